"""The bulk synthetic trace (benchmarks' long runs) is a trace as the writer makes it: every stored rollup bucket,
of the steps and of the timings, equals the sums of its rows, and the reader serves it as it serves a trainer's."""

from __future__ import annotations

import sqlite3

import pytest

from dashboards.runs import OVERVIEW, Runs
from dashboards.synthetic import PHASES, write_bulk
from diagnostics.trace import bucketing
from diagnostics.trace import connection
from diagnostics.trace import reader
from diagnostics.trace.schema import ROLLUP_WIDTHS, TRACE_NAME, rollup_table, timing_rollup_table


def test_a_bulk_trace_has_exact_rollups_and_reads_as_a_written_one(tmp_path):
    run = write_bulk(tmp_path / "bulk", 5_000, chunk=1_024, template=512)
    db = sqlite3.connect(run / TRACE_NAME)
    assert db.execute("SELECT COUNT(*), MIN(step), MAX(step) FROM steps").fetchone() == (5_000, 1, 5_000)
    assert db.execute("SELECT COUNT(*) FROM timings").fetchone()[0] == 5_000 * len(PHASES)
    for w in ROLLUP_WIDTHS:
        got = db.execute(f"SELECT bucket, n, coverage_num, loss FROM {rollup_table(w)} ORDER BY 1").fetchall()
        want = db.execute(f"SELECT (step - 1) / {w}, COUNT(*), TOTAL(coverage_num), TOTAL(loss) FROM steps "
                          "GROUP BY 1 ORDER BY 1").fetchall()
        assert [g[:3] for g in got] == [x[:3] for x in want[:len(got)]] and len(got) >= len(want) - 1, w
        assert [g[3] for g in got] == pytest.approx([x[3] for x in want[:len(got)]], rel=1e-12)
        got = db.execute(f"SELECT bucket, phase, n, seconds FROM {timing_rollup_table(w)} ORDER BY 1, 2").fetchall()
        want = db.execute(f"SELECT (step - 1) / {w}, phase, COUNT(*), TOTAL(seconds) FROM timings "
                          "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert [g[:3] for g in got] == [x[:3] for x in want], w
        assert [g[3] for g in got] == pytest.approx([x[3] for x in want], rel=1e-12)
    db.close()
    cache = Runs(tmp_path).get("bulk")
    assert cache.info.last_step == 5_000 and cache.info.meta["mode"] == "cached" and cache.info.status == "finished"
    spec = OVERVIEW.resolve(cache.columns)
    conn = connection.connect(run)
    raw = reader.read_rows(conn, 0)
    conn.close()
    got = reader.sql_buckets(run, spec, 1, 5_000, 512)
    want = bucketing.aggregate_rows(raw, spec, got.attrs["width"])
    assert got.attrs["rollup"] == 512 and got["n"].tolist() == want["n"].tolist()
    assert got["coverage_num"].tolist() == want["coverage_num"].tolist()
