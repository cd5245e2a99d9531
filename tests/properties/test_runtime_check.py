"""``diagnostics.runtime_check``: the per-step checker behind ``etrm-train --check-invariants``, driven the way the
trainer drives it (view before, forward, view after with the incoming batch, optional coverage after backward)."""

from __future__ import annotations

import pytest
import torch

from diagnostics.runtime_check import InvariantChecker, InvariantError
from etrm.testing import bundled_adapter


def _train(mode: str, fault: str = "none", steps: int = 10, coverage: bool = True, seed: int = 0) -> int:
    """Steps like the trainer (refill feed, halting from a seeded mask); returns the steps checked."""
    a = bundled_adapter(mode=mode, fault=fault, seed=seed)
    model, b = a.model, a.batch_size
    g = torch.Generator().manual_seed(seed)
    carry = model.initial_carry(a.make_batch([-1] * b))
    checker = InvariantChecker(model.max_steps)
    next_id = 0
    for step in range(steps):
        reset = carry.halted
        ids = [-1] * b
        for i in reset.nonzero().flatten().tolist():
            ids[i], next_id = next_id, next_id + 1
        batch = a.make_batch(ids)
        checker.before_step(carry.view())
        carry_new, out, events = model(carry, batch, force_halt=torch.rand(b, generator=g) < 0.3)
        checker.after_step(events, carry_new.view(), batch, step=step)
        if coverage:
            checker.watch_coverage(events)
            a.loss_fn(out, events)[0].backward()
            checker.after_backward(step=step)
        model.zero_grad(set_to_none=True)
        carry = carry_new
    return checker.steps_checked


@pytest.mark.parametrize("mode", ["trm", "reencode", "cached", "fct"])
def test_healthy_runs_pass(mode):
    assert _train(mode) == 10


@pytest.mark.parametrize("fault,mode,invariant", [
    ("label-from-batch", "reencode", "loss-labels-aligned"),
    ("encode-full-batch", "cached", "encoder-work-matches-mode"),
    ("no-step-reset", "trm", "reset-takes-sample"),
    ("stale-demos", "reencode", "demos-aligned"),
    ("carry-keeps-grad", "fct", "carry-detached"),
])
def test_faults_stop_the_run_naming_invariant_step_and_slots(fault, mode, invariant):
    with pytest.raises(InvariantError) as info:
        _train(mode, fault, coverage=False)
    err = info.value
    assert err.name == invariant and err.slots and isinstance(err.step, int)
    assert str(err).startswith(f"invariant '{invariant}' violated at step {err.step}, slots {err.slots}")


def test_coverage_mismatch_is_reported_after_backward():
    """A loss that ignores some slots' context: their encoder rows get no gradient, which the checker names."""
    a = bundled_adapter(mode="reencode", seed=1)
    model, b = a.model, a.batch_size
    batch = a.make_batch(list(range(b)))
    carry = model.initial_carry(batch)
    checker = InvariantChecker(model.max_steps)
    checker.before_step(carry.view())
    new_carry, out, events = model(carry, batch)
    checker.after_step(events, new_carry.view(), batch)
    checker.watch_coverage(events)
    out.logits[:2].sum().backward()  # only slots 0 and 1 reach the loss
    with pytest.raises(InvariantError) as info:
        checker.after_backward()
    assert info.value.name == "coverage-matches-mode" and info.value.slots == [2, 3, 4, 5]


def test_after_step_needs_before_step():
    with pytest.raises(RuntimeError, match="before_step"):
        InvariantChecker(4).after_step(None, None)
