"""``etrm-train``: bad input is one line and exit 2 with nothing written; every model/mode trains end to end."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from diagnostics.trace.liveness import LOCK_NAME
from etrm.cli import main
from etrm.config import Config
from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from etrm.train.rundir import CONFIG_NAME

PREFIX = "etrm-train: error:"


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(PREFIX), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Bad input, in process: exit 2, one line, and no run directory appears (neither the named one nor runs/...).

@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text('model = "trm\n[arch\nhidden_size = \n')
    return tmp_path


BAD_INPUT = {
    "unknown-preset": (["--preset", "nope"], ["'nope'", "demo-trm"]),
    "unknown-key": (["arch.foo=1"], ["foo", "hidden_size"]),
    "bad-value-int": (["act.halt_max_steps=0"], ["act.halt_max_steps=0", ">= 1"]),
    "bad-value-choice": (["encoder.mode=bogus"], ["encoder.mode", "bogus", "reencode"]),
    "bad-override-syntax": (["arch.hidden_size"], ["arch.hidden_size", "key=value"]),
    "resume-without-run-dir": (["--resume"], ["--resume", "--run-dir"]),
    "config-missing": (["--config", "missing.toml"], ["missing.toml", "does not exist"]),
    "config-malformed": (["--config", "bad.toml"], ["bad.toml", "not valid TOML"]),
    "unknown-flag": (["--bogus"], ["--bogus"]),
    # an override after an option is still an override (and still validated), not an "unrecognized argument"
    "override-after-option": (["arch.hidden_size=16", "--max-steps", "3", "act.halt_max_steps=0"],
                              ["act.halt_max_steps=0 is not valid", ">= 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, in_tmp: Path, capsys) -> None:
    args, needles = BAD_INPUT[case]
    before = sorted(p.name for p in in_tmp.iterdir())
    run_dir = in_tmp / "run"
    extra = [] if case == "resume-without-run-dir" else ["--run-dir", str(run_dir)]
    code = main([*args, *extra])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, *needles)
    assert out == ""
    assert not run_dir.exists()
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # no runs/ either


def test_existing_run_dir_without_resume_is_refused_untouched(tmp_path: Path, capsys, dir_snapshot, tiny) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "sentinel.txt").write_text("keep me")
    (run_dir / CONFIG_NAME).write_text('model = "etrm"\n')
    before = dir_snapshot(run_dir)
    code = main(["--preset", "demo", "--run-dir", str(run_dir), "--max-steps", "2", *tiny])
    assert_one_line_error(code, capsys.readouterr().err, str(run_dir), "already exists", "--resume")
    assert dir_snapshot(run_dir) == before


def test_resume_refuses_config_changes(trained_run: Path, tmp_path: Path, capsys, dir_snapshot) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = dir_snapshot(run_dir)
    for args in (["arch.hidden_size=32"], ["--preset", "demo-trm"], ["--seed", "3"]):
        code = main(["--resume", "--run-dir", str(run_dir), "--max-steps", "6", *args])
        assert_one_line_error(code, capsys.readouterr().err, "--resume")
    assert dir_snapshot(run_dir) == before


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["--resume", "--run-dir", str(tmp_path / "empty")])
    assert_one_line_error(code, capsys.readouterr().err, CONFIG_NAME)
    assert list((tmp_path / "empty").iterdir()) == []


def test_resume_with_truncated_checkpoint(trained_run: Path, tmp_path: Path, capsys, dir_snapshot) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = dir_snapshot(run_dir)
    code = main(["--resume", "--run-dir", str(run_dir), "--max-steps", "6"])
    assert_one_line_error(code, capsys.readouterr().err, "corrupt")
    assert dir_snapshot(run_dir) == before


def test_resume_with_checkpoint_of_another_config(trained_run: Path, tmp_path: Path, capsys, dir_snapshot) -> None:
    """A readable checkpoint whose shapes do not fit the run's config.toml (edited by hand) is bad input too."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    cfg = run_dir / CONFIG_NAME
    cfg.write_text(cfg.read_text().replace("hidden_size = 16", "hidden_size = 32"))
    before = dir_snapshot(run_dir)
    code = main(["--resume", "--run-dir", str(run_dir), "--max-steps", "6"])
    assert_one_line_error(code, capsys.readouterr().err, "arch.hidden_size", "differs from the checkpoint")
    assert dir_snapshot(run_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_bad_input(tmp_path: Path, capsys, tiny) -> None:
    code = main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), "--device", "cuda", *tiny])
    assert_one_line_error(code, capsys.readouterr().err, "cuda")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input in a separate process: what a user sees, with no traceback from the lazy imports or the loaders.

