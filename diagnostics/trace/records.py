"""Reading a run's records beside its steps, read-only: evals, evaluation audits, findings, markers and heartbeat
(the run-status inputs), the first offending alignment samples, and the per-sample ledger (schema version 3;
``diagnostics.trace.ledger`` defines its columns and figures). Connections come from
``diagnostics.trace.connection``."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics.trace import eval_audits, ledger
from diagnostics.trace.connection import connect
from diagnostics.trace.schema import EVAL_AUDIT_TABLES, TraceError, sql_name


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
    cols = ", ".join(f"{'s' if c in _ACT_STEP_COLUMNS else 'a'}.{sql_name(c)}" for c in eval_audits.COLUMNS)
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


def last_write_time(run: Path) -> float | None:
    """When the run last wrote to its trace, from the trace's content (the last heartbeat or marker), not from file
    times: viewing a run changes nothing about it. None when it cannot be read or holds no time yet."""
    try:
        conn = connect(run)
    except TraceError:
        return None
    try:
        markers, beat = read_status_inputs(conn)
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return max([t for t in (beat, *(t for t, _ in markers)) if t is not None], default=None)


def read_alignment(conn: sqlite3.Connection, limit: int | None = None) -> pd.DataFrame:
    """The first offending slots kept by the alignment probe: step, slot, sample_id, label_sample_id,
    demo_sample_id."""
    sql = ("SELECT step, slot, sample_id, label_sample_id, demo_sample_id FROM alignment_samples "
           "ORDER BY step, slot")
    return pd.read_sql_query(sql + (f" LIMIT {int(limit)}" if limit is not None else ""), conn)


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


def _json(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return text
