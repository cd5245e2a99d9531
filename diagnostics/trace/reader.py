"""The trace reader: steps and timings over any step range of a run's ``trace.sqlite``, read-only.

A live trainer may be writing the trace (WAL), so every connection comes from ``diagnostics.trace.connection``
(read-only, a short lock timeout) and any failure is a ``TraceError`` with a one-line message. Served here: the
step range and columns, steps after step N (a live tail), bucketed sums and min/max envelopes over any step range
(``sql_buckets``; the frames and ``Spec`` are ``diagnostics.trace.bucketing``'s) and phase timings. The other
tables (evals, audits, findings, markers, alignment samples, the ledger) are read by ``diagnostics.trace.records``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from diagnostics.trace import figures
from diagnostics.trace.bucketing import Spec, aggregate_rows, envelope_sql, frame_columns, group_buckets
from diagnostics.trace.connection import connect, describe_sqlite_error
from diagnostics.trace.schema import ROLLUP_WIDTHS, TraceError, rollup_table, sql_name, timing_rollup_table

MAX_TIMING_STEPS = 2_000     # timings of at most this many steps are read per range (sampled evenly beyond)
RAW_READ_MAX = 50_000        # a range of at most this many steps without a rollup level is read whole, in one query


def step_columns(conn: sqlite3.Connection) -> list[str]:
    """The stored per-step columns (every counter; not ``step``)."""
    return [r[1] for r in conn.execute("PRAGMA table_info(steps)") if r[1] != "step"]


def step_range(conn: sqlite3.Connection) -> tuple[int, int]:
    """The first and last stored step (0, 0 when there is none)."""
    # two queries: each is one b-tree descent, where MIN and MAX together would scan the table
    lo = conn.execute("SELECT MIN(step) FROM steps").fetchone()[0]
    hi = conn.execute("SELECT MAX(step) FROM steps").fetchone()[0]
    return int(lo or 0), int(hi or 0)


def rollup_widths(conn: sqlite3.Connection) -> tuple[int, ...]:
    """The rollup levels this trace has (schema 3 writes ``ROLLUP_WIDTHS``, 2 three of them, 1 none)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return tuple(w for w in ROLLUP_WIDTHS if rollup_table(w) in tables)


