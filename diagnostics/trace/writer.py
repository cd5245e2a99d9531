"""The trace writer: one run's ``trace.sqlite`` written from a single thread (the tracer's writer thread), its
rollups kept in the same transaction as their rows (``diagnostics.trace.rollups``; the tables:
``diagnostics.trace.schema``)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from diagnostics.trace.ledger import RECORD_COLUMNS, TASK_SUMS, increments, kept
from diagnostics.trace.rollups import Rollups, TimingRollups, step_matrix
from diagnostics.trace.schema import (EVAL_AUDIT_TABLES, LEDGER_TABLES, ROLLUP_WIDTHS, SCHEMA_VERSION, TABLES,
                                      TABLES_V3_EVAL_AUDITS, TraceError, add_real_columns, readable, safe_name,
                                      schema_version, timing_rollup_table)


class LedgerStore:
    """The writer's half of the ledger tables: every record's increments go into the exact per-task aggregates
    (segment 1, after the last checkpoint), every ``every``-th record (``diagnostics.trace.ledger.kept``) into ``ledger``.
    ``checkpoint`` folds segment 1 into segment 0; ``truncate_after`` (a resume) drops what the resumed run re-runs."""

    def __init__(self, conn: sqlite3.Connection, every: int) -> None:
        self.conn, self.every = conn, max(1, int(every))
        conn.executescript(LEDGER_TABLES)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         [("ledger_sample_every", str(self.every)), ("ledger_sample_rate", json.dumps(1 / self.every))])
        sums = ", ".join(TASK_SUMS)
        self.task_sql = (f"INSERT INTO ledger_tasks (task, seg, {sums}) VALUES (?, 1, {', '.join('?' * len(TASK_SUMS))}) "
                         f"ON CONFLICT (task, seg) DO UPDATE SET "
                         + ", ".join(f"{c} = {c} + excluded.{c}" for c in TASK_SUMS))
        self.bin_sql = ("INSERT INTO ledger_bins (task, seg, kind, bin, n, exact, prob_sum) VALUES (?, 1, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (task, seg, kind, bin) DO UPDATE SET n = n + excluded.n, "
                        "exact = exact + excluded.exact, prob_sum = prob_sum + excluded.prob_sum")
        self.record_sql = f"INSERT INTO ledger VALUES ({', '.join('?' * len(RECORD_COLUMNS))})"

    def write(self, records: list[tuple]) -> None:
        """Add one flush's records: every one into the aggregates, the kept ones raw."""
        if not records:
            return
        inc = increments(records)
        self.conn.executemany(self.task_sql, [(t, *v) for t, v in inc.tasks.items()])
        self.conn.executemany(self.bin_sql, [(t, k, b, *v) for (t, k, b), v in inc.bins.items()])
        sid, ex = RECORD_COLUMNS.index("sample_id"), RECORD_COLUMNS.index("exit_step")
        keep = kept(np.array([r[sid] for r in records]), np.array([r[ex] for r in records]), self.every)
        self.conn.executemany(self.record_sql, [r for r, k in zip(records, keep) if k])

    def checkpoint(self, step: int) -> None:
        """A checkpoint at ``step``: the exits so far become segment 0 (what a resume from it keeps)."""
        sums = ", ".join(TASK_SUMS)
        self.conn.execute(f"INSERT INTO ledger_tasks (task, seg, {sums}) SELECT task, 0, {sums} FROM ledger_tasks "
                          "WHERE seg = 1 ON CONFLICT (task, seg) DO UPDATE SET "
                          + ", ".join(f"{c} = {c} + excluded.{c}" for c in TASK_SUMS))
        self.conn.execute("INSERT INTO ledger_bins (task, seg, kind, bin, n, exact, prob_sum) SELECT task, 0, kind, "
                          "bin, n, exact, prob_sum FROM ledger_bins WHERE seg = 1 ON CONFLICT (task, seg, kind, bin) "
                          "DO UPDATE SET n = n + excluded.n, exact = exact + excluded.exact, "
                          "prob_sum = prob_sum + excluded.prob_sum")
        for table in ("ledger_tasks", "ledger_bins"):
            self.conn.execute(f"DELETE FROM {table} WHERE seg = 1")
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('ledger_checkpoint_step', ?)", (str(int(step)),))

    def truncate_after(self, step: int) -> None:
        """Resuming from the checkpoint at ``step``: raw records past it go, and so do the aggregates of segment 1
        (the exits after that checkpoint); from step 0, everything. A resume from any other step (no checkpoint of
        the ledger's at it) keeps segment 1 and records ``ledger_inexact_from`` (its aggregates may count exits
        twice)."""
        self.conn.execute("DELETE FROM ledger WHERE exit_step > ?", (step,))
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'ledger_checkpoint_step'").fetchone()
        at = int(row[0]) if row is not None else 0
        if step == 0:
            for table in ("ledger_tasks", "ledger_bins"):
                self.conn.execute(f"DELETE FROM {table}")
        elif step == at:
            for table in ("ledger_tasks", "ledger_bins"):
                self.conn.execute(f"DELETE FROM {table} WHERE seg = 1")
        elif self.conn.execute("SELECT 1 FROM ledger_tasks WHERE seg = 1 LIMIT 1").fetchone() is not None:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('ledger_inexact_from', ?)", (str(int(step)),))


