"""No command destroys a run, every bad value is refused (issue 24), as real processes in the style of
``tests/test_bad_input.py``: exit 2, one line naming what is wrong, no traceback, the working tree (the run
directories included) byte-identical; nothing left behind (no data cache)."""

from __future__ import annotations

import importlib
import io
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.test_bad_input import TINY, assert_one_line, run_prog, snapshot

RUN = "runs/r"


@pytest.fixture(scope="session")
def reliability_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, traced 4-step tiny run with a checkpoint at step 4; copied by each case before use."""
    root = tmp_path_factory.mktemp("reliability")
    proc = run_prog("etrm-train", ["--preset", "demo", "--run-dir", RUN, "--trace", *TINY[:-2], "--max-steps", "4",
                                   "train.checkpoint_every=2", "train.trace_every=1"], root)
    assert proc.returncode == 0, proc.stderr
    return root / RUN


def _edit_checkpoint(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / RUN / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return setup


def _nan_weight(state: dict) -> None:
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")


def _nan_optimizer(state: dict) -> None:
    moments = next(s for s in state["optimizers"][0]["state"].values())
    moments["exp_avg"].view(-1)[0] = float("inf")


def _corrupt_bytes(tmp: Path) -> None:
    """Flip bytes in the middle of the largest tensor record of the checkpoint's zip (its CRC no longer holds)."""
    path = tmp / RUN / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    info = max(zipfile.ZipFile(io.BytesIO(bytes(data))).infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    for i in range(start + info.file_size // 2, start + info.file_size // 2 + 8):
        data[i] ^= 0x01  # the low bits of a float: still finite, just wrong
    path.write_bytes(bytes(data))


def _meta_not_json(tmp: Path) -> None:
    with sqlite3.connect(tmp / RUN / "trace.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '{not json' WHERE key != 'schema_version'")
    conn.close()


def _existing(tmp: Path) -> None:
    (tmp / "steps.csv").write_text("mine\n")


# name -> (program, args, needles in the one line, setup(tmp) run after the trained run is copied in)
CASES: dict[str, tuple[str, list[str], list[str], Callable[[Path], None] | None]] = {
    # no command destroys a run
    "export-over-the-trace": ("etrm-doctor", [RUN, "--export", "csv", f"{RUN}/trace.sqlite"], ["run directory"], None),
    "export-over-the-checkpoint": ("etrm-doctor", [RUN, "--export", "parquet", f"{RUN}/checkpoint.pt"],
                                   ["run directory"], None),
    "export-over-the-config-forced": ("etrm-doctor", [RUN, "--export", "csv", f"{RUN}/config.toml", "--force"],
                                      ["run directory"], None),
    "export-new-file-in-the-run": ("etrm-doctor", [RUN, "--export", "csv", f"{RUN}/steps.csv"], ["run directory"],
                                   None),
    "export-over-an-existing-file": ("etrm-doctor", [RUN, "--export", "csv", "steps.csv"],
                                     ["already exists", "--force"], _existing),
    # every bad value refused
    "doctor-set-huge-window": ("etrm-doctor", [RUN, "--set", f"window={10 ** 30}"], ["window="], None),
    "doctor-set-nan": ("etrm-doctor", [RUN, "--set", "coverage_min=nan"], ["coverage_min=nan"], None),
    "doctor-set-negative": ("etrm-doctor", [RUN, "--set", "ema_gap=-1"], ["ema_gap=-1"], None),
    "doctor-meta-not-json": ("etrm-doctor", [RUN], ["meta"], _meta_not_json),
    "seed-negative": ("etrm-train", ["--run-dir", "new", *TINY, "--seed", "-1"], ["train.seed=-1"], None),
    "seed-above-2-64": ("etrm-train", ["--run-dir", "new", *TINY, f"train.seed={2 ** 64 + 1}"], ["train.seed="], None),
    "data-seed-negative": ("etrm-train", ["--run-dir", "new", *TINY, "data.seed=-5"], ["data.seed=-5"], None),
    "doctor-threshold-nan-in-config": ("etrm-train", ["--run-dir", "new", *TINY, "doctor.coverage_min=nan"],
                                       ["doctor.coverage_min=nan"], None),
    "doctor-threshold-out-of-range": ("etrm-train", ["--run-dir", "new", *TINY, "doctor.early_halt_share=3"],
                                      ["doctor.early_halt_share=3"], None),
    "run-dir-empty": ("etrm-train", ["--run-dir", "", *TINY], ["--run-dir", "empty"], None),
    "run-dir-name-too-long": ("etrm-train", ["--run-dir", "x" * 300, *TINY], ["too long"], None),
    "max-steps-absurd": ("etrm-train", ["--run-dir", "new", *TINY, "--max-steps", str(10 ** 20)],
                         ["train.max_steps="], None),
    "act-steps-absurd": ("etrm-train", ["--run-dir", "new", *TINY, f"act.halt_max_steps={10 ** 9}"],
                         ["act.halt_max_steps="], None),
    "maze-tasks-absurd": ("etrm-train", ["--run-dir", "new", *TINY, "model=trm", "data.dataset=maze",
                                         f"data.train_tasks={10 ** 12}"], ["GiB", "data.train_tasks"], None),
    "batch-absurd": ("etrm-train", ["--run-dir", "new", *TINY, f"train.batch_size={10 ** 8}"],
                     ["GiB", "train.batch_size"], None),
    # checkpoints validated before anything changes on resume
    "resume-negative-step": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"], ["step -3"],
                             _edit_checkpoint(lambda s: s.update(step=-3))),
    "resume-step-not-an-integer": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"], ["step"],
                                   _edit_checkpoint(lambda s: s.update(step="four"))),
    "resume-nan-weight": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"], ["not finite", "model."],
                          _edit_checkpoint(_nan_weight)),
    "resume-inf-optimizer-state": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"],
                                   ["not finite", "optimizers"], _edit_checkpoint(_nan_optimizer)),
    "resume-corrupt-bytes": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"], ["corrupt"],
                             _corrupt_bytes),
    "resume-shape-mismatch": ("etrm-train", ["--run-dir", RUN, "--resume", "--max-steps", "6"], ["shape"],
                              _edit_checkpoint(lambda s: s["model"].update(
                                  {k: torch.zeros(3) for k in list(s["model"])[:1]}))),
    "resume-device-cuda": ("etrm-train", ["--run-dir", RUN, "--resume", "--device", "cuda"], ["CUDA"], None),
}


