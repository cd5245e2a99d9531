"""Read-only trace URIs: a run path holding ``#``, ``?``, ``%``, spaces or non-ASCII opens the right file, read-only,
and nothing is created outside the run (an unescaped ``#`` or ``?`` used to end the path and drop ``mode=ro``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from diagnostics.trace.connection import connect
from diagnostics.cli import main as doctor
from diagnostics.trace.loading import load_run, run_status
from diagnostics.trace.connection import open_trace
from diagnostics.trace.schema import TRACE_NAME

NAMES = ["has#hash", "has?query", "has%20percent", "has%", "has space", "ünïcødé-运行", "a?mode=rw#x"]


def _files(root: Path) -> list[str]:
    """Every path under ``root`` but a WAL reader's own ``-wal``/``-shm`` next to the trace (SQLite makes those)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize("name", NAMES)
def test_odd_run_paths_open_read_only(name: str, tmp_path: Path, make_run, sim, meta, capsys) -> None:
    run = make_run(f"runs/{name}", sim(steps=12), meta())
    before = _files(tmp_path)
    conn = open_trace(run)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("INSERT INTO markers VALUES (0, 'x', 0, '')")
    assert conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 12  # the run's own trace, not a new file
    conn.close()
    assert len(load_run(run)) == 12 and run_status(run) == "finished"
    assert len(load_run(run / TRACE_NAME)) == 12
    assert doctor([str(run)]) in (0, 1)
    assert "corrupt" not in capsys.readouterr().err
    dash = connect(run)
    assert dash.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 12
    dash.close()
    assert _files(tmp_path) == before  # no stray database (or -wal/-shm) anywhere

