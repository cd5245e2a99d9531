"""Samplers: each id once per epoch under any reset pattern, dropped ids reported exactly, resumable state."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etrm.data.samplers import RefillSampler, TRMSampler, build_sampler


def reset_masks(seed: int, batch: int, p: float):
    rng = np.random.default_rng(seed)
    while True:
        yield rng.random(batch) < p


def assert_each_epoch_is_a_permutation(ids: np.ndarray, n: int, seed: int) -> None:
    for e in range(len(ids) // n):
        epoch = ids[e * n:(e + 1) * n]
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        np.testing.assert_array_equal(epoch, np.random.default_rng([seed, e]).permutation(n))


@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 2**31), mask_seed=st.integers(0, 2**31),
       p=st.floats(0.0, 1.0))
def test_refill_feeds_each_id_once_per_epoch(n, batch, seed, mask_seed, p):
    sampler = RefillSampler(n, seed)
    fed = []
    masks = reset_masks(mask_seed, batch, p)
    for _ in range(1000):
        if sampler.consumed >= 3 * n:
            break
        mask = next(masks)
        fill = sampler.fill(mask)
        assert fill.slot_ids.dtype == np.int64 and fill.slot_ids.shape == (batch,)
        assert (fill.slot_ids[~mask] == -1).all() and (fill.slot_ids[mask] >= 0).all()
        np.testing.assert_array_equal(fill.slot_ids[mask], fill.fed_ids)
        assert fill.dropped_ids.size == 0
        fed.append(fill.fed_ids)
    ids = np.concatenate(fed)
    assert len(ids) == sampler.consumed and sampler.epoch == sampler.consumed // n
    if p > 0.2:
        assert sampler.consumed >= 3 * n
    assert_each_epoch_is_a_permutation(ids, n, seed)


def test_refill_draw_crosses_epochs_seamlessly():
    s = RefillSampler(5, seed=7)
    first = s.draw(3)
    assert (s.epoch, s.consumed) == (0, 3)
    second = s.draw(9)
    assert (s.epoch, s.consumed) == (2, 12)
    ids = np.concatenate([first, second])
    assert_each_epoch_is_a_permutation(ids, 5, 7)
    np.testing.assert_array_equal(ids[10:], np.random.default_rng([7, 2]).permutation(5)[:2])
    assert s.draw(0).size == 0
    big = RefillSampler(50, seed=0)
    assert not np.array_equal(big.draw(50), big.draw(50)), "epochs must use different permutations"
    with pytest.raises(ValueError):
        s.draw(-1)


@settings(deadline=None, max_examples=40)
@given(n=st.integers(1, 30), seed=st.integers(0, 1000), before=st.lists(st.integers(0, 25), max_size=6),
       after=st.lists(st.integers(0, 25), min_size=1, max_size=6))
def test_refill_state_round_trip(n, seed, before, after):
    s = RefillSampler(n, seed)
    for k in before:
        s.draw(k)
    state = json.loads(json.dumps(s.state_dict()))
    resumed = RefillSampler(n, seed)
    resumed.load_state_dict(state)
    assert (resumed.consumed, resumed.epoch) == (s.consumed, s.epoch)
    for k in after:
        np.testing.assert_array_equal(resumed.draw(k), s.draw(k))


@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 2**31), mask_seed=st.integers(0, 2**31),
       p=st.floats(0.0, 1.0))
def test_trm_drops_exactly_the_ids_at_continuing_slots(n, batch, seed, mask_seed, p):
    sampler = TRMSampler(n, batch, seed)
    fed = []
    masks = reset_masks(mask_seed, batch, p)
    while sampler.consumed < 3 * n:
        mask = next(masks)
        fill = sampler.fill(mask)
        assert fill.fed_ids.shape == (batch,) and fill.slot_ids.shape == (batch,)
        np.testing.assert_array_equal(fill.slot_ids[mask], fill.fed_ids[mask])
        assert (fill.slot_ids[~mask] == -1).all()
        np.testing.assert_array_equal(fill.dropped_ids, fill.fed_ids[~mask])
        assert len(fill.dropped_ids) + int((fill.slot_ids >= 0).sum()) == batch
        fed.append(fill.fed_ids)
    assert_each_epoch_is_a_permutation(np.concatenate(fed), n, seed)


def test_trm_state_round_trip_and_checks():
    s = TRMSampler(7, 3, seed=11)
    for _ in range(5):
        s.next_batch()
    resumed = TRMSampler(7, 3, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for _ in range(6):
        np.testing.assert_array_equal(resumed.next_batch(), s.next_batch())
    with pytest.raises(ValueError, match="batch_size"):
        TRMSampler(7, 4, seed=11).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed"):
        TRMSampler(7, 3, seed=12).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="kind"):
        RefillSampler(7, seed=11).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="num_samples"):
        RefillSampler(8, seed=11).load_state_dict(RefillSampler(7, seed=11).state_dict())
    with pytest.raises(ValueError, match="consumed"):
        RefillSampler(7, seed=11).load_state_dict({**RefillSampler(7, seed=11).state_dict(), "consumed": -1})
    with pytest.raises(ValueError, match="batch_size"):
        s.fill(np.ones(4, dtype=bool))


def test_build_sampler():
    assert isinstance(build_sampler("refill", 10, 4, 0), RefillSampler)
    trm = build_sampler("trm", 10, 4, 0)
    assert isinstance(trm, TRMSampler) and trm.batch_size == 4
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("random", 10, 4, 0)
    with pytest.raises(ValueError):
        RefillSampler(0, 0)
