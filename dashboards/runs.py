"""Run loading for etrm-dash: which runs exist under ``--runs`` (path safety), and each run's data, cached.

Only dashboard concerns live here: run names resolved against the runs root (never followed out of it), and a
``RunCache`` per run that holds what the pages show and refreshes it incrementally. Every read goes through the one
trace reader, ``diagnostics.trace.reader``/``records``/``connection`` (read-only; no SQL here), and every figure
comes from the registry (``diagnostics.trace.figures``). Small runs (up to ``RAW_MAX_STEPS`` steps) are held as
their raw steps table, bucketed in memory; large runs as bucketed SQL aggregates over the visible range (full detail
once a zoom shows few enough steps). A live refresh reads only the rows past the last step seen. Any failure to read
a run (missing, corrupt, locked, half-written) is a ``RunError`` whose message the app shows on that run's error
card.
"""

from __future__ import annotations

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

from diagnostics.trace import figures

from diagnostics.trace import connection
from diagnostics.trace import reader
from diagnostics.trace import records
from diagnostics.doctor.diagnose import diagnose
from diagnostics.doctor.findings import SEVERITIES
from diagnostics.trace.liveness import trainer_alive
from diagnostics.trace.loading import STALE_AFTER_S, status_from_markers
from diagnostics.probes.profiling import PROFILER_DIR
from diagnostics.trace.bucketing import (MAX_BUCKETS, Spec, aggregate_rows, bucket_width, finish, halt_columns,
                                         merge_frames, ratio_spec)
from diagnostics.trace.schema import TRACE_NAME, TraceError
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.eval_audits import EVALUATED_FROM

RAW_MAX_STEPS = 50_000       # runs up to this many steps are held raw (exact doctor, in-memory bucketing)
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
                found.append((records.last_write_time(here) or 0.0, name))
            except RunError:
                continue
    return [name for _, name in sorted(found, key=lambda x: (-x[0], x[1]))]


def _mtime(db: Path) -> float:
    times = [f.stat().st_mtime for f in (db, db.with_name(db.name + "-wal")) if f.is_file()]
    return max(times) if times else 0.0


# ------------------------------------------------------------------------------------------------------------------
# What each page reads: registered figures (with their min/max envelopes) and the sums beside them

OVERVIEW = ratio_spec("loss_per_slot", "lm_loss_per_slot", "exact_inflight", "exact_halted", "coverage",
                      "reset_fraction", "mean_inflight_step", "mean_halt_step")
COVERAGE = ratio_spec("coverage", "reset_fraction", "grad_norm_encoder_mean", "grad_norm_rest_mean",
                      "encoded_per_step", "encode_needed_per_step", "slots_per_step", "puzzle_rows_trained_per_step")
ALIGNMENT = ratio_spec("label_mismatch_per_step", "demo_mismatch_per_step", "carry_mismatch_per_step",
                       extra=("aligned_den",))
TIMING = ratio_spec("encoded_per_step", "encode_needed_per_step", "slots_per_step", "reset_fraction")
# The compare page: coverage beside resets for the cards, and the efficiency table's whole-run sums, in one pass.
COMPARE = ratio_spec("coverage", "reset_fraction",
                     extra=tuple(t for name in ("encoded_per_step", "encoded_per_sample", "steps_per_sample",
                                                "encode_ratio", "early_halt_share", "mean_halt_step")
                                 for t in figures.REGISTRY[name].terms))


# The run card: every counter a figure reads, summed over the card's window (no envelopes).
CARD = Spec(figures.COUNTERS)


def halting_spec(columns: Iterable[str]) -> Spec:
    return ratio_spec("q_precision", "q_recall", "q_base_rate", "mean_inflight_step", "mean_halt_step",
                      "early_halt_share", extra=("q_says_halt", "explore_vetoes", *halt_columns(columns)))


