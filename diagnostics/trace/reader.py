"""The one trace reader: everything a view of a run reads from its ``trace.sqlite``, read-only.

A live trainer may be writing the trace (WAL), so every connection is read-only with a short lock timeout, and any
failure is a ``TraceError`` with a one-line message. No reader ever writes to a trace. Served here: the meta, the
step range and columns, steps after step N (a live tail), bucketed sums and min/max envelopes over any step range
(``Spec``, ``sql_buckets``; ``aggregate_rows``/``merge_frames`` do the same in memory), phase timings, evals,
evaluation audits (``read_eval_audits``), findings, markers and heartbeat (the run-status inputs), and the first
offending alignment samples. Figures are added to bucketed frames by ``finish`` from the registry
(``diagnostics.trace.figures``).

A bucketed frame has one row per bucket: ``step`` (last step in it), ``step_lo``, ``n`` (rows), the sum of each
stored column asked for, and ``<name>_min``/``<name>_max`` envelopes of per-step values; the figures are exact at
any bucket width because numerators and denominators are summed apart.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from diagnostics.trace import eval_audits

from diagnostics.trace import figures

from diagnostics.trace import ledger
from diagnostics.trace.readonly import open_read_only
from diagnostics.trace.store import (EVAL_AUDIT_TABLES, ROLLUP_WIDTHS, SCHEMA_VERSION, TRACE_NAME, TraceError, read_meta,
                               readable, rollup_table, timing_rollup_table)

MAX_BUCKETS = 800            # points per series over any visible range
MAX_TIMING_STEPS = 2_000     # timings of at most this many steps are read per range (sampled evenly beyond)
RAW_READ_MAX = 50_000        # a range of at most this many steps without a rollup level is read whole, in one query
CONNECT_TIMEOUT_S = 1.0      # a locked trace fails fast instead of hanging a page


# ------------------------------------------------------------------------------------------------------------------
# Reading the store

def connect(run_dir: Path, timeout: float = CONNECT_TIMEOUT_S) -> sqlite3.Connection:
    """A read-only connection with a short lock timeout; ``TraceError`` (one line) for a trace that is missing,
    half-written, corrupt or of a schema this version cannot read (it reads 1..``SCHEMA_VERSION``)."""
    run_dir = Path(run_dir)
    db = run_dir if run_dir.is_file() else run_dir / TRACE_NAME
    if not db.is_file():
        raise TraceError(f"no {TRACE_NAME} in {run_dir.name}")
    if db.stat().st_size == 0:
        raise TraceError(f"{run_dir.name}: the trace is empty (half-written: the trainer has not committed yet)")
    try:
        conn = open_read_only(db, timeout, check_same_thread=False)  # writes nothing beside the trace
    except sqlite3.Error as exc:
        raise TraceError(f"{run_dir.name}: cannot open the trace ({_one_line(exc)})") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables or "steps" not in tables:
            raise TraceError(f"{run_dir.name}: the trace has no schema yet (half-written, or not an etrm trace)")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            raise TraceError(f"{run_dir.name}: the trace has no schema version (half-written, or not an etrm trace)")
        if not readable(row[0]):
            raise TraceError(f"{run_dir.name}: trace schema {row[0]}, this etrm reads 1 to {SCHEMA_VERSION}; "
                             "upgrade etrm")
    except TraceError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise TraceError(describe_sqlite_error(run_dir.name, exc)) from None
    return conn


def describe_sqlite_error(name: str, exc: BaseException) -> str:
    text = _one_line(exc)
    if "locked" in text or "busy" in text:
        return f"{name}: the trace is locked by another process ({text}); it will be retried"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"{name}: the trace is corrupt ({text})"
    return f"{name}: the trace could not be read ({text})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def step_columns(conn: sqlite3.Connection) -> list[str]:
    """The stored per-step columns (every counter; not ``step``)."""
    return [r[1] for r in conn.execute("PRAGMA table_info(steps)") if r[1] != "step"]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------------------------------------------
# Bucketing specs: which sums and envelopes a page needs

@dataclass(frozen=True)
class Spec:
    """Columns to sum per bucket and per-step values whose min/max envelope to keep (derived ratio names or stored
    column names)."""

    sums: tuple[str, ...]
    envelopes: tuple[str, ...] = ()

    def resolve(self, columns: Iterable[str]) -> "Spec":
        """Only what this trace has: sums of present columns (plus figure inputs), envelopes whose inputs exist
        (a figure's root, ``sqrt``, has no envelope: its per-step value is not a plain ratio in SQL)."""
        have = set(columns)
        sums = list(dict.fromkeys(c for c in self.sums if c in have))
        envs = []
        for e in self.envelopes:
            fig = figures.REGISTRY.get(e)
            if fig is not None:
                if all(c in have for c in fig.terms) and not fig.sqrt:
                    envs.append(e)
                    sums.extend(c for c in fig.terms if c not in sums)
            elif e in have:
                envs.append(e)
                if e not in sums:
                    sums.append(e)
        return Spec(tuple(sums), tuple(envs))


def ratio_spec(*names: str, extra: Iterable[str] = ()) -> Spec:
    """A spec with the ratio terms of ``names`` summed and their envelopes kept."""
    sums: list[str] = list(extra)
    for n in names:
        if n in figures.REGISTRY:
            sums.extend(figures.REGISTRY[n].terms)
        else:
            sums.append(n)
    return Spec(tuple(dict.fromkeys(sums)), tuple(names))


def halt_columns(columns: Iterable[str]) -> list[str]:
    """``halt_at_k`` columns in k order."""
    ks = sorted(int(c[8:]) for c in columns if c.startswith("halt_at_") and c[8:].isdigit())
    return [f"halt_at_{k}" for k in ks]


def envelope_sql(name: str) -> str:
    """The per-step value of an envelope as SQL: a figure's (``diagnostics.trace.figures.per_step_sql``) or a column."""
    fig = figures.REGISTRY.get(name)
    return figures.per_step_sql(fig, _q) if fig is not None else _q(name)


def envelope_values(raw: pd.DataFrame, name: str) -> pd.Series:
    """The same per-step values in pandas."""
    fig = figures.REGISTRY.get(name)
    return figures.series(raw, fig) if fig is not None else raw[name].astype(float)


def bucket_width(lo: int, hi: int, max_buckets: int = MAX_BUCKETS) -> int:
    """Steps per bucket so that [lo, hi] makes at most ``max_buckets`` buckets (1 = full detail)."""
    return max(1, math.ceil((hi - lo + 1) / max_buckets))


def aggregate_rows(raw: pd.DataFrame, spec: Spec, width: int, origin: int = 1) -> pd.DataFrame:
    """Bucket raw per-step rows (indexed by step) into the bucketed-frame layout (sums, ``_min``/``_max``)."""
    cols = _frame_columns(spec)
    if raw.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    steps = raw.index.to_numpy(dtype=np.int64)
    data = {"step": steps.astype(float), "step_lo": steps.astype(float), "n": np.ones(len(raw))}
    for c in spec.sums:
        data[c] = raw[c].to_numpy(dtype=float) if c in raw.columns else np.full(len(raw), np.nan)
    for e in spec.envelopes:
        v = envelope_values(raw, e).to_numpy(dtype=float)
        data[f"{e}_min"], data[f"{e}_max"] = v, v
    frame = pd.DataFrame(data, columns=cols)
    if width == 1:
        return frame
    return _group(frame, (steps - origin) // width, spec)


def merge_frames(a: pd.DataFrame, b: pd.DataFrame, spec: Spec, width: int, origin: int = 1) -> pd.DataFrame:
    """Fold bucketed frame ``b`` (later steps) into ``a``, re-bucketing both at ``width`` (exact: sums, min, max)."""
    parts = [x for x in (a, b) if len(x)]
    if not parts:
        return a
    both = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    key = (both["step_lo"].to_numpy(dtype=np.int64) - origin) // width
    return _group(both[_frame_columns(spec)], key, spec)


def _frame_columns(spec: Spec) -> list[str]:
    return ["step", "step_lo", "n", *spec.sums, *(f"{e}_{m}" for e in spec.envelopes for m in ("min", "max"))]


def _group(frame: pd.DataFrame, key: np.ndarray, spec: Spec) -> pd.DataFrame:
    """Rows with equal ``key`` merged: sums added (NaN only where all are NaN), ``_min``/``_max`` and the step
    bounds reduced; vectorised with ``reduceat`` over the (sorted) keys."""
    if len(key) > 1 and (np.diff(key) < 0).any():
        order = np.argsort(key, kind="stable")
        frame, key = frame.iloc[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    mins = {"step_lo", *(f"{e}_min" for e in spec.envelopes)}
    maxs = {"step", *(f"{e}_max" for e in spec.envelopes)}
    out: dict[str, np.ndarray] = {}
    for c in frame.columns:
        v = frame[c].to_numpy(dtype=float)
        if c in mins:
            out[c] = np.fmin.reduceat(v, starts)
        elif c in maxs:
            out[c] = np.fmax.reduceat(v, starts)
        else:
            nan = np.isnan(v)
            total = np.add.reduceat(np.where(nan, 0.0, v), starts)
            total[np.add.reduceat(~nan, starts) == 0] = np.nan
            out[c] = total
    return pd.DataFrame(out, columns=list(frame.columns))


def finish(frame: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """A bucketed frame with every available registered figure added per bucket (``diagnostics.trace.figures``: a ratio
    of the bucket's sums, per step over its ``n`` steps for figures without a denominator)."""
    n = frame["n"].to_numpy(dtype=float) if "n" in frame.columns else None
    cols = figures.columns(frame, n=n, mode=mode)
    keep = frame.drop(columns=[c for c in cols if c in frame.columns])
    out = pd.concat([keep, pd.DataFrame(cols, index=frame.index)], axis=1) if cols else frame.copy()
    out.attrs.update(frame.attrs)
    return out


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
    cols = _frame_columns(spec)
    # whole rollup buckets are grouped into the view's buckets by SQLite (one row per view bucket comes back)
    exprs = ", ".join(["MAX(step_hi)", "MIN(step_lo)", "SUM(n)", *(f"SUM({_q(c)})" for c in spec.sums),
                       *(f"{m.upper()}({_q(f'{e}__{m}')})" for e in spec.envelopes for m in ("min", "max"))])
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
        out = _group(frame, (frame["step_lo"].to_numpy(dtype=np.int64) - 1) // big, spec)
    out.attrs.update(width=big, rollup=r)
    return out


def _raw_buckets(run_dir: Path, spec: Spec, lo: int, hi: int, width: int, threads: int = 2) -> pd.DataFrame:
    """Bucketed sums and envelopes from the raw rows, one aggregate query per bucket (SQLite scans each bucket's
    rowid range once; no temporary GROUP BY b-tree). Large ranges are split over ``threads`` connections."""
    exprs = ["MAX(step)", "MIN(step)", "COUNT(*)"] + [f"SUM({_q(c)})" for c in spec.sums]
    for e in spec.envelopes:
        v = envelope_sql(e)
        exprs += [f"MIN({v})", f"MAX({v})"]
    sql = f"SELECT {', '.join(exprs)} FROM steps WHERE step BETWEEN ? AND ?"
    starts = list(range(lo, hi + 1, width))
    cols = _frame_columns(spec)
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
    cols = ", ".join(["step"] + [_q(c) for c in columns]) if columns is not None else "*"
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


# ------------------------------------------------------------------------------------------------------------------
# Evals, findings, markers, alignment samples

def read_evals(conn: sqlite3.Connection) -> pd.DataFrame:
    """Evaluation results, one row per eval step (index) and one column per metric."""
    long = pd.read_sql_query("SELECT step, name, value FROM evals ORDER BY step", conn)
    if long.empty:
        return pd.DataFrame(index=pd.Index([], dtype="int64", name="step"))
    wide = long.pivot(index="step", columns="name", values="value")  # (step, name) is the key: no aggregation
    wide.columns.name = None
    return wide.astype(float)


def read_eval_audits(conn: sqlite3.Connection) -> pd.DataFrame:
    """The evaluation audits (schema 3; ``diagnostics.trace.eval_audits.COLUMNS``): one row per eval step, weights and
    ACT step, with the eval's would-halt figures, config hash and halt rule on each. Empty (same columns) for a
    trace of an older schema, which has no audits."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not set(EVAL_AUDIT_TABLES) <= tables:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in eval_audits.COLUMNS})
    cols = ", ".join(f"{'s' if c in _ACT_STEP_COLUMNS else 'a'}.{_q(c)}" for c in eval_audits.COLUMNS)
    df = pd.read_sql_query(f"SELECT {cols} FROM eval_act_steps s JOIN eval_audits a USING (step, weights) "
                           "ORDER BY s.step, s.weights, s.act_step", conn)
    return df.astype({"step": "int64", "act_step": "int64"})


_ACT_STEP_COLUMNS = ("step", "weights", "act_step", "exact", "token", "halt_share")


def read_findings(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The findings the trainer stored: code, severity, first_step, evidence (a dict), message."""
    rows = conn.execute("SELECT code, severity, first_step, evidence, message FROM findings").fetchall()
    return [{"code": c, "severity": s, "first_step": None if f is None else int(f), "evidence": _json(e),
             "message": m} for c, s, f, e, m in rows]


def read_markers(conn: sqlite3.Connection) -> pd.DataFrame:
    """Lifecycle markers in the order written: time, kind, step, detail."""
    return pd.read_sql_query("SELECT time, kind, step, detail FROM markers ORDER BY time, rowid", conn)


def read_status_inputs(conn: sqlite3.Connection) -> tuple[list[tuple[float, str]], float | None]:
    """What the run-status rule reads: (time, kind) markers in order and the last heartbeat time."""
    markers = conn.execute("SELECT time, kind FROM markers ORDER BY time, rowid").fetchall()
    beat = conn.execute("SELECT MAX(time) FROM heartbeat").fetchone()[0]
    return markers, beat


def read_alignment(conn: sqlite3.Connection, limit: int | None = None) -> pd.DataFrame:
    """The first offending slots kept by the alignment probe: step, slot, sample_id, label_sample_id,
    demo_sample_id."""
    sql = ("SELECT step, slot, sample_id, label_sample_id, demo_sample_id FROM alignment_samples "
           "ORDER BY step, slot")
    return pd.read_sql_query(sql + (f" LIMIT {int(limit)}" if limit is not None else ""), conn)


# ------------------------------------------------------------------------------------------------------------------
# The per-sample ledger (schema version 3; ``diagnostics.trace.ledger`` defines its columns and figures)

def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def ledger_sample_rate(conn: sqlite3.Connection) -> float:
    """The share of exits whose raw record is stored (1.0 when every one is; NaN for a trace without a ledger)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_sample_rate'").fetchone()
    return float(row[0]) if row is not None else math.nan


def read_ledger(conn: sqlite3.Connection, lo: int | None = None, hi: int | None = None,
                limit: int | None = None) -> pd.DataFrame:
    """The stored raw ledger records (exit step in [lo, hi] when given), in exit order: the columns of
    ``diagnostics.trace.ledger.RECORD_COLUMNS`` (``reason`` as ``q_halt``/``max_step``) plus ``token_acc``.
    ``attrs["sample_rate"]``: the share of exits kept (scale counts by its inverse). Empty before version 3."""
    cols = list(ledger.RECORD_COLUMNS)
    if "ledger" not in _tables(conn):
        out = ledger.as_frame([], cols)
    else:
        sql, args = f"SELECT {', '.join(cols)} FROM ledger WHERE 1", []
        if lo is not None:
            sql, args = sql + " AND exit_step >= ?", args + [lo]
        if hi is not None:
            sql, args = sql + " AND exit_step <= ?", args + [hi]
        sql += " ORDER BY exit_step, rank, slot" + (f" LIMIT {int(limit)}" if limit is not None else "")
        out = ledger.as_frame(conn.execute(sql, args).fetchall(), cols)
    out["token_acc"] = out["token_correct"] / out["token_count"].where(out["token_count"] > 0)
    out.attrs["sample_rate"] = ledger_sample_rate(conn)
    return out


def read_ledger_bins(conn: sqlite3.Connection) -> pd.DataFrame:
    """Per task and histogram kind (``halt_step``, ``q_prob``): bin, n, exact, prob_sum, over both segments."""
    cols = ["task", "kind", "bin", *ledger.BIN_SUMS]
    if "ledger_bins" not in _tables(conn):
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    sums = ", ".join(f"SUM({c}) AS {c}" for c in ledger.BIN_SUMS)
    return pd.read_sql_query(f"SELECT task, kind, bin, {sums} FROM ledger_bins GROUP BY task, kind, bin "
                             "ORDER BY task, kind, bin", conn)


def read_task_stats(conn: sqlite3.Connection) -> pd.DataFrame:
    """One row per task (augmentations folded): the exact sums over every exit and the task figures of
    ``diagnostics.trace.ledger.task_stats`` (exact_rate, mean_halt_step, q_halt_share, calibration_error, ...)."""
    if "ledger_tasks" not in _tables(conn):
        tasks = pd.DataFrame(columns=["task", *ledger.TASK_SUMS])
    else:
        sums = ", ".join(f"SUM({c}) AS {c}" for c in ledger.TASK_SUMS)
        tasks = pd.read_sql_query(f"SELECT task, {sums} FROM ledger_tasks GROUP BY task", conn)
    out = ledger.task_stats(tasks, read_ledger_bins(conn))
    out.attrs["sample_rate"] = ledger_sample_rate(conn)
    return out


def step_range(conn: sqlite3.Connection) -> tuple[int, int]:
    """The first and last stored step (0, 0 when there is none)."""
    # two queries: each is one b-tree descent, where MIN and MAX together would scan the table
    lo = conn.execute("SELECT MIN(step) FROM steps").fetchone()[0]
    hi = conn.execute("SELECT MAX(step) FROM steps").fetchone()[0]
    return int(lo or 0), int(hi or 0)


def _json(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


__all__ = ["CONNECT_TIMEOUT_S", "MAX_BUCKETS", "MAX_TIMING_STEPS", "Spec", "aggregate_rows", "bucket_width",
           "connect", "describe_sqlite_error", "envelope_sql", "envelope_values", "finish", "halt_columns",
           "ledger_sample_rate", "merge_frames", "ratio_spec", "read_alignment", "read_eval_audits", "read_evals",
           "read_findings", "read_ledger", "read_ledger_bins", "read_markers", "read_meta", "read_task_stats",
           "read_rows", "read_status_inputs", "read_timings", "readable", "rollup_widths", "sql_buckets", "step_columns",
           "step_range", "cover", "timing_rollup_widths"]
