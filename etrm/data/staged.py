"""The pinned-host data path: a training set too large for the device stays in host memory, and the rows of the
positions the device sampler may draw next are staged on the device a chunk ahead.

``StagedRows`` rides on a device sampler's window (``etrm.data.device_sampler``): for every chunk of stream positions
the window uploads, it uploads that chunk's rows (compact dtypes; through pinned memory, without waiting, on CUDA),
gathered on the host by a background thread while the previous chunk is being trained on; it frees them with the
window. A step then gathers its batch from the staged rows by window position, on the device, without a host sync.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from etrm.data.dataset import GridDataset
from etrm.data.device_data import gather_rows
from etrm.data.samplers import _PermutationStream
from etrm.data.tokens import PAD

STAGED_KEYS = ("inputs", "labels", "puzzle_ids", "demo_inputs", "demo_outputs", "demo_mask")


def compact_rows(ds: GridDataset, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``ids`` of ``ds`` in their compact dtypes, pooled demos expanded per row ([n, K, S] and a mask). An ARC
    training set (``etrm.data.arc_rows.ArcTrainSet``) renders just those rows."""
    if hasattr(ds, "materialise"):
        ds, ids = ds.materialise(ids), np.arange(len(ids))
    out = {"inputs": ds.inputs[ids], "labels": ds.labels[ids], "puzzle_ids": ds.puzzle_ids[ids]}
    if ds.demo_slots is not None:
        slots = ds.demo_slots[ids]
        mask = slots >= 0
        for key in ("demo_inputs", "demo_outputs"):
            out[key] = np.where(mask[..., None], getattr(ds, key)[np.clip(slots, 0, None)], PAD).astype(np.uint8)
        out["demo_mask"] = mask
    elif ds.has_demos:
        for key in ("demo_inputs", "demo_outputs", "demo_mask"):
            out[key] = getattr(ds, key)[ids]
    return out


class StagedRows:
    """The rows of a device sampler's window positions, on the device; ``batch(slot_ids, at)`` gathers a step's."""

    def __init__(self, ds: GridDataset, device: torch.device) -> None:
        self.ds, self.device = ds, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tensors: dict[str, torch.Tensor] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="etrm-stage")
        self._ahead: tuple[int, Future] | None = None
        self._reader: _PermutationStream | None = None
        self.chunk = 1

    def restart(self, stream: _PermutationStream, chunk: int) -> None:
        """Empty the window for a sampler (re)starting on ``stream`` (a new shard, a resume)."""
        self._reader = _PermutationStream(stream.total, stream.seed, stream.rank, stream.world)
        self.chunk, self._ahead = int(chunk), None
        empty = compact_rows(self.ds, np.empty(0, dtype=np.int64))
        self.tensors = {k: torch.from_numpy(v).to(self.device) for k, v in empty.items()}

    def _host_rows(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in compact_rows(self.ds, ids).items()}
        return {k: v.pin_memory() for k, v in rows.items()} if self.cuda else rows

    def _prefetch(self, start: int) -> None:
        reader, chunk = self._reader, self.chunk
        assert reader is not None

        def job() -> dict[str, torch.Tensor]:
            reader.consumed = start
            return self._host_rows(reader.take(chunk))

        self._ahead = (start, self._worker.submit(job))

    def append(self, ids: np.ndarray, start: int) -> None:
        """Add the rows of positions ``start..start+len(ids)`` (prefetched when they were the expected next chunk)."""
        if self._ahead is not None and self._ahead[0] == start and len(ids) == self.chunk:
            host = self._ahead[1].result()
        else:
            host = self._host_rows(ids)
        for k, v in host.items():
            self.tensors[k] = torch.cat([self.tensors[k], v.to(self.device, non_blocking=self.cuda)])
        self._prefetch(start + len(ids))

    def drop(self, cut: int) -> None:
        """Free the first ``cut`` positions' rows."""
        self.tensors = {k: v[cut:].clone() for k, v in self.tensors.items()}

    def batch(self, slot_ids: torch.Tensor, at: torch.Tensor) -> dict[str, torch.Tensor]:
        return gather_rows(self.tensors, slot_ids, at)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def __getstate__(self) -> Any:  # pragma: no cover - not picklable (a thread pool); never checkpointed
        raise TypeError("StagedRows holds a thread pool and is not picklable")