def metric_spec(metric: str) -> Spec:
    """The spec for one compare metric: a registered figure, with its envelope."""
    return ratio_spec(metric)


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
    thresholds: DoctorConfig = field(default_factory=DoctorConfig)  # the run's own (its trace meta's "doctor")
    error: str | None = None
    restarts: int = 0  # torchrun restarts (``restart`` markers)

    @property
    def empty(self) -> bool:
        """No training step yet, and not an ``etrm-eval`` run (evaluations only: its findings are the verdict)."""
        return not self.last_step and EVALUATED_FROM not in self.meta

    @property
    def verdict(self) -> str:
        """``error``, ``warning``, ``info``, ``healthy``, ``no data`` (no steps yet) or ``unreadable``."""
        if self.error:
            return "unreadable"
        if self.empty:
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
        if self.empty:
            return "no data yet"
        return self.findings[0]["code"] if self.findings else "healthy"


def status_of(markers: list[tuple[float, str]], beat: float | None, mtime: float, now: float | None = None,
              alive: bool | None = None) -> str:
    """``live``, ``finished``, ``stopped`` or ``crashed``: ``diagnostics.trace.loading``'s rule, on rows already read."""
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
        # large runs: (width, whole-run frame, last step in it) per spec, extended when next used
        self.frames: dict[Spec, tuple[int, pd.DataFrame, int]] = {}
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
            except (RunError, TraceError) as exc:
                self.info.error = str(exc)
            except sqlite3.Error as exc:
                self.info.error = connection.describe_sqlite_error(self.name, exc)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.info.error = f"{self.name}: the trace could not be read ({' '.join(str(exc).split())})"
            return False

    def _refresh(self) -> bool:
        self.path = resolve_run(self.root, self.name)  # again: a link may have been swapped since
        db = self.path / TRACE_NAME
        st = db.stat()
        conn = connection.connect(self.path)
        try:
            meta = connection.read_meta(conn)
            markers, beat = records.read_status_inputs(conn)
            lo, hi = reader.step_range(conn)
            inode = (st.st_dev, st.st_ino)
            restarted = (inode != self._inode or len(markers) < self._marker_count
                         or (self._marker_count >= 0 and any(k in ("resume", "restart")
                                                             for _, k in markers[self._marker_count:]))
                         or hi < self.info.last_step)
            if restarted:
                self.raw, self.frames, self._doctor_step = None, {}, -1
                self.info.last_step = 0
            self._inode, self._marker_count = inode, len(markers)
            self.columns = reader.step_columns(conn)
            last = self.info.last_step
            grew = hi > last
            if hi <= RAW_MAX_STEPS:
                if self.raw is None or grew:
                    new = reader.read_rows(conn, last if self.raw is not None else 0)
                    self.raw = new if self.raw is None else pd.concat([self.raw, new])
                    self.raw = self.raw.reindex(columns=self.columns)
            else:
                self.raw = None  # whole-run frames take the new rows when next drawn (``_extended``)
            self.evals = records.read_evals(conn)
            self.alignment = records.read_alignment(conn, limit=200)
            stored = records.read_findings(conn)
        finally:
            conn.close()
        info = self.info
        info.meta = meta
        info.thresholds = DoctorConfig.from_meta(meta)
        info.first_step, info.last_step = lo, hi
        info.updated = max([t for t in (beat, *(t for t, _ in markers)) if t is not None], default=None)
        info.status = status_of(markers, beat, _mtime(db), alive=trainer_alive(self.path))
        info.restarts = sum(kind == "restart" for _, kind in markers)
        self._findings(stored, meta)
        self.refreshed_at = time.time()
        return grew

    def _findings(self, stored_list: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        """The doctor's findings (with the run's own thresholds): recomputed on the raw table for small runs, the
        trainer's stored ones otherwise."""
        if self.raw is not None:
            if self._doctor_step != self.info.last_step:
                df = self.raw.copy()
                df.attrs["meta"] = meta
                align = self.alignment.to_dict("records")
                found = ([f.to_dict() for f in diagnose(df, meta, self.info.thresholds, alignment=align)]
                         if len(df) else [])
                codes = {f["code"] for f in found}
                found += [f for f in stored_list if f["code"] not in codes]
                self.info.findings = _sorted(found)
                self.info.findings_source = "doctor"
                self._doctor_step = self.info.last_step
        else:
            self.info.findings = _sorted(stored_list)
            self.info.findings_source = "trainer"

    def _extended(self, spec: Spec, cached: tuple[int, pd.DataFrame, int]) -> tuple[int, pd.DataFrame, int] | None:
        """A large run's cached whole-run frame with the rows past its last step folded in (coarsened when it
        grows), so a live refresh reads only new rows, and only for the frames a page draws; None when too much is
        new (the frame is then read again from the rollups)."""
        width, frame, upto = cached
        hi = self.info.last_step
        if hi <= upto:
            return cached
        if hi - upto > RAW_MAX_STEPS:
            return None
        conn = connection.connect(self.path)
        try:
            new = reader.read_rows(conn, upto, list(spec.sums), upto=hi)
        finally:
            conn.close()
        lo = int(frame["step_lo"].min()) if len(frame) else 1
        w = max(width, bucket_width(lo, hi))
        return w, merge_frames(frame, aggregate_rows(new, spec, w, origin=lo), spec, w, origin=lo), hi

    # -- reads -----------------------------------------------------------------------------------------------------
    def frame(self, spec: Spec, xrange: tuple[float, float] | None = None,
              max_buckets: int = MAX_BUCKETS) -> pd.DataFrame:
        """The bucketed frame (with ratio means) for ``spec`` over ``xrange`` (whole run when None)."""
        with self.lock:
            spec = spec.resolve(self.columns)
            first, last = self.info.first_step, self.info.last_step
            if last == 0:
                return finish(aggregate_rows(pd.DataFrame(), spec, 1), self.info.meta.get("mode"))
            lo, hi = _clip_range(xrange, first, last)
            width = bucket_width(lo, hi, max_buckets)
            if self.raw is not None:
                part = self.raw.loc[lo:hi]
                out = aggregate_rows(part, spec, width, origin=lo)
            elif xrange is None:
                cached = self.frames.get(spec)
                cached = None if cached is None else self._extended(spec, cached)
                if cached is None:
                    got = reader.sql_buckets(self.path, spec, lo, hi, width)
                    cached = (int(got.attrs.get("width", width)), got, hi)  # rollups: a multiple of their width
                self.frames[spec] = cached
                width, out, _ = cached
            else:
                out = reader.sql_buckets(self.path, spec, lo, hi, width)
                width = int(out.attrs.get("width", width))
            out = finish(out, self.info.meta.get("mode"))
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
        return reader.read_timings(self.path, lo, hi, bucket_width(lo, hi, max_buckets))

    def totals(self) -> dict[str, float]:
        """Whole-run sums of the ``COMPARE`` columns (the efficiency table's inputs) and ``steps``: the sums of the
        cached, incrementally refreshed whole-run frame, so exact and cheap after the first call."""
        f = self.frame(COMPARE)
        sums = {c: float(f[c].sum()) for c in COMPARE.resolve(self.columns).sums if c in f.columns}
        sums["steps"] = float(f["n"].sum()) if len(f) else 0.0
        return sums

    def window(self, steps: int = 100) -> tuple[tuple[int, int], dict[str, float]]:
        """The last ``steps`` steps and every registered figure over them (the run card's numbers): the sums of
        the counters over the window (one bucket: no envelopes, no per-bucket figures), then the registry."""
        with self.lock:
            first, last = self.info.first_step, self.info.last_step
            lo = max(first, last - steps + 1)
            if last == 0:
                return (0, 0), {}
            spec = CARD.resolve(self.columns)
            if self.raw is not None:
                tail = aggregate_rows(self.raw.loc[lo:last], spec, last - lo + 1, origin=lo)
            else:
                tail = reader.sql_buckets(self.path, spec, lo, last, last - lo + 1)
        if not len(tail):
            return (lo, last), {}
        sums = {c: float(np.nansum(tail[c].to_numpy(dtype=float))) for c in spec.sums}
        return (lo, last), figures.of_sums(sums, float(tail["n"].sum()), self.info.meta.get("mode"))

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
