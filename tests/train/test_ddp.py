"""DDP under ``torchrun --standalone --nproc_per_node=2`` with gloo: ranks agree, rank 0 alone writes, and the trace's
counters are the sums over ranks. Each test is real processes (a tiny model: about 10 s per launch on a CPU)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnostics import load_ledger, load_task_stats
from diagnostics.trace.liveness import LOCK_NAME
from diagnostics.trace.schema import TRACE_NAME
from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from etrm.errors import UserError
from etrm.data.samplers import RefillSampler
from etrm.train.distributed import DistEnv, EvalShard, halt_seed, local_batch, shard_sampler

WORLD, PER_RANK, STEPS = 2, 8, 12
# The tiny config's batch of 8 per process; under torchrun train.batch_size is the global batch. Exploration and no
# Q loss keep the halting staggered, so steps have few resets (cached mode then leaves the encoder unused).
DDP_EXTRA = [f"train.batch_size={WORLD * PER_RANK}", "train.trace_every=4", "train.checkpoint_every=6",
             "act.halt_exploration_prob=0.5", "loss.q_weight=0"]


@pytest.fixture
def ddp_args(tiny: list[str]) -> list[str]:
    return [*tiny, *DDP_EXTRA]


@pytest.fixture
def torchrun(subprocess_env: dict[str, str]):
    """``torchrun(cwd, *args, state_dir=...)``: etrm-train on two gloo ranks; each rank saves its final state."""

    def run(cwd: Path, *args: str, state_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return _torchrun(dict(subprocess_env), cwd, *args, state_dir=state_dir, timeout=timeout)

    return run


def _torchrun(env: dict[str, str], cwd: Path, *args: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env["ETRM_RANK_STATE_DIR"] = str(state_dir)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "etrm.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ranks_agree(state_dir: Path, run_dir: Path, steps: int) -> list[dict]:
    states = [torch.load(state_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ckpt = load_checkpoint(run_dir)
    for r, st in enumerate(states):
        assert st["step"] == steps and st["slots"] == PER_RANK
        for name, value in states[0]["model"].items():
            assert torch.equal(st["model"][name], value), f"rank {r} disagrees with rank 0 on {name}"
            assert torch.equal(ckpt["model"][name], value), f"checkpoint differs from the ranks on {name}"
        for name, value in states[0]["ema"].items():
            assert torch.equal(st["ema"][name], value), f"rank {r} disagrees on the EMA of {name}"
    # Each rank fed its own share of the data.
    assert [st["sampler"]["num_samples"] for st in states] == [s["sampler"]["num_samples"] for s in ckpt["ranks"]]
    return states


def trace_rows(run_dir: Path) -> tuple[list[str], list[tuple]]:
    con = sqlite3.connect(run_dir / TRACE_NAME)
    try:
        cur = con.execute("SELECT * FROM steps ORDER BY step")
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("mode_args", [["--preset", "demo-trm"], ["--preset", "demo", "encoder.mode=cached"]],
                         ids=["trm", "cached"])
def test_ddp_two_ranks(mode_args: list[str], ddp_args: list[str], torchrun, tmp_path: Path) -> None:
    work, state_dir = tmp_path / "work", tmp_path / "ranks"
    work.mkdir()
    proc = torchrun(work, *mode_args, "--trace", "--run-dir", "run", "--max-steps", str(STEPS), "--device", "cpu",
                    *ddp_args, state_dir=state_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = work / "run"

    # Only rank 0 wrote: the run directory and nothing else; console output once.
    assert [p.name for p in work.iterdir()] == ["run"]
    allowed = {"config.toml", CHECKPOINT_NAME, TRACE_NAME, TRACE_NAME + "-wal", TRACE_NAME + "-shm", LOCK_NAME,
               "profiler"}  # rank 0 profiles a few steps after the doctor's first finding (cached: low coverage)
    assert {p.name for p in run_dir.iterdir()} <= allowed
    assert proc.stdout.count("etrm-train summary") == 1
    assert proc.stdout.count(f"step {STEPS}/{STEPS}") == 1

    states = assert_ranks_agree(state_dir, run_dir, STEPS)
    if mode_args[1] == "demo-trm":
        table = states[0]["model"]["puzzle_emb.weights"]
        assert table.abs().sum() > 0, "the puzzle table never moved"

    # Trace counters are sums over ranks: B slots per rank, so 2 * B in each row; resets add up to the samples fed.
    cols, rows = trace_rows(run_dir)
    assert [r[cols.index("step")] for r in rows] == list(range(1, STEPS + 1))
    col = {name: np.array([r[cols.index(name)] for r in rows], dtype=float) for name in cols}
    assert (col["slots"] == WORLD * PER_RANK).all()
    assert (col["coverage_den"] == WORLD * PER_RANK).all()
    assert col["resets"][0] == WORLD * PER_RANK  # the first step loads every slot of every rank
    consumed = sum(st["sampler"]["consumed"] for st in states)
    assert col["samples_consumed"].sum() == consumed  # each rank's draws, summed
    assert (col["resets"] <= WORLD * PER_RANK).all()
    con = sqlite3.connect(run_dir / TRACE_NAME)
    try:
        markers = [r[0] for r in con.execute("SELECT kind FROM markers ORDER BY rowid")]
        timing_ranks = {r[0] for r in con.execute("SELECT DISTINCT rank FROM timings")}
    finally:
        con.close()
    assert markers.count("start") == 1 and markers.count("end") == 1  # one writer
    assert timing_ranks == {0, 1}  # each rank's phase timings, stored by rank 0
    assert_audits_are_whole_set(run_dir, STEPS)
    # the ledger: every rank's samples that left their slots, gathered to rank 0 (one record each, all kept here)
    records = load_ledger(run_dir)
    assert set(records["rank"]) == {0, 1} and len(records) == col["halted"].sum()
    assert not records.duplicated(["rank", "sample_id", "exit_step"]).any()
    assert load_task_stats(run_dir)["samples"].sum() == len(records)


def assert_audits_are_whole_set(run_dir: Path, step: int) -> None:
    """The evaluation audits of a two-rank run (each rank evaluated every other sample) equal one process's
    evaluation of the checkpointed weights (EMA and raw) over the whole set: the per-ACT-step sums were reduced."""
    from diagnostics import load_eval_audits
    from diagnostics.trace.eval_audits import act_key
    from etrm.config import Config
    from etrm.train.evaluate import evaluate
    from etrm.train.trainer import Trainer

    ckpt = load_checkpoint(run_dir)
    assert ckpt["step"] == step
    single = Trainer(Config.from_dict(ckpt["config"]), run_dir.parent / "single", device=torch.device("cpu"))
    single.model.load_state_dict(ckpt["model"])
    single.ema.load_state_dict(ckpt["ema"])
    audits = load_eval_audits(run_dir)
    last = audits[audits["step"] == step]
    t = single.cfg.max_steps_per_sample
    whole = {"ema": single.evaluate(), "raw": evaluate(single.model, single.eval_ds, 8, single.device, single.autocast)}
    assert sorted(last["weights"].unique()) == ["ema", "raw"]
    for weights, res in whole.items():
        rows = last[last["weights"] == weights].sort_values("act_step")
        assert (rows["count"] == len(single.eval_ds)).all()
        for what, col in (("exact", "exact"), ("token", "token"), ("halts", "halt_share")):
            np.testing.assert_allclose(rows[col], [res[act_key(k, what)] for k in range(1, t + 1)], atol=1e-9,
                                       err_msg=f"{weights} {col}")
        np.testing.assert_allclose(rows["halt_step"], res["halt.step"], atol=1e-9)


def test_ddp_resume_restores_each_rank(ddp_args: list[str], torchrun, subprocess_env, tmp_path: Path) -> None:
    work, state_dir = tmp_path / "work", tmp_path / "ranks"
    work.mkdir()
    first = torchrun(work, "--preset", "demo", "--trace", "--run-dir", "run", "--max-steps", "6", "--device", "cpu",
                     *ddp_args, state_dir=state_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = load_checkpoint(work / "run")
    assert ckpt["world_size"] == WORLD and len(ckpt["ranks"]) == WORLD
    assert [r["carry"]["halted"].shape[0] for r in ckpt["ranks"]] == [PER_RANK] * WORLD
    second = torchrun(work, "--resume", "--run-dir", "run", "--max-steps", "10", state_dir=state_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_ranks_agree(state_dir, work / "run", 10)
    cols, rows = trace_rows(work / "run")  # the trace goes on where it stopped, still summed over both ranks
    assert [r[cols.index("step")] for r in rows] == list(range(1, 11))
    assert {r[cols.index("slots")] for r in rows} == {WORLD * PER_RANK}
    # A single process cannot take over a two-rank checkpoint (it holds two carries).
    single = subprocess.run([sys.executable, "-m", "etrm.cli", "--resume", "--run-dir", "run", "--max-steps", "12"],
                            cwd=work, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 2 and "resume it with 2" in single.stderr


# -- the pieces, in process ---------------------------------------------------------------------------------------
def test_sharded_streams_are_disjoint_per_epoch_and_cover_the_set() -> None:
    n = 11
    streams = [shard_sampler(RefillSampler(n, seed=3), DistEnv(r, WORLD, r)) for r in range(WORLD)]
    firsts = [s.draw(s.num_samples) for s in streams]
    assert sorted(np.concatenate(firsts).tolist()) == list(range(n))
    seconds = [s.draw(s.num_samples) for s in streams]
    assert sorted(np.concatenate(seconds).tolist()) == list(range(n))
    assert any(not np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(firsts, seconds)), "shards never change"
    again = shard_sampler(RefillSampler(n, seed=3), DistEnv(1, WORLD, 1))
    assert np.array_equal(again.draw(7), np.concatenate([firsts[1], seconds[1]])[:7])  # deterministic


def test_eval_shards_partition_the_set() -> None:
    class Rows:
        def __len__(self) -> int:
            return 5

        def batch(self, ids):
            return {"sample_id": torch.as_tensor(ids)}

    shards = [EvalShard(Rows(), DistEnv(r, WORLD, r)) for r in range(WORLD)]
    got = [s.batch(np.array([*range(len(s)), -1]))["sample_id"].tolist() for s in shards]
    assert got == [[0, 2, 4, -1], [1, 3, -1]]


def test_global_batch_must_split_evenly_and_seeds_differ_per_rank() -> None:
    assert local_batch(16, DistEnv(0, 2, 0)) == 8
    with pytest.raises(UserError, match="must divide"):
        local_batch(15, DistEnv(0, 2, 0))
    assert halt_seed(5, DistEnv(0, 2, 0)) == 5 and halt_seed(5, DistEnv(1, 2, 1)) != 5


def test_uneven_global_batch_is_bad_input(monkeypatch: pytest.MonkeyPatch, capsys, tiny: list[str],
                                          tmp_path: Path) -> None:
    from etrm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["--preset", "demo", "--run-dir", str(tmp_path / "run"), "--device", "cpu", *tiny,
                 "train.batch_size=7"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "must divide by the 2 ranks" in err
    assert not (tmp_path / "run").exists()
