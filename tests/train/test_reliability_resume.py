"""Resume and readers after a SIGKILL (issue 24).

- A resumed trace equals an uninterrupted one: every column of the steps table (the context-diversity probe's
  sampling phase included), the evaluations, their audits and the ledger, bit for bit. Only the timing columns
  differ, by nature: the ``timings`` table and its rollups (phase wall times), and the wall-clock ``time`` of the
  markers and the heartbeat (and the meta's start time).
- Readers never write: a SIGKILLed run (committed rows still in ``trace.sqlite-wal``) and a finished run are read
  by ``etrm-doctor`` and by the dashboard's run cache with no file beside the trace created or changed, and with
  every committed row seen.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from diagnostics.trace.killpoints import ENV as KILL_ENV
from diagnostics.trace.schema import TRACE_NAME
from tests.test_bad_input import TINY

TIMING_TABLES = ("timings", "markers", "heartbeat", "meta")
ARGS = ["--preset", "demo", "--trace", *TINY[:-2], "--device", "cpu", "train.diversity_every=4",
        "train.checkpoint_every=3", "train.trace_every=1", "train.eval_every=3", "--max-steps", "6"]


def _train(cwd: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "etrm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``whole``: 6 steps uninterrupted; ``killed``: SIGKILLed during step 5 (checkpoint at 3, rows of 1..4 in its
    -wal), kept as it died; ``resumed``: a copy of it resumed to step 6."""
    root = tmp_path_factory.mktemp("reliability-resume")
    assert _train(root, *ARGS, "--run-dir", "whole").returncode == 0
    assert _train(root, *ARGS, "--run-dir", "killed", kill="step:4").returncode == -9
    shutil.copytree(root / "killed", root / "resumed")
    shutil.copytree(root / "killed", root / "killed-no-shm")  # the -wal's rows without the index SQLite keeps
    (root / "killed-no-shm" / (TRACE_NAME + "-shm")).unlink()
    proc = _train(root, "--resume", "--run-dir", "resumed")
    assert proc.returncode == 0, proc.stderr
    return {name: root / name for name in ("whole", "killed", "resumed", "killed-no-shm")}


def _tables(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {n: conn.execute(f'SELECT * FROM "{n}" ORDER BY 1').fetchall() for n in names
               if n not in TIMING_TABLES and not n.startswith("timing_rollup")}
    conn.close()
    return out


def test_reliability_resumed_trace_equals_uninterrupted(runs: dict[str, Path]) -> None:
    whole, resumed = _tables(runs["whole"] / TRACE_NAME), _tables(runs["resumed"] / TRACE_NAME)
    assert sorted(whole) == sorted(resumed) and len(whole["steps"]) == 6
    with sqlite3.connect(f"file:{runs['whole'] / TRACE_NAME}?mode=ro&immutable=1", uri=True) as conn:
        measured = [r[0] for r in conn.execute("SELECT step FROM steps WHERE context_measured > 0")]
    assert measured == [1, 5]  # every 4th step from the first: step 5 comes after the resume at 3
    for name in whole:
        assert whole[name] == resumed[name], name


def _files(run: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in run.iterdir()}


def _committed_steps(run: Path) -> list[int]:
    """The rows a writer committed, read from a private copy (the copy may recover its -wal; the run is untouched)."""
    copy = run.parent / f"{run.name}-copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for p in run.glob(TRACE_NAME + "*"):
        shutil.copyfile(p, copy / p.name)
    with sqlite3.connect(copy / TRACE_NAME) as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step")]
    conn.close()
    shutil.rmtree(copy)
    return steps


@pytest.mark.parametrize("name", ["killed", "killed-no-shm", "whole"])
def test_reliability_readers_never_write(name: str, runs: dict[str, Path]) -> None:
    run = runs[name]
    wal = run / (TRACE_NAME + "-wal")
    if name != "whole":
        assert wal.is_file() and wal.stat().st_size > 0  # the committed rows are still in the -wal
    committed = _committed_steps(run)
    assert committed == list(range(1, 7 if name == "whole" else 5))
    before = _files(run)
    proc = subprocess.run([sys.executable, "-m", "diagnostics.cli", str(run), "--json"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode in (0, 1), proc.stderr
    import json

    summary = json.loads(proc.stdout)["summary"]
    assert summary["status"] == ("finished" if name == "whole" else "crashed")
    assert _files(run) == before

    from dashboards.runs import Runs

    cache = Runs(run.parent).get(name)
    assert cache.info.error is None and cache.info.last_step == committed[-1]
    assert list(cache.raw.index if cache.raw.index.name == "step" else cache.raw["step"]) == committed
    assert cache.info.updated is not None and cache.info.updated < min(t for _, t in before.values()) / 1e9 + 60
    assert _files(run) == before
