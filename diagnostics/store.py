"""The trace store: one SQLite database per run (WAL mode), so a live reader can follow a writing trainer.

Schema policy: versions are additive (a version only adds tables or columns), readers accept every version from 1
to ``SCHEMA_VERSION``, and docs/diagnostics.md lists what each version added. ``meta.schema_version`` is the
trace's version; a writer of a later version resuming an older trace adds what its version adds (the rollups of the
rows already there) and records ``upgraded_from``.

Version 2 adds the rollups: ``rollup_64``, ``rollup_4096``, ``rollup_262144`` (``ROLLUP_WIDTHS``), one row per
bucket of that many steps (``bucket`` = (step - 1) // width): ``n`` rows, ``step_lo``/``step_hi``, the sum of every
counter column (NULL counts 0), and ``<figure>__min``/``<figure>__max`` of every registered figure's per-step value.
They are written in the same transaction as their rows, and kept equal to the sums of their rows across a resume's
truncation. A view of any step range then reads on the order of a thousand rows whatever the run's length.

Version 3 (the per-sample ACT ledger, ``LEDGER_TABLES``; ``diagnostics.ledger`` defines the columns):
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
from itertools import chain
from pathlib import Path
from typing import Any, Iterable

from diagnostics.ledger import BIN_SUMS, RECORD_COLUMNS, TASK_SUMS, increments, kept

SCHEMA_VERSION = 3
ROLLUP_WIDTHS = (64, 4096, 262144)
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
    (segment 1, after the last checkpoint), every ``every``-th record (``diagnostics.ledger.kept``) into ``ledger``.
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
        self.ledger = LedgerStore(self.conn, int(rows.get("ledger_sample_every", existing.get("ledger_sample_every", 1))))
        if had_rows and int(version) < SCHEMA_VERSION:  # resuming an older trace: what later versions add is added
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
        """Insert step rows: each tuple is (step, value for each of ``names``)."""
        if not rows:
            return
        cols = ", ".join(["step"] + [_safe(n) for n in names])
        marks = ", ".join("?" * (len(names) + 1))
        lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
        rewrite = self.conn.execute("SELECT 1 FROM steps WHERE step BETWEEN ? AND ? LIMIT 1", (lo, hi)).fetchone()
        self.conn.executemany(f"INSERT OR REPLACE INTO steps ({cols}) VALUES ({marks})",
                              [tuple(_num(v) for v in row) for row in rows])
        if rewrite:  # a step written again (rare): its buckets are recomputed from the rows
            self.rollups.rebuild(int(lo))
        else:
            self.rollups.add(names, rows)

    def write_timings(self, rows: list[tuple[int, int, str, float]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?)", rows)

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO evals VALUES (?, ?, ?)",
                              [(step, k, _num(v)) for k, v in values.items()])

    def write_alignment(self, rows: list[tuple[int, int, int, int, int]]) -> None:
        self.conn.executemany("INSERT INTO alignment_samples VALUES (?, ?, ?, ?, ?)", rows)

    def write_ledger(self, records: list[tuple]) -> None:
        """One flush's ledger records (``diagnostics.ledger.RECORD_COLUMNS``): aggregates exact, raw sampled."""
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
        for table in ("steps", "timings", "evals", "alignment_samples"):
            self.conn.execute(f"DELETE FROM {table} WHERE step > ?", (step,))
        self.rollups.rebuild(step + 1)  # every bucket equals the sum of its remaining rows
        self.ledger.truncate_after(step)
        # a finding that first held on a deleted row is found again (or not) when those steps are re-run
        self.conn.execute("DELETE FROM findings WHERE first_step > ?", (step,))
        self.conn.commit()

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.commit()
        self.conn.close()


def rollup_table(width: int) -> str:
    return f"rollup_{int(width)}"


