"""ARC augmentation on the device: a variant of a base grid (dihedral transform, colour permutation, translation)
rendered onto the canvas as index gathers, equal to the host's ``encode_at(Variant(tid, perm).apply(grid), ...)``.

The dihedral transforms are affine maps of the cell coordinates: output cell (r, c) of transform ``tid`` reads source
cell ``i = a*(h-1) + b*r + c_*c``, ``j = d*(w-1) + e*r + f*c`` (``DIHEDRAL_COEFFS``), the grid's sides swapping for
the transforms that transpose. So only the base grids (and, per sample, a few ints) need to be resident.
"""

from __future__ import annotations

import numpy as np
import torch

from etrm.data.tokens import COLOUR_OFFSET, EOS, PAD

# Per transform id (upstream's numbering, etrm.data.families.dihedral): (a, b, c, d, e, f, swaps sides).
DIHEDRAL_COEFFS = (
    (0, 1, 0, 0, 0, 1, 0),    # 0 identity:          (r, c)
    (0, 0, 1, 1, -1, 0, 1),   # 1 rot90:             (c, w-1-r)
    (1, -1, 0, 1, 0, -1, 0),  # 2 rot180:            (h-1-r, w-1-c)
    (1, 0, -1, 0, 1, 0, 1),   # 3 rot270:            (h-1-c, r)
    (0, 1, 0, 1, 0, -1, 0),   # 4 flip left-right:   (r, w-1-c)
    (1, -1, 0, 0, 0, 1, 0),   # 5 flip up-down:      (h-1-r, c)
    (0, 0, 1, 0, 1, 0, 1),    # 6 transpose:         (c, r)
    (1, 0, -1, 1, -1, 0, 1),  # 7 anti-transpose:    (h-1-c, w-1-r)
)


