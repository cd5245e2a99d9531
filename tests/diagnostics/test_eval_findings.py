"""The evaluation findings on audits built to show them (and not on ones that should not): eval-halting-mismatch in
both directions, ema-gap in both directions, their thresholds, modes and warm-up; the live doctor agrees with the
offline one; ``etrm-doctor`` reports them from a stored trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diagnostics.trace.eval_audits import ActStep, EvalAudit
from diagnostics.doctor.eval_findings import LiveEvalDoctor, audit_rows, diagnose_evals
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter
from diagnostics.doctor.thresholds import DoctorConfig


def audit(step: int, curve, halt_exact: float, weights: str = "ema", count: float = 64,
          halt_shares=None) -> EvalAudit:
    t = len(curve)
    shares = halt_shares or [0.0] * (t - 1) + [1.0]
    steps = tuple(ActStep(k + 1, float(e), float(e), float(s)) for k, (e, s) in enumerate(zip(curve, shares)))
    return EvalAudit(step, weights, "abc123", "q_halt > 0", count, halt_exact, halt_exact, 2.0, steps)


def meta(mode: str = "reencode", ema_rate: float = 0.99, max_steps: int = 1000) -> dict:
    return {"mode": mode, "max_steps": max_steps, "config": {"train": {"ema": True, "ema_rate": ema_rate}}}


def codes(audits, m=None, cfg=None) -> dict[str, object]:
    return {f.code: f for f in diagnose_evals(audit_rows(audits), m or meta(), cfg)}


def test_premature_halting_is_named_with_its_eval_step_and_curve() -> None:
    found = codes([audit(100, [0.1, 0.2, 0.3, 0.3], 0.28),  # healthy: within 0.1
                   audit(200, [0.1, 0.3, 0.5, 0.6], 0.2, halt_shares=[0.5, 0.5, 0.0, 0.0])])
    f = found["eval-halting-mismatch"]
    assert f.first_step == 200 and f.severity == "warning"
    assert f.evidence["kind"] == "premature" and f.evidence["gap"] == pytest.approx(0.4)
    assert f.evidence["exact_per_act_step"] == [0.1, 0.3, 0.5, 0.6]
    assert f.evidence["would_halt_share_per_act_step"] == [0.5, 0.5, 0.0, 0.0]
    assert "overstates" in f.message


def test_answers_degrading_past_the_would_halt_step_are_named_late() -> None:
    f = codes([audit(300, [0.5, 0.3, 0.2, 0.1], 0.5)])["eval-halting-mismatch"]
    assert f.evidence["kind"] == "late" and f.evidence["best_act_step"] == 1 and "understates" in f.message


@pytest.mark.parametrize("why, audits, m, cfg", [
    ("a gap under the threshold", [audit(100, [0.2, 0.5], 0.41)], meta(), None),
    ("too few samples", [audit(100, [0.2, 0.9], 0.2, count=16)], meta(), None),
    ("fct halts at fixed steps", [audit(100, [0.2, 0.9], 0.2)], meta("fct"), None),
    ("the what-if threshold", [audit(100, [0.2, 0.9], 0.2)], meta(), DoctorConfig(eval_halt_gap=0.8)),
])
def test_no_halting_mismatch_where_it_should_not_fire(why, audits, m, cfg) -> None:
    assert "eval-halting-mismatch" not in codes(audits, m, cfg), why


def test_the_evaluated_weights_are_judged_for_halting() -> None:
    """With EMA on, the EMA audit is what evaluation reports; a mismatch of the raw weights alone is not named."""
    raw_only = [audit(100, [0.1, 0.9], 0.1, weights="raw"), audit(100, [0.5, 0.5], 0.5, weights="ema")]
    assert "eval-halting-mismatch" not in codes(raw_only)
    no_ema = [audit(100, [0.1, 0.9], 0.1, weights="raw")]  # EMA off: raw is the evaluated one
    assert codes(no_ema)["eval-halting-mismatch"].evidence["weights"] == "raw"


def test_an_ema_worse_than_raw_past_its_warm_up_is_a_warning() -> None:
    # rate 0.99: warm-up 3 time constants = 300 steps; the gap at step 200 is the EMA catching up, not a finding
    audits = [audit(200, [0.0, 0.1], 0.1), audit(200, [0.3, 0.6], 0.6, weights="raw"),
              audit(400, [0.2, 0.3], 0.3), audit(400, [0.3, 0.6], 0.6, weights="raw")]
    f = codes(audits)["ema-gap"]
    assert f.first_step == 400 and f.severity == "warning"
    assert f.evidence["direction"] == "ema-worse" and f.evidence["gap"] == pytest.approx(-0.3)
    assert f.evidence["warmup_steps"] == pytest.approx(300)


def test_an_ema_better_than_raw_is_info_and_the_last_eval_is_judged_even_in_warm_up() -> None:
    audits = [audit(100, [0.5, 0.7], 0.7), audit(100, [0.2, 0.4], 0.4, weights="raw")]
    assert "ema-gap" not in codes(audits, meta(ema_rate=0.999, max_steps=1000))  # warm-up 3000 steps
    f = codes(audits, meta(ema_rate=0.999, max_steps=100))["ema-gap"]  # step 100 is the run's last
    assert f.severity == "info" and f.evidence["direction"] == "ema-better"


@pytest.mark.parametrize("why, audits, cfg", [
    ("no raw audit", [audit(400, [0.0, 0.1], 0.1)], None),
    ("a gap under the threshold", [audit(400, [0.2, 0.5], 0.5), audit(400, [0.2, 0.55], 0.5, weights="raw")], None),
    ("the what-if threshold", [audit(400, [0.2, 0.1], 0.1), audit(400, [0.2, 0.6], 0.6, weights="raw")],
     DoctorConfig(ema_gap=0.6)),
])
def test_no_ema_gap_where_it_should_not_fire(why, audits, cfg) -> None:
    assert "ema-gap" not in codes(audits, cfg=cfg), why


def test_the_live_doctor_names_the_same_findings_at_the_same_steps() -> None:
    stream = [[audit(100, [0.1, 0.2], 0.2), audit(100, [0.1, 0.2], 0.2, weights="raw")],
              [audit(400, [0.1, 0.6], 0.1), audit(400, [0.1, 0.2], 0.2, weights="raw")],
              [audit(500, [0.1, 0.7], 0.1), audit(500, [0.1, 0.1], 0.1, weights="raw")]]
    live = LiveEvalDoctor(meta())
    seen = [[f.code for f in live.update(batch)] for batch in stream]
    assert seen == [[], ["eval-halting-mismatch", "ema-gap"], []]  # each named once, when it first holds
    offline = {f.code: f.first_step for f in diagnose_evals(audit_rows(a for b in stream for a in b), meta())}
    assert offline == {f.code: f.first_step for f in live.findings} == {"eval-halting-mismatch": 400, "ema-gap": 400}


def test_etrm_doctor_reports_evaluation_findings_from_the_trace(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / TRACE_NAME, {"model": "etrm", **meta()})
    w.add_counters([("slots", "resets", "slots per step")])
    w.write_steps(["slots"], [(s, 8.0) for s in range(1, 401)])
    w.write_eval_audits([audit(400, [0.1, 0.6], 0.1), audit(400, [0.1, 0.6], 0.1, weights="raw")])
    w.marker("end", 400)
    w.close()
    out = subprocess.run([sys.executable, "-m", "diagnostics.cli", str(tmp_path), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # warnings only
    found = {f["code"]: f for f in json.loads(out.stdout)["findings"]}
    assert set(found) == {"eval-halting-mismatch"} and found["eval-halting-mismatch"]["first_step"] == 400


def test_a_resumed_live_doctor_does_not_name_a_stored_finding_again() -> None:
    stored = audit_rows([audit(400, [0.1, 0.6], 0.1)])
    live = LiveEvalDoctor(meta())
    assert [f.code for f in live.replay(stored)] == ["eval-halting-mismatch"]  # held before the resume
    assert live.update([audit(500, [0.1, 0.7], 0.1)]) == []
    assert [f.first_step for f in live.findings] == [400]