# One case per class runs as a real process (the CLI's own entry point); every case also runs in-process (fast).
PROCESSES = ("export-over-the-trace", "seed-negative", "doctor-set-nan", "maze-tasks-absurd", "resume-nan-weight",
             "resume-device-cuda")
MAINS = {"etrm-train": "etrm.cli", "etrm-doctor": "diagnostics.cli"}


def _prepare(case: str, tmp_path: Path, reliability_run: Path) -> None:
    if case == "resume-device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    shutil.copytree(reliability_run, tmp_path / RUN)
    setup = CASES[case][3]
    if setup is not None:
        setup(tmp_path)


@pytest.mark.parametrize("case", PROCESSES)
def test_reliability_bad_input_process(case: str, tmp_path: Path, reliability_run: Path) -> None:
    prog, args, needles, _ = CASES[case]
    _prepare(case, tmp_path, reliability_run)
    before = snapshot(tmp_path)
    assert_one_line(run_prog(prog, args, tmp_path), prog, needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", list(CASES))
def test_reliability_bad_input(case: str, tmp_path: Path, reliability_run: Path, monkeypatch, capsys) -> None:
    prog, args, needles, _ = CASES[case]
    _prepare(case, tmp_path, reliability_run)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = importlib.import_module(MAINS[prog]).main(list(args))  # an exception here is the traceback a user sees
    out, err = capsys.readouterr()
    assert_one_line(subprocess.CompletedProcess(args, code, out, err), prog, needles)
    assert snapshot(tmp_path) == before


def test_reliability_export_force_replaces_only_outside_runs(tmp_path: Path, reliability_run: Path, monkeypatch,
                                                            capsys) -> None:
    """``--force`` replaces an existing file outside run directories, atomically (no temporary file is left)."""
    from diagnostics.cli import main

    shutil.copytree(reliability_run, tmp_path / RUN)
    _existing(tmp_path)
    run_before = snapshot(tmp_path / RUN)
    monkeypatch.chdir(tmp_path)
    assert main([RUN, "--export", "csv", "steps.csv", "--force"]) == 0, capsys.readouterr().err
    assert "coverage_num" in (tmp_path / "steps.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "steps.csv"]
    assert snapshot(tmp_path / RUN) == run_before
