"""The refill and trm samplers with their position on the training device: no host read of the reset mask.

Both draw from the same stream as ``etrm.data.samplers`` (epoch ``e`` is ``default_rng([seed, e]).permutation``,
strided by rank under torchrun), so for the same seed and reset masks they feed the same ids in the same order.

The stream is uploaded ahead in chunks of ``chunk`` positions (an ``_IdWindow``). The refill sampler's position
(ids consumed) is a device scalar: a step's reset slots take ``window[pos + cumsum(reset) - 1]`` and ``pos`` advances
by the reset count, all on the device. The host never needs the exact position to stay correct: every step draws at
most ``B`` ids, so ``upper`` (the position at the last snapshot plus ``B`` per step since) bounds it, and the window
always reaches ``upper + B`` (any number of epochs ahead, however short an epoch is). To free consumed chunks, the
position is copied to host memory every ``snapshot_every`` steps without waiting (pinned memory and a CUDA event on
a GPU) and read at the next snapshot, long after the copy has landed. Exact reads (``consumed``, ``state_dict``) are
for checkpoints and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from etrm.data.samplers import _PermutationStream, _StreamSampler

DEFAULT_CHUNK = 4096  # stream positions uploaded at a time
SNAPSHOT_EVERY = 16  # steps between the (non-blocking) copies of the position to the host


@dataclass
class DeviceFill:
    """One step's intake on the device: each slot's new id (-1 where it continues), the ids the batch holds per
    position, and how many fed ids were dropped (a 0-dim int64 tensor)."""

    slot_ids: torch.Tensor
    batch_ids: torch.Tensor
    dropped: torch.Tensor
    at: torch.Tensor  # [B] each batch position's index into the sampler's window (-1: padding)


def upload(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host ids to ``device`` without blocking the host (through pinned memory on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _IdWindow:
    """Stream positions ``[base, end)`` of a permutation stream, resident on the device, in whole chunks (and, with
    ``rows``, the rows of those positions)."""

    def __init__(self, stream: _PermutationStream, device: torch.device, chunk: int, start: int,
                 rows: Any = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.stream, self.device, self.chunk = stream, device, int(chunk)
        self.base = self.end = (start // self.chunk) * self.chunk
        self.ids = torch.empty(0, dtype=torch.int64, device=device)
        self.rows = rows
        if rows is not None:
            rows.restart(stream, self.chunk)

    def reach(self, position: int) -> None:
        """Upload chunks until the window holds every position below ``position``."""
        while self.end < position:
            self.stream.consumed = self.end
            ids = self.stream.take(self.chunk)
            self.ids = torch.cat([self.ids, upload(ids, self.device)])
            if self.rows is not None:
                self.rows.append(ids, self.end)
            self.end += self.chunk

    def drop_below(self, position: int) -> None:
        """Free the whole chunks below ``position`` (consumed for sure)."""
        cut = (position // self.chunk) * self.chunk - self.base
        if cut > 0:
            self.ids = self.ids[cut:].clone()
            self.base += cut
            if self.rows is not None:
                self.rows.drop(cut)


class _PositionSnapshot:
    """A copy of a device scalar in host memory, made without waiting; ``value()`` is ``None`` until it landed."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=self.cuda)
        self.view = self.host.numpy()  # read through numpy: the host copy is host memory by design
        self.event: Any = None
        self.tag: Any = None

    def take(self, value: torch.Tensor, tag: Any) -> None:
        self.host.copy_(value, non_blocking=self.cuda)
        self.tag = tag
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def value(self) -> tuple[int, Any] | None:
        if self.tag is None or (self.event is not None and not self.event.query()):
            return None
        return int(self.view), self.tag


