"""Run loading for etrm-dash: which runs exist under ``--runs``, and their traces as bucketed frames.

Everything here reads the trace store read-only and never follows a path out of the runs root. A run is kept in a
``RunCache``: small runs (up to ``RAW_MAX_STEPS`` steps) as their raw steps table, bucketed in pandas; large runs as
bucketed min/max SQL aggregates over the visible range (full detail once a zoom shows few enough steps). A live
refresh reads only the rows past the last step seen and folds them into what is cached. Any failure to read a run
(missing, corrupt, locked, half-written) is a ``RunError`` whose message the app shows on that run's error card.

A bucketed frame has one row per bucket: ``step`` (last step in it), ``step_lo``, ``n`` (rows), the sum of each
stored column asked for, and ``<name>_min``/``<name>_max`` envelopes of per-step values; ``finish`` adds the
ratio-of-sums means (``coverage``, ``loss_mean``... as ``diagnostics.loading.DERIVED`` defines them), exact at any
bucket width because numerators and denominators are summed apart.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote

import numpy as np
import pandas as pd

from diagnostics.doctor import SEVERITIES, diagnose
from diagnostics.liveness import trainer_alive
from diagnostics.loading import DERIVED, STALE_AFTER_S, status_from_markers
from diagnostics.profiling import PROFILER_DIR
from diagnostics.store import SCHEMA_VERSION, TRACE_NAME, read_meta, read_only_uri

RAW_MAX_STEPS = 50_000       # runs up to this many steps are held raw (exact doctor, pandas bucketing)
MAX_BUCKETS = 800            # points per series over any visible range
MAX_TIMING_STEPS = 2_000     # timings of at most this many steps are read per range (sampled evenly beyond)
CONNECT_TIMEOUT_S = 1.0      # a locked trace fails fast instead of hanging a page
MAX_DEPTH = 3                # how deep under --runs to look for traces


class RunError(Exception):
    """A run that cannot be shown; the message is one line for its error card."""


class Refused(RunError):
    """A path that is not inside the runs root."""


# ------------------------------------------------------------------------------------------------------------------
# Paths: every run name is resolved against the root and must stay inside it

def resolve_run(root: str | Path, name: str) -> Path:
    """The run directory for ``name`` (relative to ``root``, URL-quoted or not); ``Refused`` if it leaves ``root``."""
    base = Path(root).resolve()
    text = unquote(name or "")
    if not text or "\x00" in text or text.startswith(("/", "\\", "~")) or Path(text).is_absolute():
        raise Refused(f"refused: {text!r} is not a run under {base}")
    target = (base / text).resolve()
    if target == base or base not in target.parents:
        raise Refused(f"refused: {text!r} is outside the runs directory {base}")
    trace = target / TRACE_NAME
    if trace.exists() and base not in trace.resolve().parents:
        raise Refused(f"refused: the trace of {text!r} points outside the runs directory {base}")
    if not target.is_dir():
        raise RunError(f"no run named {text!r} under {base}")
    if not trace.is_file():
        raise RunError(f"{text!r} has no {TRACE_NAME} (train with --trace)")
    return target


def discover(root: str | Path) -> list[str]:
    """Names (relative, '/'-separated) of the traced runs under ``root``, newest first; links out of it are skipped."""
    base = Path(root).resolve()
    found: list[tuple[float, str]] = []
    if not base.is_dir():
        return []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(base).parts)
        if depth >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if TRACE_NAME in filenames and here != base:
            name = here.relative_to(base).as_posix()
            try:
                resolve_run(base, name)
                found.append((_mtime(here / TRACE_NAME), name))
            except RunError:
                continue
    return [name for _, name in sorted(found, key=lambda x: (-x[0], x[1]))]


def _mtime(db: Path) -> float:
    times = [f.stat().st_mtime for f in (db, db.with_name(db.name + "-wal")) if f.is_file()]
    return max(times) if times else 0.0


# ------------------------------------------------------------------------------------------------------------------
# Reading the store

def connect(run_dir: Path) -> sqlite3.Connection:
    """A read-only connection with a short lock timeout; ``RunError`` for a trace that is not a readable v1 trace."""
    db = Path(run_dir) / TRACE_NAME
    if not db.is_file():
        raise RunError(f"no {TRACE_NAME} in {run_dir.name}")
    if db.stat().st_size == 0:
        raise RunError(f"{run_dir.name}: the trace is empty (half-written: the trainer has not committed yet)")
    try:
        conn = sqlite3.connect(read_only_uri(db), uri=True, timeout=CONNECT_TIMEOUT_S,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise RunError(f"{run_dir.name}: cannot open the trace ({_one_line(exc)})") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables or "steps" not in tables:
            raise RunError(f"{run_dir.name}: the trace has no schema yet (half-written, or not an etrm trace)")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            raise RunError(f"{run_dir.name}: the trace has no schema version (half-written, or not an etrm trace)")
        if str(row[0]) != str(SCHEMA_VERSION):
            raise RunError(f"{run_dir.name}: trace schema {row[0]}, this dashboard reads {SCHEMA_VERSION}")
    except RunError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise RunError(describe_sqlite_error(run_dir.name, exc)) from None
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


def _columns(conn: sqlite3.Connection) -> list[str]:
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
        """Only what this trace has: sums of present columns (plus ratio inputs), envelopes whose inputs exist."""
        have = set(columns)
        sums = list(dict.fromkeys(c for c in self.sums if c in have))
        envs = []
        for e in self.envelopes:
            if e in DERIVED:
                nums, dens = DERIVED[e]
                if all(c in have for c in nums + dens):
                    envs.append(e)
                    sums.extend(c for c in nums + dens if c not in sums)
            elif e in have:
                envs.append(e)
                if e not in sums:
                    sums.append(e)
        return Spec(tuple(sums), tuple(envs))


def ratio_spec(*names: str, extra: Iterable[str] = ()) -> Spec:
    """A spec with the ratio terms of ``names`` summed and their envelopes kept."""
    sums: list[str] = list(extra)
    for n in names:
        if n in DERIVED:
            nums, dens = DERIVED[n]
            sums.extend(nums + dens)
        else:
            sums.append(n)
    return Spec(tuple(dict.fromkeys(sums)), tuple(names))


def halt_columns(columns: Iterable[str]) -> list[str]:
    """``halt_at_k`` columns in k order."""
    ks = sorted(int(c[8:]) for c in columns if c.startswith("halt_at_") and c[8:].isdigit())
    return [f"halt_at_{k}" for k in ks]


OVERVIEW = ratio_spec("loss_mean", "exact_inflight", "exact_halted", "coverage",
                      extra=("resets", "slots", "inflight_step_sum", "real_slots", "halted_steps", "halted_count"))
COVERAGE = ratio_spec("coverage", "reset_fraction", "grad_norm_encoder", "grad_norm_rest",
                      extra=("encoded", "encode_needed", "puzzle_ids_with_grad"))
ALIGNMENT = ratio_spec("label_mismatch", "demo_mismatch", "carry_mismatch", extra=("aligned_den",))
TIMING = Spec(("encoded", "encode_needed", "slots", "resets"))
# The compare page: coverage beside resets for the cards, and the efficiency table's whole-run sums, in one pass.
COMPARE = ratio_spec("coverage", extra=("resets", "slots", "encoded", "encode_needed", "samples_consumed",
                                         "real_slots", "halted_steps", "halted_count"))


def halting_spec(columns: Iterable[str]) -> Spec:
    return Spec(("halted", "q_tp", "q_fp", "q_fn", "q_correct", "real_slots", "inflight_step_sum", "halted_steps",
                 "halted_count", "q_says_halt", "explore_vetoes", *halt_columns(columns)))


def metric_spec(metric: str) -> Spec:
    """The spec for one compare metric: a derived ratio (with its envelope) or a stored counter (mean per step)."""
    return ratio_spec(metric)


def envelope_sql(name: str) -> str:
    """The per-step value of an envelope as SQL (a REAL division is NULL where the denominator is 0)."""
    if name in DERIVED:
        nums, dens = DERIVED[name]
        num = " + ".join(f"COALESCE({_q(c)}, 0)" for c in nums)
        den = " + ".join(f"COALESCE({_q(c)}, 0)" for c in dens)
        return f"(1.0 * ({num}) / NULLIF({den}, 0))"
    return _q(name)


def envelope_values(raw: pd.DataFrame, name: str) -> pd.Series:
    """The same per-step values in pandas."""
    if name in DERIVED:
        nums, dens = DERIVED[name]
        num = sum((raw[c].fillna(0.0) for c in nums[1:]), raw[nums[0]].fillna(0.0))
        den = sum((raw[c].fillna(0.0) for c in dens[1:]), raw[dens[0]].fillna(0.0))
        return num.astype(float) / den.astype(float).where(den != 0)
    return raw[name].astype(float)


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


def finish(frame: pd.DataFrame) -> pd.DataFrame:
    """A bucketed frame with the ratio means added (ratios of sums) and ``<col>_mean`` per step for stored columns."""
    out = frame.copy()
    for name, (nums, dens) in DERIVED.items():
        if all(c in out.columns for c in nums + dens):
            num = sum((out[c].fillna(0.0) for c in nums[1:]), out[nums[0]].fillna(0.0))
            den = sum((out[c].fillna(0.0) for c in dens[1:]), out[dens[0]].fillna(0.0))
            out[name] = num.astype(float) / den.astype(float).where(den != 0)
    n = out["n"].astype(float).where(out["n"] > 0) if "n" in out.columns else None
    if n is not None:
        for c in list(out.columns):
            if c not in ("step", "step_lo", "n") and not c.endswith(("_min", "_max")) and c not in DERIVED:
                out[f"{c}_mean"] = out[c] / n
    out.attrs.update(frame.attrs)
    return out


def sql_buckets(run_dir: Path, spec: Spec, lo: int, hi: int, width: int, threads: int = 2) -> pd.DataFrame:
    """Bucketed sums and min/max envelopes over steps [lo, hi], one aggregate query per bucket (SQLite scans each
    bucket's rowid range once; no temporary GROUP BY b-tree). Large ranges are split over ``threads`` connections."""
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
        except (sqlite3.Error, RunError) as exc:
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
        raise err if isinstance(err, RunError) else RunError(describe_sqlite_error(run_dir.name, err))
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
    df = pd.read_sql_query(sql + " ORDER BY step", conn, params=args)
    df = df.set_index("step")
    df.index = df.index.astype("int64")
    return df.astype(float)


def read_timings(run_dir: Path, lo: int, hi: int, width: int,
                 max_steps: int = MAX_TIMING_STEPS) -> pd.DataFrame:
    """Mean seconds per step of each phase per bucket (averaged over ranks): columns step, phase, seconds.

    Up to ``max_steps`` steps in range are read in full; beyond that, ``max_steps`` evenly spaced steps are read
    through the (step, rank, phase) index (timings are noisy averages, not counts), and ``attrs['sampled']`` says so.
    """
    conn = connect(run_dir)
    try:
        span = hi - lo + 1
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
        raise RunError(describe_sqlite_error(run_dir.name, exc)) from None
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


# ------------------------------------------------------------------------------------------------------------------
# One run, cached

@dataclass
class RunInfo:
    """What the runs list shows for one run; ``error`` is set (and the rest may be empty) when it cannot be read."""

    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    first_step: int = 0
    last_step: int = 0
    updated: float | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    findings_source: str = "doctor"
    error: str | None = None
    restarts: int = 0  # torchrun restarts (``restart`` markers)

    @property
    def verdict(self) -> str:
        """``error``, ``warning``, ``info``, ``healthy``, ``no data`` (no steps yet) or ``unreadable``."""
        if self.error:
            return "unreadable"
        if not self.last_step:
            return "no data"
        for sev in SEVERITIES:
            if any(f["severity"] == sev for f in self.findings):
                return sev
        return "healthy"

    @property
    def headline(self) -> str:
        """The verdict in a few words: the first finding's code, or 'healthy'."""
        if self.error:
            return "unreadable"
        if not self.last_step:
            return "no data yet"
        return self.findings[0]["code"] if self.findings else "healthy"


def status_of(markers: list[tuple[float, str]], beat: float | None, mtime: float, now: float | None = None,
              alive: bool | None = None) -> str:
    """``live``, ``finished``, ``stopped`` or ``crashed``: ``diagnostics.loading``'s rule, on rows already read."""
    now = time.time() if now is None else now
    return status_from_markers(markers, beat, [mtime] if mtime else [], now, STALE_AFTER_S, alive=alive)


class RunCache:
    """One run's data, read incrementally. Thread-safe (Dash serves callbacks from several threads)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = Path(root), name
        self.path = resolve_run(root, name)
        self.lock = threading.RLock()
        self.info = RunInfo(name)
        self.columns: list[str] = []
        self.raw: pd.DataFrame | None = None          # small runs: every stored column, indexed by step
        self.frames: dict[Spec, tuple[int, pd.DataFrame]] = {}  # large runs: (width, overview frame) per spec
        self.evals = pd.DataFrame()
        self.alignment = pd.DataFrame()
        self._marker_count = -1
        self._inode: tuple[int, int] | None = None
        self._doctor_step = -1
        self.refreshed_at = 0.0

    # -- refresh ---------------------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read what is new (rows past the last step seen, markers, findings, evals); True when steps were added.

        Never raises: a failure is kept in ``info.error`` (and cleared by the next good read)."""
        with self.lock:
            try:
                grew = self._refresh()
                self.info.error = None
                return grew
            except RunError as exc:
                self.info.error = str(exc)
            except sqlite3.Error as exc:
                self.info.error = describe_sqlite_error(self.name, exc)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.info.error = f"{self.name}: the trace could not be read ({_one_line(exc)})"
            return False

    def _refresh(self) -> bool:
        self.path = resolve_run(self.root, self.name)  # again: a link may have been swapped since
        db = self.path / TRACE_NAME
        st = db.stat()
        conn = connect(self.path)
        try:
            meta = read_meta(conn)
            markers = conn.execute("SELECT time, kind FROM markers ORDER BY time, rowid").fetchall()
            beat = conn.execute("SELECT MAX(time) FROM heartbeat").fetchone()[0]
            lo, hi = conn.execute("SELECT MIN(step), MAX(step) FROM steps").fetchone()
            lo, hi = int(lo or 0), int(hi or 0)
            inode = (st.st_dev, st.st_ino)
            restarted = (inode != self._inode or len(markers) < self._marker_count
                         or (self._marker_count >= 0 and any(k in ("resume", "restart")
                                                             for _, k in markers[self._marker_count:]))
                         or hi < self.info.last_step)
            if restarted:
                self.raw, self.frames, self._doctor_step = None, {}, -1
                self.info.last_step = 0
            self._inode, self._marker_count = inode, len(markers)
            self.columns = _columns(conn)
            last = self.info.last_step
            grew = hi > last
            if hi <= RAW_MAX_STEPS:
                if self.raw is None or grew:
                    new = read_rows(conn, last if self.raw is not None else 0)
                    self.raw = new if self.raw is None else pd.concat([self.raw, new])
                    self.raw = self.raw.reindex(columns=self.columns)
            else:
                self.raw = None
                if grew:
                    self._extend_frames(conn, last, hi)
            self.evals = _evals(conn)
            self.alignment = pd.read_sql_query(
                "SELECT step, slot, sample_id, label_sample_id, demo_sample_id FROM alignment_samples "
                "ORDER BY step, slot LIMIT 200", conn)
            stored = pd.read_sql_query("SELECT code, severity, first_step, evidence, message FROM findings", conn)
        finally:
            conn.close()
        info = self.info
        info.meta = meta
        info.first_step, info.last_step = lo, hi
        info.updated = max([t for t in (beat, *(t for t, _ in markers)) if t is not None] + [_mtime(db)])
        info.status = status_of(markers, beat, _mtime(db), alive=trainer_alive(self.path))
        info.restarts = sum(kind == "restart" for _, kind in markers)
        self._findings(stored, meta)
        self.refreshed_at = time.time()
        return grew

    def _findings(self, stored: pd.DataFrame, meta: dict[str, Any]) -> None:
        """The doctor's findings: recomputed on the raw table for small runs, the trainer's stored ones otherwise."""
        stored_list = [{"code": r.code, "severity": r.severity,
                        "first_step": None if pd.isna(r.first_step) else int(r.first_step),
                        "evidence": _json(r.evidence), "message": r.message} for r in stored.itertuples()]
        if self.raw is not None:
            if self._doctor_step != self.info.last_step:
                df = self.raw.copy()
                df.attrs["meta"] = meta
                align = self.alignment.to_dict("records")
                found = [f.to_dict() for f in diagnose(df, meta, alignment=align)] if len(df) else []
                codes = {f["code"] for f in found}
                found += [f for f in stored_list if f["code"] not in codes]
                self.info.findings = _sorted(found)
                self.info.findings_source = "doctor"
                self._doctor_step = self.info.last_step
        else:
            self.info.findings = _sorted(stored_list)
            self.info.findings_source = "trainer"

    def _extend_frames(self, conn: sqlite3.Connection, last: int, hi: int) -> None:
        """Large runs: fold rows past ``last`` into each cached overview frame, coarsening it when it grows."""
        if not self.frames:
            return
        need = sorted({c for spec in self.frames for c in spec.sums})
        new = read_rows(conn, last, need) if hi - last <= RAW_MAX_STEPS else None
        for spec, (width, frame) in list(self.frames.items()):
            if new is None:  # too much at once: rebuild this frame from SQL on next use
                del self.frames[spec]
                continue
            lo = int(frame["step_lo"].min()) if len(frame) else 1
            w = max(width, bucket_width(lo, hi))
            merged = merge_frames(frame, aggregate_rows(new, spec, w, origin=lo), spec, w, origin=lo)
            self.frames[spec] = (w, merged)

    # -- reads -----------------------------------------------------------------------------------------------------
    def frame(self, spec: Spec, xrange: tuple[float, float] | None = None,
              max_buckets: int = MAX_BUCKETS) -> pd.DataFrame:
        """The bucketed frame (with ratio means) for ``spec`` over ``xrange`` (whole run when None)."""
        with self.lock:
            spec = spec.resolve(self.columns)
            first, last = self.info.first_step, self.info.last_step
            if last == 0:
                return finish(aggregate_rows(pd.DataFrame(), spec, 1))
            lo, hi = _clip_range(xrange, first, last)
            width = bucket_width(lo, hi, max_buckets)
            if self.raw is not None:
                part = self.raw.loc[lo:hi]
                out = aggregate_rows(part, spec, width, origin=lo)
            elif xrange is None:
                cached = self.frames.get(spec)
                if cached is None:
                    cached = (width, sql_buckets(self.path, spec, lo, hi, width))
                    self.frames[spec] = cached
                width, out = cached
            else:
                out = sql_buckets(self.path, spec, lo, hi, width)
            out = finish(out)
            out.attrs.update(width=width, lo=lo, hi=hi, exact=width == 1)
            return out

    def timings(self, xrange: tuple[float, float] | None = None, max_buckets: int = MAX_BUCKETS) -> pd.DataFrame:
        with self.lock:
            first, last = self.info.first_step, self.info.last_step
        if last == 0:
            out = pd.DataFrame(columns=["step", "phase", "seconds"])
            out.attrs["sampled"] = False
            return out
        lo, hi = _clip_range(xrange, first, last)
        return read_timings(self.path, lo, hi, bucket_width(lo, hi, max_buckets))

    def totals(self) -> dict[str, float]:
        """Whole-run sums of the ``COMPARE`` columns (the efficiency table's inputs) and ``steps``: the sums of the
        cached, incrementally refreshed whole-run frame, so exact and cheap after the first call."""
        f = self.frame(COMPARE)
        sums = {c: float(f[c].sum()) for c in COMPARE.resolve(self.columns).sums if c in f.columns}
        sums["steps"] = float(f["n"].sum()) if len(f) else 0.0
        return sums

    def profiler_traces(self) -> list[Path]:
        """Profiler traces under the run's ``profiler/`` folder (kept inside the runs root)."""
        prof = self.path / PROFILER_DIR
        if not prof.is_dir():
            return []
        base = self.root.resolve()
        out = [p for p in sorted(prof.rglob("*.json*")) if p.is_file() and base in p.resolve().parents
               and ".pt.trace.json" in p.name]
        return out[:20]


def _clip_range(xrange: tuple[float, float] | None, first: int, last: int) -> tuple[int, int]:
    if not xrange:
        return first, last
    a, b = sorted(float(x) for x in xrange)
    lo, hi = max(first, int(math.floor(a))), min(last, int(math.ceil(b)))
    if hi < lo:
        return first, last
    return lo, hi


def _evals(conn: sqlite3.Connection) -> pd.DataFrame:
    long = pd.read_sql_query("SELECT step, name, value FROM evals ORDER BY step", conn)
    if long.empty:
        return pd.DataFrame(index=pd.Index([], dtype="int64", name="step"))
    wide = long.pivot_table(index="step", columns="name", values="value", aggfunc="last")
    wide.columns.name = None
    return wide.astype(float)


def _json(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text


def _sorted(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(findings, key=lambda f: (SEVERITIES.index(f["severity"]) if f["severity"] in SEVERITIES else 9,
                                          f.get("first_step") or 0))


class Runs:
    """Every run under the root, as ``RunCache``s made on first use. ``get`` refuses names outside the root."""

    def __init__(self, root: str | Path, min_refresh_s: float = 0.5) -> None:
        self.root = Path(root).resolve()
        self.caches: dict[str, RunCache] = {}
        self.lock = threading.Lock()
        self.min_refresh_s = min_refresh_s

    def names(self) -> list[str]:
        return discover(self.root)

    def get(self, name: str, refresh: bool = True) -> RunCache:
        """The run's cache, refreshed if older than ``min_refresh_s``; ``Refused``/``RunError`` for a bad name."""
        key = unquote(name or "")
        path = resolve_run(self.root, key)
        key = path.relative_to(self.root).as_posix()
        with self.lock:
            cache = self.caches.get(key)
            if cache is None:
                cache = self.caches[key] = RunCache(self.root, key)
        if refresh and time.time() - cache.refreshed_at >= self.min_refresh_s:
            cache.refresh()
        return cache

    def infos(self) -> list[RunInfo]:
        """The runs list: one ``RunInfo`` per run (an unreadable one carries its error)."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name).info)
            except RunError as exc:
                out.append(RunInfo(name, error=str(exc)))
        return out
