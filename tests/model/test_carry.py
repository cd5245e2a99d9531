"""The ACT carry: reset semantics, the halting rule, exploration, and detachment between steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from etrm.model.carry import Carry, decide_halt, reset_slots, slot_where

B = 6
DATA_KEYS = ("inputs", "labels", "puzzle_id", "sample_id", "demo_inputs", "demo_outputs", "demo_mask")


def _mask(bits: list[bool]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


masks = st.lists(st.booleans(), min_size=B, max_size=B)


def _started(model, batch):
    """The carry after one training step from the initial carry (every slot loaded, step 1, nothing halted)."""
    carry, _, _ = model(model.initial_carry(batch), batch, force_halt=torch.zeros(B, dtype=torch.bool))
    return carry


# --------------------------------------------------------------------------------------------------------------------
# reset_slots: the carry update as a pure function


@given(bits=masks)
def test_reset_slots_takes_batch_data_init_state_and_step_zero_only_where_halted(bits, make_batch):
    old = make_batch(B, seed=1, first_sample_id=100)
    new = make_batch(B, seed=2, first_sample_id=200)
    reset = _mask(bits)
    g = torch.Generator().manual_seed(3)
    carry = Carry(
        z_H=torch.randn(B, 5, 8, generator=g), z_L=torch.randn(B, 5, 8, generator=g),
        steps=torch.randint(1, 4, (B,), dtype=torch.int32, generator=g), halted=reset, data=old,
    )
    z_H0, z_L0 = torch.full((B, 5, 8), 7.0), torch.full((B, 5, 8), -7.0)
    out = reset_slots(carry, new, z_H0, z_L0)
    for i in range(B):
        if bits[i]:
            assert torch.equal(out.z_H[i], z_H0[i]) and torch.equal(out.z_L[i], z_L0[i])
            assert out.steps[i] == 0
            for k in DATA_KEYS:
                assert torch.equal(out.data[k][i], new[k][i]), k
        else:
            assert torch.equal(out.z_H[i], carry.z_H[i]) and torch.equal(out.z_L[i], carry.z_L[i])
            assert out.steps[i] == carry.steps[i]
            for k in DATA_KEYS:
                assert torch.equal(out.data[k][i], old[k][i]), k
    # The flags that exist for faults break exactly their half of the rule.
    no_state = reset_slots(carry, new, z_H0, z_L0, reset_state=False)
    assert torch.equal(no_state.z_H, carry.z_H) and torch.equal(no_state.steps, out.steps)
    no_steps = reset_slots(carry, new, z_H0, z_L0, reset_steps=False)
    assert torch.equal(no_steps.steps, carry.steps) and torch.equal(no_steps.z_H, out.z_H)


def test_slot_where_broadcasts_over_trailing_dims():
    mask = _mask([True, False, True])
    new, old = torch.ones(3, 2, 4), torch.zeros(3, 2, 4)
    out = slot_where(mask, new, old)
    assert out[0].eq(1).all() and out[1].eq(0).all() and out[2].eq(1).all()
    assert torch.equal(slot_where(mask, torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3])), torch.tensor([5, 2, 7]))


def test_carry_tensors_round_trip(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("cached"))
    batch = make_batch(B, seed=0)
    carry = _started(model, batch)
    flat = carry.tensors()
    assert {"z_H", "z_L", "steps", "halted", "context", "context_sample_id"} <= set(flat)
    assert {f"data.{k}" for k in DATA_KEYS} <= set(flat)
    back = Carry.from_tensors(flat)
    assert back.tensors().keys() == flat.keys()
    assert all(torch.equal(back.tensors()[k], v) for k, v in flat.items())


# --------------------------------------------------------------------------------------------------------------------
# Reset semantics through the model, every mode


@given(bits=masks)
def test_step_resets_exactly_the_halted_slots(bits, mode, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config(mode))
    first = make_batch(B, seed=10, first_sample_id=0)
    second = make_batch(B, seed=11, first_sample_id=1000)
    carry = _started(model, first)
    carry = model(carry, first, force_halt=torch.zeros(B, dtype=torch.bool))[0]
    assert torch.equal(carry.steps, torch.full((B,), 2, dtype=torch.int32))
    reset = _mask(bits)
    before = replace(carry, halted=reset)
    after, out, events = model(before, second, force_halt=torch.zeros(B, dtype=torch.bool))
    assert torch.equal(events.reset, reset)
    for i in range(B):
        src = second if bits[i] else first
        for k in DATA_KEYS:
            assert torch.equal(after.data[k][i], src[k][i]), (k, i)
        assert after.steps[i] == (1 if bits[i] else 3)
    assert torch.equal(events.sample_id_before, carry.data["sample_id"])
    assert torch.equal(events.sample_id_after, after.data["sample_id"])
    assert torch.equal(out.steps, after.steps)
    if mode != "trm":
        # the context every slot used was built from its own sample's demos
        assert torch.equal(events.demo_sample_id, after.data["sample_id"])
        assert torch.equal(after.context_sample_id, after.data["sample_id"])


@pytest.mark.parametrize("fault", ["none", "no-state-reset"])
def test_reset_slot_starts_from_init_state(mode, fault, make_mode_config, make_model, make_batch, take_rows):
    """A reset slot computes exactly what a fresh carry computes on its sample alone; a continuing slot does not."""
    model = make_model(make_mode_config(mode, fault=fault))
    first = make_batch(B, seed=20, first_sample_id=0)
    second = make_batch(B, seed=21, first_sample_id=1000)
    carry = _started(model, first)
    reset = _mask([True, False, False, True, False, True])
    _, out, _ = model(replace(carry, halted=reset), second, force_halt=torch.zeros(B, dtype=torch.bool))
    for i in range(B):
        alone = take_rows(second if reset[i] else first, [i])
        _, ref, _ = model(model.initial_carry(alone), alone, force_halt=torch.zeros(1, dtype=torch.bool))
        # fp32 rounding of a batch of B against a batch of 1 reaches 2e-5 on logits of ~2.5; a continuing slot
        # differs by more than 1
        same = torch.allclose(out.logits[i], ref.logits[0], atol=1e-4) and torch.allclose(
            out.q_halt_logits[i], ref.q_halt_logits[0], atol=1e-4)
        if reset[i]:
            assert same == (fault == "none"), f"slot {i}"
        else:
            assert not same, f"continuing slot {i} looks freshly initialised"


def test_no_step_reset_fault_keeps_counting(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("reencode", fault="no-step-reset"))
    batch = make_batch(B, seed=0)
    carry = _started(model, batch)
    reset = _mask([True, False, True, False, False, False])
    after, _, _ = model(replace(carry, halted=reset), batch, force_halt=torch.zeros(B, dtype=torch.bool))
    assert torch.equal(after.steps, torch.full((B,), 2, dtype=torch.int32))


def test_initial_carry_is_all_halted_and_empty(mode, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config(mode))
    batch = make_batch(B, seed=0)
    carry = model.initial_carry(batch)
    assert carry.halted.all() and (carry.steps == 0).all()
    assert (carry.data["sample_id"] == -1).all()
    after, _, events = model(carry, batch)
    assert events.reset.all() and (after.steps == 1).all()
    assert torch.equal(after.data["sample_id"], batch["sample_id"])


# --------------------------------------------------------------------------------------------------------------------
# The halting rule

MAX = 4
steps_st = st.lists(st.integers(1, MAX), min_size=B, max_size=B).map(lambda v: torch.tensor(v, dtype=torch.int32))
logits_st = st.lists(st.floats(-5, 5, allow_nan=False), min_size=B, max_size=B).map(torch.tensor)


def _halt(steps, q_halt, q_cont, **kw):
    args = dict(use_q_continue=False, exploration_prob=0.0, adaptive=True, generator=None)
    args.update(kw)
    return decide_halt(steps, MAX, q_halt, q_cont, **args)


@given(steps=steps_st, q_halt=logits_st, q_cont=logits_st, use_qc=st.booleans(), adaptive=st.booleans(),
       p=st.sampled_from([0.0, 0.5, 1.0]), force=st.none() | masks.map(_mask))
def test_max_steps_always_halts(steps, q_halt, q_cont, use_qc, adaptive, p, force):
    g = torch.Generator().manual_seed(0)
    halted, _, veto, is_last = _halt(steps, q_halt, q_cont, use_q_continue=use_qc, exploration_prob=p,
                                     adaptive=adaptive, generator=g, force=force)
    assert torch.equal(is_last, steps >= MAX)
    assert halted[is_last].all()
    assert not veto[is_last].any()


@given(steps=steps_st, q_halt=logits_st, q_cont=logits_st)
def test_adaptive_halts_on_positive_q_halt(steps, q_halt, q_cont):
    halted, q_says, veto, _ = _halt(steps, q_halt, q_cont)
    assert torch.equal(q_says, q_halt > 0)
    assert torch.equal(halted, (q_halt > 0) | (steps >= MAX))
    assert not veto.any()


@given(steps=steps_st, q_halt=logits_st, q_cont=logits_st)
def test_q_continue_compares_the_two_logits(steps, q_halt, q_cont):
    halted, q_says, _, _ = _halt(steps, q_halt, q_cont, use_q_continue=True)
    assert torch.equal(q_says, q_halt > q_cont)
    assert torch.equal(halted, (q_halt > q_cont) | (steps >= MAX))


@given(steps=steps_st, q_halt=logits_st, q_cont=logits_st, force=st.none() | masks.map(_mask))
def test_non_adaptive_halts_only_at_max(steps, q_halt, q_cont, force):
    halted, q_says, veto, _ = _halt(steps, q_halt + 10.0, q_cont, adaptive=False, exploration_prob=1.0, force=force)
    assert torch.equal(halted, steps >= MAX)
    assert not q_says.any() and not veto.any()


@given(steps=steps_st, q_halt=logits_st, bits=masks)
def test_force_overrides_q_but_max_still_halts(steps, q_halt, bits):
    force = _mask(bits)
    g = torch.Generator().manual_seed(0)
    halted, _, veto, _ = _halt(steps, q_halt, q_halt, force=force, exploration_prob=1.0, generator=g)
    assert torch.equal(halted, force | (steps >= MAX))
    assert not veto.any()


@given(steps=steps_st, q_halt=logits_st, q_cont=logits_st, use_qc=st.booleans(),
       p=st.sampled_from([0.1, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_exploration_only_delays(steps, q_halt, q_cont, use_qc, p, seed):
    g = torch.Generator().manual_seed(seed)
    halted, q_says, veto, is_last = _halt(steps, q_halt, q_cont, use_q_continue=use_qc, exploration_prob=p,
                                          generator=g)
    no_explore, _, _, _ = _halt(steps, q_halt, q_cont, use_q_continue=use_qc)
    assert not (halted & ~(q_says | is_last)).any()  # halted ⊆ q_says | is_last
    assert not (halted & ~no_explore).any()  # never halts where the plain rule would not
    assert not (veto & ~q_says).any()
    assert not (veto & halted & ~is_last).any()  # a vetoed slot does not halt unless at max
    assert torch.equal(halted, is_last | (q_says & ~veto))


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_veto_rate_matches_upstream_draw(p):
    """Veto rate at step s is p*(max-s)/(max-1): a min halting step drawn uniformly in [2, max] with probability p."""
    n, max_steps = 40_000, 6
    g = torch.Generator().manual_seed(1234)
    q = torch.ones(n)
    for s in range(1, max_steps + 1):
        steps = torch.full((n,), s, dtype=torch.int32)
        halted, q_says, veto, _ = decide_halt(steps, max_steps, q, q, use_q_continue=False, exploration_prob=p,
                                              adaptive=True, generator=g)
        assert q_says.all()
        expected = p * (max_steps - s) / (max_steps - 1)
        assert abs(veto.float().mean().item() - expected) < 0.015, (s, veto.float().mean().item(), expected)
        assert torch.equal(halted, ~veto)


def test_exploration_is_reproducible_from_the_generator():
    steps = torch.randint(1, MAX + 1, (256,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    q = torch.ones(256)
    runs = [_halt(steps, q, q, exploration_prob=0.5, generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    other = _halt(steps, q, q, exploration_prob=0.5, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)


# --------------------------------------------------------------------------------------------------------------------
# Detachment: no gradient path across steps


@pytest.mark.parametrize("phase", ["train", "train-q-continue", "eval"])
def test_carry_never_requires_grad(mode, phase, make_mode_config, make_model, make_batch):
    cfg = make_mode_config(mode, act={"q_continue": phase == "train-q-continue", "halt_exploration_prob": 0.5})
    model = make_model(cfg)
    model.train(phase != "eval")
    batch = make_batch(B, seed=0)
    carry = model.initial_carry(batch)
    for _ in range(MAX + 1):
        carry, out, _ = model(carry, batch)
        if phase != "eval":
            assert out.logits.requires_grad
        leaking = [k for k, v in carry.tensors().items() if v.requires_grad]
        assert not leaking, leaking


def test_carry_keeps_grad_fault_leaks_gradient(mode, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config(mode, fault="carry-keeps-grad"))
    batch = make_batch(B, seed=0)
    carry, _, _ = model(model.initial_carry(batch), batch)
    assert carry.z_H.requires_grad and carry.z_L.requires_grad