class _DeviceStreamSampler(_StreamSampler):
    """What both device samplers share: a restart of their device state on sharding and on resume."""

    def _restart(self, consumed: int) -> None:  # pragma: no cover - each sampler defines it
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def shard(self, rank: int, world: int) -> None:
        super().shard(rank, world)
        self._restart(0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restart(self._stream.consumed)


class DeviceRefillSampler(_DeviceStreamSampler):
    """``RefillSampler`` on the device: ``fill(reset)`` takes the reset mask as a device tensor and never reads it."""

    kind = "refill"

    def __init__(self, num_samples: int, seed: int, device: torch.device, chunk: int = DEFAULT_CHUNK,
                 snapshot_every: int = SNAPSHOT_EVERY, rows: Any = None) -> None:
        super().__init__(num_samples, seed)
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.device, self.chunk, self.snapshot_every = torch.device(device), int(chunk), int(snapshot_every)
        self.rows = rows
        self._restart(0)

    def _restart(self, consumed: int) -> None:
        self._pos = torch.full((), consumed, dtype=torch.int64, device=self.device)
        self._window = _IdWindow(self._stream, self.device, self.chunk, consumed, self.rows)
        self._upper = consumed  # bound on the device position, known on the host
        self._slots = 0  # slots filled so far (the host's count: B per step)
        self._fills = 0
        self._snapshot = _PositionSnapshot(self.device)
        self._zero = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def consumed(self) -> int:
        """Ids drawn so far (reads the device position: a sync, for checkpoints and tests)."""
        return int(self._pos.item())

    def fill(self, reset: torch.Tensor) -> DeviceFill:
        """Give each reset slot (``reset``: [B] bool on the device) the next id in slot order; others get -1."""
        b = reset.shape[0]
        if self._fills and self._fills % self.snapshot_every == 0:  # before this step's indices are taken
            self._refresh()
        self._window.reach(self._upper + b)
        order = torch.cumsum(reset, 0) - 1  # the k-th reset slot takes the k-th next id
        at = (self._pos - self._window.base + order).clamp(min=0)
        slot_ids = torch.where(reset, self._window.ids[at], -1)
        self._pos += reset.sum()
        self._upper += b
        self._slots += b
        self._fills += 1
        return DeviceFill(slot_ids, slot_ids, self._zero, torch.where(reset, at, -1))

    def _refresh(self) -> None:
        """Tighten the host's bound from the last snapshot, free consumed chunks, and take the next snapshot."""
        landed = self._snapshot.value()
        if landed is not None:
            position, slots_then = landed
            self._upper = min(self._upper, position + self._slots - slots_then)
            self._window.drop_below(position)
        self._snapshot.take(self._pos, self._slots)


class DeviceTRMSampler(_DeviceStreamSampler):
    """``TRMSampler`` on the device: a whole batch of fresh ids per step (their positions are known on the host);
    the ids landing in continuing slots are dropped and counted on the device."""

    kind = "trm"

    def __init__(self, num_samples: int, batch_size: int, seed: int, device: torch.device,
                 chunk: int = DEFAULT_CHUNK, rows: Any = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        super().__init__(num_samples, seed)
        self.device, self.chunk, self.rows = torch.device(device), int(chunk), rows
        self._arange = torch.arange(self.batch_size, device=self.device)
        self._restart(0)

    def _restart(self, consumed: int) -> None:
        self._consumed = consumed
        self._window = _IdWindow(self._stream, self.device, self.chunk, consumed, self.rows)

    @property
    def consumed(self) -> int:
        """Ids fed so far (dropped ones included); known on the host."""
        return self._consumed

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "batch_size": self.batch_size}

    def fill(self, reset: torch.Tensor) -> DeviceFill:
        """Feed a whole batch; reset slots take their position's id, the others' ids are dropped (counted)."""
        if reset.shape[0] != self.batch_size:
            raise ValueError(f"reset mask has {reset.shape[0]} slots, the sampler's batch_size is {self.batch_size}")
        b, start = self.batch_size, self._consumed
        self._window.reach(start + b)
        self._window.drop_below(start)
        first = start - self._window.base
        fed = self._window.ids[first:first + b]
        self._consumed += b
        return DeviceFill(torch.where(reset, fed, -1), fed, (~reset).sum(), self._arange + first)
