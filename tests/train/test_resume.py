"""``--resume`` is exact: 10 steps + checkpoint + 10 steps equal 20 steps bit for bit; Ctrl-C stops at a checkpoint."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from etrm.cli import main
from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from etrm.train.console import Reporter
from etrm.train.trainer import Trainer

TOTAL, SPLIT = 20, 10


def run_quietly(trainer: Trainer, until: int) -> None:
    result = trainer.run(until, Reporter(until, start=trainer.step, live=False))
    assert not result.stopped_early and result.step == until


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, f"{what}: {name}"
        same = torch.equal(a[name], b[name])
        if not same and a[name].is_floating_point():
            diff = (a[name].double() - b[name].double()).abs().max().item()
            assert same, f"{what}: {name} differs after resume (max abs diff {diff:.3g})"
        assert same, f"{what}: {name} differs after resume"


def optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for i, opt in enumerate(trainer.optimizers):
        for pid, st in opt.state_dict().get("state", {}).items():
            for key, val in st.items():
                out[f"{i}.{pid}.{key}"] = torch.as_tensor(val)
    return out


@pytest.mark.parametrize("sampler", ["refill", "trm"])
@pytest.mark.parametrize("mode", ["reencode", "cached", "trm"])
def test_resume_is_bitwise_identical(mode: str, sampler: str, make_trainer, record_events, tmp_path: Path) -> None:
    overrides = (f"train.sampler={sampler}", "act.halt_exploration_prob=0.5", f"train.max_steps={TOTAL}",
                 "train.eval_every=4", "train.checkpoint_every=100")

    straight = make_trainer(mode, *overrides, run_dir=tmp_path / "straight")
    rows = record_events(straight)
    run_quietly(straight, TOTAL)

    # The run must exercise what resume has to restore: slots halting at different steps, and exploration vetoes
    # (drawn from the halting RNG) actually delaying halts, in the second half too.
    resets = torch.stack([r["reset"] for r in rows])
    assert ((resets.sum(1) > 0) & (resets.sum(1) < resets.shape[1])).any(), "halting never staggered"
    assert torch.stack([r["veto"] for r in rows[SPLIT:]]).any(), "no exploration veto after the split"

    first = make_trainer(mode, *overrides, run_dir=tmp_path / "split")
    run_quietly(first, SPLIT)  # also evaluates at step 10 (its last), which the straight run does not
    save_checkpoint(first.run_dir, first.state_dict())
    del first

    second = make_trainer(mode, *overrides, run_dir=tmp_path / "split")
    assert second.step == 0
    second.resume()
    assert second.step == SPLIT
    run_quietly(second, TOTAL)

    assert second.step == straight.step == TOTAL
    model_state = straight.model.state_dict()
    if mode == "trm":
        assert "puzzle_emb.weights" in model_state and model_state["puzzle_emb.weights"].abs().sum() > 0
    assert_same_tensors(model_state, second.model.state_dict(), "model")
    assert_same_tensors(straight.ema.state_dict(), second.ema.state_dict(), "EMA")
    assert_same_tensors(straight.carry.tensors(), second.carry.tensors(), "carry")
    assert_same_tensors(optimizer_tensors(straight), optimizer_tensors(second), "optimizer")
    assert straight.sampler.state_dict() == second.sampler.state_dict()
    assert straight.samples_dropped == second.samples_dropped
    assert (straight.samples_dropped > 0) == (sampler == "trm")
    assert torch.equal(straight.model.generator(straight.device).get_state(),
                       second.model.generator(second.device).get_state())


# ---------------------------------------------------------------------------------------------------------------

def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child process")
def test_ctrl_c_stops_with_checkpoint_and_resume_continues(tmp_path: Path, tiny, subprocess_env, capsys) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "etrm.cli", "--preset", "demo", "--run-dir", str(run_dir), "--device", "cpu",
           "--max-steps", "100000", *tiny, "train.trace_every=1", "train.eval_every=100000",
           "train.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen = []
    try:
        while True:  # wait for the first progress line: the trainer's Ctrl-C handler is in place by then
            line = lines.get(timeout=120)
            assert line is not None, "etrm-train ended before its first progress line:\n" + "".join(seen)
            seen.append(line)
            if re.match(r"step \d+/100000 ", line):
                break
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    out, err = "".join(seen), proc.stderr.read()

    assert code == 0, err
    assert "Traceback" not in err
    stopped = re.search(r"stopped at step (\d+)", out)
    assert stopped, out
    step = int(stopped.group(1))
    assert 1 <= step < 100000
    assert (run_dir / CHECKPOINT_NAME).is_file()
    assert load_checkpoint(run_dir)["step"] == step

    target = step + 3
    assert main(["--resume", "--run-dir", str(run_dir), "--max-steps", str(target)]) == 0
    resumed = capsys.readouterr().out
    progress = [int(m) for m in re.findall(r"^step (\d+)/", resumed, flags=re.M)]
    assert progress == list(range(step + 1, target + 1)), resumed  # trace_every=1: one line per step, from step+1
    assert load_checkpoint(run_dir)["step"] == target
