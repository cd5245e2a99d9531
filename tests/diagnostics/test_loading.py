"""load_run and friends: the steps table with derived ratios, evals, timings, findings, and run status."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

import diagnostics
from diagnostics.trace.loading import (load_alignment, load_evals, load_findings, load_markers, load_run, load_timings,
                                 run_status)
from diagnostics.trace.schema import TRACE_NAME, TraceError
from diagnostics.trace.writer import TraceWriter


def test_load_run_indexes_by_step_with_derived_ratios(sim, meta, make_run):
    rows = sim(mode="cached", M=8)
    rows[3]["halted_count"], rows[3]["halted_exact"] = 0.0, 0.0
    run = make_run("r", rows, meta("cached", M=8))
    df = diagnostics.load_run(run)
    assert list(df.index) == list(range(1, 61)) and (df["step"] == df.index).all()
    assert df.index.name is None  # unnamed, so that df["step"], sort_values("step"), merge(on="step") are not ambiguous
    assert df.sort_values("step")["step"].iloc[-1] == 60
    assert df.attrs["meta"]["mode"] == "cached" and df.attrs["meta"]["max_steps_per_sample"] == 8
    assert df.attrs["status"] == "finished"
    r = rows[9]
    assert df.loc[10, "coverage"] == r["coverage_num"] / r["coverage_den"]
    assert df.loc[10, "reset_fraction"] == r["resets"] / r["slots"]
    assert (df["coverage"] == df["reset_fraction"]).all()
    assert df.loc[10, "exact_inflight"] == r["inflight_exact"] / r["inflight_count"]
    assert df.loc[10, "mean_inflight_step"] == r["inflight_step_sum"] / r["real_slots"]
    assert df.loc[10, "q_precision"] == pytest.approx(r["q_tp"] / (r["q_tp"] + r["q_fp"]))
    assert df.loc[10, "q_recall"] == pytest.approx(r["q_tp"] / (r["q_tp"] + r["q_fn"]))
    assert df.loc[10, "q_base_rate"] == r["q_correct"] / r["real_slots"]
    assert math.isnan(df.loc[4, "exact_halted"])  # no slot halted: NaN, not 0 and not inf
    assert not np.isinf(df.select_dtypes("number").to_numpy()).any()


def test_load_run_keeps_loss_as_the_per_step_sum_and_adds_loss_per_slot(sim, meta, make_run):
    """The stored ``loss`` stays the step's sum over slots; ``loss_per_slot`` divides by the slots (the 64x
    disagreement of the run card came from two figures sharing the name ``loss_mean``)."""
    rows = sim(mode="cached", M=8)
    df = diagnostics.load_run(make_run("r", rows, meta("cached", M=8)))
    r = rows[9]
    assert df.loc[10, "loss"] == r["loss"]
    assert df.loc[10, "loss_per_slot"] == pytest.approx(r["loss"] / r["slots"])
    assert df.loc[10, "lm_loss_per_slot"] == pytest.approx(r["lm_loss"] / r["slots"])
    assert "loss_mean" not in df.columns


def test_load_run_on_a_run_dir_or_the_trace_file(sim, meta, make_run):
    run = make_run("r", sim(steps=5), meta())
    assert len(load_run(run)) == len(load_run(run / TRACE_NAME)) == 5


def test_evals_timings_findings_alignment_markers(sim, meta, make_run, tmp_path):
    run = make_run("r", sim(steps=5), meta(), alignment=[(2, 3, 10, 11, 10)],
                   evals={5: {"exact": 0.25, "token": 0.5}, 3: {"exact": 0.125, "token": 0.25}})
    w = TraceWriter(run / TRACE_NAME)
    w.write_timings([(1, 0, "encoder", 0.01), (1, 0, "backward", 0.02), (2, 0, "encoder", 0.015)])
    w.write_finding("dropped-samples", "info", 2, {"samples_dropped": 3}, "three dropped")
    w.close()
    ev = load_evals(run)
    assert list(ev.index) == [3, 5] and ev.loc[5, "exact"] == 0.25 and set(ev.columns) == {"exact", "token"}
    tm = load_timings(run)
    assert list(tm.columns) == ["step", "rank", "phase", "seconds"] and len(tm) == 3
    fd = load_findings(run)
    assert fd.loc[0, "evidence"] == {"samples_dropped": 3} and fd.loc[0, "first_step"] == 2
    al = load_alignment(run)
    assert al.iloc[0].tolist() == [2, 3, 10, 11, 10]
    assert load_run(run).attrs["alignment_samples"] == [{"step": 2, "slot": 3, "sample_id": 10,
                                                          "label_sample_id": 11, "demo_sample_id": 10}]
    assert list(load_markers(run)["kind"]) == ["start", "end"]
    assert load_evals(make_run("none", sim(steps=2), meta())).empty


def test_missing_and_corrupt_traces_raise_one_line_trace_errors(tmp_path):
    with pytest.raises(TraceError, match="no trace"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TraceError):
        load_run(tmp_path / "emptydir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / TRACE_NAME).write_bytes(np.random.default_rng(0).bytes(8192))
    for fn in (load_run, load_evals, load_timings, load_findings, run_status):
        with pytest.raises(TraceError) as err:
            fn(bad)
        assert "\n" not in str(err.value)


def test_load_run_does_not_write_to_the_trace(sim, meta, make_run):
    run = make_run("r", sim(steps=5), meta())
    before = (run / TRACE_NAME).read_bytes()
    load_run(run)
    assert (run / TRACE_NAME).read_bytes() == before  # (a WAL reader may add its -shm index beside it)


def _trace(tmp_path, name, kinds, heartbeat_age=None, marker_age=0.0):
    d = tmp_path / name
    d.mkdir()
    w = TraceWriter(d / TRACE_NAME, {"mode": "reencode"})
    for i, k in enumerate(kinds):  # written marker_age seconds ago, in order
        w.conn.execute("INSERT INTO markers VALUES (?, ?, ?, ?)", (time.time() - marker_age + i * 1e-3, k, 0, ""))
    if heartbeat_age is not None:
        w.conn.execute("INSERT OR REPLACE INTO heartbeat VALUES (0, ?, ?)", (time.time() - heartbeat_age, 5))
    w.close()
    return d


def test_run_status_from_markers_and_heartbeat(tmp_path):
    now = time.time()
    assert run_status(_trace(tmp_path, "fin", ["start", "end"])) == "finished"
    assert run_status(_trace(tmp_path, "stop", ["start", "stopped"])) == "stopped"
    assert run_status(_trace(tmp_path, "crash", ["start", "crashed"])) == "crashed"
    live = _trace(tmp_path, "live", ["start"], heartbeat_age=5, marker_age=60)
    assert run_status(live) == "live"
    assert run_status(live, now=now + 1000) == "crashed"  # the heartbeat went stale: the trainer died
    assert run_status(live, stale_after=1.0) == "crashed"
    assert run_status(_trace(tmp_path, "old", ["start"], heartbeat_age=500, marker_age=600)) == "crashed"
    # resumed after an end: live again while the heartbeat, or the resume marker itself, is fresh
    assert run_status(_trace(tmp_path, "resumed", ["start", "end", "resume"], heartbeat_age=1)) == "live"
    assert run_status(_trace(tmp_path, "resumed2", ["start", "end", "resume"], heartbeat_age=900)) == "live"
    # no heartbeat yet: the start marker itself is the last sign of life
    assert run_status(_trace(tmp_path, "starting", ["start"])) == "live"
    assert run_status(_trace(tmp_path, "starting2", ["start"]), now=now + 1000) == "crashed"
    # no markers at all: heartbeat, else the file's age
    assert run_status(_trace(tmp_path, "bare", [], heartbeat_age=1)) == "live"
    bare = _trace(tmp_path, "bare2", [])
    old = now - 1000
    for p in bare.iterdir():
        os.utime(p, (old, old))
    assert run_status(bare) == "crashed"
