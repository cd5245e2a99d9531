"""The non-finite guard: whatever goes NaN or infinite first (gradients, parameters, the puzzle table, EMA weights,
optimizer state), the run stops at the flush before the next checkpoint, and the kept checkpoint is finite."""

from __future__ import annotations

import math

import pytest
import torch

from etrm.train import finite_guard, instruments
from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from etrm.train.console import Reporter
from etrm.train.trainer import Trainer


def _poison_grads(t: Trainer) -> None:
    """An infinite gradient (the loss is finite), set as backward accumulates it."""
    def hook(q: torch.Tensor) -> None:
        q.grad.fill_(math.inf)
        handle.remove()

    handle = next(iter(t.model.parameters())).register_post_accumulate_grad_hook(hook)


def _poison_params(t: Trainer) -> None:
    with torch.no_grad():
        next(iter(t.model.parameters())).view(-1)[0] = math.nan


def _poison_table(t: Trainer) -> None:
    t.model.puzzle_emb.weights[0, 0] = math.nan


def _poison_ema(t: Trainer) -> None:
    next(iter(t.ema.shadow.values())).view(-1)[0] = math.inf


def _poison_adam(t: Trainer) -> None:
    state = next(iter(t.optimizers[0].state.values()))
    state["exp_avg_sq"].view(-1)[0] = math.nan


# (model, poison, when: in backward / after the AdamW step, the word the message must hold)
CASES = [
    ("reencode", _poison_grads, "backward", "gradients"),
    ("reencode", _poison_params, "after", "parameters"),
    ("trm", _poison_table, "after", "puzzle-embedding table"),
    ("cached", _poison_ema, "after", "EMA weights"),
    ("fct", _poison_adam, "after", "optimizer state"),
]


def poison_at(trainer: Trainer, step: int, poison, when: str) -> None:
    """Apply ``poison`` in backward or after the AdamW step of optimizer step ``step`` (1-based): the loss stays
    finite."""
    if when == "backward":
        def hook(at, _events, _metrics):
            if at == step - 1:
                poison(trainer)
        trainer.add(instruments.OnStep(hook))  # step instruments run before backward
        return
    adam = trainer.optimizers[0]
    real = adam.step

    def stepped(*args, **kwargs):
        out = real(*args, **kwargs)
        if when == "after" and trainer.step == step - 1:
            poison(trainer)
        return out

    adam.step = stepped


@pytest.mark.parametrize("mode, poison, when, word", CASES, ids=[c[3] for c in CASES])
@pytest.mark.parametrize("ckpt_every, stop, kept", [(1, 3, 2), (10, 4, None)])
def test_non_finite_state_never_reaches_a_checkpoint(mode, poison, when, word, ckpt_every, stop, kept, make_trainer,
                                                     capsys) -> None:
    trainer = make_trainer(mode, "train.trace_every=2", f"train.checkpoint_every={ckpt_every}", "train.eval_every=100")
    poison_at(trainer, 3, poison, when)
    result = trainer.run(10, Reporter(10, live=False))
    assert result.non_finite and result.step == stop  # the first flush at or after the poisoned step 3
    assert word in result.message and "within steps" in result.message
    if kept is None:
        assert "no checkpoint exists" in result.message
        assert not (trainer.run_dir / CHECKPOINT_NAME).exists()
    else:
        assert f"the checkpoint of step {kept} is kept" in result.message
        state = load_checkpoint(trainer.run_dir)
        assert state["step"] == kept
        tensors = [*state["model"].values(), *state["ema"].values(),
                   *[v for o in state["optimizers"] for s in o.get("state", {}).values() for v in s.values()]]
        assert all(torch.isfinite(v).all() for v in tensors if v.is_floating_point())
    assert word in capsys.readouterr().out


def test_large_learning_rate_keeps_a_finite_checkpoint(make_trainer) -> None:
    """The reported failure: a huge lr with a checkpoint every step; the loss of the step that breaks the weights is
    still finite, yet the checkpoint kept is the last finite one."""
    trainer = make_trainer("trm", "train.lr=1e30", "train.puzzle_emb_lr=1e30", "train.grad_clip=0",
                           "train.lr_warmup_steps=0", "train.checkpoint_every=1", "train.trace_every=5")
    result = trainer.run(10, Reporter(10, live=False))
    assert result.non_finite
    state = load_checkpoint(trainer.run_dir)
    assert state["step"] == result.step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_any_non_finite_is_a_device_flag() -> None:
    ok = [torch.ones(3), torch.full((2, 2), 3e38), torch.arange(4)]
    assert finite_guard.any_non_finite(ok, torch.device("cpu")).item() == 0.0
    for bad in (math.nan, math.inf, -math.inf):
        flag = finite_guard.any_non_finite([*ok, torch.tensor([1.0, bad])], torch.device("cpu"))
        assert flag.shape == () and flag.item() == 1.0
    assert finite_guard.any_non_finite([], torch.device("cpu")).item() == 0.0