def timing_rollup_widths(conn: sqlite3.Connection) -> tuple[int, ...]:
    """The timing rollup levels this trace has (schema 3 writes them; older traces have none)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return tuple(w for w in ROLLUP_WIDTHS if timing_rollup_table(w) in tables)


def cover(lo: int, hi: int, levels: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Steps [lo, hi] as pieces, each read from one place: ``(width, first, last)`` for stored buckets
    ``first..last`` of a rollup of that width, ``(1, a, b)`` for raw steps a..b. ``levels``: (width, last stored
    bucket) from the coarsest to the finest; each level covers what lies wholly inside its complete buckets and
    finer levels cover the edges, so the pieces are at most (hi - lo) / coarsest + 2 x (ratio of widths) per level
    rows, plus the raw edges (under one finest bucket each, and the writer's unstored tail)."""
    if lo > hi:
        return []
    if not levels:
        return [(1, lo, hi)]
    (w, last), finer = levels[0], levels[1:]
    first, end = -(-(lo - 1) // w), min(hi // w - 1, last)  # buckets wholly inside [lo, hi], stored
    if first > end:
        return cover(lo, hi, finer)
    return [*cover(lo, first * w, finer), (w, first, end), *cover((end + 1) * w + 1, hi, finer)]


def _levels(conn: sqlite3.Connection, widths: Iterable[int], table: Callable[[int], str],
            up_to: int) -> list[tuple[int, int]]:
    """(width, last stored bucket) of the rollups not wider than ``up_to``, coarsest first."""
    out = []
    for w in sorted((w for w in widths if w <= up_to), reverse=True):
        last = conn.execute(f"SELECT MAX(bucket) FROM {table(w)}").fetchone()[0]
        if last is not None:
            out.append((w, int(last)))
    return out


def sql_buckets(run_dir: Path, spec: Spec, lo: int, hi: int, width: int, threads: int = 2) -> pd.DataFrame:
    """Bucketed sums and min/max envelopes over steps [lo, hi] (``attrs["width"]``: the width used).

    From the writer's rollups when the trace has them and buckets are at least one rollup wide: buckets are then a
    multiple of the widest rollup not wider than ``width``, on the trace's step grid (bucket k holds steps
    k*width+1 .. (k+1)*width), read as ``cover`` splits the range: whole buckets of that rollup, finer rollups at
    the edges, raw rows only within a finest bucket of each edge (and the writer's unstored tail), so a view reads
    on the order of a thousand rows whatever the run's length. Otherwise one aggregate query per bucket over the raw
    rows (a summary in memory of the reader; no reader ever writes)."""
    if all(e in figures.REGISTRY for e in spec.envelopes):
        conn = connect(run_dir)
        try:
            levels = _levels(conn, rollup_widths(conn), rollup_table, width)
            if levels:
                return _rollup_buckets(conn, spec, lo, hi, width, levels)
        except sqlite3.Error as exc:
            raise TraceError(describe_sqlite_error(Path(run_dir).name, exc)) from None
        finally:
            conn.close()
    if hi - lo + 1 <= RAW_READ_MAX:  # a short range (a zoom): its rows at once, bucketed in memory
        conn = connect(run_dir)
        try:
            raw = read_rows(conn, lo - 1, list(spec.sums), upto=hi)
        except sqlite3.Error as exc:
            raise TraceError(describe_sqlite_error(Path(run_dir).name, exc)) from None
        finally:
            conn.close()
        out = aggregate_rows(raw, spec, width, origin=lo)
    else:
        out = _raw_buckets(run_dir, spec, lo, hi, width, threads)
    out.attrs.update(width=width, rollup=1)
    return out


def _rollup_buckets(conn: sqlite3.Connection, spec: Spec, lo: int, hi: int, width: int,
                    levels: list[tuple[int, int]]) -> pd.DataFrame:
    """``sql_buckets`` from the rollups ``levels`` (coarsest first): the pieces of ``cover``, grouped into
    buckets of a multiple of the coarsest width on the step grid."""
    r = levels[0][0]
    big = math.ceil(width / r) * r
    cols = frame_columns(spec)
    # whole rollup buckets are grouped into the view's buckets by SQLite (one row per view bucket comes back)
    exprs = ", ".join(["MAX(step_hi)", "MIN(step_lo)", "SUM(n)", *(f"SUM({sql_name(c)})" for c in spec.sums),
                       *(f"{m.upper()}({sql_name(f'{e}__{m}')})" for e in spec.envelopes for m in ("min", "max"))])
    parts: list[pd.DataFrame] = []
    conn.execute("BEGIN")  # one read transaction: a writer's commit between the pieces cannot split a step
    try:
        for w, a, b in cover(lo, hi, levels):
            if w == 1:
                raw = read_rows(conn, a - 1, list(spec.sums), upto=b)
                if len(raw):
                    parts.append(aggregate_rows(raw, spec, 1))
            else:
                got = conn.execute(f"SELECT {exprs} FROM {rollup_table(w)} WHERE bucket BETWEEN ? AND ? "
                                   f"GROUP BY (bucket * {w}) / {big} ORDER BY 1", (a, b)).fetchall()
                if got:  # one float matrix (NULL -> NaN), not a frame built row by row
                    parts.append(pd.DataFrame(np.array(got, dtype=float), columns=cols))
    finally:
        conn.execute("COMMIT")
    parts = [p for p in parts if len(p)]
    if not parts:
        out = pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    else:
        frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        out = group_buckets(frame, (frame["step_lo"].to_numpy(dtype=np.int64) - 1) // big, spec)
    out.attrs.update(width=big, rollup=r)
    return out


def _raw_buckets(run_dir: Path, spec: Spec, lo: int, hi: int, width: int, threads: int = 2) -> pd.DataFrame:
    """Bucketed sums and envelopes from the raw rows, one aggregate query per bucket (SQLite scans each bucket's
    rowid range once; no temporary GROUP BY b-tree). Large ranges are split over ``threads`` connections."""
    exprs = ["MAX(step)", "MIN(step)", "COUNT(*)"] + [f"SUM({sql_name(c)})" for c in spec.sums]
    for e in spec.envelopes:
        v = envelope_sql(e)
        exprs += [f"MIN({v})", f"MAX({v})"]
    sql = f"SELECT {', '.join(exprs)} FROM steps WHERE step BETWEEN ? AND ?"
    starts = list(range(lo, hi + 1, width))
    cols = frame_columns(spec)
    parts: list[list[tuple] | None] = [None] * max(1, threads)
    errors: list[BaseException] = []

    def work(k: int, chunk: list[int]) -> None:
        try:
            conn = connect(run_dir)
            try:
                parts[k] = [conn.execute(sql, (s, min(s + width - 1, hi))).fetchone() for s in chunk]
            finally:
                conn.close()
        except (sqlite3.Error, TraceError) as exc:
            errors.append(exc)

    n_threads = threads if (hi - lo + 1) > 200_000 and threads > 1 else 1
    size = math.ceil(len(starts) / n_threads)
    chunks = [starts[i * size:(i + 1) * size] for i in range(n_threads)]
    if n_threads == 1:
        work(0, chunks[0])
    else:
        ts = [threading.Thread(target=work, args=(k, c)) for k, c in enumerate(chunks)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    if errors:
        err = errors[0]
        raise err if isinstance(err, TraceError) else TraceError(describe_sqlite_error(run_dir.name, err))
    rows = [r for p in parts if p for r in p if r[2]]
    return pd.DataFrame.from_records(rows, columns=cols).astype(float)


def read_rows(conn: sqlite3.Connection, after: int, columns: list[str] | None = None,
              upto: int | None = None) -> pd.DataFrame:
    """Raw steps rows with step > ``after`` (and <= ``upto``), indexed by step, as floats."""
    cols = ", ".join(["step"] + [sql_name(c) for c in columns]) if columns is not None else "*"
    sql, args = f"SELECT {cols} FROM steps WHERE step > ?", [after]
    if upto is not None:
        sql += " AND step <= ?"
        args.append(upto)
    cur = conn.execute(sql + " ORDER BY step", args)
    names = [d[0] for d in cur.description]
    got = cur.fetchall()
    data = np.array(got, dtype=float) if got else np.zeros((0, len(names)))  # NULL -> NaN
    return pd.DataFrame(data[:, 1:], index=pd.Index(data[:, 0].astype(np.int64), name="step"), columns=names[1:])


def read_timings(run_dir: Path, lo: int, hi: int, width: int,
                 max_steps: int = MAX_TIMING_STEPS) -> pd.DataFrame:
    """Mean seconds per step of each phase per bucket (averaged over ranks): columns step, phase, seconds.

    From the timing rollups (schema 3) when buckets are at least one rollup wide, or the range is longer than
    ``max_steps`` (its buckets are then at least the finest rollup's width): sums of seconds and rows per (bucket,
    phase), split over the range as ``cover`` does, so exact and on the order of a thousand rows whatever the
    run's length (buckets then are a multiple of the rollup width, on the step grid). Otherwise up to
    ``max_steps`` steps in range are read in full; beyond that, ``max_steps`` evenly spaced steps are read through
    the (step, rank, phase) index (timings are noisy averages, not counts), and ``attrs['sampled']`` says so.
    """
    conn = connect(run_dir)
    try:
        span = hi - lo + 1
        # timings are noisy means, not counts: a range too long to read whole is read from the finest rollup
        # even when the view asked for narrower buckets
        up_to = max(width, ROLLUP_WIDTHS[0]) if span > max_steps else width
        levels = _levels(conn, timing_rollup_widths(conn), timing_rollup_table, up_to)
        if levels:
            return _rollup_timings(conn, lo, hi, max(width, levels[0][0]), levels)
        if span <= max_steps:
            df = pd.read_sql_query("SELECT step, phase, AVG(seconds) AS seconds FROM timings "
                                   "WHERE step BETWEEN ? AND ? GROUP BY step, phase", conn, params=(lo, hi))
            sampled = False
        else:
            picks = np.unique(np.linspace(lo, hi, max_steps).round().astype(np.int64)).tolist()
            df = pd.read_sql_query("SELECT step, phase, AVG(seconds) AS seconds FROM timings WHERE step IN "
                                   "(SELECT value FROM json_each(?)) GROUP BY step, phase", conn,
                                   params=(json.dumps(picks),))
            sampled = True
    except sqlite3.Error as exc:
        raise TraceError(describe_sqlite_error(Path(run_dir).name, exc)) from None
    finally:
        conn.close()
    if df.empty:
        out = pd.DataFrame(columns=["step", "phase", "seconds"])
    else:
        df["bucket"] = (df["step"] - lo) // width
        out = df.groupby(["bucket", "phase"], sort=True).agg(step=("step", "max"), seconds=("seconds", "mean"))
        out = out.reset_index()[["step", "phase", "seconds"]]
    out.attrs["sampled"] = sampled
    return out


def _rollup_timings(conn: sqlite3.Connection, lo: int, hi: int, width: int,
                    levels: list[tuple[int, int]]) -> pd.DataFrame:
    """``read_timings`` from the timing rollups: (step_hi, phase, rows, seconds) pieces of ``cover``, grouped into
    buckets of a multiple of the coarsest width; a bucket's value is its seconds over its rows."""
    big = math.ceil(width / levels[0][0]) * levels[0][0]
    pieces: list[tuple] = []
    conn.execute("BEGIN")
    try:
        for w, a, b in cover(lo, hi, levels):
            if w == 1:
                pieces += conn.execute(f"SELECT (step - 1) / {big}, MAX(step), phase, COUNT(*), TOTAL(seconds) "
                                       "FROM timings WHERE step BETWEEN ? AND ? GROUP BY 1, phase", (a, b)).fetchall()
            else:
                pieces += conn.execute(f"SELECT (bucket * {w}) / {big}, MAX((bucket + 1) * {w}), phase, SUM(n), "
                                       f"SUM(seconds) FROM {timing_rollup_table(w)} WHERE bucket BETWEEN ? AND ? "
                                       "GROUP BY 1, phase", (a, b)).fetchall()
    finally:
        conn.execute("COMMIT")
    if not pieces:
        out = pd.DataFrame(columns=["step", "phase", "seconds"])
    else:  # pieces of one (bucket, phase) from several levels are merged: rows and seconds added
        bucket, step, phase, n, sec = zip(*pieces)
        names, code = np.unique(np.array(phase, dtype=object).astype(str), return_inverse=True)
        key = np.asarray(bucket, dtype=np.int64) * len(names) + code
        keys, at = np.unique(key, return_inverse=True)
        rows = np.bincount(at, weights=np.asarray(n, dtype=float))
        total = np.bincount(at, weights=np.asarray(sec, dtype=float))
        last = np.zeros(len(keys), dtype=np.int64)
        np.maximum.at(last, at, np.asarray(step, dtype=np.int64))
        out = pd.DataFrame({"step": np.minimum(last, hi), "phase": names[keys % len(names)],
                            "seconds": total / rows})
    out.attrs.update(sampled=False, width=big)
    return out
