"""How an ARC row is made from a base grid: a ``Variant`` (a dihedral transform after a colour permutation, and its
inverse), ``encode_at`` (the grid placed on the canvas at a translation offset), and the tables that record, for a
training set, which base grids and variant made each row (``VariantTable``, ``ArcVariants``). ``etrm.data.arc``
builds them, ``etrm.data.arc_rows`` renders rows from them on the host, ``etrm.data.arc_device`` on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etrm.data.families import dihedral, inverse_dihedral
from etrm.data.tokens import COLOUR_OFFSET, EOS, PAD

IDENTITY_PERM = tuple(range(10))


@dataclass(frozen=True)
class Variant:
    """A dihedral transform ``tid`` after the colour permutation ``perm`` (``perm[c]`` is the new colour of ``c``)."""

    tid: int = 0
    perm: tuple[int, ...] = IDENTITY_PERM

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(dihedral(np.asarray(self.perm, dtype=np.uint8)[np.asarray(grid)], self.tid))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Map a grid in this variant's frame back to the original task's frame."""
        return invert_grid(grid, self.tid, np.asarray(self.perm))

    @property
    def name(self) -> str:
        return f"t{self.tid}|" + "".join(map(str, self.perm))


def invert_grid(grid: np.ndarray, tid: int, perm: np.ndarray) -> np.ndarray:
    """Undo ``dihedral(perm[g], tid)``: the inverse transform, then the inverse colour permutation."""
    inv = np.argsort(np.asarray(perm)).astype(np.uint8)
    grid = np.asarray(grid, dtype=np.int64)
    return np.ascontiguousarray(inv[dihedral(grid, inverse_dihedral(int(tid)))])


def encode_at(grid: np.ndarray, canvas: int, top: int = 0, left: int = 0) -> np.ndarray:
    """``encode_grid`` with the grid (and its EOS edges) shifted down by ``top`` and right by ``left``."""
    h, w = grid.shape
    if top + h > canvas or left + w > canvas:
        raise ValueError(f"grid of {h}x{w} at ({top}, {left}) does not fit the {canvas}x{canvas} canvas")
    out = np.full((canvas, canvas), PAD, dtype=np.uint8)
    out[top:top + h, left:left + w] = grid.astype(np.uint8) + COLOUR_OFFSET
    if top + h < canvas:
        out[top + h, left:left + w] = EOS
    if left + w < canvas:
        out[top:top + h, left + w] = EOS
    if top + h < canvas and left + w < canvas:
        out[top + h, left + w] = EOS
    return out.reshape(-1)


@dataclass
class VariantTable:
    """How every row (or demo-pool entry) was made from the base grids: base input and output grid, dihedral id,
    colour permutation and translation. ``etrm.data.arc_device`` renders rows from it on the device."""

    source: np.ndarray  # [N, 2] int32 indices into the base grids (input, output)
    tid: np.ndarray  # [N] int8
    perm: np.ndarray  # [N, 10] uint8
    offset: np.ndarray  # [N, 2] uint8 (top, left; a canvas is at most 255 cells a side)


@dataclass
class ArcVariants:
    """A training set as base grids plus how each row (and, ETRM, each demo-pool entry) was made from them."""

    grids: list[np.ndarray]
    rows: VariantTable
    pool: VariantTable | None = None

