"""The trace store: one SQLite database per run (WAL mode), so a live reader can follow a writing trainer.

Schema version 1 (``meta.schema_version``):
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
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
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
        if "schema_version" in existing and schema_version(existing["schema_version"], self.path) != SCHEMA_VERSION:
            raise TraceError(f"{self.path} has trace schema {existing['schema_version']}, this etrm writes "
                             f"{SCHEMA_VERSION}; start a new run directory")
        rows = {"schema_version": str(SCHEMA_VERSION), **{k: _meta_value(v) for k, v in (meta or {}).items()}}
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows.items())
        self.columns = [r[1] for r in self.conn.execute("PRAGMA table_info(steps)").fetchall() if r[1] != "step"]
        self.conn.commit()

    def add_counters(self, counters: Iterable[tuple[str, str, str]]) -> None:
        """Declare per-step columns (name, probe, description); new ones are added to ``steps``."""
        for name, probe, description in counters:
            if name not in self.columns:
                self.conn.execute(f"ALTER TABLE steps ADD COLUMN {_safe(name)} REAL")
                self.columns.append(name)
            self.conn.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", (name, probe, description))
        self.conn.commit()

    def write_steps(self, names: list[str], rows: list[tuple]) -> None:
        """Insert step rows: each tuple is (step, value for each of ``names``)."""
        if not rows:
            return
        cols = ", ".join(["step"] + [_safe(n) for n in names])
        marks = ", ".join("?" * (len(names) + 1))
        self.conn.executemany(f"INSERT OR REPLACE INTO steps ({cols}) VALUES ({marks})",
                              [tuple(_num(v) for v in row) for row in rows])

    def write_timings(self, rows: list[tuple[int, int, str, float]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?)", rows)

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO evals VALUES (?, ?, ?)",
                              [(step, k, _num(v)) for k, v in values.items()])

    def write_alignment(self, rows: list[tuple[int, int, int, int, int]]) -> None:
        self.conn.executemany("INSERT INTO alignment_samples VALUES (?, ?, ?, ?, ?)", rows)

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
        # a finding that first held on a deleted row is found again (or not) when those steps are re-run
        self.conn.execute("DELETE FROM findings WHERE first_step > ?", (step,))
        self.conn.commit()

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.commit()
        self.conn.close()


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
    if schema_version(version[0], db) != SCHEMA_VERSION:
        raise TraceError(f"trace {db} has schema {version[0]}, this etrm reads {SCHEMA_VERSION}; "
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
