"""The ledger findings: each fires on a run built to show it and stays quiet on its healthy twin; mode-aware.

The runs are ledgers of a small numpy simulation of samples leaving their slots (task, halting step and reason,
exactness, q-halt logit), stored through the real trace store; ``etrm-doctor`` reads them like any run. The healthy
demo runs are checked in tests/test_demo_halting.py (its doctor test reads the ledger findings too).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diagnostics.trace import ledger
from diagnostics.cli import main as doctor_main
from diagnostics.doctor.ledger_doctor import diagnose_run
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter
from diagnostics.doctor.thresholds import DoctorConfig

M = 4


def simulate(tasks: int = 40, exits: int = 4000, steps: int = 400, q: str = "calibrated", never_halt: int = 0,
             unsolved: int = 0, seed: int = 0) -> list[tuple]:
    """Ledger records: each exit's task, exit step, halting, exactness (probability ``p`` drawn per exit) and a q-halt
    logit saying ``p`` (calibrated), ``p`` pushed to the extremes (overconfident) or a constant 95% (flat: nothing
    learned, far off the exact rate)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(exits):
        task = int(rng.integers(tasks)) + 1
        exit_step = 1 + i * steps // exits
        p = float(rng.uniform(0.1, 0.9))
        if task <= unsolved:
            p = 0.0
        exact = int(rng.random() < p)
        logit = math.log(max(p, 1e-3) / max(1 - p, 1e-3))
        logit = {"calibrated": logit, "overconfident": 6.0 * logit + 3.0, "flat": float(rng.normal(3.0, 0.1))}[q]
        q_halts = task <= tasks - never_halt and rng.random() < 0.7  # the last ``never_halt`` tasks never Q-halt
        used = int(rng.integers(1, M)) if q_halts else M
        reason = ledger.MAX_STEP if used == M else ledger.Q_HALT
        out.append((i, task, task, i % 8, 0, max(1, exit_step - used + 1), exit_step, used, reason, 0, exact,
                    5 * exact, 5, logit, None, used))
    return out


def write_run(tmp_path, name: str, records: list[tuple], mode: str = "reencode", steps: int = 400):
    run = tmp_path / name
    run.mkdir()
    w = TraceWriter(run / TRACE_NAME, {"mode": mode, "model": "trm" if mode == "trm" else "etrm",
                                       "max_steps_per_sample": M, "max_steps": steps, "ledger_sample_every": 1})
    w.add_counters([("halted", "halting", "")])
    w.write_steps(["halted"], [(s, 10.0) for s in range(1, steps + 1)])
    w.write_ledger(records)
    w.close()
    return run


def codes(run, mode="reencode") -> list[str]:
    return [f.code for f in diagnose_run(run, {"mode": mode}, DoctorConfig())]


def test_healthy_ledger_has_no_finding(tmp_path):
    assert codes(write_run(tmp_path, "ok", simulate())) == []


def test_q_halt_miscalibrated_fires_on_an_overconfident_q_head(tmp_path):
    run = write_run(tmp_path, "over", simulate(q="overconfident"))
    found = {f.code: f for f in diagnose_run(run, {"mode": "reencode"})}
    f = found["q-halt-miscalibrated"]
    assert f.severity == "warning" and f.first_step == 400
    assert f.evidence["calibration_error"] > 0.2 and f.evidence["window"] == [201, 400]
    assert f.evidence["mean_probability_exact"] > f.evidence["mean_probability_wrong"]
    assert "overconfident" in f.message
    # mode-aware: fct's steps are fixed, its Q-head decides nothing
    assert "q-halt-miscalibrated" not in codes(run, "fct")
    # a Q-head that has not learned (it does not rank right answers above wrong ones) is not judged on calibration
    assert codes(write_run(tmp_path, "flat", simulate(q="flat"))) == []


def test_tasks_never_halt_fires_when_some_tasks_always_run_to_the_maximum(tmp_path):
    run = write_run(tmp_path, "stuck", simulate(never_halt=4))
    f = {f.code: f for f in diagnose_run(run, {"mode": "trm"})}["tasks-never-halt"]
    assert f.evidence["tasks"] == 4 and sorted(f.evidence["task_ids"]) == [37, 38, 39, 40]
    assert f.evidence["others_q_halt_share"] >= 0.5
    assert "tasks-never-halt" not in codes(run, "fct")


def test_tasks_never_solved_is_an_info_listing_them(tmp_path):
    run = write_run(tmp_path, "unsolved", simulate(unsolved=3))
    f = {f.code: f for f in diagnose_run(run, {"mode": "fct"})}["tasks-never-solved"]
    assert f.severity == "info" and sorted(f.evidence["task_ids"]) == [1, 2, 3]
    assert f.evidence["their_exits"] >= 3 * DoctorConfig().never_solved_min_samples
    # one straggler among 120 tasks (under never_solved_min_share) is not listed
    assert codes(write_run(tmp_path, "straggler", simulate(tasks=120, unsolved=1)), "fct") == []
    # nor is a run that does not solve most tasks yet (early training: its exact curve says so)
    assert codes(write_run(tmp_path, "early", simulate(tasks=10, unsolved=6)), "fct") == []


def test_etrm_doctor_reports_ledger_findings(tmp_path, capsys):
    run = write_run(tmp_path, "cli", simulate(q="overconfident", never_halt=4))
    assert doctor_main([str(run), "--json"]) == 0  # warnings: exit 0
    out = json.loads(capsys.readouterr().out)
    assert {"q-halt-miscalibrated", "tasks-never-halt"} <= {f["code"] for f in out["findings"]}
    # what-if: a looser threshold silences it
    assert doctor_main([str(run), "--json", "--set", "calibration_error_max=0.9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "q-halt-miscalibrated" not in {f["code"] for f in out["findings"]}


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="ledger_late_share"):
        DoctorConfig(ledger_late_share=0.0)
