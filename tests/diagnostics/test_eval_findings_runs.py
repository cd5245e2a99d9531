"""The evaluation findings on real training runs built to show them, tiny and seeded (three runs, one thread each,
trained in the background from the session's start; about a minute of CPU). Healthy runs are the demo's
(``tests/test_demo_halting.py``: no finding at all).

- ``late``: a Q-head pinned at "halt" (bias +5, no Q loss, no exploration): every training sample halts at step 1,
  so the model only learns step-1 answers, and evaluation at the maximum step runs three untrained steps more.
  Held-out exact at the would-halt step (1) is far above exact at step 4: ``eval-halting-mismatch`` (late).
- ``premature``: the same pinned Q-head with exploration on every sample (``act.halt_exploration_prob=1``): training
  vetoes the step-1 halts, so samples train for 2..4 steps, while evaluation (no exploration) halts every sample at
  step 1, whose answers are far behind step 4's: ``eval-halting-mismatch`` (premature).
- ``slow-ema``: ``train.ema_rate=0.999`` (a time constant of 1000 steps) on an 80-step run: the EMA weights are
  still mostly the initial ones at the end while the raw weights have learned ``draw_border``: ``ema-gap``, named
  at the last evaluation (the one at step 40 is inside the EMA's warm-up, so not judged).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diagnostics.trace.loading import load_findings

STEPS = 80
BASE = ['data.families=["draw_border"]', "arch.hidden_size=32", "arch.num_heads=2", "arch.L_layers=1",
        "train.batch_size=32", "data.train_tasks=256", "data.heldout_tasks=16", "train.seed=0"]
PINNED = ["arch.q_init_bias=5", "loss.q_weight=0", "train.ema=false", f"train.eval_every={STEPS}"]
RUNS = {"late": [*PINNED, "act.halt_exploration_prob=0"], "premature": [*PINNED, "act.halt_exploration_prob=1"],
        "slow-ema": ["train.ema_rate=0.999", f"train.eval_every={STEPS // 2}"]}
_bin = Path(sys.executable).parent


# Trained from the session's start on the core the test session leaves idle (tests/conftest.py, BackgroundRuns).
BACKGROUND_RUNS = {"eval-findings": {
    name: ["--preset", "demo", *BASE, *extra, "--trace", "--max-steps", str(STEPS), "--device", "cpu"]
    for name, extra in RUNS.items()}}


@pytest.fixture(scope="module")
def runs(background_runs) -> dict[str, Path]:
    return background_runs.runs("eval-findings", timeout=900)


def doctor(run: Path) -> dict[str, dict]:
    out = subprocess.run([str(_bin / "etrm-doctor"), str(run), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    return {f["code"]: f for f in json.loads(out.stdout)["findings"]}


@pytest.mark.parametrize("kind, sign", [("late", -1), ("premature", 1)])
def test_a_q_head_pinned_at_halt_gives_a_halting_mismatch(kind: str, sign: int, runs) -> None:
    """late: trained at step 1 only; premature: exploration vetoed its step-1 halts in training."""
    found = doctor(runs[kind])
    f = found["eval-halting-mismatch"]
    assert f["first_step"] == STEPS and f["evidence"]["kind"] == kind
    assert f["evidence"]["mean_would_halt_step"] == 1.0
    assert sign * (f["evidence"]["exact_at_max_step"] - f["evidence"]["exact_at_would_halt"]) >= 0.1
    assert "ema-gap" not in found  # EMA off: only the raw weights are audited
    stored = load_findings(runs[kind]).set_index("code")  # the trainer's live doctor named it at the same eval
    assert stored.loc["eval-halting-mismatch", "first_step"] == STEPS


def test_an_ema_slower_than_the_run_gives_an_ema_gap(runs) -> None:
    found = doctor(runs["slow-ema"])
    f = found["ema-gap"]
    # the last evaluation: at step 40 the gap was there too, but inside the EMA's warm-up (3000 steps)
    assert f["first_step"] == STEPS
    assert f["severity"] == "warning" and f["evidence"]["direction"] == "ema-worse"
    assert f["evidence"]["raw_exact"] - f["evidence"]["ema_exact"] >= 0.1
    assert "eval-halting-mismatch" not in found
    stored = load_findings(runs["slow-ema"]).set_index("code")
    assert stored.loc["ema-gap", "first_step"] == STEPS