class TraceWriter:
    """Writes one run's trace. Used from a single thread (the tracer's writer thread)."""

    def __init__(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(TABLES)
        self.conn.executescript(TABLES_V3_EVAL_AUDITS)
        existing = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if "schema_version" in existing and not readable(schema_version(existing["schema_version"], self.path)):
            raise TraceError(f"{self.path} has trace schema {existing['schema_version']}, this etrm writes "
                             f"{SCHEMA_VERSION}; start a new run directory")
        had_rows = self.conn.execute("SELECT 1 FROM steps LIMIT 1").fetchone() is not None
        version = existing.get("schema_version", str(SCHEMA_VERSION))
        rows = {"schema_version": str(SCHEMA_VERSION), **{k: _meta_value(v) for k, v in (meta or {}).items()}}
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows.items())
        self.columns = [r[1] for r in self.conn.execute("PRAGMA table_info(steps)").fetchall() if r[1] != "step"]
        self.rollups = Rollups(self.conn, self.columns)
        self._insert_sql: dict[tuple[str, ...], str] = {}
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.timing_rollups = TimingRollups(self.conn)
        if timing_rollup_table(ROLLUP_WIDTHS[0]) not in tables:  # an older trace's timings get their rollups
            self.timing_rollups.rebuild(1)
        self.ledger = LedgerStore(self.conn, int(rows.get("ledger_sample_every",
                                                        existing.get("ledger_sample_every", 1))))
        if had_rows and int(version) < SCHEMA_VERSION:  # resuming an older trace: what this version adds is added
            # (rollups of its rows from version 2; eval audit tables, ledger tables and the new rollup levels from 3)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('upgraded_from', ?)", (version,))
        self.conn.commit()

    def add_counters(self, counters: Iterable[tuple[str, str, str]]) -> None:
        """Declare per-step columns (name, probe, description); new ones are added to ``steps``."""
        counters = list(counters)
        self.columns.extend(add_real_columns(self.conn, "steps", [name for name, _, _ in counters]))
        self.conn.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", counters)
        self.rollups.add_columns(self.columns)
        self.conn.commit()

    def write_steps(self, names: list[str], rows: list[tuple]) -> None:
        """Insert step rows: each tuple is (step, value for each of ``names``); NaN and None are stored as NULL.

        The rows become one float matrix (one conversion, shared by the insert and the rollups)."""
        if not rows:
            return
        steps, values = step_matrix(rows, len(names))
        key = tuple(names)
        sql = self._insert_sql.get(key)
        if sql is None:
            cols = ", ".join(["step"] + [safe_name(n) for n in names])
            marks = ", ".join("?" * (len(names) + 1))
            sql = self._insert_sql[key] = f"INSERT OR REPLACE INTO steps ({cols}) VALUES ({marks})"
        lo, hi = int(steps.min()), int(steps.max())
        rewrite = self.conn.execute("SELECT 1 FROM steps WHERE step BETWEEN ? AND ? LIMIT 1", (lo, hi)).fetchone()
        self.conn.executemany(sql, stored_rows(steps, values))
        if rewrite:  # a step written again (rare): its buckets are recomputed from the rows
            self.rollups.rebuild(lo)
        else:
            self.rollups.add(names, steps, values)

    def write_timings(self, rows: list[tuple[int, int, str, float]]) -> None:
        """Insert (step, rank, phase, seconds) rows and add them to the timing rollups."""
        if not rows:
            return
        lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
        rewrite = self.conn.execute("SELECT 1 FROM timings WHERE step BETWEEN ? AND ? LIMIT 1", (lo, hi)).fetchone()
        self.conn.executemany("INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?)", rows)
        if rewrite:  # a step's timings written again (rare): its buckets are recomputed from the rows
            self.timing_rollups.rebuild(int(lo))
        else:
            self.timing_rollups.add_range(int(lo), int(hi))

    def add_timing_sums(self, rows: list[tuple[int, str, int, float]]) -> None:
        """Add (finest bucket, phase, rows, seconds) sums of timing rows just stored to every timing rollup (for a
        bulk writer that knows them; ``write_timings`` computes them itself)."""
        self.timing_rollups.add_sums(rows)

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO evals VALUES (?, ?, ?)",
                              [(step, k, _num(v)) for k, v in values.items()])

    def write_eval_audits(self, audits: Iterable[Any]) -> None:
        """Store evaluation audits (``diagnostics.trace.eval_audits.EvalAudit``): one ``eval_audits`` row each, one
        ``eval_act_steps`` row per ACT step (schema version 3)."""
        for a in audits:
            self.conn.execute("INSERT OR REPLACE INTO eval_audits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (a.step, a.weights, a.config_hash, a.halt_rule, _num(a.count), _num(a.halt_exact),
                               _num(a.halt_token), _num(a.halt_step)))
            self.conn.executemany("INSERT OR REPLACE INTO eval_act_steps VALUES (?, ?, ?, ?, ?, ?)",
                                  [(a.step, a.weights, s.act_step, _num(s.exact), _num(s.token), _num(s.halt_share))
                                   for s in a.act_steps])

    def write_alignment(self, rows: list[tuple[int, int, int, int, int]]) -> None:
        self.conn.executemany("INSERT INTO alignment_samples VALUES (?, ?, ?, ?, ?)", rows)

    def write_ledger(self, records: list[tuple]) -> None:
        """One flush's ledger records (``diagnostics.trace.ledger.RECORD_COLUMNS``): aggregates exact, raw sampled."""
        self.ledger.write(records)

    def ledger_checkpoint(self, step: int) -> None:
        self.ledger.checkpoint(step)

    def write_finding(self, code: str, severity: str, first_step: int | None, evidence: dict, message: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO findings VALUES (?, ?, ?, ?, ?)",
                          (code, severity, first_step, json.dumps(evidence), message))

    def marker(self, kind: str, step: int | None, detail: str = "") -> None:
        self.conn.execute("INSERT INTO markers VALUES (?, ?, ?, ?)", (time.time(), kind, step, detail))

    def heartbeat(self, step: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO heartbeat VALUES (0, ?, ?)", (time.time(), step))

    def truncate_after(self, step: int) -> None:
        """Delete every row past ``step`` (``--resume`` from a checkpoint at ``step``): no step is duplicated."""
        for table in ("steps", "timings", "evals", "alignment_samples", *EVAL_AUDIT_TABLES):
            self.conn.execute(f"DELETE FROM {table} WHERE step > ?", (step,))
        self.rollups.rebuild(step + 1)  # every bucket equals the sum of its remaining rows
        self.timing_rollups.rebuild(step + 1)
        self.ledger.truncate_after(step)
        # a finding that first held on a deleted row is found again (or not) when those steps are re-run
        self.conn.execute("DELETE FROM findings WHERE first_step > ?", (step,))
        self.conn.commit()

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        """Store the complete buckets still waiting for a batch (a closed trace has every complete bucket), commit."""
        if self.rollups.waiting:
            self.rollups.store_complete()
        self.conn.commit()
        self.conn.close()


def stored_rows(steps: np.ndarray, values: np.ndarray) -> list[tuple]:
    """The rows as SQLite stores them: (step, values), NaN as NULL (infinities stay)."""
    cells = values.tolist()
    for i, j in zip(*np.nonzero(np.isnan(values))):
        cells[i][j] = None
    return [(s, *v) for s, v in zip(steps.tolist(), cells)]


def _meta_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _num(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value

