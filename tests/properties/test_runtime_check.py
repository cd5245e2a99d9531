"""``diagnostics.properties.runtime_check``: the per-step checker behind ``etrm-train --check-invariants``, driven the way the
trainer drives it (view before, forward, view after with the incoming batch, optional coverage after backward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagnostics.properties.fingerprints import CHECKSUM_KEY, content_checksums
from diagnostics.properties.invariants import label_content_mismatch
from diagnostics.probes.alignment import AlignmentProbe
from diagnostics.properties.runtime_check import InvariantChecker, InvariantError
from etrm.model import ACTModel
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


# --------------------------------------------------------------------------------------------------------------------
# Content checksums: what the ids cannot see


class RolledLabels(ACTModel):
    """A test-side model variant: the loss gets the next slot's labels while every reported id stays right."""

    def forward(self, carry, batch, force_halt=None, clock=None):
        new_carry, out, events = super().forward(carry, batch, force_halt=force_halt, clock=clock)
        out.labels = out.labels.roll(1, 0)
        return new_carry, out, events


def _checked_step(model_cls, seed: int = 0):
    a = bundled_adapter(mode="reencode", seed=seed)
    model = model_cls(a.cfg.model_config(), a.model.shape)
    model.load_state_dict(a.model.state_dict())
    batch = a.make_batch(list(range(a.batch_size)))
    batch.update(content_checksums(batch))  # as etrm.data's batches carry them
    carry = model.initial_carry(batch)
    checker = InvariantChecker(model.max_steps)
    checker.before_step(carry.view())
    new_carry, out, events = model(carry, batch)
    a.loss_fn(out, events)
    return checker, events, new_carry, batch


def test_checksums_pass_on_a_healthy_step_and_the_probe_counts_nothing():
    checker, events, new_carry, batch = _checked_step(ACTModel)
    checker.after_step(events, new_carry.view(), batch)
    assert torch.equal(events.content_checksum, batch[CHECKSUM_KEY])
    assert not label_content_mismatch(events).any()


def test_labels_of_another_slot_are_caught_by_content_though_the_ids_agree():
    checker, events, new_carry, batch = _checked_step(RolledLabels)
    assert torch.equal(events.label_sample_id, events.sample_id_after)  # the bookkeeping says all is well
    with pytest.raises(InvariantError) as info:
        checker.after_step(events, new_carry.view(), batch)
    assert info.value.name == "loss-labels-content" and info.value.slots == list(range(6))
    rows: dict = {}

    class Row:
        def set(self, name, value):
            rows[name] = value

    AlignmentProbe().observe(events, {}, Row())  # the traced path counts it on the device
    assert float(rows["label_content_mismatch"]) == 6.0 and float(rows["label_mismatch"]) == 0.0


def test_dataset_batches_carry_checksums_of_their_content():
    from etrm.data.dataset import GridDataset  # noqa: PLC0415

    n, s = 4, 5
    ds = GridDataset(inputs=np.arange(n * s).reshape(n, s) % 7, labels=np.arange(n * s).reshape(n, s) % 5,
                     puzzle_ids=np.ones(n, dtype=np.int64))
    b = ds.batch(np.array([2, -1, 0]))
    want = content_checksums({k: v for k, v in b.items() if k != CHECKSUM_KEY})[CHECKSUM_KEY]
    assert torch.equal(b[CHECKSUM_KEY], want) and b[CHECKSUM_KEY].shape == (3, 3)
    assert not torch.equal(b[CHECKSUM_KEY][0], b[CHECKSUM_KEY][2])


class InputsFromBatch(ACTModel):
    """A test-side variant: the carry update takes the incoming inputs for every slot (ids and checksums stay)."""

    def forward(self, carry, batch, force_halt=None, clock=None):
        new_carry, out, events = super().forward(carry, batch, force_halt=force_halt, clock=clock)
        new_carry.data["inputs"] = batch["inputs"]
        return new_carry, out, events


def test_carried_data_that_no_longer_matches_its_checksum_is_caught():
    a = bundled_adapter(mode="trm", seed=2)
    model = InputsFromBatch(a.cfg.model_config(), a.model.shape)
    model.load_state_dict(a.model.state_dict())
    b = a.batch_size
    first = a.make_batch(list(range(b)))
    first.update(content_checksums(first))
    carry = model.initial_carry(first)
    carry, _, _ = model(carry, first, force_halt=torch.zeros(b, dtype=torch.bool))  # everyone continues
    pad = a.make_batch([-1] * b)
    pad.update(content_checksums(pad))
    checker = InvariantChecker(model.max_steps)
    checker.before_step(carry.view())
    new_carry, out, events = model(carry, pad, force_halt=torch.zeros(b, dtype=torch.bool))
    a.loss_fn(out, events)
    with pytest.raises(InvariantError) as info:
        checker.after_step(events, new_carry.view(), pad)
    assert "slot-data-content" in [v.name for v in info.value.violations]
