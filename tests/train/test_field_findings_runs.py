"""The field's findings on real tiny runs (in process, one thread; a few seconds each), named live by the trainer's
doctor and by ``etrm-doctor`` (a subprocess) at the same step:

- a learning rate raised 10^5-fold on resume: the gradient norm spikes (finite, ~1e10) one step before everything
  goes non-finite, and the non-finite stop's line names the spike; the live console labels the error finding ``error``;
- a slowdown switched on mid-run in the data phase (a test instrument that sleeps at the end of the phase from step
  N: no fault branch in the model): ``step-time-regression`` names ``data`` at or after N, ``phase-dominates`` too;
- ``train.keep_best``: ``checkpoint_best.pt`` re-evaluates to the best evaluation's score, ``--resume`` continues
  from ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diagnostics.trace.loading import load_evals, load_findings
from etrm.train import instrument_setup
from etrm.train.checkpoint import read_torch_file
from etrm.train.console import Reporter
from etrm.train.instruments import Instrument
from etrm.train.retention import BEST_INFO, BEST_NAME
from etrm.train.trainer import Trainer

from conftest import tiny_config

_bin = Path(sys.executable).parent


def doctor(run: Path) -> dict[str, dict]:
    out = subprocess.run([str(_bin / "etrm-doctor"), str(run), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    return {f["code"]: f for f in json.loads(out.stdout)["findings"]}


def traced(cfg, run_dir: Path, resume: bool = False) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, device=torch.device("cpu"))
    if resume:
        trainer.resume()
    instrument_setup.build(trainer, instrument_setup.Options(trace=True))
    return trainer


SPIKE = ["train.grad_clip=0", "train.trace_every=5", "train.eval_every=100"]  # the doctor's default thresholds


def test_field_findings_lr_raise_spikes_before_non_finite_and_the_stop_line_names_it(tmp_path, capsys) -> None:
    cfg = tiny_config("demo", *SPIKE)
    run = tmp_path / "spike"
    traced(cfg, run).run(30, Reporter(30, live=False))
    trainer = traced(cfg, run, resume=True)  # a resume with a changed learning rate
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["base_lr"] *= 1e5
    result = trainer.run(60, Reporter(60, live=False))
    assert result.non_finite
    stored = load_findings(run).set_index("code")
    spike = int(stored.loc["grad-norm-spike", "first_step"])
    assert 30 < spike < int(stored.loc["non-finite-loss", "first_step"])  # the step after the raise: finite, 1e10
    assert f"preceded by grad-norm-spike at step {spike}" in result.message
    found = doctor(run)
    assert found["grad-norm-spike"]["first_step"] == spike  # live equals offline
    assert found["non-finite-loss"]["first_step"] == int(stored.loc["non-finite-loss", "first_step"])
    out = " ".join(capsys.readouterr().out.split())
    assert "error: non-finite-loss" in out and "warning: grad-norm-spike" in out


class SlowData(Instrument):
    """A slowdown seam for tests: from optimizer step ``start`` on, the data phase takes ``seconds`` longer (it
    sleeps before the tracer's clock stops the phase: instruments stop in reverse order)."""

    times_phases = True

    def __init__(self, start: int, seconds: float) -> None:
        self.start, self.seconds, self.step = start, seconds, 0

    def before_step(self, step, carry):
        self.step = step + 1

    def end_phase(self, name):
        if name == "data" and self.step >= self.start:
            time.sleep(self.seconds)


def test_field_findings_slowdown_from_step_n_is_named_with_its_phase(tmp_path) -> None:
    cfg = tiny_config("demo", "train.trace_every=5", "train.eval_every=100",
                      "doctor.slow_warmup_steps=4", "doctor.slow_window=6")
    trainer = traced(cfg, tmp_path / "slow")
    trainer.add(SlowData(start=20, seconds=0.25))
    trainer.run(34, Reporter(34, live=False))
    stored = load_findings(trainer.run_dir).set_index("code")
    found = doctor(trainer.run_dir)
    for code in ("step-time-regression", "phase-dominates"):
        assert found[code]["evidence"]["phase"] == "data"
        assert 20 <= found[code]["first_step"] == int(stored.loc[code, "first_step"])


def test_field_findings_keep_best_reevaluates_to_the_peak_and_resume_uses_the_last(tmp_path) -> None:
    cfg = tiny_config("demo", "train.trace_every=5", "train.eval_every=10", "train.keep_best=true",
                      "train.best_metric=token", "train.checkpoint_every=1000")
    run = tmp_path / "best"
    trainer = traced(cfg, run)
    trainer.run(40, Reporter(40, live=False))
    evals = load_evals(run)["token"]
    info = json.loads((run / BEST_INFO).read_text())
    assert info["step"] == int(evals.idxmax()) and info["value"] == pytest.approx(evals.max())
    state = read_torch_file(run / BEST_NAME, "")
    assert state["step"] == info["step"]
    again = Trainer(cfg, run, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert again.evaluate()["token"] == pytest.approx(info["value"])
    resumed = Trainer(cfg, run, device=torch.device("cpu"))
    resumed.resume()
    assert resumed.step == 40  # checkpoint.pt, not the best
