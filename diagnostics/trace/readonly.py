"""Opening a trace without writing a byte beside it: a reader creates or changes no ``-wal``/``-shm`` file.

SQLite's plain read-only mode (``mode=ro``) still creates the ``-shm``/``-wal`` files of a WAL database and writes
its read marks into ``-shm``. So a trace is opened by its state:

- no trainer holds the run and its ``-wal`` is missing or empty (a finished run): ``immutable=1``, no locks, no
  side files;
- its ``-wal`` holds committed rows (a trainer killed before checkpointing them) and ``-shm`` exists:
  ``readonly_shm=1``, which reads both without writing either (every committed row is seen);
- the same without ``-shm``: the trace and its ``-wal`` are copied into a private temporary directory, recovered
  there and read into memory (the copy is removed at once);
- a live trainer holds the run: plain ``mode=ro``, whose read lock lives in the trainer's own ``-shm`` (SQLite's
  protocol for reading beside a writer; the files are the trainer's and exist already).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

from diagnostics.trace.liveness import trainer_alive


def side_file(db: Path, suffix: str) -> Path:
    """``trace.sqlite-wal`` / ``-shm`` beside ``db``."""
    return db.with_name(db.name + suffix)


def sqlite_uri(db: Path, query: str) -> str:
    """The SQLite URI of ``db`` with ``query``: the path percent-escaped (``#``, ``?``, ``%``, spaces, non-ASCII),
    so that no character of it can end the path early and drop the query."""
    return Path(db).absolute().as_uri() + "?" + query


def open_read_only(db: Path, timeout: float, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to ``db`` that reads every committed row and writes nothing anywhere (see the module doc)."""
    db = Path(db)
    wal, shm = side_file(db, "-wal"), side_file(db, "-shm")
    wal_rows = wal.is_file() and wal.stat().st_size > 0
    alive = trainer_alive(db)
    if alive:
        query = "mode=ro"
    elif not wal_rows:
        query = "mode=ro&immutable=1"
    elif shm.is_file():
        query = "mode=ro&readonly_shm=1"
    else:
        return _recovered_copy(db, wal, timeout, check_same_thread)
    return sqlite3.connect(sqlite_uri(db, query), uri=True, timeout=timeout, check_same_thread=check_same_thread)


def _recovered_copy(db: Path, wal: Path, timeout: float, check_same_thread: bool) -> sqlite3.Connection:
    """The trace with its ``-wal`` rows, recovered in a private copy and read into memory."""
    with tempfile.TemporaryDirectory(prefix="etrm-trace-") as tmp:
        copy = Path(tmp) / "trace.sqlite"
        try:
            shutil.copyfile(db, copy)
            shutil.copyfile(wal, side_file(copy, "-wal"))
        except OSError as exc:  # no room for the copy: a read error like any other (one line)
            raise sqlite3.OperationalError(f"cannot copy the trace to read its -wal ({exc.strerror or exc})") from None
        source = sqlite3.connect(copy, timeout=timeout)
        try:
            memory = sqlite3.connect(":memory:", check_same_thread=check_same_thread)
            source.backup(memory)
        finally:
            source.close()
    return memory
