"""Run loading without a browser: path containment, bucketed SQL against pandas, incremental refresh, error cards."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from dashboards import runs as R
from diagnostics.trace import bucketing
from diagnostics.trace import connection
from diagnostics.trace import reader
from dashboards.synthetic import write_synthetic
from diagnostics.trace.schema import ROLLUP_WIDTHS, TRACE_NAME, timing_rollup_table
from diagnostics.trace.writer import TraceWriter


def synthetic(root: Path, name: str, steps: int, **kw) -> Path:
    return write_synthetic(root / name, steps, timings=kw.pop("timings", False), chunk=kw.pop("chunk", 5000), **kw)


# -- paths ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """runs/ok (a run), runs/group/inner (a nested run), outside/ (a run outside), and links pointing out."""
    root, outside = tmp_path / "runs", tmp_path / "outside"
    synthetic(root, "ok", 30)
    synthetic(root / "group", "inner", 30)
    synthetic(tmp_path, "outside", 30)
    os.symlink(outside, root / "escape")                  # a directory link out of the root
    (root / "trace-link").mkdir()
    os.symlink(outside / TRACE_NAME, root / "trace-link" / TRACE_NAME)  # a trace file linked from outside
    return root


@pytest.mark.parametrize("name", ["../outside", "..%2Foutside", "%2E%2E/outside", "/etc", "%2Fetc", "ok/../../outside",
                                  "escape", "trace-link", "~/x", "", ".", "ok/../..", "..\x00"])
def test_paths_outside_the_runs_root_are_refused(tree, name):
    with pytest.raises(R.Refused):
        R.resolve_run(tree, name)
    with pytest.raises(R.Refused):
        R.Runs(tree).get(name)


def test_runs_inside_resolve_and_discovery_skips_links_out(tree):
    assert R.resolve_run(tree, "ok") == (tree / "ok").resolve()
    assert R.resolve_run(tree, "group%2Finner") == (tree / "group" / "inner").resolve()
    assert sorted(R.discover(tree)) == ["group/inner", "ok"]
    with pytest.raises(R.RunError, match="no run named"):
        R.resolve_run(tree, "missing")


# -- bucketing -----------------------------------------------------------------------------------------------------

def test_sql_buckets_equal_pandas_bucketing_of_the_raw_rows(tmp_path):
    run = synthetic(tmp_path, "s", 1234, max_steps_per_sample=4)
    conn = connection.connect(run)
    raw = reader.read_rows(conn, 0)
    conn.close()
    spec = R.COVERAGE.resolve(raw.columns)
    for width, lo, hi in ((1, 1, 1234), (7, 1, 1234), (50, 101, 1100)):
        sql = reader.sql_buckets(run, spec, lo, hi, width, threads=2)
        pan = bucketing.aggregate_rows(raw.loc[lo:hi], spec, width, origin=lo)
        pd.testing.assert_frame_equal(sql.reset_index(drop=True), pan.reset_index(drop=True), check_dtype=False,
                                      rtol=1e-9)
    f = bucketing.finish(reader.sql_buckets(run, spec, 1, 1234, 100))
    expect = raw["coverage_num"].sum() / raw["coverage_den"].sum()
    assert (f["coverage_num"].sum() / f["coverage_den"].sum()) == pytest.approx(expect)
    per_step = raw["coverage_num"] / raw["coverage_den"]
    assert f["coverage_min"].min() == pytest.approx(per_step.min())
    assert f["coverage_max"].max() == pytest.approx(per_step.max())


def test_merging_buckets_is_exact(tmp_path):
    run = synthetic(tmp_path, "s", 500)
    conn = connection.connect(run)
    raw = reader.read_rows(conn, 0)
    conn.close()
    spec = R.OVERVIEW.resolve(raw.columns)
    whole = bucketing.aggregate_rows(raw, spec, 20)
    parts = bucketing.merge_frames(bucketing.aggregate_rows(raw.loc[:230], spec, 10), bucketing.aggregate_rows(raw.loc[231:], spec, 10),
                           spec, 20)
    pd.testing.assert_frame_equal(whole, parts[whole.columns], check_dtype=False)


def test_large_runs_are_bucketed_and_zoom_gives_full_detail(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "RAW_MAX_STEPS", 1000)
    synthetic(tmp_path, "big", 5000, max_steps_per_sample=4)
    cache = R.Runs(tmp_path).get("big")
    assert cache.raw is None and cache.info.last_step == 5000
    f = cache.frame(R.OVERVIEW, max_buckets=100)
    assert len(f) == 100 and f.attrs["width"] == 50 and not f.attrs["exact"]
    assert f["n"].sum() == 5000
    zoom = cache.frame(R.OVERVIEW, (2000.4, 2079.6), max_buckets=100)
    assert zoom.attrs["exact"] and zoom["step"].tolist() == list(range(2000, 2081))
    t = cache.timings()
    assert t.empty or set(t.columns) == {"step", "phase", "seconds"}


def test_timings_of_long_ranges_come_from_the_rollups_or_are_sampled_without_them(tmp_path):
    run = write_synthetic(tmp_path / "t", 600, chunk=600)
    full = reader.read_timings(run, 1, 600, 10, max_steps=1000)    # read whole, in 10-step buckets
    rolled = reader.read_timings(run, 1, 600, 10, max_steps=100)   # too long to read whole: the 64-step rollup
    phases = full["phase"].nunique()
    assert not full.attrs["sampled"] and len(full) == 60 * phases
    assert not rolled.attrs["sampled"] and rolled.attrs["width"] == 64 and len(rolled) == 10 * phases
    db = sqlite3.connect(run / TRACE_NAME)
    want = dict(db.execute("SELECT phase, AVG(seconds) FROM timings WHERE step <= 64 GROUP BY phase").fetchall())
    first = rolled[rolled["step"] == 64].set_index("phase")["seconds"].to_dict()
    assert first == pytest.approx(want)  # a rollup bucket's mean is its rows' mean
    for w in ROLLUP_WIDTHS:  # as a version-2 trace has it: no timing rollups, so a long range is sampled
        db.execute(f"DROP TABLE {timing_rollup_table(w)}")
    db.commit()
    db.close()
    sampled = reader.read_timings(run, 1, 600, 10, max_steps=100)
    assert sampled.attrs["sampled"] and set(sampled["phase"]) == set(full["phase"])


# -- live refresh --------------------------------------------------------------------------------------------------

def append_steps(run: Path, first: int, n: int) -> None:
    """Add rows as a trainer's flush would (same columns as the synthetic run)."""
    conn = connection.connect(run)
    cols = reader.step_columns(conn)
    last = conn.execute(f"SELECT * FROM steps WHERE step = {first - 1}").fetchone()
    conn.close()
    w = TraceWriter(run / TRACE_NAME)
    w.write_steps(cols, [(s, *last[1:]) for s in range(first, first + n)])
    w.heartbeat(first + n - 1)
    w.commit()
    w.close()


