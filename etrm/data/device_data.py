"""A ``GridDataset`` resident on the training device, and its batch gather as device index ops (no host round trip).

The rows stay in their compact host dtypes (uint8 tokens, int16 labels, int32 ids) and are widened to the int64/bool
batch ``GridDataset.batch`` returns, value for value, at gather time. ``fits_on_device`` is the memory estimate that
decides between this and the pinned-host path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diagnostics.properties.fingerprints import content_checksums
from etrm.data.dataset import BLANK_PUZZLE_ID, GridDataset
from etrm.data.tokens import IGNORE_LABEL, PAD

# The training set may take at most this fraction of the device's free memory (the rest is the model's).
DEVICE_DATA_FRACTION = 0.25
ROW_KEYS = ("inputs", "labels", "puzzle_ids", "demo_inputs", "demo_outputs", "demo_mask", "demo_slots")


def dataset_bytes(ds: GridDataset) -> int:
    """Bytes a device copy of the dataset needs: its arrays, or for an ARC training set (rendered on the device,
    ``etrm.data.arc_device``) its base grids, variant tables and per-row ids (``ArcTrainSet.device_bytes``)."""
    if hasattr(ds, "arc_variants"):  # an ArcTrainSet (etrm.data.arc_rows)
        return ds.device_bytes()
    return sum(int(a.nbytes) for a in (getattr(ds, k) for k in ROW_KEYS) if a is not None)


def fits_on_device(ds: GridDataset, device: torch.device, fraction: float = DEVICE_DATA_FRACTION) -> bool:
    """Whether ``ds`` goes on ``device``: on CUDA when it needs at most ``fraction`` of the free memory; on the CPU
    always (the arrays are shared with the host dataset, nothing is copied)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return dataset_bytes(ds) <= fraction * free


def resident_data(ds: GridDataset, device: torch.device):
    """The device-resident form of ``ds``: rows rendered from base grids for an ARC set with a variant table, the
    rows themselves otherwise. Both have ``batch(slot_ids)`` equal to ``ds.batch``."""
    if hasattr(ds, "arc_variants"):  # an ArcTrainSet (etrm.data.arc_rows)
        from etrm.data.arc_device import ArcDeviceData
        return ArcDeviceData(ds, device)
    return DeviceGridData(ds, device)


def _where_rows(valid: torch.Tensor, rows: torch.Tensor, fill: Any) -> torch.Tensor:
    return torch.where(valid.view(-1, *([1] * (rows.dim() - 1))), rows, torch.full_like(rows, fill))


def gather_rows(t: dict[str, Any], slot_ids: torch.Tensor, at: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``GridDataset.batch`` from compact row tensors ``t`` (``ROW_KEYS``; pooled demos when ``demo_slots`` is
    there): batch position k holds row ``at[k]`` (default ``slot_ids[k]``) as sample ``slot_ids[k]`` (-1: padding)."""
    valid = slot_ids >= 0
    safe = (slot_ids if at is None else at).clamp(min=0)
    out = {
        "inputs": _where_rows(valid, t["inputs"][safe].long(), PAD),
        "labels": _where_rows(valid, t["labels"][safe].long(), IGNORE_LABEL),
        "puzzle_id": _where_rows(valid, t["puzzle_ids"][safe].long(), BLANK_PUZZLE_ID),
        "sample_id": torch.where(valid, slot_ids, -1),
    }
    if t.get("demo_slots") is not None:
        slots = _where_rows(valid, t["demo_slots"][safe].long(), -1)
        mask = slots >= 0
        pooled_at = slots.clamp(min=0)
        for key in ("demo_inputs", "demo_outputs"):
            out[key] = torch.where(mask[..., None], t[key][pooled_at].long(), PAD)
        out["demo_mask"] = mask
    elif t.get("demo_inputs") is not None:
        out["demo_inputs"] = _where_rows(valid, t["demo_inputs"][safe].long(), PAD)
        out["demo_outputs"] = _where_rows(valid, t["demo_outputs"][safe].long(), PAD)
        out["demo_mask"] = _where_rows(valid, t["demo_mask"][safe], False)
    out.update(content_checksums(out))  # as GridDataset.batch: the slot's checksums, computed on the device
    return out


class DeviceGridData:
    """The rows of a ``GridDataset`` as tensors on ``device``."""

    def __init__(self, ds: GridDataset, device: torch.device) -> None:
        self.device = torch.device(device)
        self.num_samples = len(ds)

        def put(arr: np.ndarray | None) -> torch.Tensor | None:
            if arr is None:
                return None
            return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

        self.tensors: dict[str, torch.Tensor | None] = {k: put(getattr(ds, k)) for k in ROW_KEYS}

    def batch(self, slot_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``GridDataset.batch`` on the device: rows ``slot_ids`` ([B] int64 on the device, -1 = padding row)."""
        return gather_rows(self.tensors, slot_ids)
