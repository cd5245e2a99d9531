"""``--resume`` safety: odd run paths, config drift refused with the differing keys, the resume allow-list, and what
is printed on resume (the step resumed from; how to extend a finished run)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from diagnostics.trace.loading import load_run
from etrm.cli import main
from etrm.train.checkpoint import load_checkpoint
from etrm.train.rundir import CONFIG_NAME
from test_cli import assert_one_line_error


def test_traced_run_with_odd_path_resumes(tmp_path: Path, tiny) -> None:
    """Train, then ``--resume``, a traced run whose directory holds ``#`` and ``?``: no traceback, no stray file."""
    run = tmp_path / "a#b?c d"
    assert main(["--preset", "demo", "--run-dir", str(run), "--max-steps", "2", "--device", "cpu", "--trace",
                 *tiny]) == 0
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--resume", "--run-dir", str(run), "--max-steps", "4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == outside
    df = load_run(run)
    assert list(df.index) == [1, 2, 3, 4]


def _copy(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_config_drift_is_refused_with_the_differing_keys(trained_run: Path, tmp_path: Path, capsys,
                                                         dir_snapshot) -> None:
    """The reported failure: config.toml edited from reencode to cached, then resumed, used to train cached."""
    run = _copy(trained_run, tmp_path)
    cfg = run / CONFIG_NAME
    cfg.write_text(cfg.read_text().replace('mode = "reencode"', 'mode = "cached"').replace("lr = 0.001", "lr = 0.002"))
    before = dir_snapshot(run)
    code = main(["--resume", "--run-dir", str(run), "--max-steps", "6"])
    line = assert_one_line_error(code, capsys.readouterr().err, "encoder.mode", "'reencode' in the checkpoint",
                                 "'cached'", "train.lr", "start a new run")
    assert "train.max_steps" not in line.split("(only")[0]  # an allowed change is not a reason to refuse
    assert dir_snapshot(run) == before


def test_override_outside_the_allow_list_is_refused(trained_run: Path, tmp_path: Path, capsys, dir_snapshot) -> None:
    run = _copy(trained_run, tmp_path)
    before = dir_snapshot(run)
    code = main(["--resume", "--run-dir", str(run), "--max-steps", "6", "encoder.mode=cached"])
    assert_one_line_error(code, capsys.readouterr().err, "encoder.mode cannot change on resume", "train.max_steps")
    assert dir_snapshot(run) == before


def test_allowed_overrides_are_applied_printed_and_kept(trained_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(trained_run, tmp_path)
    assert main(["--resume", "--run-dir", str(run), "--max-steps", "6", "train.eval_every=3",
                 "train.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out
    assert "changed on resume: train.eval_every: 5 -> 3" in out
    assert "changed on resume: train.max_steps: 4 -> 6" in out
    saved = tomllib.loads((run / CONFIG_NAME).read_text())["train"]
    assert (saved["eval_every"], saved["checkpoint_every"], saved["max_steps"]) == (3, 2, 6)
    state = load_checkpoint(run)
    assert state["step"] == 6 and state["config"]["train"]["eval_every"] == 3
    # the next resume compares against what this one ran with: nothing to report, nothing refused
    assert main(["--resume", "--run-dir", str(run), "--max-steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 6" in out and "train.eval_every" not in out


def test_resuming_a_finished_run_says_how_to_extend_it(trained_run: Path, tmp_path: Path, capsys,
                                                       dir_snapshot) -> None:
    run = _copy(trained_run, tmp_path)
    before = dir_snapshot(run)
    assert main(["--resume", "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "already finished at step 4" in err and f"--resume --run-dir {run} --max-steps 8" in err
    assert dir_snapshot(run) == before