class Rollups:
    """The writer's multi-resolution summaries of ``steps`` (schema version 2).

    A bucket's row is written once, when the bucket is complete (a row of a later bucket arrives), in the same
    transaction as the rows that complete it; the open bucket of each width lives in memory (readers read its rows
    directly: at most one bucket's worth at the edge). The finest buckets are made from rows, one vector pass per
    completed bucket; coarser ones are sums of finest buckets. So every stored bucket equals the sum of its rows at
    every commit, and a flush mostly appends to a list. ``rebuild`` recomputes the buckets from a step on (a
    truncation, a rewritten step); ``sync`` restores the open buckets when a writer opens an existing trace.
    """

    def __init__(self, conn: sqlite3.Connection, columns: list[str]) -> None:
        import numpy as np

        from diagnostics import figures  # the registry's per-step values give the min/max envelopes

        self.np, self.conn = np, conn
        self.envelopes = [f for f in figures.REGISTRY.values() if not f.sqrt]
        for w in ROLLUP_WIDTHS:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {rollup_table(w)} (bucket INTEGER PRIMARY KEY, "
                         "n INTEGER NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL)")
        self.columns: list[str] | None = None
        self.open: dict[int, list | None] = {w: None for w in ROLLUP_WIDTHS}  # coarser widths' open buckets
        self.pending: list[tuple] = []  # rows of the open finest bucket
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
        index = {c: i for i, c in enumerate(self.columns)}
        self.env = [(f, [index[t] for t in f.num], [index[t] for t in f.den]) for f in self.envelopes
                    if all(t in index for t in f.terms)]
        # the envelopes' numerators and denominators as two matrix products (a per-step figure divides by 1)
        np = self.np
        self.num_m = np.zeros((len(self.columns), len(self.env)))
        self.den_m = np.zeros((len(self.columns), len(self.env)))
        self.per_step = np.array([not den for _, _, den in self.env], dtype=bool)
        for j, (_, num, den) in enumerate(self.env):
            self.num_m[num, j] = 1.0
            self.den_m[den, j] = 1.0
        names = ["bucket", "n", "step_lo", "step_hi", *self.columns,
                 *(f"{f.name}__{m}" for f, _, _ in self.env for m in ("min", "max"))]
        self.insert = {w: f"INSERT OR REPLACE INTO {rollup_table(w)} ({', '.join(_safe(c) for c in names)}) "
                          f"VALUES ({', '.join('?' * len(names))})" for w in ROLLUP_WIDTHS}
        self.sync()

    def _matrix(self, names: list[str], rows: list[tuple]):
        """Steps [k] and values [k, columns] (NULL and NaN as 0; absent columns 0), and per-step envelopes."""
        np = self.np
        width = len(names) + 1
        try:
            data = np.fromiter(chain.from_iterable(rows), dtype=float, count=len(rows) * width).reshape(-1, width)
        except (TypeError, ValueError):  # NULLs
            data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
        steps = data[:, 0].astype(np.int64)
        if names == self.columns:
            vals = data[:, 1:]
            vals[np.isnan(vals)] = 0.0
        else:
            vals = np.zeros((len(rows), len(self.columns)))
            index = {c: i for i, c in enumerate(self.columns)}
            for j, n in enumerate(names):
                vals[:, index[n]] = np.nan_to_num(data[:, 1 + j], nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = vals if np.isfinite(vals).all() else np.where(np.isfinite(vals), vals, 0.0)
        a, b = finite @ self.num_m, finite @ self.den_m
        b[:, self.per_step] = 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            env = np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)
        return steps, vals, env

    def _complete(self, rows: list[tuple]) -> None:
        """Rows that fill finest buckets completely: one vector pass makes those buckets, written and folded up."""
        np = self.np
        steps, vals, env = self._matrix(self.columns, rows)
        keys = (steps - 1) // ROLLUP_WIDTHS[0]
        cuts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
        for a, b in zip(cuts[:-1], cuts[1:]):
            e = env[a:b]
            ok = ~np.isnan(e)
            agg = [int(keys[a]), b - a, int(steps[a]), int(steps[b - 1]), vals[a:b].sum(0),
                   np.fmin.reduce(e, axis=0, initial=np.inf, where=ok),
                   np.fmax.reduce(e, axis=0, initial=-np.inf, where=ok)]
            self._write(ROLLUP_WIDTHS[0], agg)
            self._up(agg)

    def _up(self, agg: list, widths: tuple[int, ...] = ROLLUP_WIDTHS[1:]) -> None:
        """Fold one complete finest bucket into the open bucket of each coarser width (writing a completed one)."""
        np = self.np
        for w in widths:
            key = (agg[2] - 1) // w
            acc = self.open[w]
            if acc is not None and acc[0] != key:
                self._write(w, acc)
                acc = None
            if acc is None:
                self.open[w] = [key, agg[1], agg[2], agg[3], agg[4].copy(), agg[5].copy(), agg[6].copy()]
            else:
                acc[1] += agg[1]
                acc[2], acc[3] = min(acc[2], agg[2]), max(acc[3], agg[3])
                acc[4] += agg[4]
                np.fmin(acc[5], agg[5], out=acc[5])
                np.fmax(acc[6], agg[6], out=acc[6])

    def _write(self, w: int, acc: list) -> None:
        key, n, lo, hi, sums, mn, mx = acc
        env = [None if not self.np.isfinite(v) else float(v) for pair in zip(mn, mx) for v in pair]
        self.conn.execute(self.insert[w], (key, int(n), lo, hi, *sums.tolist(), *env))

    def add(self, names: list[str], rows: list[tuple]) -> None:
        """Take new step rows (later than every row already counted). The open finest bucket's rows wait in memory
        (at most ``ROLLUP_WIDTHS[0]``); each bucket they complete is written now, in the caller's transaction."""
        if not rows:
            return
        if names != self.columns:  # the columns in this writer's order, absent ones 0
            at = {n: i + 1 for i, n in enumerate(names)}
            rows = [(r[0], *(r[at[c]] if c in at else 0.0 for c in self.columns)) for r in rows]
        self.pending.extend(sorted(rows))
        fine = ROLLUP_WIDTHS[0]
        open_key = (self.pending[-1][0] - 1) // fine
        done = 0
        while done < len(self.pending) and (self.pending[done][0] - 1) // fine < open_key:
            done += 1
        if done:
            ready, self.pending = self.pending[:done], self.pending[done:]
            self._complete(ready)

    def sync(self) -> None:
        """Restore the open buckets from what is stored: the coarser widths' from the finest buckets past their
        last stored bucket, then the rows past the last finest bucket (writing any bucket those complete)."""
        np = self.np
        fine = ROLLUP_WIDTHS[0]
        self.pending, self.open = [], {w: None for w in ROLLUP_WIDTHS}
        env_cols = "".join(f", {_safe(f'{f.name}__{m}')}" for f, _, _ in self.env for m in ("min", "max"))
        sum_cols = "".join(", " + _safe(c) for c in self.columns)
        for w in ROLLUP_WIDTHS[1:]:
            last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(w)}").fetchone()[0]
            first_fine = 0 if last is None else (int(last) + 1) * (w // fine)
            for r in self.conn.execute(f"SELECT bucket, n, step_lo, step_hi{sum_cols}{env_cols} FROM "
                                       f"{rollup_table(fine)} WHERE bucket >= ? ORDER BY bucket", (first_fine,)):
                k = len(self.columns)
                env = np.array([np.nan if v is None else v for v in r[4 + k:]], dtype=float)
                self._up([r[0], r[1], r[2], r[3], np.array([0.0 if v is None else v for v in r[4:4 + k]]),
                          np.where(np.isnan(env[0::2]), np.inf, env[0::2]),
                          np.where(np.isnan(env[1::2]), -np.inf, env[1::2])], (w,))
        last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(fine)}").fetchone()[0]
        start = 1 if last is None else (int(last) + 1) * fine + 1
        rows = self.conn.execute(f"SELECT step{sum_cols} FROM steps WHERE step >= ? ORDER BY step",
                                 (start,)).fetchall()
        self.add(self.columns, rows)

    def rebuild(self, lo: int) -> None:
        """Recompute every bucket holding a step at or after ``lo`` from the rows now stored."""
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"DELETE FROM {rollup_table(w)} WHERE bucket >= ?", ((lo - 1) // w,))
        self.sync()


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
    return Path(db).absolute().as_uri() + "?mode=ro"


def open_trace(path: Path) -> sqlite3.Connection:
    """Open a run's trace read-only (a live trainer may be writing); a missing or corrupt one is a TraceError."""
    p = Path(path)
    db = p / TRACE_NAME if p.is_dir() else p
    if not db.is_file():
        raise TraceError(f"no trace at {db}; train with --trace, or check the run directory")
    try:
        conn = sqlite3.connect(read_only_uri(db), uri=True, timeout=10)
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
