"""Device samplers: the same ids in the same order as the host samplers, none dropped, exact resume, DDP shards."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etrm.data.device_sampler import DeviceRefillSampler, DeviceTRMSampler
from etrm.data.samplers import RefillSampler, TRMSampler

CPU = torch.device("cpu")


def masks(seed: int, batch: int, p: float, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(batch) < p for _ in range(steps)]


def run_both(host, device, step_masks):
    """Feed the same masks to both; return the ids each fed (the device's read back only here, in the test)."""
    host_ids, device_ids = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for mask in step_masks:
        h = host.fill(mask)
        d = device.fill(torch.from_numpy(mask))
        np.testing.assert_array_equal(d.slot_ids.numpy(), h.slot_ids)
        np.testing.assert_array_equal(d.batch_ids.numpy(), h.batch_ids)
        assert int(d.dropped) == len(h.dropped_ids)
        host_ids.append(h.fed_ids)
        device_ids.append(d.slot_ids.numpy()[mask] if host.kind == "refill" else d.batch_ids.numpy())
    return np.concatenate(host_ids), np.concatenate(device_ids)


shapes = dict(n=st.integers(1, 30), batch=st.integers(1, 16), seed=st.integers(0, 2**31),
              mask_seed=st.integers(0, 2**31), p=st.floats(0.0, 1.0), chunk=st.integers(1, 40),
              snapshot_every=st.integers(1, 8), steps=st.integers(1, 60))


@settings(deadline=None, max_examples=60)
@given(**shapes)
def test_device_refill_feeds_what_the_host_refill_feeds(n, batch, seed, mask_seed, p, chunk, snapshot_every, steps):
    """Same order for the same seed, every id once per epoch (nothing dropped), also when one epoch is far shorter
    than what is drawn between two snapshots (n=1, batch=16, snapshot_every=8: 128 epochs between snapshots)."""
    host = RefillSampler(n, seed)
    device = DeviceRefillSampler(n, seed, CPU, chunk=chunk, snapshot_every=snapshot_every)
    h, d = run_both(host, device, masks(mask_seed, batch, p, steps))
    np.testing.assert_array_equal(d, h)
    assert device.consumed == host.consumed == len(d) and device.epoch == host.epoch
    for e in range(len(d) // n):
        np.testing.assert_array_equal(np.sort(d[e * n:(e + 1) * n]), np.arange(n))
    # the window stays bounded: consumed chunks are freed, at most a few snapshot intervals are held ahead
    held = device._window.end - device._window.base
    assert held <= chunk * (2 + -(-batch * 2 * snapshot_every // chunk)) + n


@settings(deadline=None, max_examples=40)
@given(**shapes, cut=st.integers(0, 60), from_host=st.booleans())
def test_device_refill_resumes_exactly(n, batch, seed, mask_seed, p, chunk, snapshot_every, steps, cut, from_host):
    """A device sampler loading a checkpointed state (its own, or the host sampler's: the format is one) continues
    as the uninterrupted one does."""
    ms = masks(mask_seed, batch, p, steps + cut)
    whole = DeviceRefillSampler(n, seed, CPU, chunk=chunk, snapshot_every=snapshot_every)
    first = RefillSampler(n, seed) if from_host else DeviceRefillSampler(n, seed, CPU, chunk, snapshot_every)
    for m in ms[:cut]:
        whole.fill(torch.from_numpy(m))
        first.fill(m if from_host else torch.from_numpy(m))
    state = json.loads(json.dumps(first.state_dict()))
    assert state == whole.state_dict()
    resumed = DeviceRefillSampler(n, seed, CPU, chunk=chunk, snapshot_every=snapshot_every)
    resumed.load_state_dict(state)
    for m in ms[cut:]:
        mask = torch.from_numpy(m)
        assert torch.equal(resumed.fill(mask).slot_ids, whole.fill(mask).slot_ids)
    assert resumed.consumed == whole.consumed


@settings(deadline=None, max_examples=30)
@given(n=st.integers(4, 30), world=st.integers(2, 4), batch=st.integers(1, 8), seed=st.integers(0, 1000),
       mask_seed=st.integers(0, 1000), chunk=st.integers(1, 20), steps=st.integers(1, 30))
def test_device_refill_shards_as_the_host_does(n, world, batch, seed, mask_seed, chunk, steps):
    """Under torchrun each rank's device sampler feeds its host twin's ids (disjoint shares of every epoch)."""
    for rank in range(min(world, n)):
        host, device = RefillSampler(n, seed), DeviceRefillSampler(n, seed, CPU, chunk=chunk, snapshot_every=3)
        host.shard(rank, world)
        device.shard(rank, world)
        h, d = run_both(host, device, masks(mask_seed + rank, batch, 0.6, steps))
        np.testing.assert_array_equal(d, h)
        assert device.num_samples == host.num_samples


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 30), batch=st.integers(1, 16), seed=st.integers(0, 2**31), mask_seed=st.integers(0, 2**31),
       chunk=st.integers(1, 40), steps=st.integers(1, 30), cut=st.integers(0, 30))
def test_device_trm_feeds_and_drops_what_the_host_trm_does(n, batch, seed, mask_seed, chunk, steps, cut):
    host, device = TRMSampler(n, batch, seed), DeviceTRMSampler(n, batch, seed, CPU, chunk=chunk)
    ms = masks(mask_seed, batch, 0.4, steps + cut)
    run_both(host, device, ms[:cut])
    resumed = DeviceTRMSampler(n, batch, seed, CPU, chunk=chunk)
    resumed.load_state_dict(json.loads(json.dumps(device.state_dict())))
    h, d = run_both(host, resumed, ms[cut:])
    np.testing.assert_array_equal(d, h)
    assert resumed.consumed == host.consumed


def test_device_sampler_state_is_checked_like_the_host_one():
    device = DeviceRefillSampler(10, 3, CPU)
    with pytest.raises(ValueError, match="seed"):
        device.load_state_dict(RefillSampler(10, 4).state_dict())
    with pytest.raises(ValueError, match="kind"):
        device.load_state_dict(TRMSampler(10, 2, 3).state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        DeviceTRMSampler(10, 3, 3, CPU).fill(torch.ones(2, dtype=torch.bool))
