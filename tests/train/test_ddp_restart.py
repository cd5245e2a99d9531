"""``torchrun --max-restarts=1`` on two gloo ranks: one rank is SIGKILLed mid-run (a kill point, not a timer), the
agent restarts the group, and the restarted ranks resume from the last checkpoint by themselves. The run completes,
the trace holds every step exactly once and marks the restart, and the weights equal an uninterrupted run's."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import torch

from diagnostics.trace.killpoints import ENV
from diagnostics.trace.connection import read_only_uri
from diagnostics.trace.schema import TRACE_NAME
from etrm.train.checkpoint import load_checkpoint

WORLD, PER_RANK, STEPS = 2, 8, 12
EXTRA = [f"train.batch_size={WORLD * PER_RANK}", "train.trace_every=4", "train.checkpoint_every=6",
         "act.halt_exploration_prob=0.5", "loss.q_weight=0"]


def torchrun(cwd: Path, env: dict[str, str], *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", ENV):
        env.pop(key, None)
    if kill:
        env[ENV] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "--max-restarts=1", "-m", "etrm.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_killed_rank_is_restarted_and_resumes(tiny: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    args = ["--preset", "demo", "--trace", "--run-dir", "run", "--max-steps", str(STEPS), "--device", "cpu", *tiny,
            *EXTRA]
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = torchrun(tmp_path / "whole", subprocess_env, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # rank 1 dies during step 8: after the step-6 checkpoint, before the flush at step 8
    killed = torchrun(tmp_path / "killed", subprocess_env, *args, kill="step:7:1")
    assert killed.returncode == 0, killed.stderr[-3000:]
    out = killed.stdout + killed.stderr
    assert "torchrun restart 1: resumed from step 6" in out, out[-3000:]

    run = tmp_path / "killed" / "run"
    with sqlite3.connect(read_only_uri(run / TRACE_NAME), uri=True) as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM steps ORDER BY step")]
        markers = [tuple(r) for r in conn.execute("SELECT kind, step FROM markers ORDER BY time, rowid")]
    assert steps == list(range(1, STEPS + 1))  # every step exactly once
    assert ("restart", 6) in markers and markers[-1] == ("end", STEPS)
    ref, got = load_checkpoint(tmp_path / "whole" / "run"), load_checkpoint(run)
    assert got["step"] == STEPS
    for name, value in ref["model"].items():
        assert torch.equal(got["model"][name], value), name
    for name, value in ref["ema"].items():
        assert torch.equal(got["ema"][name], value), name
