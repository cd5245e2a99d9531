"""An ARC training set held as its base grids plus the de-duplicated variant table, never as augmented rows.

``build_arc`` records, for every training row (and, ETRM, every demo-pool entry), which base input and output grid
it comes from and under which variant (dihedral id, colour permutation, translation offset). ``ArcTrainSet`` keeps
only that, so ``num_aug=1000`` costs the base tasks plus a few ints per row. A drawn row is rendered when drawn: on
the device as gathers (``etrm.data.arc_device``, the device data path), on the host with the same
``Variant.apply`` + ``encode_at`` the rows were always made with (``batch``, the host path). ``materialise`` builds
the full ``GridDataset`` (the pinned path and whole-array readers such as ``inputs`` go through it, once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from etrm.data.arc_variants import ArcVariants, Variant, VariantTable, encode_at
from etrm.data.dataset import GridDataset
from etrm.data.tokens import NUM_COLOURS, VOCAB_SIZE, labels_from_tokens


def table_bytes(table: VariantTable) -> int:
    """Bytes of one variant table's arrays."""
    return sum(int(getattr(table, k).nbytes) for k in ("source", "tid", "perm", "offset"))


@dataclass
class ArcTrainSet:
    """The ``GridDataset`` interface over base grids + variant tables: rows exist only once drawn."""

    canvas: int
    arc_variants: ArcVariants
    puzzle_ids: np.ndarray  # [N] int32
    demo_slots: np.ndarray | None = None  # [N, K] int32 into the pool table (-1: none); ETRM view only
    info: dict[str, Any] = field(default_factory=dict)
    arc_index: Any = None  # training sets carry none (the eval set has the ArcIndex)
    row_scorer: Any = None
    _full: GridDataset | None = field(default=None, repr=False)

    # -- the GridDataset facts ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.puzzle_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return self.canvas * self.canvas

    @property
    def has_demos(self) -> bool:
        return self.arc_variants.pool is not None

    @property
    def num_demos(self) -> int:
        return int(self.demo_slots.shape[1]) if self.demo_slots is not None else 0

    def device_bytes(self) -> int:
        """What the device copy (``etrm.data.arc_device.ArcDeviceData``) holds: the base grids padded to the canvas
        (uint8) with their int64 shapes, the variant tables, puzzle ids and demo slots in their compact dtypes."""
        v = self.arc_variants
        extra = [self.puzzle_ids] + ([self.demo_slots] if self.demo_slots is not None else [])
        return (len(v.grids) * (self.seq_len + 2 * 8) + table_bytes(v.rows)
                + (table_bytes(v.pool) if v.pool is not None else 0) + sum(int(a.nbytes) for a in extra))

    def materialised_bytes(self) -> int:
        """What the materialised ``GridDataset`` holds: uint8 inputs, int16 labels, int32 ids (and, ETRM, the pool's
        uint8 demo inputs and outputs and the int32 demo slots), without building it."""
        n, s = len(self), self.seq_len
        pool = self.arc_variants.pool
        demos = 0 if pool is None else 2 * len(pool.tid) * s + int(self.demo_slots.nbytes)
        return n * s * (1 + 2) + int(self.puzzle_ids.nbytes) + demos

    # -- rendering on the host ------------------------------------------------------------------------------------
    def _encode(self, table: VariantTable, at: np.ndarray, side: int) -> np.ndarray:
        """[len(at), S] uint8: entry ``at[k]`` of ``table``, input (side 0) or output (side 1) grid, encoded."""
        grids = self.arc_variants.grids
        out = np.empty((len(at), self.seq_len), dtype=np.uint8)
        for k, i in enumerate(at):
            v = Variant(int(table.tid[i]), tuple(int(c) for c in table.perm[i]))
            out[k] = encode_at(v.apply(grids[table.source[i, side]]), self.canvas, *map(int, table.offset[i]))
        return out

    def materialise(self, rows: np.ndarray | None = None) -> GridDataset:
        """The ``GridDataset`` of ``rows`` (default: all, in order) with just the demo-pool entries they use."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        table = self.arc_variants.rows
        outputs = self._encode(table, rows, 1)
        pid = self.puzzle_ids[rows]
        if self.demo_slots is None:
            return GridDataset(self._encode(table, rows, 0), labels_from_tokens(outputs), pid)
        slots = self.demo_slots[rows]
        used, local = np.unique(slots[slots >= 0], return_inverse=True)
        sub_slots = np.full(slots.shape, -1, dtype=np.int32)
        sub_slots[slots >= 0] = local
        pool = self.arc_variants.pool
        return GridDataset(self._encode(table, rows, 0), labels_from_tokens(outputs), pid,
                           self._encode(pool, used, 0), self._encode(pool, used, 1), None, demo_slots=sub_slots)

    def batch(self, slot_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """``GridDataset.batch`` of the materialised set, rendering only the drawn rows (and their demos)."""
        slot_ids = np.asarray(slot_ids)
        if slot_ids.ndim != 1 or not np.issubdtype(slot_ids.dtype, np.integer):
            raise ValueError(f"slot_ids must be a 1-D integer array, got shape {slot_ids.shape} dtype {slot_ids.dtype}")
        if slot_ids.size and (slot_ids.min() < -1 or slot_ids.max() >= len(self)):
            raise IndexError(f"slot ids must lie in -1..{len(self) - 1}, got {slot_ids.min()}..{slot_ids.max()}")
        valid = slot_ids >= 0
        drawn, local = np.unique(slot_ids[valid], return_inverse=True)
        at = np.full(slot_ids.shape, -1, dtype=np.int64)
        at[valid] = local
        if not drawn.size and len(self):  # an all-padding batch: one row rendered keeps the demo pool non-empty
            drawn = np.zeros(1, dtype=np.int64)
        out = self.materialise(drawn).batch(at)
        out["sample_id"] = torch.from_numpy(np.where(valid, slot_ids, -1).astype(np.int64))
        return out

    # -- whole arrays (materialised once, on first use) -----------------------------------------------------------
    def full(self) -> GridDataset:
        """The whole materialised set, built on first use and kept."""
        if self._full is None:
            self._full = self.materialise()
        return self._full

    @property
    def inputs(self) -> np.ndarray:
        return self.full().inputs

    @property
    def labels(self) -> np.ndarray:
        return self.full().labels

    @property
    def demo_inputs(self) -> np.ndarray | None:
        return self.full().demo_inputs if self.has_demos else None

    @property
    def demo_outputs(self) -> np.ndarray | None:
        return self.full().demo_outputs if self.has_demos else None

    @property
    def demo_mask(self) -> None:
        return None  # pooled demos: the mask is demo_slots >= 0 (GridDataset's convention)

    def validate(self, vocab_size: int = VOCAB_SIZE) -> None:
        """Check the tables index the base grids and hold valid variants (every rendered token is then < vocab)."""
        from etrm.data.dataset import _check
        from etrm.data.families import NUM_DIHEDRAL

        _check(vocab_size >= VOCAB_SIZE, f"ARC rows need a vocab of {VOCAB_SIZE}, got {vocab_size}")
        grids = self.arc_variants.grids
        n = len(self)
        tables = [("rows", self.arc_variants.rows)] + ([("pool", self.arc_variants.pool)] if self.has_demos else [])
        for name, t in tables:
            m = len(t.tid)
            _check(t.source.shape == (m, 2) and t.perm.shape == (m, NUM_COLOURS) and t.offset.shape == (m, 2),
                   f"{name} table arrays disagree in length")
            _check(m == 0 or (t.source.min() >= 0 and t.source.max() < len(grids)), f"{name} table points past "
                   "the base grids")
            _check(m == 0 or (t.tid.min() >= 0 and t.tid.max() < NUM_DIHEDRAL), f"{name} table holds a bad "
                   "dihedral id")
            _check(bool((np.sort(t.perm, axis=1) == np.arange(NUM_COLOURS)).all()), f"{name} table holds a colour "
                   "map that is not a permutation")
        _check(len(self.arc_variants.rows.tid) == n and self.puzzle_ids.shape == (n,),
               f"the rows table and puzzle_ids must have N={n} entries")
        if self.demo_slots is not None:
            _check(self.demo_slots.shape[0] == n, f"demo_slots must be [N={n}, K], got {self.demo_slots.shape}")
            _check(self.demo_slots.size == 0 or int(self.demo_slots.max()) < len(self.arc_variants.pool.tid),
                   "demo_slots point past the pool")
