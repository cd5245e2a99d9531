"""The trace store: one SQLite database per run (WAL mode), so a live reader can follow a writing trainer.

Schema policy: versions are additive (a version only adds tables or columns), readers accept every version from 1
to ``SCHEMA_VERSION``, and docs/diagnostics.md lists what each version added. ``meta.schema_version`` is the
trace's version; a writer of a later version resuming an older trace adds what its version adds (the rollups of the
rows already there) and records ``upgraded_from``.

Version 2 adds the rollups: ``rollup_64``, ``rollup_4096``, ``rollup_262144``, one row per
bucket of that many steps (``bucket`` = (step - 1) // width): ``n`` rows, ``step_lo``/``step_hi``, the sum of every
counter column (NULL counts 0), and ``<figure>__min``/``<figure>__max`` of every registered figure's per-step value.
They are written in the same transaction as their rows, and kept equal to the sums of their rows across a resume's
truncation. A view of any step range then reads on the order of a thousand rows whatever the run's length.

Version 3 adds (issue 14, evaluation audits; ``_TABLES_V3_EVAL_AUDITS``): ``eval_audits(step, weights, config_hash,
halt_rule, count, halt_exact, halt_token, halt_step)``, one row per evaluation and weights (``ema``/``raw``), and
``eval_act_steps(step, weights, act_step, exact, token, halt_share)``, one row per evaluation, weights and ACT step
(``diagnostics.trace.eval_audits``).

Version 3 also adds ``rollup_512`` and ``rollup_32768`` (so that a view's finest usable level is at most 8x finer than
its buckets: a view reads at most about 8 rows per bucket) and the timing rollups: ``timing_rollup_<width>`` for
every width of ``ROLLUP_WIDTHS``, one row per (bucket, phase):
``n`` timing rows (steps x ranks) and the sum of their ``seconds``, kept equal to the sums of their rows at every
commit (updated by each flush, recomputed after a truncation or a rewritten step).

Version 3 also adds the per-sample ACT ledger (``LEDGER_TABLES``; ``diagnostics.trace.ledger`` defines the columns):
- ``ledger(<RECORD_COLUMNS>)``: the raw records kept (every ``meta.ledger_sample_every``-th exit, chosen by a hash of
  sample id and exit step; ``meta.ledger_sample_rate`` = 1 / that), one per sample that left its slot.
- ``ledger_tasks(task, seg, <TASK_SUMS>)``: exact per-task sums over every exit, kept or not; ``seg`` 0 holds the
  exits up to the last checkpoint (``meta.ledger_checkpoint_step``), 1 those after, so a resume from that checkpoint
  drops exactly the exits it re-runs.
- ``ledger_bins(task, seg, kind, bin, n, exact, prob_sum)``: per task the halting-step histogram (``halt_step``, bin =
  ACT steps used) and the calibration bins of sigmoid(q-halt logit) at exit (``q_prob``, 10 bins).

Version 1 (``meta.schema_version``):
- ``meta(key, value)``: schema version, run description (model, mode, preset, max_steps, trace_every, config JSON).
- ``counters(name, probe, description)``: the per-step columns, self-describing; probes may add columns.
- ``steps(step, <counter columns>)``: one row per training step; counts are stored as numerator and denominator
  columns (``*_num``/``*_den``) summed across ranks, so any re-bucketing stays exact.
- ``timings(step, rank, phase, seconds)``: per-rank phase timings.
- ``evals(step, name, value)``: evaluation results.
- ``findings(code, severity, first_step, evidence, message)``: the doctor's findings.
- ``alignment_samples(step, slot, sample_id, label_sample_id, demo_sample_id)``: first offending slots.
- ``markers(time, kind, step, detail)``: start / resume / end / stopped / crashed, and ``heartbeat``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from diagnostics.trace.ledger import BIN_SUMS, RECORD_COLUMNS, TASK_SUMS, increments, kept
from diagnostics.trace.readonly import open_read_only, sqlite_uri

SCHEMA_VERSION = 3
ROLLUP_WIDTHS = (64, 512, 4096, 32768, 262144)  # version 2 wrote 64, 4096, 262144; 3 adds the rest
ROLLUP_BATCH = 1024  # the writer stores finest buckets once this many rows wait (a reader's raw edge stays small)
TRACE_NAME = "trace.sqlite"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, probe TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS timings (step INTEGER NOT NULL, rank INTEGER NOT NULL, phase TEXT NOT NULL,
                                    seconds REAL NOT NULL, PRIMARY KEY (step, rank, phase));
CREATE TABLE IF NOT EXISTS evals (step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
                                  PRIMARY KEY (step, name));
CREATE TABLE IF NOT EXISTS findings (code TEXT PRIMARY KEY, severity TEXT NOT NULL, first_step INTEGER,
                                     evidence TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alignment_samples (step INTEGER NOT NULL, slot INTEGER NOT NULL, sample_id INTEGER,
                                              label_sample_id INTEGER, demo_sample_id INTEGER);
CREATE TABLE IF NOT EXISTS markers (time REAL NOT NULL, kind TEXT NOT NULL, step INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 0), time REAL NOT NULL,
                                      step INTEGER NOT NULL);
"""