@pytest.mark.parametrize("raw_max", [10_000, 100])
def test_refresh_reads_only_rows_past_the_last_step(tmp_path, monkeypatch, raw_max):
    monkeypatch.setattr(R, "RAW_MAX_STEPS", raw_max)
    run = synthetic(tmp_path, "live", 300, finished=False)
    cache = R.Runs(tmp_path).get("live")
    before = cache.frame(R.OVERVIEW, max_buckets=50)
    assert cache.info.status == "live" and cache.info.last_step == 300
    seen: list[int] = []
    real = reader.read_rows

    def spy(conn, after, *a, **k):
        seen.append(after)
        return real(conn, after, *a, **k)

    monkeypatch.setattr(reader, "read_rows", spy)
    assert cache.refresh() is False and seen == []  # nothing new: no row read
    append_steps(run, 301, 40)
    assert cache.refresh() is True
    assert all(a == 300 for a in seen)  # a small run's table takes the new rows now
    assert cache.info.last_step == 340
    after = cache.frame(R.OVERVIEW, max_buckets=50)  # a large run's cached frame takes them when drawn
    assert seen and all(a == 300 for a in seen)
    assert after["n"].sum() == 340 and before["n"].sum() == 300
    fresh = R.RunCache(tmp_path, "live")
    fresh.refresh()
    rebuilt = fresh.frame(R.OVERVIEW, max_buckets=50)
    cols = ["loss", "coverage_num", "resets"]
    assert after[cols].sum().tolist() == pytest.approx(rebuilt[cols].sum().tolist())


