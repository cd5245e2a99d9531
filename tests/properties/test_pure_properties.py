"""@given properties of the pure pieces under the carry: ``slot_where``/``reset_slots``, ``decide_halt``, the
samplers' exactly-once accounting under ACT-driven resets, and stablemax against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etrm.data.samplers import RefillSampler, TRMSampler
from etrm.loss import IGNORE_LABEL, stablemax_cross_entropy, stablemax_log_probs
from etrm.model.carry import Carry, decide_halt, reset_slots, slot_where

EXAMPLES = max(50, settings().max_examples)
seeds = st.integers(0, 2**31 - 1)


def _bits(b: int) -> st.SearchStrategy[list[bool]]:
    return st.lists(st.booleans(), min_size=b, max_size=b)


# --------------------------------------------------------------------------------------------------------------------
# slot_where and reset_slots


@settings(max_examples=EXAMPLES)
@given(data=st.data(), b=st.integers(1, 6), trailing=st.lists(st.integers(1, 3), max_size=3), seed=seeds)
def test_slot_where_picks_whole_rows(data, b, trailing, seed):
    mask = torch.tensor(data.draw(_bits(b)), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    new, old = torch.randn(b, *trailing, generator=g), torch.randn(b, *trailing, generator=g)
    out = slot_where(mask, new, old)
    assert out.shape == old.shape
    for i in range(b):
        assert torch.equal(out[i], new[i] if mask[i] else old[i])


def _carry(b: int, g: torch.Generator, halted: torch.Tensor, first_id: int) -> Carry:
    data = {"inputs": torch.randint(0, 9, (b, 5), generator=g), "labels": torch.randint(0, 9, (b, 5), generator=g),
            "sample_id": torch.arange(first_id, first_id + b), "puzzle_id": torch.randint(1, 4, (b,), generator=g)}
    return Carry(z_H=torch.randn(b, 3, 4, generator=g), z_L=torch.randn(b, 3, 4, generator=g),
                 steps=torch.randint(1, 5, (b,), generator=g, dtype=torch.int32), halted=halted, data=data)


@settings(max_examples=EXAMPLES)
@given(data=st.data(), b=st.integers(1, 6), seed=seeds)
def test_reset_slots_moves_exactly_the_halted_slots(data, b, seed):
    halted = torch.tensor(data.draw(_bits(b)), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    carry = _carry(b, g, halted, first_id=0)
    batch = _carry(b, g, halted, first_id=100).data
    z_H0, z_L0 = torch.randn(b, 3, 4, generator=g), torch.randn(b, 3, 4, generator=g)
    out = reset_slots(carry, batch, z_H0, z_L0)
    for i in range(b):
        r = bool(halted[i])
        for key in carry.data:  # (the reset faults' halves: tests/model/test_faults.py)
            assert torch.equal(out.data[key][i], (batch if r else carry.data)[key][i]), key
        assert torch.equal(out.z_H[i], z_H0[i] if r else carry.z_H[i])
        assert torch.equal(out.z_L[i], z_L0[i] if r else carry.z_L[i])
        assert int(out.steps[i]) == (0 if r else int(carry.steps[i]))
    assert torch.equal(out.halted, carry.halted)  # halting is decided after the step, not here
    assert out.steps.dtype == carry.steps.dtype


# --------------------------------------------------------------------------------------------------------------------
# decide_halt


halt_cases = st.fixed_dictionaries({
    "b": st.integers(1, 8), "max_steps": st.integers(1, 6), "use_qc": st.booleans(), "adaptive": st.booleans(),
    "p": st.sampled_from([0.0, 0.1, 0.5, 1.0]), "seed": seeds, "forced": st.booleans(),
})


@settings(max_examples=EXAMPLES * 2)
@given(case=halt_cases, data=st.data())
def test_decide_halt_rules(case, data):
    b, m = case["b"], case["max_steps"]
    steps = torch.tensor(data.draw(st.lists(st.integers(1, m), min_size=b, max_size=b)), dtype=torch.int32)
    logits = st.floats(-8, 8, allow_nan=False)
    q_halt = torch.tensor(data.draw(st.lists(logits, min_size=b, max_size=b)))
    q_cont = torch.tensor(data.draw(st.lists(logits, min_size=b, max_size=b)))
    force = torch.tensor(data.draw(_bits(b))) if case["forced"] else None

    def run():
        g = torch.Generator().manual_seed(case["seed"])
        return decide_halt(steps, m, q_halt, q_cont, use_q_continue=case["use_qc"], exploration_prob=case["p"],
                           adaptive=case["adaptive"], generator=g, force=force)

    halted, q_says, veto, is_last = run()
    assert torch.equal(is_last, steps >= m)
    assert bool((halted | ~is_last).all())  # max steps always halts
    if not case["adaptive"]:
        assert torch.equal(halted, is_last) and not q_says.any() and not veto.any()
        return
    if force is not None:  # the forced mask decides alone: no exploration
        assert torch.equal(q_says, force) and not veto.any()
        assert torch.equal(halted, is_last | force)
        return
    rule = (q_halt > q_cont) if case["use_qc"] else (q_halt > 0)
    assert torch.equal(q_says, rule)
    assert torch.equal(halted, is_last | (q_says & ~veto))
    assert not bool((veto & ~(q_says & ~is_last)).any())  # exploration only delays a Q-halt, never past max
    if case["p"] == 0.0 or m == 1:
        assert not veto.any()
    again = run()  # the same generator state gives the same decision (checkpointed RNG resumes exactly)
    assert all(torch.equal(x, y) for x, y in zip((halted, q_says, veto, is_last), again))


# --------------------------------------------------------------------------------------------------------------------
# Samplers under ACT-driven resets: every sample of an epoch is taken exactly once (refill), fed once (trm)


def _act_resets(b: int, max_steps: int, halts: list[int], steps_total: int):
    """Reset masks an ACT carry produces: all at first, then slots that hit max or were halted by the drawn bits."""
    steps = np.zeros(b, dtype=np.int64)
    halted = np.ones(b, dtype=bool)
    for t in range(steps_total):
        yield halted.copy()
        steps = np.where(halted, 0, steps) + 1
        forced = np.array([(halts[t % len(halts)] >> i) & 1 for i in range(b)], dtype=bool)
        halted = (steps >= max_steps) | forced


def _epochs_exactly_once(ids: np.ndarray, n: int) -> None:
    full = len(ids) // n
    for e in range(full):
        assert sorted(ids[e * n:(e + 1) * n].tolist()) == list(range(n)), f"epoch {e}"
    tail = ids[full * n:]
    assert len(set(tail.tolist())) == len(tail)


@settings(max_examples=EXAMPLES)
@given(n=st.integers(1, 23), b=st.integers(1, 6), max_steps=st.integers(1, 4), seed=st.integers(0, 10**6),
       halts=st.lists(st.integers(0, 63), min_size=1, max_size=8), total=st.integers(1, 40),
       resume_at=st.integers(0, 40))
def test_refill_takes_every_sample_once_per_epoch(n, b, max_steps, seed, halts, total, resume_at):
    sampler = RefillSampler(n, seed)
    taken = []
    for t, reset in enumerate(_act_resets(b, max_steps, halts, total)):
        if t == resume_at:  # a checkpoint/resume mid-run continues the same stream
            state = sampler.state_dict()
            sampler = RefillSampler(n, seed)
            sampler.load_state_dict(state)
        fill = sampler.fill(reset)
        assert (fill.slot_ids[~reset] == -1).all()  # continuing slots get padding, never a sample
        assert (fill.slot_ids[reset] >= 0).all() and len(fill.dropped_ids) == 0
        assert np.array_equal(fill.slot_ids[reset], fill.fed_ids)
        taken.extend(fill.slot_ids[reset].tolist())
    assert sampler.consumed == len(taken)
    _epochs_exactly_once(np.array(taken, dtype=np.int64), n)


@settings(max_examples=EXAMPLES)
@given(n=st.integers(1, 23), b=st.integers(1, 6), max_steps=st.integers(1, 4), seed=st.integers(0, 10**6),
       halts=st.lists(st.integers(0, 63), min_size=1, max_size=8), total=st.integers(1, 40))
def test_trm_feed_is_exactly_once_and_drops_what_continuing_slots_refuse(n, b, max_steps, seed, halts, total):
    sampler = TRMSampler(n, b, seed)
    fed, taken, dropped = [], 0, 0
    for reset in _act_resets(b, max_steps, halts, total):
        fill = sampler.fill(reset)
        assert np.array_equal(fill.slot_ids[reset], fill.fed_ids[reset])
        assert np.array_equal(fill.dropped_ids, fill.fed_ids[~reset])
        fed.extend(fill.fed_ids.tolist())
        taken += int(reset.sum())
        dropped += len(fill.dropped_ids)
    assert taken + dropped == len(fed) == sampler.consumed
    _epochs_exactly_once(np.array(fed, dtype=np.int64), n)


# --------------------------------------------------------------------------------------------------------------------
# stablemax against a float64 reference written from the definition


def _reference_log_probs(row: list[float]) -> list[float]:
    s = [1.0 / (1.0 - x) if x < 0 else x + 1.0 for x in row]
    total = math.fsum(s)
    return [math.log(v / total) for v in s]


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=EXAMPLES * 2)
@given(rows=st.integers(1, 4), vocab=st.integers(2, 7), data=st.data(), half=st.booleans())
def test_stablemax_matches_float64_reference(rows, vocab, data, half):
    values = [data.draw(st.lists(finite, min_size=vocab, max_size=vocab)) for _ in range(rows)]
    logits = torch.tensor(values, dtype=torch.float32)
    if half:
        logits = logits.to(torch.bfloat16)  # the model may emit bf16 logits under autocast
    got = stablemax_log_probs(logits)
    assert got.dtype == torch.float64
    ref = torch.tensor([_reference_log_probs(r) for r in logits.double().tolist()], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (got, ref)
    assert torch.allclose(got.exp().sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-12)

    labels = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, vocab - 1), min_size=1, max_size=1),
                                             min_size=rows, max_size=rows)))[:, 0]
    labels = torch.where(labels < 0, IGNORE_LABEL, labels)
    ce = stablemax_cross_entropy(logits[:, None, :], labels[:, None])[:, 0]
    for i in range(rows):
        want = 0.0 if labels[i] == IGNORE_LABEL else -ref[i, labels[i]].item()
        assert math.isclose(ce[i].item(), want, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=EXAMPLES)
@given(row=st.lists(finite, min_size=2, max_size=6), i=st.integers(0, 5), j=st.integers(0, 5))
def test_stablemax_is_monotone(row, i, j):
    i, j = i % len(row), j % len(row)
    logp = stablemax_log_probs(torch.tensor([row], dtype=torch.float64))[0]
    if row[i] > row[j]:
        assert logp[i] >= logp[j]
