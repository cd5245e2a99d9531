"""The training loop's contracts: what the samplers feed, fct's fixed schedule, eval leaves training alone, and a
non-finite loss stops the run at the next flush without replacing the last good checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from etrm.train import instruments
from etrm.train.console import Reporter
from etrm.train.trainer import Trainer

STEPS = 12


def staggered(rows: list[dict[str, torch.Tensor]]) -> bool:
    """Whether some step reset some slots but not all (halting not in lockstep)."""
    counts = [int(r["reset"].sum()) for r in rows]
    return any(0 < c < len(rows[0]["reset"]) for c in counts)


# ---------------------------------------------------------------------------------------------------------------
# Samplers: refill draws exactly one fresh sample per reset slot; trm feeds a whole batch and drops the rest.

@pytest.mark.parametrize("mode", ["reencode", "trm"])
def test_refill_sampler_feeds_reset_slots_only(mode: str, make_trainer, record_events) -> None:
    trainer = make_trainer(mode, "train.sampler=refill", "act.halt_exploration_prob=0.5")
    rows = record_events(trainer)
    for _ in range(STEPS):
        trainer.train_step()
    assert staggered(rows)
    assert trainer.samples_dropped == 0
    for r in rows:  # fresh samples exactly in the reset slots; padding (-1) in continuing ones
        assert torch.equal(r["batch_sample_id"] >= 0, r["reset"])
    resets = sum(int(r["reset"].sum()) for r in rows)
    assert trainer.sampler.consumed == resets


@pytest.mark.parametrize("mode", ["reencode", "trm"])
def test_trm_sampler_counts_dropped_samples(mode: str, make_trainer, record_events) -> None:
    trainer = make_trainer(mode, "train.sampler=trm", "act.halt_exploration_prob=0.5")
    rows = record_events(trainer)
    for _ in range(STEPS):
        trainer.train_step()
    assert staggered(rows)
    b = trainer.cfg.train.batch_size
    continuing = sum(b - int(r["reset"].sum()) for r in rows)
    assert trainer.samples_dropped == continuing > 0
    assert trainer.sampler.consumed == b * STEPS  # a whole batch fed every step
    for r in rows:  # every position holds a fresh sample, as upstream; only reset slots take theirs
        assert bool((r["batch_sample_id"] >= 0).all())
        assert torch.equal(r["sample_id_after"][r["reset"]], r["batch_sample_id"][r["reset"]])
        assert torch.equal(r["sample_id_after"][~r["reset"]], r["sample_id_before"][~r["reset"]])


# ---------------------------------------------------------------------------------------------------------------
# fct: every slot resets together every fct.steps steps, and nothing halts early even when the Q-head says so.

@pytest.mark.parametrize("sampler", ["refill", "trm"])
def test_fct_resets_all_slots_every_fct_steps(sampler: str, make_trainer, record_events, tmp_path: Path) -> None:
    f = 3
    trainer = make_trainer("fct", f"fct.steps={f}", "act.halt_max_steps=5", "act.halt_exploration_prob=0.5",
                           f"train.sampler={sampler}", "train.eval_every=100", "train.checkpoint_every=100")
    rows = record_events(trainer)
    q_positive_early = []
    trainer.add(instruments.OnStep(lambda step, ev, _m: q_positive_early.append(
        bool(((ev.q_halt_logits > 0) & ~ev.is_last_step).any()))))
    result = trainer.run(4 * f, Reporter(4 * f, live=False))
    assert result.step == 4 * f and len(rows) == 4 * f

    b = trainer.cfg.train.batch_size
    for r in rows:
        k = int(r["step"])
        assert bool(r["reset"].all()) == (k % f == 0) and bool(r["reset"].any()) == (k % f == 0), k
        assert bool(r["halted"].all()) == (k % f == f - 1) and bool(r["halted"].any()) == (k % f == f - 1), k
        assert torch.equal(r["steps"], torch.full((b,), k % f + 1, dtype=r["steps"].dtype)), k
        assert not r["veto"].any()
    assert any(q_positive_early), "the Q-head never asked to halt early, so 'never halts early' was not tested"
    assert trainer.samples_dropped == (0 if sampler == "refill" else b * (f - 1) * 4)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation runs a fresh carry on the eval model: the training carry, weights and RNGs are left as they were.

@pytest.mark.parametrize("mode, ema", [("reencode", True), ("cached", False), ("trm", False), ("fct", True)])
def test_evaluate_leaves_training_state_alone(mode: str, ema: bool, make_trainer) -> None:
    overrides = ("act.halt_exploration_prob=0.5", f"train.ema={str(ema).lower()}")
    evaluated, plain = make_trainer(mode, *overrides), make_trainer(mode, *overrides)
    for _ in range(5):  # mid-flight: some slots in their 2nd+ ACT step
        evaluated.train_step()
        plain.train_step()
    assert not evaluated.carry.halted.all()
    carry = {k: v.clone() for k, v in evaluated.carry.tensors().items()}
    weights = {k: v.clone() for k, v in evaluated.model.state_dict().items()}
    halt_rng = evaluated.model.generator(evaluated.device).get_state()
    torch_rng = torch.get_rng_state()

    res = evaluated.evaluate()

    assert res["count"] == len(evaluated.eval_ds)
    assert all(0.0 <= res[k] <= 1.0 for k in ("exact", "token", "halt.exact", "halt.token"))
    assert 1.0 <= res["halt.step"] <= evaluated.cfg.max_steps_per_sample
    after = evaluated.carry.tensors()
    assert sorted(after) == sorted(carry)
    for k in carry:
        assert torch.equal(after[k], carry[k]), f"evaluate() changed carry.{k}"
    for k, v in evaluated.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"evaluate() changed weight {k}"
    assert evaluated.model.training
    assert torch.equal(evaluated.model.generator(evaluated.device).get_state(), halt_rng)
    assert torch.equal(torch.get_rng_state(), torch_rng)

    for _ in range(4):  # and training goes on exactly as if no evaluation had happened
        evaluated.train_step()
        plain.train_step()
    for k, v in plain.model.state_dict().items():
        assert torch.equal(evaluated.model.state_dict()[k], v), k
    for k, v in plain.carry.tensors().items():
        assert torch.equal(evaluated.carry.tensors()[k], v), k


# ---------------------------------------------------------------------------------------------------------------
# A non-finite loss: flagged on the device, acted on at the next flush; the last good checkpoint stays.

def poison_loss(trainer: Trainer, at_step: int) -> None:
    """Make optimizer step ``at_step`` (1-based) produce NaN logits, hence a NaN loss, through the real loss head."""
    loss_fn = trainer.loss_fn

    def loss(out, events=None):
        if trainer.step == at_step - 1:
            out.logits = out.logits * float("nan")
        return loss_fn(out, events)

    trainer.loss_fn = loss


@pytest.mark.parametrize("nan_step, trace_every, ckpt_every, stop_step, ckpt_step", [
    (6, 4, 2, 6, 4),      # the NaN step is itself a checkpoint step: the flush before saving catches it
    (4, 5, 3, 5, 3),      # caught at the next trace flush; the step-3 checkpoint stays
    (1, 3, 2, 2, None),   # NaN on the first step: no checkpoint is ever written
])
def test_non_finite_loss_stops_at_next_flush(nan_step, trace_every, ckpt_every, stop_step, ckpt_step,
                                             make_trainer, capsys) -> None:
    trainer = make_trainer("reencode", f"train.trace_every={trace_every}", f"train.checkpoint_every={ckpt_every}",
                           "train.eval_every=6", "train.max_steps=12")
    poison_loss(trainer, nan_step)
    eval_steps = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: (eval_steps.append(trainer.step), evaluate())[1]

    result = trainer.run(12, Reporter(12, live=False))

    assert result.stopped_early
    assert result.step == trainer.step == stop_step
    assert all(s < nan_step for s in eval_steps), "evaluated after the NaN"
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "stopped at step" not in out
    path = trainer.run_dir / CHECKPOINT_NAME
    if ckpt_step is None:
        assert not path.exists()
    else:
        state = load_checkpoint(trainer.run_dir)
        assert state["step"] == ckpt_step < nan_step
        for name, t in state["model"].items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), name
        for name, t in state["ema"].items():
            assert torch.isfinite(t).all(), name


def test_nan_parameter_stops_the_run(make_trainer) -> None:
    """A NaN weight (not only a NaN loss) is caught the same way, and no checkpoint holds it."""
    trainer = make_trainer("trm", "train.trace_every=2", "train.checkpoint_every=2", "train.eval_every=100")
    assert not trainer.run(2, Reporter(2, live=False)).stopped_early
    assert load_checkpoint(trainer.run_dir)["step"] == 2
    with torch.no_grad():
        trainer.model.core.lm_head.weight.fill_(math.nan)  # step 3's loss is NaN; flushed at step 4
    result = trainer.run(10, Reporter(10, start=2, live=False))
    assert result.stopped_early and result.step == 4
    state = load_checkpoint(trainer.run_dir)
    assert state["step"] == 2
    assert torch.isfinite(state["model"]["core.lm_head.weight"]).all()


def request_stop_at(trainer, step: int) -> None:
    """Do what Ctrl-C does, from a step hook, during step ``step`` (0-based)."""
    def hook(at, _events, _metrics):
        if at == step:
            trainer.stop_requested = True

    trainer.add(instruments.OnStep(hook))


def test_stop_request_saves_a_checkpoint_at_the_stop_step(make_trainer, capsys) -> None:
    """What Ctrl-C does, in process: the step in flight finishes, is flushed, saved, and the run reports it."""
    trainer = make_trainer("cached", "train.trace_every=100", "train.checkpoint_every=100", "train.eval_every=100")

    request_stop_at(trainer, 3)
    result = trainer.run(10, Reporter(10, live=False))
    assert result.stopped_early and result.step == 4
    assert load_checkpoint(trainer.run_dir)["step"] == 4
    assert "stopped at step 4" in capsys.readouterr().out


def test_stop_request_with_unflushed_nan_keeps_no_bad_checkpoint(make_trainer) -> None:
    trainer = make_trainer("reencode", "train.trace_every=100", "train.checkpoint_every=2", "train.eval_every=100")
    poison_loss(trainer, 3)

    request_stop_at(trainer, 3)
    result = trainer.run(10, Reporter(10, live=False))
    assert result.stopped_early and result.step == 4
    assert load_checkpoint(trainer.run_dir)["step"] == 2