# ---- schema version 3: evaluation audits (issue 14, item 2; diagnostics.trace.eval_audits) ----------------------------
_TABLES_V3_EVAL_AUDITS = """
CREATE TABLE IF NOT EXISTS eval_audits (step INTEGER NOT NULL, weights TEXT NOT NULL, config_hash TEXT NOT NULL,
                                        halt_rule TEXT NOT NULL, count REAL, halt_exact REAL, halt_token REAL,
                                        halt_step REAL, PRIMARY KEY (step, weights));
CREATE TABLE IF NOT EXISTS eval_act_steps (step INTEGER NOT NULL, weights TEXT NOT NULL, act_step INTEGER NOT NULL,
                                           exact REAL, token REAL, halt_share REAL,
                                           PRIMARY KEY (step, weights, act_step));
"""
EVAL_AUDIT_TABLES = ("eval_audits", "eval_act_steps")
# ---- end of schema version 3: evaluation audits ------------------------------------------------------------------


# -- schema version 3: the per-sample ACT ledger (issue 14a; one block, additive) --------------------------------------
LEDGER_TABLES = f"""
CREATE TABLE IF NOT EXISTS ledger ({", ".join(c + " INTEGER" if c not in ("q_halt_logit", "q_continue_logit")
                                              else c + " REAL" for c in RECORD_COLUMNS)});
CREATE INDEX IF NOT EXISTS ledger_exit ON ledger (exit_step);
CREATE TABLE IF NOT EXISTS ledger_tasks (task INTEGER NOT NULL, seg INTEGER NOT NULL,
                                         {", ".join(c + " REAL NOT NULL DEFAULT 0" for c in TASK_SUMS)},
                                         PRIMARY KEY (task, seg)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_bins (task INTEGER NOT NULL, seg INTEGER NOT NULL, kind TEXT NOT NULL,
                                        bin INTEGER NOT NULL, {", ".join(c + " REAL NOT NULL DEFAULT 0" for c in BIN_SUMS)},
                                        PRIMARY KEY (task, seg, kind, bin)) WITHOUT ROWID;
"""


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
        import numpy as np

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
# -- end of schema version 3's ledger block -----------------------------------------------------------------------------


