"""Rollups (trace schemas 2 and 3): stored in the transaction of the flush that completes them, equal to the sums
of their rows after a resume's truncation, and readable by the reader exactly as an in-memory summary of the rows;
the phase-timing rollups likewise."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from diagnostics.trace import bucketing
from diagnostics.trace import connection
from diagnostics.trace import reader
from diagnostics.trace.schema import (ROLLUP_BATCH, ROLLUP_WIDTHS, SCHEMA_VERSION, TRACE_NAME, rollup_table,
                                      timing_rollup_table)
from diagnostics.trace.writer import TraceWriter

NAMES = ["coverage_num", "coverage_den", "resets", "slots", "loss", "q_tp", "q_fp", "grad_norm_encoder"]


def rows(first: int, n: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed + first)
    out = []
    for s in range(first, first + n):
        v = rng.integers(0, 9, len(NAMES)).astype(float).tolist()
        v[3] = 8.0
        if s % 7 == 0:
            v[-1] = None  # a NaN gradient norm is stored as NULL: it counts 0 in sums, nothing in min/max
        out.append((s, *v))
    return out


def check_buckets_equal_rows(db) -> int:
    """Every rollup bucket against SQL sums of its rows; returns the number of buckets checked."""
    conn = sqlite3.connect(db)
    checked = 0
    for w in ROLLUP_WIDTHS:
        got = conn.execute(f"SELECT bucket, n, step_lo, step_hi, {', '.join(NAMES)} FROM {rollup_table(w)} "
                           "ORDER BY bucket").fetchall()
        want = conn.execute(f"SELECT (step - 1) / {w}, COUNT(*), MIN(step), MAX(step), "
                            f"{', '.join(f'TOTAL({c})' for c in NAMES)} FROM steps GROUP BY (step - 1) / {w} "
                            "ORDER BY 1").fetchall()
        # the stored buckets are the leading complete ones, each equal to its rows; the rest (the open bucket, and
        # finest buckets waiting for a batch of ROLLUP_BATCH rows) are the writer's and less than a batch behind
        assert got == want[:len(got)] and len(got) < len(want), w
        unstored = sum(n for _, n, *_ in want[len(got):])
        assert unstored < w + ROLLUP_BATCH, (w, unstored)
        mins = conn.execute(f"SELECT bucket, loss_per_slot__min, loss_per_slot__max, q_precision__min "
                            f"FROM {rollup_table(w)} ORDER BY bucket").fetchall()
        want_env = conn.execute(f"SELECT (step - 1) / {w}, MIN(loss / slots), MAX(loss / slots), "
                                f"MIN(1.0 * q_tp / NULLIF(q_tp + q_fp, 0)) FROM steps GROUP BY 1 ORDER BY 1").fetchall()
        assert [(b, a, c) for b, a, c, _ in mins] == [(b, a, c) for b, a, c, _ in want_env[:len(got)]]
        assert [m[3] for m in mins] == pytest.approx([e[3] for e in want_env[:len(got)]], nan_ok=True)
        checked += len(got)
    conn.close()
    return checked


def writer(tmp_path) -> TraceWriter:
    w = TraceWriter(tmp_path / TRACE_NAME, {"mode": "cached"})
    w.add_counters((n, "t", n) for n in NAMES)
    return w


def test_rollups_equal_their_rows_after_writes_and_a_resume_truncation(tmp_path):
    db = tmp_path / TRACE_NAME
    w = writer(tmp_path)
    n = (ROLLUP_BATCH + 300) // 20 * 20  # past one batch of waiting rows, so that buckets are stored
    for first in range(1, n + 1, 20):  # flushes of 20 rows, as the tracer writes them
        w.write_steps(NAMES, rows(first, 20))
        w.commit()
    assert check_buckets_equal_rows(db) > 0
    cut = n - 170
    w.truncate_after(cut)  # --resume from a checkpoint at step `cut`: later rows go, and with them their sums
    assert check_buckets_equal_rows(db) > 0
    w.write_steps(NAMES, rows(cut + 1, 50, seed=1))  # the resumed run writes the steps again, with new values
    w.write_steps(NAMES, rows(cut + 40, 3, seed=2))  # and a step written twice is recomputed, not double-counted
    w.commit()
    check_buckets_equal_rows(db)
    w.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_version_1_trace_resumed_gets_its_rollups(tmp_path):
    db = tmp_path / TRACE_NAME
    w = writer(tmp_path)
    w.write_steps(NAMES, rows(1, 100))
    w.close()
    conn = sqlite3.connect(db)
    for t in ROLLUP_WIDTHS:  # as a version-1 writer left it: no rollup tables
        conn.execute(f"DROP TABLE {rollup_table(t)}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    conn = connection.connect(tmp_path)  # readers accept every version from 1 to the current one
    assert reader.rollup_widths(conn) == ()
    conn.close()
    TraceWriter(db).close()
    check_buckets_equal_rows(db)


def test_the_reader_uses_rollups_and_matches_the_in_memory_summary(tmp_path):
    w = writer(tmp_path)
    w.write_steps(NAMES, rows(1, 20_000))
    w.close()
    spec = bucketing.ratio_spec("coverage", "loss_per_slot", "q_precision", "grad_norm_encoder_mean").resolve(NAMES)
    conn = connection.connect(tmp_path)
    raw = reader.read_rows(conn, 0)
    assert reader.rollup_widths(conn) == ROLLUP_WIDTHS
    conn.close()
    for lo, hi in ((1, 20_000), (77, 19_999), (5_000, 9_000)):
        got = reader.sql_buckets(tmp_path, spec, lo, hi, bucketing.bucket_width(lo, hi, 50))
        width = got.attrs["width"]
        assert got.attrs["rollup"] > 1 and width % got.attrs["rollup"] == 0
        want = bucketing.aggregate_rows(raw.loc[lo:hi], spec, width, origin=1)
        assert got["n"].sum() == hi - lo + 1
        cols = ["step", "step_lo", "n", *spec.sums]
        assert got[cols].to_numpy() == pytest.approx(want[cols].to_numpy())
        env = [c for c in got.columns if c.endswith(("_min", "_max"))]
        assert env and got[env].to_numpy() == pytest.approx(want[env].to_numpy(), nan_ok=True)
        f = bucketing.finish(got)
        assert f["loss_per_slot"].to_numpy() == pytest.approx(bucketing.finish(want)["loss_per_slot"].to_numpy())


def check_timing_buckets_equal_rows(db) -> int:
    """Every timing rollup bucket against SQL sums of its rows (every bucket is stored, the open one included)."""
    conn = sqlite3.connect(db)
    checked = 0
    for w in ROLLUP_WIDTHS:
        got = conn.execute(f"SELECT bucket, phase, n, seconds FROM {timing_rollup_table(w)} ORDER BY 1, 2").fetchall()
        want = conn.execute(f"SELECT (step - 1) / {w}, phase, COUNT(*), TOTAL(seconds) FROM timings "
                            "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert [g[:3] for g in got] == [x[:3] for x in want], w
        assert [g[3] for g in got] == pytest.approx([x[3] for x in want], rel=1e-12), w
        checked += len(got)
    conn.close()
    return checked


def timing_rows(first: int, n: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed + first)
    return [(s, r, ph, float(rng.random())) for s in range(first, first + n) for r in (0, 1) for ph in ("fwd", "bwd")]


def test_timing_rollups_equal_their_rows_after_writes_a_truncation_and_a_rewrite(tmp_path):
    db = tmp_path / TRACE_NAME
    w = writer(tmp_path)
    for first in range(1, 5_001, 20):
        w.write_steps(NAMES, rows(first, 20))
        w.write_timings(timing_rows(first, 20))
        w.commit()
    assert check_timing_buckets_equal_rows(db) > 3 * 4
    w.truncate_after(4_200)  # inside the first 4096-bucket's successor: every width loses part of a bucket
    check_timing_buckets_equal_rows(db)
    w.write_timings(timing_rows(4_201, 100, seed=1))
    w.write_timings(timing_rows(4_250, 3, seed=2))  # steps written again are recomputed, not double-counted
    w.commit()
    check_timing_buckets_equal_rows(db)
    w.close()


def test_a_version_2_trace_resumed_gets_its_timing_rollups(tmp_path):
    db = tmp_path / TRACE_NAME
    w = writer(tmp_path)
    w.write_timings(timing_rows(1, 300))
    w.commit()
    for t in ROLLUP_WIDTHS:  # as a version-2 writer left it: no timing rollups
        w.conn.execute(f"DROP TABLE {timing_rollup_table(t)}")
    w.conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    w.close()
    TraceWriter(db).close()
    assert check_timing_buckets_equal_rows(db) == 5 * 2 + (len(ROLLUP_WIDTHS) - 1) * 2  # 300 steps, 2 phases


def test_the_reader_reads_timings_from_their_rollups_as_from_the_rows(tmp_path):
    w = writer(tmp_path)
    for first in range(1, 20_001, 500):
        w.write_steps(NAMES, rows(first, 500))
        w.write_timings(timing_rows(first, 500))
    w.close()
    conn = sqlite3.connect(tmp_path / TRACE_NAME)
    import pandas as pd
    raw = pd.read_sql_query("SELECT step, phase, seconds FROM timings", conn)
    conn.close()
    for lo, hi in ((1, 20_000), (77, 19_999), (5_000, 9_000)):
        got = reader.read_timings(tmp_path, lo, hi, bucketing.bucket_width(lo, hi, 50))
        big = got.attrs["width"]
        assert big >= 64 and not got.attrs["sampled"]
        part = raw[(raw.step >= lo) & (raw.step <= hi)].assign(bucket=lambda d: (d.step - 1) // big)
        want = part.groupby(["bucket", "phase"]).agg(step=("step", "max"), seconds=("seconds", "mean")).reset_index()
        assert got["phase"].tolist() == want["phase"].tolist()
        assert got["step"].tolist() == want["step"].tolist()
        assert got["seconds"].to_numpy() == pytest.approx(want["seconds"].to_numpy(), rel=1e-9)


def test_cover_reads_whole_buckets_and_finer_edges():
    pieces = reader.cover(100, 10_000, [(4096, 10), (64, 200)])
    steps = [s for w, a, b in pieces for s in (range(a, b + 1) if w == 1 else range(a * w + 1, (b + 1) * w + 1))]
    assert steps == list(range(100, 10_001))  # every step once
    assert (4096, 1, 1) in pieces and sum(1 for w, *_ in pieces if w == 1) == 2