def pad_grids(grids: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Base grids top-left in [P, side, side] uint8 (zeros elsewhere) and their [P, 2] (h, w)."""
    out = np.zeros((len(grids), side, side), dtype=np.uint8)
    shapes = np.zeros((len(grids), 2), dtype=np.int64)
    for k, g in enumerate(grids):
        h, w = g.shape
        out[k, :h, :w] = g
        shapes[k] = (h, w)
    return out, shapes


def dihedral_coeffs(device: torch.device) -> torch.Tensor:
    """``DIHEDRAL_COEFFS`` as an [8, 7] int64 tensor on ``device`` (made once: a host-to-device copy waits)."""
    return torch.tensor(DIHEDRAL_COEFFS, dtype=torch.int64, device=device)


def render(grids: torch.Tensor, shapes: torch.Tensor, which: torch.Tensor, tid: torch.Tensor, perm: torch.Tensor,
           top: torch.Tensor, left: torch.Tensor, canvas: int, coeff_table: torch.Tensor | None = None) -> torch.Tensor:
    """Flat [B, canvas*canvas] int64 tokens: base grid ``which[k]`` under transform ``tid[k]`` and colour permutation
    ``perm[k]`` ([B, 10]), placed at (``top[k]``, ``left[k]``) with its EOS edges, PAD elsewhere. ``coeff_table``:
    ``dihedral_coeffs`` on the device (pass it in a training step)."""
    table = dihedral_coeffs(grids.device) if coeff_table is None else coeff_table
    coeffs = table[tid]  # [B, 7]
    h, w = shapes[which, 0], shapes[which, 1]
    swap = coeffs[:, 6].bool()
    out_h, out_w = torch.where(swap, w, h), torch.where(swap, h, w)
    ys = torch.arange(canvas, device=grids.device)
    r = (ys[None, :, None] - top[:, None, None]).expand(-1, canvas, canvas)  # [B, canvas, canvas]
    c = (ys[None, None, :] - left[:, None, None]).expand(-1, canvas, canvas)

    def k(col: int) -> torch.Tensor:
        return coeffs[:, col, None, None]

    i = k(0) * (h - 1)[:, None, None] + k(1) * r + k(2) * c
    j = k(3) * (w - 1)[:, None, None] + k(4) * r + k(5) * c
    oh, ow = out_h[:, None, None], out_w[:, None, None]
    inside = (r >= 0) & (r < oh) & (c >= 0) & (c < ow)
    side = grids.shape[1]
    flat = (which[:, None, None] * side + i.clamp(0, side - 1)) * side + j.clamp(0, side - 1)
    colours = grids.reshape(-1)[flat.clamp(0, grids.numel() - 1)].long()
    coloured = torch.gather(perm.long(), 1, colours.reshape(len(which), -1)).reshape(colours.shape)
    edge = ((r == oh) & (c >= 0) & (c <= ow)) | ((c == ow) & (r >= 0) & (r <= oh))
    tokens = torch.where(inside, coloured + COLOUR_OFFSET, torch.where(edge, EOS, PAD))
    return tokens.reshape(len(which), canvas * canvas)


class ArcDeviceData:
    """An ARC training set (``etrm.data.arc_rows.ArcTrainSet``) as base grids and variant tables on the device, in
    their compact dtypes; ``batch`` renders the drawn rows (and their demos) there, equal to the host's ``batch``."""

    def __init__(self, ds, device: torch.device) -> None:
        variants = ds.arc_variants
        self.device = torch.device(device)
        self.canvas = int(round(ds.seq_len ** 0.5))
        grids, shapes = pad_grids(variants.grids, self.canvas)
        self.grids, self.shapes = torch.from_numpy(grids).to(device), torch.from_numpy(shapes).to(device)
        self.coeffs = dihedral_coeffs(self.device)

        def table(t) -> dict[str, torch.Tensor]:
            return {k: torch.from_numpy(getattr(t, k)).to(device) for k in ("source", "tid", "perm", "offset")}

        self.rows = table(variants.rows)
        self.pool = table(variants.pool) if variants.pool is not None else None
        self.puzzle_ids = torch.from_numpy(ds.puzzle_ids).to(device)  # int32, widened per drawn row
        self.demo_slots = None if ds.demo_slots is None else torch.from_numpy(ds.demo_slots).to(device)
        self.num_samples = len(ds)

    def nbytes(self) -> int:
        """Bytes this set holds on the device: base grids, their shapes, the variant tables and per-row ids."""
        tensors = [self.grids, self.shapes, self.coeffs, self.puzzle_ids, self.demo_slots,
                   *self.rows.values(), *(self.pool.values() if self.pool is not None else ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _render(self, t: dict[str, torch.Tensor], at: torch.Tensor, side: int) -> torch.Tensor:
        """Entries ``at`` of a table, input (side 0) or output (side 1) grid, rendered (the compact table entries
        widened to int64 for the drawn rows only)."""
        offset = t["offset"][at].long()
        return render(self.grids, self.shapes, t["source"][at, side].long(), t["tid"][at].long(), t["perm"][at].long(),
                      offset[:, 0], offset[:, 1], self.canvas, self.coeffs)

    def batch(self, slot_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        from diagnostics.properties.fingerprints import content_checksums
        from etrm.data.dataset import BLANK_PUZZLE_ID
        from etrm.data.tokens import IGNORE_LABEL

        valid = slot_ids >= 0
        safe = slot_ids.clamp(min=0)
        rows = valid[:, None]
        outputs = self._render(self.rows, safe, 1)
        out = {
            "inputs": torch.where(rows, self._render(self.rows, safe, 0), PAD),
            "labels": torch.where(rows & (outputs != PAD), outputs, IGNORE_LABEL),
            "puzzle_id": torch.where(valid, self.puzzle_ids[safe].long(), BLANK_PUZZLE_ID),
            "sample_id": torch.where(valid, slot_ids, -1),
        }
        if self.demo_slots is not None and self.pool is not None:
            slots = torch.where(rows, self.demo_slots[safe].long(), -1)  # [B, K]
            mask = slots >= 0
            flat = slots.clamp(min=0).reshape(-1)
            for key, side in (("demo_inputs", 0), ("demo_outputs", 1)):
                demos = self._render(self.pool, flat, side).reshape(*slots.shape, -1)
                out[key] = torch.where(mask[..., None], demos, PAD)
            out["demo_mask"] = mask
        out.update(content_checksums(out))  # as GridDataset.batch: the slot's checksums, computed on the device
        return out