@pytest.mark.parametrize("args, needles", [
    (["--preset", "nope"], ["'nope'"]),
    (["encoder.mode=bogus", "--max-steps", "3"], ["encoder.mode", "bogus"]),
])
def test_bad_input_subprocess(args: list[str], needles: list[str], run_cli, tmp_path: Path) -> None:
    proc = run_cli(*args, "--run-dir", "run")
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_corrupt_checkpoint_subprocess(trained_run: Path, tmp_path: Path, run_cli, dir_snapshot) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    garbage = bytes(range(256)) * 4
    (run_dir / CHECKPOINT_NAME).write_bytes(garbage)
    before = dir_snapshot(run_dir)
    proc = run_cli("--resume", "--run-dir", str(run_dir), "--max-steps", "6")
    line = assert_one_line_error(proc.returncode, proc.stderr, str(run_dir / CHECKPOINT_NAME), "corrupt")
    assert "weights_only" not in line  # torch's advice to load unsafely is not a message for users
    assert dir_snapshot(run_dir) == before
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == garbage


# ---------------------------------------------------------------------------------------------------------------
# Every model/mode end to end: exit 0, config.toml that parses back to the same run, a checkpoint at the last step.

@pytest.mark.parametrize("mode", ["trm", "cached", "fct"])
def test_mode_trains_end_to_end(mode: str, tmp_path: Path, capsys, tiny, mode_args) -> None:
    run_dir = tmp_path / "run"
    # options and overrides interleaved, as users type them
    code = main([*mode_args(mode), "--max-steps", "6", *tiny, "--run-dir", str(run_dir),
                 "--device", "cpu", "train.checkpoint_every=4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    assert f"mode {mode}" in out and "etrm-train summary" in out

    saved = tomllib.loads((run_dir / CONFIG_NAME).read_text())
    assert saved["model"] == ("trm" if mode == "trm" else "etrm")
    if mode != "trm":
        assert saved["encoder"]["mode"] == mode
    assert saved["train"]["max_steps"] == 6 and saved["arch"]["hidden_size"] == 16
    cfg = Config.from_dict(saved)  # the written config is a valid config, equal to the resolved one
    assert cfg.to_dict() == Config.from_dict(load_checkpoint(run_dir)["config"]).to_dict()

    state = load_checkpoint(run_dir)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([CHECKPOINT_NAME, CONFIG_NAME, LOCK_NAME])


def test_check_invariants_passes_a_healthy_run_and_stops_a_faulty_one(tmp_path: Path, capsys, tiny) -> None:
    """``--check-invariants``: a healthy run finishes (exit 0); label-from-batch stops at its first step with a
    continuing slot, exit 1, naming the invariant; no checkpoint is written for the bad step."""
    assert main(["--preset", "demo", *tiny, "--max-steps", "4", "--check-invariants",
                 "--run-dir", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad"
    code = main(["--preset", "demo", *tiny, "fault=label-from-batch", "--max-steps", "6", "--check-invariants",
                 "--run-dir", str(bad)])
    err = capsys.readouterr().err
    assert code == 1
    assert "invariant 'loss-labels-aligned' violated at step 2" in err
    assert len(err.strip().splitlines()) == 1
    assert not (bad / CHECKPOINT_NAME).exists()
