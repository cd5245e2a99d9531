"""Reading a run's trace into pandas: the steps table with derived ratios, evals, timings, findings and run status.

Everything opens the trace read-only (a live trainer may be writing it) and turns a missing or corrupt trace into a
``TraceError`` with a one-line message. Derived columns are the figures of ``diagnostics.trace.figures.REGISTRY``, per step,
NaN where the denominator is 0.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from diagnostics.trace import figures

from diagnostics.trace import records
from diagnostics.trace.liveness import trainer_alive
from diagnostics.trace.connection import open_trace, read_meta
from diagnostics.trace.schema import TRACE_NAME, TraceError

LIFECYCLE = {"start": "live", "resume": "live", "end": "finished", "finished": "finished",
             "stopped": "stopped", "crashed": "crashed"}
STALE_AFTER_S = 120.0


@contextmanager
def _trace(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; any SQLite error while reading becomes a one-line ``TraceError``."""
    conn = open_trace(Path(path))
    try:
        yield conn
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:  # pandas wraps errors of its own queries
        raise TraceError(f"trace at {path} could not be read ({_one_line(exc)}); it may be corrupt") from None
    finally:
        conn.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def add_derived(df: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """Add the per-step value of every registered figure whose inputs are present (in place; stored columns are
    never replaced)."""
    for name, values in figures.columns(df, mode=mode).items():
        if name not in df.columns:
            df[name] = values
    return df


def load_run(path: str | Path) -> pd.DataFrame:
    """The steps table, one row per step, indexed by step and with a ``step`` column too.

    Stored counters keep their names and per-step meaning: ``loss`` is the step's loss summed over slots,
    ``coverage_num``/``coverage_den`` its counts. Every registered figure that applies to the run's mode is added
    per step under its own name (``loss_per_slot``, ``coverage``, ``exact_inflight``...: see
    ``diagnostics.trace.figures.REGISTRY`` and docs/diagnostics.md). ``attrs``: ``meta``, ``status``,
    ``alignment_samples``. The index is unnamed so that ``df["step"]`` and ``df.sort_values("step")`` are not
    ambiguous.
    """
    with _trace(path) as conn:
        meta = read_meta(conn)
        df = pd.read_sql_query("SELECT * FROM steps ORDER BY step", conn)
        alignment = records.read_alignment(conn)
    df = df.astype(float)
    df["step"] = df["step"].astype("int64")
    df.index = pd.Index(df["step"].to_numpy(), dtype="int64")
    add_derived(df, meta.get("mode"))
    df.attrs["meta"] = meta
    df.attrs["status"] = run_status(path)
    df.attrs["alignment_samples"] = alignment.to_dict("records")
    return df


def load_alignment(path: str | Path) -> pd.DataFrame:
    """The first offending slots kept by the alignment probe: step, slot, sample_id, label_sample_id, demo_sample_id."""
    with _trace(path) as conn:
        return records.read_alignment(conn)


def load_ledger(path: str | Path, lo: int | None = None, hi: int | None = None) -> pd.DataFrame:
    """The per-sample ACT ledger: one row per stored record of a sample that left its slot (sample_id, puzzle_id,
    task, slot, rank, enter_step, exit_step, steps_used, reason, vetoes, exact, token_correct, token_count,
    token_acc, q_halt_logit, q_continue_logit, encoder_grad_steps). ``attrs["sample_rate"]``: the share of exits
    stored (1.0 when every one is); ``lo``/``hi`` bound the exit step."""
    with _trace(path) as conn:
        return records.read_ledger(conn, lo, hi)


def load_task_stats(path: str | Path) -> pd.DataFrame:
    """One row per task (augmentations folded), exact over every exit whatever the sample rate: samples,
    exact_rate, token_acc, mean_halt_step, q_halt_share, mean_q_prob, calibration_error, never_solved and the sums."""
    with _trace(path) as conn:
        return records.read_task_stats(conn)


def load_ledger_bins(path: str | Path) -> pd.DataFrame:
    """The ledger's histograms per task: kind (``halt_step``, ``q_prob``), bin, n, exact, prob_sum."""
    with _trace(path) as conn:
        return records.read_ledger_bins(conn)


def load_evals(path: str | Path) -> pd.DataFrame:
    """Evaluation results, one row per eval step and one column per metric."""
    with _trace(path) as conn:
        return records.read_evals(conn)


def load_eval_audits(path: str | Path) -> pd.DataFrame:
    """The evaluation audits (``diagnostics.trace.eval_audits``): one row per (eval step, weights, ACT step) with columns
    ``step``, ``weights`` (``ema``/``raw``), ``act_step`` (1..max), ``exact``, ``token`` (the answer at that ACT step),
    ``halt_share`` (share of samples whose would-halt step it is), and per eval ``halt_exact``, ``halt_token``,
    ``halt_step`` (at the would-halt step), ``count``, ``config_hash``, ``halt_rule``. Empty for traces before
    schema 3."""
    with _trace(path) as conn:
        return records.read_eval_audits(conn)


def load_timings(path: str | Path) -> pd.DataFrame:
    """Per-rank phase timings in long form: step, rank, phase, seconds."""
    with _trace(path) as conn:
        return pd.read_sql_query("SELECT step, rank, phase, seconds FROM timings ORDER BY step, rank, phase", conn)


def load_findings(path: str | Path) -> pd.DataFrame:
    """The findings the trainer stored (code, severity, first_step, evidence as a dict, message)."""
    with _trace(path) as conn:
        rows = records.read_findings(conn)
    return pd.DataFrame(rows, columns=["code", "severity", "first_step", "evidence", "message"])


def load_markers(path: str | Path) -> pd.DataFrame:
    """Lifecycle markers in the order written: time, kind, step, detail."""
    with _trace(path) as conn:
        return records.read_markers(conn)


def status_from_markers(markers: Sequence[tuple[float, str]], beat: float | None, fallback: list[float],
                        now: float, stale_after: float = STALE_AFTER_S, alive: bool | None = None) -> str:
    """The status rule, pure: the last lifecycle marker decides, unless it is ``start``/``resume``; then ``alive``
    (``diagnostics.trace.liveness``: whether the trainer's process holds the run, when that can be told on this host)
    decides, and failing that the run is live while its last sign of life (heartbeat, that marker, else the
    ``fallback`` times) is younger than ``stale_after`` seconds, and crashed after."""
    last_kind, last_time = None, None
    for t, kind in markers:
        if kind in LIFECYCLE:
            last_kind, last_time = kind, t
        elif kind == "heartbeat":
            beat = t if beat is None else max(beat, t)
    if last_kind is not None and LIFECYCLE[last_kind] != "live":
        return LIFECYCLE[last_kind]
    if alive is not None:
        return "live" if alive else "crashed"
    signs = [t for t in (beat, last_time) if t is not None] or list(fallback)
    return "live" if signs and now - max(signs) <= stale_after else "crashed"


def run_status(path: str | Path, stale_after: float = STALE_AFTER_S, now: float | None = None) -> str:
    """``live``, ``finished``, ``stopped`` or ``crashed``, from the last lifecycle marker and the heartbeat's age.

    A trace without markers is judged by its heartbeat, or failing that by the database file's modification time.
    """
    now = time.time() if now is None else now
    with _trace(path) as conn:
        markers, beat = records.read_status_inputs(conn)
    p = Path(path)
    db = p / TRACE_NAME if p.is_dir() else p
    wal = db.with_name(db.name + "-wal")  # a reader's own -shm/-wal (empty) must not count as a write
    fallback = [f.stat().st_mtime for f in (db, wal) if f.is_file() and f.stat().st_size > 0]
    return status_from_markers(markers, beat, fallback, now, stale_after, alive=trainer_alive(db))


def as_json_value(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN and infinities as None, integral floats kept as floats."""
    if isinstance(value, dict):
        return {str(k): as_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json_value(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
