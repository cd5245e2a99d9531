"""SIGKILL at exact places (``diagnostics.trace.killpoints``, not timing): after the temporary checkpoint file is written,
between a flush's rows and their commit, and mid-run. The kept checkpoint is finite and loadable, resume traces each
step once and ends with the weights of an uninterrupted run, and readers say ``crashed`` within seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# tests/train/conftest.py's helpers, by path: ``from conftest import`` takes whichever conftest pytest loaded last
_spec = importlib.util.spec_from_file_location("_train_conftest", Path(__file__).with_name("conftest.py"))
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)
TINY, cli_env = _conf.TINY, _conf.cli_env
from dashboards.runs import Runs
from diagnostics.trace.killpoints import ENV
from diagnostics.trace.liveness import LOCK_NAME, trainer_alive
from diagnostics.trace.loading import run_status
from diagnostics.trace.connection import read_only_uri
from diagnostics.trace.schema import TRACE_NAME
from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint

STEPS = 8
ARGS = ["--preset", "demo", "--device", "cpu", "--trace", *TINY, "train.trace_every=1", "train.checkpoint_every=2",
        "train.eval_every=100"]


def train(run: Path, *extra: str, kill: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    env = cli_env()
    env.pop(ENV, None)
    if kill:
        env[ENV] = kill
    args = ["--resume", "--run-dir", str(run), "--max-steps", str(STEPS)] if resume else \
        [*ARGS, "--run-dir", str(run), "--max-steps", str(STEPS), *extra]
    return subprocess.run([sys.executable, "-m", "etrm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def traced_steps(run: Path) -> list[int]:
    with sqlite3.connect(read_only_uri(run / TRACE_NAME), uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("whole") / "run"
    assert train(run).returncode == 0
    assert traced_steps(run) == list(range(1, STEPS + 1))
    return load_checkpoint(run)["model"]


@pytest.mark.parametrize("kill, kept, committed", [
    ("checkpoint-tmp:4", 2, [1, 2, 3, 4]),   # the step-4 checkpoint is whole in its temporary file, not renamed
    ("flush-commit:3", 2, [1, 2]),           # step 3's row is written, not committed
])
def test_sigkill_at_a_kill_point_then_resume(kill, kept, committed, tmp_path: Path, uninterrupted) -> None:
    run = tmp_path / "run"
    killed = train(run, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = load_checkpoint(run)  # loadable, and the last complete one
    assert state["step"] == kept
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert traced_steps(run) == committed
    assert run_status(run) == "crashed"  # its lock is free: no need to wait for the heartbeat to go stale

    resumed = train(run, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {kept}" in resumed.stdout
    assert traced_steps(run) == list(range(1, STEPS + 1))  # each step exactly once
    final = load_checkpoint(run)
    assert final["step"] == STEPS
    for name, t in uninterrupted.items():
        assert torch.equal(final["model"][name], t), name
    assert run_status(run) == "finished"


def test_readers_say_crashed_within_seconds_of_a_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = root / "live"
    env = cli_env()
    env.pop(ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "etrm.cli", *ARGS, "--run-dir", str(run), "--max-steps", "100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / TRACE_NAME).is_file() and _rows(run) >= 2):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert trainer_alive(run) is True
        assert run_status(run) == "live"
        assert Runs(root).infos()[0].status == "live"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = time.time()
    assert (run / LOCK_NAME).is_file()
    assert trainer_alive(run) is False
    assert run_status(run) == "crashed"
    assert Runs(root).infos()[0].status == "crashed"
    assert time.time() - killed_at < 5  # the bound; the heartbeat rule alone says "live" for 120 s
    doctor = subprocess.run([sys.executable, "-m", "diagnostics.cli", str(run), "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert json.loads(doctor.stdout)["summary"]["status"] == "crashed"


def _rows(run: Path) -> int:
    try:
        return len(traced_steps(run))
    except sqlite3.Error:
        return 0
