"""An in-memory dataset of token grids, and its batch gather with explicit padding rows.

Sample ids are row indices. A batch is requested by slot: slot id -1 means "no sample here" (a continuing slot under
the refill sampler, or the tail of an eval batch) and yields a padding row that the loss ignores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diagnostics.properties.fingerprints import content_checksums
from etrm.data.tokens import IGNORE_LABEL, PAD, VOCAB_SIZE

BLANK_PUZZLE_ID = 0


@dataclass
class GridDataset:
    """Token rows with their labels and puzzle ids; optionally each row's demos (ETRM view), stored per row."""

    inputs: np.ndarray  # [N, S] uint8 tokens
    labels: np.ndarray  # [N, S] int16, IGNORE_LABEL where not supervised
    puzzle_ids: np.ndarray  # [N] int32, >= 1 for real rows (0 is the blank id of padding)
    demo_inputs: np.ndarray | None = None  # [N, K, S] uint8 tokens
    demo_outputs: np.ndarray | None = None  # [N, K, S] uint8 tokens (PAD 0, not -100-masked)
    demo_mask: np.ndarray | None = None  # [N, K] bool, False for padding demos
    # Pooled demos (large augmented sets): demo_inputs/demo_outputs are a pool [P, S] of demo pairs, demo_slots [N, K]
    # int32 names each row's demos in the pool (-1: none) and demo_mask is left None (it is demo_slots >= 0).
    demo_slots: np.ndarray | None = None
    arc_index: Any = None  # ARC eval sets: how each row maps back to its task (etrm.data.arc.ArcIndex)
    # Extra per-row eval scores (``names``; called as (inputs, labels, preds) -> {name: bool [B]}), e.g. the maze
    # set's valid-shortest-path check (etrm.data.maze.MazeScorer); evaluation reports their means beside ``exact``.
    row_scorer: Any = None
    info: dict[str, Any] = field(default_factory=dict)  # facts about how the set was built (printed by the trainer)
    # The task of each puzzle id ([num_puzzle_ids] int64: augmented variants share their base task's index), for the
    # ledger's per-task aggregates; None when every puzzle id is its own task
    puzzle_task: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def has_demos(self) -> bool:
        """Whether each row carries its task's demos (the ETRM view)."""
        return self.demo_inputs is not None

    @property
    def seq_len(self) -> int:
        """Tokens per grid (canvas * canvas)."""
        return int(self.inputs.shape[1])

    @property
    def num_demos(self) -> int:
        """Demo slots per row (K); 0 without demos."""
        if self.demo_slots is not None:
            return int(self.demo_slots.shape[1])
        return int(self.demo_inputs.shape[1]) if self.demo_inputs is not None else 0

    def batch(self, slot_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Gather rows ``slot_ids`` ([B], -1 = padding) into int64/bool tensors; padding rows are PAD/-100/blank."""
        slot_ids = np.asarray(slot_ids)
        if slot_ids.ndim != 1 or not np.issubdtype(slot_ids.dtype, np.integer):
            raise ValueError(f"slot_ids must be a 1-D integer array, got shape {slot_ids.shape} dtype {slot_ids.dtype}")
        n = len(self)
        if slot_ids.size and (slot_ids.min() < -1 or slot_ids.max() >= n):
            raise IndexError(f"slot ids must lie in -1..{n - 1}, got {slot_ids.min()}..{slot_ids.max()}")
        valid = slot_ids >= 0
        rows = slot_ids[valid]

        def gather(arr: np.ndarray, fill: int | bool, dtype: type) -> torch.Tensor:
            out = np.full((len(slot_ids),) + arr.shape[1:], fill, dtype=dtype)
            out[valid] = arr[rows]
            return torch.from_numpy(out)

        out = {
            "inputs": gather(self.inputs, PAD, np.int64),
            "labels": gather(self.labels, IGNORE_LABEL, np.int64),
            "puzzle_id": gather(self.puzzle_ids, BLANK_PUZZLE_ID, np.int64),
            "sample_id": torch.from_numpy(np.where(valid, slot_ids, -1).astype(np.int64)),
        }
        if self.demo_slots is not None:
            slots = np.full((len(slot_ids), self.num_demos), -1, dtype=np.int64)
            slots[valid] = self.demo_slots[rows]
            mask = slots >= 0
            safe = np.where(mask, slots, 0)
            for key in ("demo_inputs", "demo_outputs"):
                pool = getattr(self, key)
                out[key] = torch.from_numpy(np.where(mask[..., None], pool[safe], PAD).astype(np.int64))
            out["demo_mask"] = torch.from_numpy(mask)
        elif self.has_demos:
            out["demo_inputs"] = gather(self.demo_inputs, PAD, np.int64)
            out["demo_outputs"] = gather(self.demo_outputs, PAD, np.int64)
            out["demo_mask"] = gather(self.demo_mask, False, np.bool_)
        # per-sample content checksums, carried with the slot's data so the runtime checks can compare what the
        # model used against them on the device (``diagnostics.properties.fingerprints.CHECKSUM_KEY``)
        out.update(content_checksums(out))
        return out

    def validate(self, vocab_size: int = VOCAB_SIZE) -> None:
        """Check shapes, dtypes and value ranges; raise ``ValueError`` with a one-line message on the first problem."""
        _check(self.inputs.ndim == 2, f"inputs must be [N, S], got shape {self.inputs.shape}")
        n, s = self.inputs.shape
        _check(self.inputs.dtype == np.uint8, f"inputs must be uint8, got {self.inputs.dtype}")
        _check(self.labels.shape == (n, s), f"labels shape {self.labels.shape} does not match inputs {(n, s)}")
        _check(self.labels.dtype == np.int16, f"labels must be int16, got {self.labels.dtype}")
        _check(self.puzzle_ids.shape == (n,), f"puzzle_ids shape {self.puzzle_ids.shape} does not match N={n}")
        _check(self.puzzle_ids.dtype == np.int32, f"puzzle_ids must be int32, got {self.puzzle_ids.dtype}")
        if n:
            _check(int(self.inputs.max()) < vocab_size, f"inputs hold token {self.inputs.max()} >= vocab {vocab_size}")
            bad = (self.labels != IGNORE_LABEL) & ((self.labels < 0) | (self.labels >= vocab_size))
            _check(not bad.any(), f"labels hold {int(bad.sum())} values outside 0..{vocab_size - 1} and {IGNORE_LABEL}")
            _check(int(self.puzzle_ids.min()) >= 0, f"puzzle_ids hold a negative id {self.puzzle_ids.min()}")
        if self.demo_slots is not None:
            _check(self.demo_inputs is not None and self.demo_outputs is not None and self.demo_mask is None,
                   "pooled demos need demo_inputs and demo_outputs pools and no demo_mask")
            _check(self.demo_slots.ndim == 2 and self.demo_slots.shape[0] == n,
                   f"demo_slots must be [N={n}, K], got shape {self.demo_slots.shape}")
            p = self.demo_inputs.shape[0]
            _check(self.demo_inputs.shape == (p, s) and self.demo_outputs.shape == (p, s),
                   f"demo pools must be [P, S={s}], got {self.demo_inputs.shape} and {self.demo_outputs.shape}")
            _check(self.demo_slots.size == 0 or int(self.demo_slots.max()) < p, "demo_slots point past the pool")
            for name in ("demo_inputs", "demo_outputs"):
                arr = getattr(self, name)
                _check(arr.dtype == np.uint8, f"{name} must be uint8, got {arr.dtype}")
                _check(arr.size == 0 or int(arr.max()) < vocab_size, f"{name} hold a token >= vocab {vocab_size}")
            return
        demos = (self.demo_inputs, self.demo_outputs, self.demo_mask)
        if all(d is None for d in demos):
            return
        _check(all(d is not None for d in demos), "demo_inputs, demo_outputs and demo_mask must be given together")
        _check(self.demo_inputs.ndim == 3 and self.demo_inputs.shape[0] == n and self.demo_inputs.shape[2] == s,
               f"demo_inputs must be [N={n}, K, S={s}], got shape {self.demo_inputs.shape}")
        k = self.demo_inputs.shape[1]
        _check(self.demo_outputs.shape == (n, k, s),
               f"demo_outputs shape {self.demo_outputs.shape} does not match demo_inputs {(n, k, s)}")
        _check(self.demo_mask.shape == (n, k), f"demo_mask shape {self.demo_mask.shape} does not match {(n, k)}")
        for name in ("demo_inputs", "demo_outputs"):
            arr = getattr(self, name)
            _check(arr.dtype == np.uint8, f"{name} must be uint8, got {arr.dtype}")
            _check(arr.size == 0 or int(arr.max()) < vocab_size, f"{name} hold a token >= vocab {vocab_size}")
        _check(self.demo_mask.dtype == np.bool_, f"demo_mask must be bool, got {self.demo_mask.dtype}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid GridDataset: {message}")
