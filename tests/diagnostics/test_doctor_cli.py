"""etrm-doctor: exit codes (0 healthy, 1 error finding, 2 bad input), the JSON shape, the report, the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diagnostics.cli import main
from diagnostics.trace.schema import TRACE_NAME


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_healthy_run_exits_0_with_a_report(sim, meta, make_run, capsys):
    run = make_run("healthy", sim(), meta())
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "no findings" in out and "encoder gradient coverage" in out and "(coverage)" in out


def test_json_shape(sim, meta, make_run, capsys):
    run = make_run("healthy", sim(), meta(), evals={60: {"exact": 0.5}})
    code, doc = run_json(capsys, str(run))
    assert code == 0
    assert set(doc) >= {"summary", "findings"} and doc["findings"] == []
    s = doc["summary"]
    assert s["figures"]["coverage"] == 1.0 and s["steps"] == 60 and s["status"] == "finished"
    assert s["last_eval"] == {"step": 60, "exact": 0.5}


def test_cached_run_exits_1_with_gradient_starvation(sim, meta, make_run, capsys):
    run = make_run("cached", sim(mode="cached", M=8), meta("cached", M=8))
    code, doc = run_json(capsys, str(run))
    assert code == 1
    (f,) = [f for f in doc["findings"] if f["code"] == "gradient-starvation"]
    assert set(f) == {"code", "severity", "first_step", "evidence", "message"}
    # named on step 2 (the first with continuing slots: single-step evidence), confirmed by the 10-step window
    assert f["severity"] == "error" and f["first_step"] == 2 and f["evidence"]["confirmed_window"] == [1, 10]
    assert f["evidence"]["coverage_mean"] == f["evidence"]["reset_fraction_mean"]
    assert doc["summary"]["figures"]["coverage"] == doc["summary"]["figures"]["reset_fraction"] < 0.5
    # the rich report names it too
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "gradient-starvation" in out and "error" in out


@pytest.mark.parametrize("kw,mode,codes", [
    (dict(fault="label-from-batch"), "reencode", {"label-misalignment"}),
    (dict(nan_at=37), "reencode", {"non-finite-loss"}),
])
def test_error_findings_exit_1(kw, mode, codes, sim, meta, make_run, capsys):
    code, doc = run_json(capsys, str(make_run("e", sim(**kw), meta(mode))))
    assert code == 1 and {f["code"] for f in doc["findings"]} == codes


def test_warning_and_info_findings_exit_0(sim, meta, make_run, capsys):
    rows = sim(sampler="trm", halting=[(1, "mixed"), (30, "one")])
    code, doc = run_json(capsys, str(make_run("w", rows, meta())))
    assert code == 0
    assert {(f["code"], f["severity"]) for f in doc["findings"]} == {("halting-collapse", "warning"),
                                                                    ("dropped-samples", "info")}
    assert main([str(make_run("w2", rows, meta()))]) == 0


def test_set_overrides_thresholds(sim, meta, make_run, capsys):
    run = make_run("cached", sim(mode="cached", M=8), meta("cached", M=8))
    code, doc = run_json(capsys, str(run), "--set", "coverage_min=0.05")
    assert code == 0 and doc["findings"] == []
    code, doc = run_json(capsys, str(run), "--set", "window=30")  # the window decides; the first step stays 2
    assert code == 1 and doc["findings"][0]["evidence"]["confirmed_window"] == [1, 30]
    assert doc["findings"][0]["first_step"] == 2


def test_the_runs_own_thresholds_judge_and_set_is_a_read_only_what_if(sim, meta, make_run, capsys):
    """A run traced with ``doctor.coverage_min=0.05`` is judged with it; ``--set`` re-judges without writing."""
    run = make_run("own", sim(mode="cached", M=8), meta("cached", M=8, doctor={"coverage_min": 0.05}))
    code, doc = run_json(capsys, str(run))
    assert code == 0 and doc["findings"] == [] and doc["summary"]["thresholds"]["coverage_min"] == 0.05
    db = run / TRACE_NAME
    before = db.read_bytes(), sorted(p.name for p in run.iterdir())
    code = main([str(run), "--json", "--set", "coverage_min=0.5"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["summary"]["what_if"] == ["coverage_min=0.5"]
    assert "what-if" in err and "read-only" in err
    assert (db.read_bytes(), sorted(p.name for p in run.iterdir())) == before  # nothing written


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etrm-doctor: error: ")
    return lines[0]


def test_bad_input_exits_2_with_one_line(tmp_path, sim, meta, make_run, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no trace" in _one_error_line(capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / TRACE_NAME).write_bytes(np.random.default_rng(1).bytes(4096))
    assert main([str(corrupt)]) == 2
    assert "corrupt" in _one_error_line(capsys)
    assert main([str(corrupt), "--json"]) == 2
    _one_error_line(capsys)
    assert capsys.readouterr().out == ""
    run = make_run("ok", sim(steps=3), meta())
    for argv in ([str(run), "--set", "nope=1"], [str(run), "--export", "xlsx", str(tmp_path / "x")], [],
                 [str(run), "--bogus"]):
        assert main(argv) == 2
        _one_error_line(capsys)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trips_the_steps(fmt, tmp_path, sim, meta, make_run, capsys):
    run = make_run("r", sim(steps=25), meta())
    out = tmp_path / f"steps.{fmt}"
    assert main([str(run), "--json", "--export", fmt, str(out)]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays pure JSON; the export note goes to stderr
    back = pd.read_csv(out, index_col="step") if fmt == "csv" else pd.read_parquet(out)
    assert len(back) == 25 and list(back.index) == list(range(1, 26))
    assert {"coverage", "reset_fraction", "coverage_num"} <= set(back.columns)


def test_export_to_an_unwritable_place_exits_2(tmp_path, sim, meta, make_run, capsys):
    run = make_run("r", sim(steps=3), meta())
    assert main([str(run), "--export", "csv", str(tmp_path / "no" / "such" / "dir" / "x.csv")]) == 2
    _one_error_line(capsys)


def test_doctor_never_writes_the_trace(sim, meta, make_run, capsys):
    run = make_run("cached", sim(mode="cached", M=8), meta("cached", M=8))
    before = (run / TRACE_NAME).read_bytes()
    main([str(run), "--json"])
    assert (run / TRACE_NAME).read_bytes() == before
    import sqlite3
    with sqlite3.connect(run / TRACE_NAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM findings").fetchone()[0] == 0


def test_console_script(sim, meta, make_run):
    script = Path(sys.executable).parent / "etrm-doctor"
    if not script.exists():
        pytest.skip("etrm-doctor is not installed in this environment")
    run = make_run("cached", sim(mode="cached", M=8), meta("cached", M=8))
    proc = subprocess.run([str(script), str(run), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["findings"][0]["code"] == "gradient-starvation"


def test_export_exits_0_on_a_run_with_an_error_finding_unless_strict(sim, meta, make_run, tmp_path, capsys):
    """Scripts that export must not fail because the run has a finding; ``--strict`` keeps exit 1."""
    run = make_run("cached", sim(mode="cached", M=8), meta("cached", M=8))
    out = tmp_path / "steps.csv"
    assert main([str(run), "--export", "csv", str(out)]) == 0 and out.is_file()
    assert "gradient-starvation" in capsys.readouterr().out  # the finding is still reported
    out.unlink()
    assert main([str(run), "--export", "csv", str(out), "--strict"]) == 1 and out.is_file()
    assert main([str(run)]) == 1  # without --export an error finding is exit 1, as before
