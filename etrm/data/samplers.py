"""Which sample each reset slot takes next: the refill sampler (ours) and upstream TRM's whole-batch feed.

Both walk a fresh random permutation of the sample ids per epoch (epoch e: ``np.random.default_rng([seed, e])``),
crossing epoch boundaries seamlessly, so over each epoch every id is fed exactly once. Their state is one counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np


@dataclass
class Fill:
    """One step's intake: each slot's new sample id (-1 where the slot continues), what was fed, what was dropped."""

    slot_ids: np.ndarray  # [B] int64
    fed_ids: np.ndarray  # int64: every id the sampler yielded for this step
    dropped_ids: np.ndarray  # int64: fed ids that landed in continuing slots and were discarded
    batch_ids: np.ndarray | None = None  # [B] what the incoming batch holds per position (default: slot_ids)

    def __post_init__(self) -> None:
        if self.batch_ids is None:
            self.batch_ids = self.slot_ids


class _PermutationStream:
    """The concatenation of per-epoch permutations of 0..N-1, read from a position ``consumed``.

    With ``world > 1`` it is one rank's share: epoch ``e`` yields ``perm_e[rank::world]`` (disjoint across ranks),
    and ``num_samples`` is the share's size.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world <= num_samples:
            raise ValueError(f"{num_samples} samples cannot be shared as rank {rank} of {world}")
        self.total, self.rank, self.world = int(num_samples), int(rank), int(world)
        self.num_samples = len(range(rank, num_samples, world))
        self.seed, self.consumed = int(seed), 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.total).astype(np.int64)
            self._perm, self._perm_epoch = perm[self.rank::self.world], epoch
        return self._perm

    def take(self, k: int) -> np.ndarray:
        if k < 0:
            raise ValueError(f"cannot draw a negative number of samples ({k})")
        parts, need = [], int(k)
        while need:
            epoch, pos = divmod(self.consumed, self.num_samples)
            chunk = self._permutation(epoch)[pos:pos + need]
            parts.append(chunk)
            need -= len(chunk)
            self.consumed += len(chunk)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _check_state(state: dict[str, Any], expected: dict[str, Any]) -> int:
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has {key}={value!r}")
    consumed = state.get("consumed")
    if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
        raise ValueError(f"sampler state has consumed={consumed!r}; expected an int >= 0")
    return consumed


def _reset_mask(reset_mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(reset_mask)
    if mask.ndim != 1 or mask.dtype != np.bool_:
        raise ValueError(f"reset_mask must be a 1-D bool array, got shape {mask.shape} dtype {mask.dtype}")
    return mask


class _StreamSampler:
    """What both samplers share: a permutation stream, its position, a shard of it, and resumable state."""

    kind = ""

    def __init__(self, num_samples: int, seed: int) -> None:
        self._stream = _PermutationStream(num_samples, seed)

    @property
    def num_samples(self) -> int:
        """Size of the dataset (or of this rank's share of it) sampled from."""
        return self._stream.num_samples

    @property
    def epoch(self) -> int:
        """The epoch the next id comes from."""
        return self._stream.consumed // self._stream.num_samples

    @property
    def consumed(self) -> int:
        """Ids drawn so far (for ``trm``: fed, dropped ones included), over all epochs."""
        return self._stream.consumed

    def shard(self, rank: int, world: int) -> None:
        """Draw only this rank's disjoint share of every epoch (under torchrun), from the start."""
        self._stream = _PermutationStream(self._stream.total, self._stream.seed, rank, world)

    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_samples": self.num_samples, "seed": self._stream.seed}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state; a sampler loading it continues identically."""
        return {**self._identity(), "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; a state of another kind, size, batch size or seed raises ``ValueError``."""
        self._stream.consumed = _check_state(state, self._identity())


class RefillSampler(_StreamSampler):
    """Draws exactly as many new samples as slots were reset; continuing slots get -1 (padding), nothing is dropped."""

    kind = "refill"

    def draw(self, k: int) -> np.ndarray:
        """The next ``k`` sample ids (int64)."""
        return self._stream.take(k)

    def fill(self, reset_mask: np.ndarray) -> Fill:
        """Give each reset slot a new sample id, in slot order; continuing slots get -1."""
        mask = _reset_mask(reset_mask)
        fed = self.draw(int(mask.sum()))
        slot_ids = np.full(mask.shape[0], -1, dtype=np.int64)
        slot_ids[mask] = fed
        return Fill(slot_ids, fed, np.empty(0, dtype=np.int64))


class TRMSampler(_StreamSampler):
    """Upstream's feed: a whole fresh batch every step; ids landing in continuing slots are dropped (and reported).

    Unlike upstream, batches cross epoch boundaries instead of dropping an incomplete tail, and ids are drawn
    uniformly rather than one augmentation per group.
    """

    kind = "trm"

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        super().__init__(num_samples, seed)

    def next_batch(self) -> np.ndarray:
        """The next ``batch_size`` sample ids (int64)."""
        return self._stream.take(self.batch_size)

    def fill(self, reset_mask: np.ndarray) -> Fill:
        """Feed a whole batch; reset slots take their position's id, the ids at continuing positions are dropped."""
        mask = _reset_mask(reset_mask)
        if mask.shape[0] != self.batch_size:
            raise ValueError(f"reset_mask has {mask.shape[0]} slots, the sampler's batch_size is {self.batch_size}")
        fed = self.next_batch()
        return Fill(np.where(mask, fed, -1), fed, fed[~mask], batch_ids=fed)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "batch_size": self.batch_size}


Sampler = Union[RefillSampler, TRMSampler]


def build_sampler(kind: str, num_samples: int, batch_size: int, seed: int) -> Sampler:
    """The sampler named by ``train.sampler`` (``refill`` or ``trm``)."""
    if kind == "refill":
        return RefillSampler(num_samples, seed)
    if kind == "trm":
        return TRMSampler(num_samples, batch_size, seed)
    raise ValueError(f"unknown sampler {kind!r}; allowed: refill, trm")