def readable(version: Any) -> bool:
    """Whether this etrm reads a trace of schema ``version``: every version from 1 to the current one (versions are
    additive, so a reader of version N reads what any version up to N wrote)."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        return False
    return 1 <= v <= SCHEMA_VERSION


class TraceError(Exception):
    """A trace that is missing, corrupt or of an unknown schema; the message says what to do."""


def _safe(name: str) -> str:
    if not name.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"counter name {name!r} must be letters, digits, '_' or '.'")
    return '"' + name + '"'


class TraceWriter:
    """Writes one run's trace. Used from a single thread (the tracer's writer thread)."""

    def __init__(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_TABLES)
        self.conn.executescript(_TABLES_V3_EVAL_AUDITS)
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
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {timing_rollup_table(w)} (bucket INTEGER NOT NULL, "
                              "phase TEXT NOT NULL, n INTEGER NOT NULL, seconds REAL NOT NULL, "
                              "PRIMARY KEY (bucket, phase)) WITHOUT ROWID")
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS timing_delta (bucket INTEGER, phase TEXT, n INTEGER, "
                          "seconds REAL)")  # a flush's timing sums on their way into the rollups
        if timing_rollup_table(ROLLUP_WIDTHS[0]) not in tables:  # an older trace's timings get their rollups
            self._rebuild_timings(1)
        self.ledger = LedgerStore(self.conn, int(rows.get("ledger_sample_every",
                                                        existing.get("ledger_sample_every", 1))))
        if had_rows and int(version) < SCHEMA_VERSION:  # resuming an older trace: what this version adds is added
            # (rollups of its rows from version 2; eval audit tables, ledger tables and the new rollup levels from 3)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('upgraded_from', ?)", (version,))
        self.conn.commit()

    def add_counters(self, counters: Iterable[tuple[str, str, str]]) -> None:
        """Declare per-step columns (name, probe, description); new ones are added to ``steps``."""
        for name, probe, description in counters:
            if name not in self.columns:
                self.conn.execute(f"ALTER TABLE steps ADD COLUMN {_safe(name)} REAL")
                self.columns.append(name)
            self.conn.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", (name, probe, description))
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
            cols = ", ".join(["step"] + [_safe(n) for n in names])
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
            self._rebuild_timings(int(lo))
        else:
            self.rollup_timings(int(lo), int(hi))

    def rollup_timings(self, lo: int, hi: int) -> None:
        """Add the timing rows of steps [lo, hi] (new: not counted yet) to every timing rollup: their sums per
        (finest bucket, phase) once, in SQL, then ``add_timing_sums``."""
        self.conn.execute("DELETE FROM temp.timing_delta")
        self.conn.execute(f"INSERT INTO temp.timing_delta SELECT (step - 1) / {ROLLUP_WIDTHS[0]}, phase, COUNT(*), "
                          "TOTAL(seconds) FROM timings WHERE step BETWEEN ? AND ? GROUP BY 1, 2", (lo, hi))
        self._fold_timings()

    def add_timing_sums(self, rows: list[tuple[int, str, int, float]]) -> None:
        """Add (finest bucket, phase, rows, seconds) sums of timing rows just stored to every timing rollup (for a
        bulk writer that knows them; ``write_timings`` computes them itself)."""
        self.conn.execute("DELETE FROM temp.timing_delta")
        self.conn.executemany("INSERT INTO temp.timing_delta VALUES (?, ?, ?, ?)", rows)
        self._fold_timings()

    def _fold_timings(self) -> None:
        fine = ROLLUP_WIDTHS[0]
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"INSERT INTO {timing_rollup_table(w)} (bucket, phase, n, seconds) "
                              f"SELECT bucket / {w // fine}, phase, SUM(n), SUM(seconds) FROM temp.timing_delta "
                              "WHERE 1 GROUP BY 1, 2 ON CONFLICT (bucket, phase) DO UPDATE SET n = n + excluded.n, "
                              "seconds = seconds + excluded.seconds")

    def _rebuild_timings(self, lo: int) -> None:
        """Recompute every timing bucket holding a step at or after ``lo``: the finest from the rows, coarser ones
        from the finest."""
        fine = ROLLUP_WIDTHS[0]
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"DELETE FROM {timing_rollup_table(w)} WHERE bucket >= ?", ((lo - 1) // w,))
        self.conn.execute(f"INSERT INTO {timing_rollup_table(fine)} SELECT (step - 1) / {fine}, phase, COUNT(*), "
                          "TOTAL(seconds) FROM timings WHERE step >= ? GROUP BY 1, 2", ((lo - 1) // fine * fine + 1,))
        for w in ROLLUP_WIDTHS[1:]:
            self.conn.execute(f"INSERT INTO {timing_rollup_table(w)} SELECT bucket / {w // fine}, phase, SUM(n), "
                              f"SUM(seconds) FROM {timing_rollup_table(fine)} WHERE bucket >= ? GROUP BY 1, 2",
                              ((lo - 1) // w * (w // fine),))

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
        self._rebuild_timings(step + 1)
        self.ledger.truncate_after(step)
        # a finding that first held on a deleted row is found again (or not) when those steps are re-run
        self.conn.execute("DELETE FROM findings WHERE first_step > ?", (step,))
        self.conn.commit()

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        """Store the complete buckets still waiting for a batch (a closed trace has every complete bucket), commit."""
        if self.rollups.waiting:
            self.rollups._store_complete()
        self.conn.commit()
        self.conn.close()


def rollup_table(width: int) -> str:
    return f"rollup_{int(width)}"


def timing_rollup_table(width: int) -> str:
    return f"timing_rollup_{int(width)}"


@dataclass
class Buckets:
    """Consecutive rollup buckets of one width as arrays: key, rows ``n``, step bounds, the sum of every counter
    column ``[m, columns]`` and the min/max of every envelope ``[m, figures]`` (NaN: no finite value)."""

    key: np.ndarray
    n: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sums: np.ndarray
    mn: np.ndarray
    mx: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    def cat(self, other: "Buckets") -> "Buckets":
        return Buckets(*(np.concatenate([a, b]) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[np.ndarray, ...]:
        return self.key, self.n, self.lo, self.hi, self.sums, self.mn, self.mx

    def group(self, keys: np.ndarray) -> "Buckets":
        """Runs of equal ``keys`` (ascending) merged into one bucket each: sums added, bounds and envelopes
        reduced."""
        at = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return Buckets(keys[at], np.add.reduceat(self.n, at), np.minimum.reduceat(self.lo, at),
                       np.maximum.reduceat(self.hi, at), np.add.reduceat(self.sums, at, axis=0),
                       np.fmin.reduceat(self.mn, at, axis=0), np.fmax.reduceat(self.mx, at, axis=0))

    def take(self, a: int, b: int | None = None) -> "Buckets":
        return Buckets(*(f[a:b] for f in self.fields()))


class Rollups:
    """The writer's multi-resolution summaries of ``steps`` (schema versions 2 and 3).

    A bucket's row is written once, when the bucket is complete (a row of a later bucket has arrived), in the
    transaction of the flush that stores it; finest buckets are stored once ``ROLLUP_BATCH`` rows wait, and the open
    bucket of each width lives in memory (readers read what is not stored from finer buckets and, at the very edge,
    at most ``ROLLUP_BATCH + ROLLUP_WIDTHS[0]`` rows). The finest buckets are made from rows and coarser ones are sums
    of finest buckets, each in one vectorised pass and one ``executemany`` per width. So every stored bucket equals
    the sum of its rows at every commit. ``rebuild`` recomputes the buckets from a step on (a truncation, a
    rewritten step); ``sync`` restores the open buckets when a writer opens an existing trace.
    """

    def __init__(self, conn: sqlite3.Connection, columns: list[str]) -> None:
        from diagnostics.trace import figures  # the registry's per-step values give the min/max envelopes

        self.conn = conn
        self.envelopes = [f for f in figures.REGISTRY.values() if not f.sqrt]
        for w in ROLLUP_WIDTHS:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {rollup_table(w)} (bucket INTEGER PRIMARY KEY, "
                         "n INTEGER NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL)")
        self.columns: list[str] | None = None
        self.open: dict[int, Buckets | None] = {w: None for w in ROLLUP_WIDTHS}  # coarser widths' open buckets
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # rows not in a stored bucket yet, as flushed
        self.waiting = 0
        self.add_columns(columns)

    def add_columns(self, columns: list[str]) -> None:
        """Sum columns for every counter and envelope columns for every figure, in every rollup table."""
        if list(columns) == self.columns:
            return
        wanted = list(columns) + [f"{f.name}__{m}" for f in self.envelopes for m in ("min", "max")]
        for w in ROLLUP_WIDTHS:
            have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({rollup_table(w)})")}
            for c in wanted:
                if c not in have:
                    self.conn.execute(f"ALTER TABLE {rollup_table(w)} ADD COLUMN {_safe(c)} REAL")
        self.columns = list(columns)
        self.index = {c: i for i, c in enumerate(self.columns)}
        self.env = [(f, [self.index[t] for t in f.num], [self.index[t] for t in f.den]) for f in self.envelopes
                    if all(t in self.index for t in f.terms)]
        # the envelopes' numerators and denominators: a gather of each one's first term plus its few other terms
        # (much cheaper than a product with a 0/1 matrix); a per-step figure divides by 1
        self.per_step = np.array([not den for _, _, den in self.env], dtype=bool)
        self.num_idx = np.array([num[0] for _, num, _ in self.env], dtype=np.int64)
        self.den_idx = np.array([den[0] if den else 0 for _, _, den in self.env], dtype=np.int64)
        self.num_more = [(j, c) for j, (_, num, _) in enumerate(self.env) for c in num[1:]]
        self.den_more = [(j, c) for j, (_, _, den) in enumerate(self.env) for c in den[1:]]
        names = ["bucket", "n", "step_lo", "step_hi", *self.columns,
                 *(f"{f.name}__{m}" for f, _, _ in self.env for m in ("min", "max"))]
        self.insert = {w: f"INSERT OR REPLACE INTO {rollup_table(w)} ({', '.join(_safe(c) for c in names)}) "
                          f"VALUES ({', '.join('?' * len(names))})" for w in ROLLUP_WIDTHS}
        self.sync()

    def _values(self, names: list[str], values: np.ndarray) -> np.ndarray:
        """Values [k, columns] in this writer's column order (absent columns 0); NaN stays (``_complete`` counts it
        0, as a NULL)."""
        if names == self.columns:
            return values
        vals = np.zeros((len(values), len(self.columns)))
        vals[:, [self.index[n] for n in names]] = values
        return vals

    def _envelopes(self, vals: np.ndarray) -> np.ndarray:
        """Each envelope figure's per-step value [k, figures] (NaN where its denominator is 0)."""
        if not self.env:
            return np.zeros((len(vals), 0))
        finite = vals if np.isfinite(vals).all() else np.where(np.isfinite(vals), vals, 0.0)
        a, b = finite[:, self.num_idx], finite[:, self.den_idx]
        for j, c in self.num_more:
            a[:, j] += finite[:, c]
        for j, c in self.den_more:
            b[:, j] += finite[:, c]
        b[:, self.per_step] = 1.0
        return a / np.where(b == 0, np.nan, b)

    def _complete(self, steps: np.ndarray, vals: np.ndarray) -> None:
        """Rows that fill finest buckets completely: those buckets in one vector pass, written, folded up.
        ``vals`` is the writer's own copy: NaN (a NULL) is set to 0 in place, so it counts 0."""
        vals[np.isnan(vals)] = 0.0
        env = self._envelopes(vals)
        fw, k = ROLLUP_WIDTHS[0], len(steps)
        keys = (steps - 1) // fw
        if k % fw == 0 and (steps[0] - 1) % fw == 0 and steps[-1] - steps[0] == k - 1:  # whole buckets (usual)
            m = k // fw
            fine = Buckets(keys[::fw], np.full(m, fw), steps[::fw], steps[fw - 1::fw],
                           vals.reshape(m, fw, -1).sum(1), np.fmin.reduce(env.reshape(m, fw, -1), 1),
                           np.fmax.reduce(env.reshape(m, fw, -1), 1))
        else:  # a partial bucket (the first after a resume or a gap)
            one = np.ones(k, dtype=np.int64)
            fine = Buckets(steps, one, steps, steps, vals, env, env).group(keys)
        self._write(ROLLUP_WIDTHS[0], fine)
        for w in ROLLUP_WIDTHS[1:]:
            self._fold(w, fine)

    def _fold(self, w: int, fine: Buckets) -> None:
        """Fold complete finer buckets into width ``w``: every coarse bucket a later one follows is written, the
        last stays open (in memory)."""
        if not len(fine):
            return
        acc = self.open[w]
        keys = (fine.lo - 1) // w
        if acc is not None and keys[0] == keys[-1] == acc.key[0]:  # all inside the open bucket: in place
            acc.n += fine.n.sum()
            acc.hi[0] = max(acc.hi[0], fine.hi[-1])
            acc.sums += fine.sums.sum(0)
            np.fmin(acc.mn, np.fmin.reduce(fine.mn, 0), out=acc.mn)
            np.fmax(acc.mx, np.fmax.reduce(fine.mx, 0), out=acc.mx)
            return
        both = fine if acc is None else acc.cat(fine)
        coarse = both.group((both.lo - 1) // w)
        if len(coarse) > 1:
            self._write(w, coarse.take(0, -1))
        self.open[w] = coarse.take(-1)

    def _write(self, w: int, b: Buckets) -> None:
        env = np.empty((len(b), 2 * b.mn.shape[1]))
        env[:, 0::2], env[:, 1::2] = b.mn, b.mx
        bad = ~np.isfinite(env)
        if bad.any():  # no finite value: NULL
            env = env.astype(object)
            env[bad] = None
        cells = env.tolist()
        self.conn.executemany(self.insert[w], [(k, n, lo, hi, *s, *e) for k, n, lo, hi, s, e in zip(
            b.key.tolist(), b.n.tolist(), b.lo.tolist(), b.hi.tolist(), b.sums.tolist(), cells)])

    def add(self, names: list[str], steps: np.ndarray, values: np.ndarray) -> None:
        """Take new step rows (``steps`` [k], ``values`` [k, names]; later than every row already counted). The
        rows wait in memory until ``ROLLUP_BATCH`` of them do; then every finest bucket a later row completes is
        written, in the caller's transaction (so a stored bucket always equals the sum of its stored rows)."""
        if not len(steps):
            return
        steps = np.asarray(steps, dtype=np.int64)
        self.pending.append((steps, self._values(names, np.asarray(values, dtype=float).reshape(len(steps), -1))))
        self.waiting += len(steps)
        if self.waiting < ROLLUP_BATCH:
            return  # stored once ``ROLLUP_BATCH`` rows wait: fewer, larger writes
        self._store_complete()

    def _store_complete(self) -> None:
        """Store every finest bucket that a later row completes (and fold it up); the open one's rows wait."""
        fine = ROLLUP_WIDTHS[0]
        steps = np.concatenate([b[0] for b in self.pending])
        vals = np.concatenate([b[1] for b in self.pending])  # a copy: the writer's own
        if (np.diff(steps) < 0).any():
            order = np.argsort(steps, kind="stable")
            steps, vals = steps[order], vals[order]
        keys = (steps - 1) // fine
        done = int(np.searchsorted(keys, keys[-1], side="left"))
        if done:
            self._complete(steps[:done], vals[:done])
        self.pending = [(steps[done:], vals[done:])]
        self.waiting = len(steps) - done

    def sync(self, chunk: int = 65_536) -> None:
        """Restore the open buckets from what is stored: the coarser widths' from the finest buckets past their
        last stored bucket, then the rows past the last finest bucket (writing any bucket those complete), read in
        chunks so that upgrading a long version-1 trace stays in bounded memory."""
        fine = ROLLUP_WIDTHS[0]
        self.pending, self.waiting = [], 0
        self.open = {w: None for w in ROLLUP_WIDTHS}
        env_cols = "".join(f", {_safe(f'{f.name}__{m}')}" for f, _, _ in self.env for m in ("min", "max"))
        sum_cols = "".join(", " + _safe(c) for c in self.columns)
        k = len(self.columns)
        for w in ROLLUP_WIDTHS[1:]:
            last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(w)}").fetchone()[0]
            first_fine = 0 if last is None else (int(last) + 1) * (w // fine)
            got = self.conn.execute(f"SELECT bucket, n, step_lo, step_hi{sum_cols}{env_cols} FROM "
                                    f"{rollup_table(fine)} WHERE bucket >= ? ORDER BY bucket",
                                    (first_fine,)).fetchall()
            if got:
                a = np.array(got, dtype=float)  # NULL -> NaN: sums count it 0, envelopes ignore it
                ints = a[:, :4].astype(np.int64)
                self._fold(w, Buckets(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3],
                                      np.nan_to_num(a[:, 4:4 + k], nan=0.0, posinf=np.inf, neginf=-np.inf),
                                      a[:, 4 + k::2], a[:, 5 + k::2]))
        last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(fine)}").fetchone()[0]
        start = 1 if last is None else (int(last) + 1) * fine + 1
        cur = self.conn.execute(f"SELECT step{sum_cols} FROM steps WHERE step >= ? ORDER BY step", (start,))
        while rows := cur.fetchmany(chunk):
            steps, values = step_matrix(rows, k)
            self.add(self.columns, steps, values)
        if self.pending:
            self._store_complete()

    def rebuild(self, lo: int) -> None:
        """Recompute every bucket holding a step at or after ``lo`` from the rows now stored."""
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"DELETE FROM {rollup_table(w)} WHERE bucket >= ?", ((lo - 1) // w,))
        self.sync()


def step_matrix(rows: list[tuple] | list[list], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Step rows (step, ``width`` values) as steps [k] (int) and values [k, width] (float; None as NaN)."""
    try:
        data = np.array(rows, dtype=float)
    except (TypeError, ValueError):
        data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    if data.ndim != 2 or data.shape[1] != width + 1:
        raise ValueError(f"step rows must be (step, {width} values); got shape {data.shape}")
    return data[:, 0].astype(np.int64), data[:, 1:]


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


def schema_version(value: Any, db: Path) -> int:
    """``meta.schema_version`` as an int; anything else is a TraceError naming the file."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TraceError(f"trace {db} has schema_version {value!r}, not a number: it is not an etrm trace (or it "
                         "was edited); re-run with --trace") from None


def read_only_uri(db: Path) -> str:
    """The SQLite URI that opens ``db`` read-only: the path percent-escaped (``#``, ``?``, ``%``, spaces, non-ASCII),
    so that no character of it can end the path early and drop ``mode=ro``."""
    return sqlite_uri(db, "mode=ro")


def open_trace(path: Path) -> sqlite3.Connection:
    """Open a run's trace read-only (a live trainer may be writing); a missing or corrupt one is a TraceError."""
    p = Path(path)
    db = p / TRACE_NAME if p.is_dir() else p
    if not db.is_file():
        raise TraceError(f"no trace at {db}; train with --trace, or check the run directory")
    try:
        conn = open_read_only(db, timeout=10)  # writes nothing beside the trace
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise TraceError(f"trace {db} is corrupt or not an etrm trace ({exc}); re-run with --trace") from None
    if version is None:
        raise TraceError(f"trace {db} has no schema version; it is not an etrm trace")
    if not readable(schema_version(version[0], db)):
        raise TraceError(f"trace {db} has schema {version[0]}, this etrm reads 1 to {SCHEMA_VERSION}; "
                         "upgrade etrm or re-run")
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    """The run's meta table, JSON values decoded."""
    out: dict[str, Any] = {}
    for key, value in conn.execute("SELECT key, value FROM meta"):
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out