def test_status_live_finished_crashed():
    now = 1000.0
    assert R.status_of([(900.0, "start")], 990.0, 0, now) == "live"
    assert R.status_of([(100.0, "start")], 200.0, 0, now) == "crashed"
    assert R.status_of([(100.0, "start"), (200.0, "end")], None, 0, now) == "finished"
    assert R.status_of([(100.0, "start"), (200.0, "crashed")], 990.0, 0, now) == "crashed"
    assert R.status_of([], None, 995.0, now) == "live"


# -- runs that cannot be read --------------------------------------------------------------------------------------

def test_corrupt_empty_half_written_and_locked_runs_give_errors_not_exceptions(tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / TRACE_NAME).write_bytes(b"this is not a database" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / TRACE_NAME).write_bytes(b"")
    (tmp_path / "half").mkdir()
    sqlite3.connect(tmp_path / "half" / TRACE_NAME).execute("CREATE TABLE steps (step INTEGER PRIMARY KEY)")
    locked = tmp_path / "locked"
    locked.mkdir()
    holder = sqlite3.connect(locked / TRACE_NAME, isolation_level=None)
    holder.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    holder.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY)")
    holder.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    holder.execute("BEGIN EXCLUSIVE")  # a writer in rollback-journal mode holding the lock
    synthetic(tmp_path, "good", 20)
    runs = R.Runs(tmp_path)
    infos = {i.name: i for i in runs.infos()}
    holder.rollback()
    holder.close()
    assert set(infos) == {"corrupt", "empty", "half", "locked", "good"}
    assert "corrupt" in infos["corrupt"].error or "not a database" in infos["corrupt"].error
    assert "half-written" in infos["empty"].error
    assert "half-written" in infos["half"].error
    assert "locked" in infos["locked"].error
    assert infos["good"].error is None and infos["good"].last_step == 20
    for name in ("corrupt", "empty", "half"):
        cache = runs.get(name)
        assert cache.info.verdict == "unreadable"
        assert cache.frame(R.OVERVIEW).empty  # nothing to draw, and no exception
    assert runs.get("locked").refresh() is False or runs.get("locked").info.error is None  # the lock is gone now


# -- real runs made by the trainer ---------------------------------------------------------------------------------

def test_trainer_runs_verdicts_and_columns(runs_root):
    runs = R.Runs(runs_root)
    cached, reencode = runs.get("cached"), runs.get("reencode")
    assert cached.info.status == reencode.info.status == "finished"
    assert cached.info.last_step == reencode.info.last_step == 40
    assert cached.info.verdict == "error" and cached.info.findings[0]["code"] == "gradient-starvation"
    assert cached.info.findings[0]["first_step"] is not None
    assert reencode.info.verdict == "healthy" and reencode.info.headline == "healthy"
    fc, fr = cached.frame(R.COVERAGE), reencode.frame(R.COVERAGE)
    assert fc["coverage"].tolist() == pytest.approx(fc["reset_fraction"].tolist())  # cached: coverage == resets
    assert fr["coverage"].min() == 1.0
    assert cached.totals()["steps"] == 40
    assert not cached.evals.empty and "exact" in cached.evals.columns
