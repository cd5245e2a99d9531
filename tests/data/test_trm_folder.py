"""The upstream data-folder reader, on a folder written here in upstream's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from etrm.cli import main
from etrm.data.trm_folder import FolderError, read_trm_folder


def write_split(d: Path, inputs, labels, pids, pidx, gidx, ignore=0, vocab=12, num_ids=5) -> None:
    d.mkdir(parents=True)
    np.save(d / "all__inputs.npy", np.asarray(inputs, np.uint8))
    np.save(d / "all__labels.npy", np.asarray(labels, np.uint8))
    np.save(d / "all__puzzle_identifiers.npy", np.asarray(pids, np.int32))
    np.save(d / "all__puzzle_indices.npy", np.asarray(pidx, np.int32))
    np.save(d / "all__group_indices.npy", np.asarray(gidx, np.int32))
    meta = {"pad_id": 0, "ignore_label_id": ignore, "blank_identifier_id": 0, "vocab_size": vocab,
            "seq_len": len(inputs[0]), "num_puzzle_identifiers": num_ids, "total_groups": len(gidx) - 1,
            "mean_puzzle_examples": 1.0, "total_puzzles": len(pids), "sets": ["all"]}
    (d / "dataset.json").write_text(json.dumps(meta))


def make_folder(root: Path, ids=(1, 2, 3)) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 12, (5, 9))
    y = rng.integers(0, 12, (5, 9))
    write_split(root / "train", x, y, list(ids[:2]), [0, 2, 5], [0, 2])
    write_split(root / "test", x[:2], y[:2], [ids[2]], [0, 2], [0, 1])
    return root


def test_reads_back(tmp_path: Path):
    root = make_folder(tmp_path / "d")
    train, test, info = read_trm_folder(root)
    x = np.load(root / "train/all__inputs.npy")
    y = np.load(root / "train/all__labels.npy")
    assert np.array_equal(train.inputs, x)
    assert np.array_equal(train.labels, np.where(y == 0, -100, y.astype(np.int64)))
    assert train.puzzle_ids.tolist() == [1, 1, 2, 2, 2]
    assert test.puzzle_ids.tolist() == [3, 3]
    assert info["vocab_size"] == 12 and info["seq_len"] == 9 and info["num_puzzle_ids"] == 5


def test_id_zero_is_shifted(tmp_path: Path):
    train, test, info = read_trm_folder(make_folder(tmp_path / "d", ids=(0, 0, 0)))
    assert set(train.puzzle_ids.tolist()) == {1} and info["num_puzzle_ids"] == 6


def test_bad_folders(tmp_path: Path):
    with pytest.raises(FolderError, match="does not exist"):
        read_trm_folder(tmp_path / "nope")
    root = make_folder(tmp_path / "d")
    (root / "test/dataset.json").write_text("{not json")
    with pytest.raises(FolderError, match="not valid JSON"):
        read_trm_folder(root)
    root = make_folder(tmp_path / "e")
    (root / "train/all__labels.npy").unlink()
    with pytest.raises(FolderError, match="missing"):
        read_trm_folder(root)


def _one_line(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("etrm-train: error:"), err
    for n in needles:
        assert n in err[0], err[0]


TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.H_cycles=1",
        "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=4"]


def test_cli_bad_input(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, main(["--preset", "demo-trm", "data.dataset=trm-folder", f"data.path={tmp_path / 'x'}"]),
              "does not exist")
    bad = make_folder(tmp_path / "bad")
    (bad / "train/dataset.json").write_text("[")
    _one_line(capsys, main(["--preset", "demo-trm", "data.dataset=trm-folder", f"data.path={bad}"]), "JSON")
    _one_line(capsys, main(["--preset", "demo-trm", "data.dataset=imagenet"]), "data.dataset")
    _one_line(capsys, main(["--preset", "demo-trm", "data.dataset=arc1", "data.canvas=10", "data.strict=true"]),
              "larger than")
    _one_line(capsys, main(["--preset", "demo", "data.dataset=sudoku"]), "model=trm")
    assert not (tmp_path / "runs").exists()


def test_cli_trains_on_folder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "d")
    assert main(["--preset", "demo-trm", "data.dataset=trm-folder", f"data.path={root}", "--run-dir",
                 str(tmp_path / "run"), *TINY]) == 0
