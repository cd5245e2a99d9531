"""Opening a trace read-only, the one place that does: ``open_trace`` (strict, for the doctor CLI and ``load_run``;
a missing or corrupt trace is a ``TraceError``) and ``connect`` (a short lock timeout and one-line messages, for
views that poll a live trace), plus ``read_meta``. A live trainer may be writing the trace (WAL): no reader writes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from diagnostics.trace.readonly import open_read_only, sqlite_uri
from diagnostics.trace.schema import SCHEMA_VERSION, TRACE_NAME, TraceError, readable, schema_version

CONNECT_TIMEOUT_S = 1.0      # a locked trace fails fast instead of hanging a page


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

