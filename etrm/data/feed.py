"""Where a training step's fresh samples come from: the device data path (no host sync) or the host path.

``train.data_path``:
- ``device``: the training set on the device and a device sampler (``etrm.data.device_sampler``); a step's batch is
  chosen and gathered from the reset mask without reading it back. An ARC set goes up as its base grids and variant
  table, its augmentations rendered on the device when drawn (``etrm.data.arc_device``).
- ``host``: the sampler on the host reads the reset mask back every step (a sync), gathers the batch there and copies
  it up (through pinned memory on CUDA). Upstream's way; kept for comparison.
- ``pinned``: the set stays in (pinned) host memory; the device sampler's window stages the rows it may draw next
  on the device, a chunk ahead, from a background thread (``etrm.data.staged``); no host sync in a step either.
- ``auto``: ``device`` when the memory estimate (``etrm.data.device_data.fits_on_device``) says the set fits, else
  ``pinned``.

Both paths feed the same ids in the same order for the same seed and reset masks, and share one checkpoint format.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from etrm.data.dataset import GridDataset
from etrm.data.device_data import DeviceGridData, fits_on_device, resident_data
from etrm.data.device_sampler import DeviceFill, DeviceRefillSampler, DeviceTRMSampler
from etrm.config import DATA_PATHS
from etrm.data.staged import StagedRows
from etrm.data.samplers import RefillSampler, TRMSampler, build_sampler

AnySampler = Union[RefillSampler, TRMSampler, DeviceRefillSampler, DeviceTRMSampler]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on ``device``; on CUDA through pinned memory, without waiting (each batch is a fresh host
    tensor, never reused)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class HostFeed:
    """The host path: ``draw`` reads the reset mask back (one sync per step); ``gather`` builds the batch on the
    host and copies it to the device."""

    on_device = False

    def __init__(self, ds: GridDataset, sampler: RefillSampler | TRMSampler, device: torch.device) -> None:
        self.ds, self.sampler, self.device = ds, sampler, device
        self.samples_dropped = 0

    def draw(self, reset: torch.Tensor) -> np.ndarray:
        fill = self.sampler.fill(reset.cpu().numpy())
        self.samples_dropped += len(fill.dropped_ids)
        return fill.batch_ids

    def gather(self, batch_ids: np.ndarray) -> dict[str, torch.Tensor]:
        return to_device(self.ds.batch(batch_ids), self.device)


class DeviceFeed:
    """The device path: ``draw`` picks the ids from the reset mask on the device; ``gather`` indexes the resident
    set (or, on the pinned path, the rows staged for the sampler's window). The dropped count (``trm``) is a device
    counter, read only when ``samples_dropped`` is asked for."""

    on_device = True

    def __init__(self, data: DeviceGridData | StagedRows | Any,
                 sampler: DeviceRefillSampler | DeviceTRMSampler) -> None:
        self.data, self.sampler = data, sampler
        self.staged = isinstance(data, StagedRows)
        self._dropped = torch.zeros((), dtype=torch.int64, device=sampler.device)
        self._dropped_before = 0

    @property
    def samples_dropped(self) -> int:
        """Fed ids dropped so far (a read of the device counter: for checkpoints and reports)."""
        return self._dropped_before + int(self._dropped.item())

    @samples_dropped.setter
    def samples_dropped(self, value: int) -> None:
        self._dropped_before = int(value)
        self._dropped.zero_()

    def draw(self, reset: torch.Tensor) -> DeviceFill:
        fill = self.sampler.fill(reset)
        self._dropped += fill.dropped
        return fill

    def gather(self, fill: DeviceFill) -> dict[str, torch.Tensor]:
        if self.staged:
            return self.data.batch(fill.batch_ids, fill.at)
        return self.data.batch(fill.batch_ids)


Feed = Union[HostFeed, DeviceFeed]


def resolve_data_path(name: str, ds: GridDataset, device: torch.device) -> str:
    """``auto`` resolved by the memory estimate; ``device`` and ``host`` as asked."""
    if name not in DATA_PATHS:
        raise ValueError(f"unknown data path {name!r}; allowed: {', '.join(DATA_PATHS)}")
    if name == "auto":
        return "device" if fits_on_device(ds, device) else "pinned"
    return name


def build_feed(data_path: str, sampler: str, ds: GridDataset, batch_size: int, seed: int,
               device: torch.device) -> Feed:
    """The feed ``train.data_path`` and ``train.sampler`` (``refill`` or ``trm``) name, on ``device``."""
    path = resolve_data_path(data_path, ds, device)
    if path == "host":
        return HostFeed(ds, build_sampler(sampler, len(ds), batch_size, seed), device)
    staged = StagedRows(ds, device) if path == "pinned" else None
    data = staged if staged is not None else resident_data(ds, device)
    if sampler == "refill":
        return DeviceFeed(data, DeviceRefillSampler(len(ds), seed, device, rows=staged))
    return DeviceFeed(data, DeviceTRMSampler(len(ds), batch_size, seed, device, rows=staged))
