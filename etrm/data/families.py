"""Transformation families for the generated few-shot grid tasks.

A family draws a random rule (plain JSON-able values) once per task and applies it to every input grid of that task.
Each family also says how much larger its output can be than its input, so input sizes are drawn to fit the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

Rule = dict[str, Any]
Grid = np.ndarray

# Dihedral transform ids, as upstream: identity, rot90, rot180, rot270, flip lr, flip ud, transpose, anti-transpose.
NUM_DIHEDRAL = 8
_DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral(grid: Grid, tid: int) -> Grid:
    """Apply dihedral transform ``tid`` (0..7, upstream's numbering) to a 2-D grid; returns a new array."""
    if tid == 0:
        out = grid
    elif tid in (1, 2, 3):
        out = np.rot90(grid, k=tid)
    elif tid == 4:
        out = np.fliplr(grid)
    elif tid == 5:
        out = np.flipud(grid)
    elif tid == 6:
        out = grid.T
    elif tid == 7:
        out = np.fliplr(np.rot90(grid, k=1))
    else:
        raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")
    return np.ascontiguousarray(out).copy()


def inverse_dihedral(tid: int) -> int:
    """The transform id that undoes ``tid``."""
    return _DIHEDRAL_INVERSE[tid]


def random_grid(rng: np.random.Generator, h: int, w: int, colours: list[int] | None = None,
                density: tuple[float, float] = (0.15, 0.5)) -> Grid:
    """A sparse grid: background 0 and a random fraction of cells in a few colours (default: 1-4 of 1..9)."""
    if colours is None:
        colours = list(rng.choice(np.arange(1, 10), size=int(rng.integers(1, 5)), replace=False))
    p = rng.uniform(*density)
    mask = rng.random((h, w)) < p
    if not mask.any():
        mask[rng.integers(h), rng.integers(w)] = True
    grid = np.zeros((h, w), dtype=np.uint8)
    grid[mask] = rng.choice(np.asarray(colours, dtype=np.uint8), size=int(mask.sum()))
    return grid


def _colours_except(rng: np.random.Generator, excluded: list[int], k: int) -> list[int]:
    pool = np.array([c for c in range(1, 10) if c not in excluded])
    return [int(c) for c in rng.choice(pool, size=min(k, len(pool)), replace=False)]


def _default_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    return random_grid(rng, h, w)


def _no_scale(rule: Rule) -> tuple[int, int]:
    return (1, 1)


@dataclass(frozen=True)
class Family:
    """One transformation family: a rule sampler, the rule's action on a grid, and its input sampler."""

    name: str
    sample_rule: Callable[[np.random.Generator], Rule]
    apply: Callable[[Rule, Grid], Grid]
    sample_input: Callable[[np.random.Generator, Rule, int, int], Grid] = _default_input
    scale: Callable[[Rule], tuple[int, int]] = _no_scale  # output is at most (sy*h, sx*w) or its transpose

    def max_input_shape(self, rule: Rule, canvas: int, max_grid: int) -> tuple[int, int]:
        """Largest (h, w) whose output under ``rule`` still fits the canvas, capped at ``max_grid``."""
        sy, sx = self.scale(rule)
        return min(max_grid, canvas // sy), min(max_grid, canvas // sx)

    def sample_pair(self, rng: np.random.Generator, rule: Rule, canvas: int, min_grid: int,
                    max_grid: int) -> tuple[Grid, Grid]:
        """Draw an input of a random size that fits, and its output under ``rule``."""
        mh, mw = self.max_input_shape(rule, canvas, max_grid)
        if mh < 1 or mw < 1:
            raise ValueError(f"family {self.name!r} with rule {rule} cannot fit a {canvas}x{canvas} canvas")
        h = int(rng.integers(min(min_grid, mh), mh + 1))
        w = int(rng.integers(min(min_grid, mw), mw + 1))
        grid = self.sample_input(rng, rule, h, w)
        return grid, self.apply(rule, grid).astype(np.uint8)


# --- dihedral / transpose -------------------------------------------------------------------------------------------

def _dihedral_rule(rng: np.random.Generator) -> Rule:
    return {"tid": int(rng.integers(1, 6))}  # rotations and flips; the transposes are their own family


def _transpose_rule(rng: np.random.Generator) -> Rule:
    return {"tid": int(rng.choice([6, 7]))}


def _apply_dihedral(rule: Rule, grid: Grid) -> Grid:
    return dihedral(grid, rule["tid"])


# --- colour map ------------------------------------------------------------------------------------------------------

def _colour_map_rule(rng: np.random.Generator) -> Rule:
    while True:  # a derangement of 1..9, so every coloured cell changes colour
        perm = rng.permutation(np.arange(1, 10))
        if not np.any(perm == np.arange(1, 10)):
            return {"perm": [0] + [int(c) for c in perm]}


def _apply_colour_map(rule: Rule, grid: Grid) -> Grid:
    return np.asarray(rule["perm"], dtype=np.uint8)[grid]


# --- translation -----------------------------------------------------------------------------------------------------

def _translate_rule(rng: np.random.Generator) -> Rule:
    while True:
        dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
        if dy or dx:
            return {"dy": dy, "dx": dx, "wrap": bool(rng.integers(2))}


def _apply_translate(rule: Rule, grid: Grid) -> Grid:
    dy, dx = rule["dy"], rule["dx"]
    if rule["wrap"]:
        return np.roll(grid, (dy, dx), axis=(0, 1))
    h, w = grid.shape
    out = np.zeros_like(grid)
    src = grid[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


# --- gravity ---------------------------------------------------------------------------------------------------------

GRAVITY_DIRECTIONS = ("down", "up", "right", "left")


def _gravity_rule(rng: np.random.Generator) -> Rule:
    return {"direction": GRAVITY_DIRECTIONS[int(rng.integers(4))]}


def _fall_down(grid: Grid) -> Grid:
    out = np.zeros_like(grid)
    h = grid.shape[0]
    for j in range(grid.shape[1]):
        cells = grid[:, j][grid[:, j] != 0]
        out[h - len(cells):, j] = cells
    return out


def _apply_gravity(rule: Rule, grid: Grid) -> Grid:
    d = rule["direction"]
    if d == "down":
        return _fall_down(grid)
    if d == "up":
        return np.flipud(_fall_down(np.flipud(grid)))
    if d == "right":
        return _fall_down(grid.T).T.copy()
    return np.fliplr(_fall_down(np.fliplr(grid).T).T).copy()


# --- recolour one colour ---------------------------------------------------------------------------------------------

def _recolour_rule(rng: np.random.Generator) -> Rule:
    src, dst = (int(c) for c in rng.choice(np.arange(1, 10), size=2, replace=False))
    return {"src": src, "dst": dst}


def _recolour_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    colours = [rule["src"]] + _colours_except(rng, [rule["src"], rule["dst"]], int(rng.integers(0, 3)))
    grid = random_grid(rng, h, w, colours)
    if not np.any(grid == rule["src"]):
        grid[rng.integers(h), rng.integers(w)] = rule["src"]
    return grid


def _apply_recolour(rule: Rule, grid: Grid) -> Grid:
    out = grid.copy()
    out[grid == rule["src"]] = rule["dst"]
    return out


# --- recolour objects by size ----------------------------------------------------------------------------------------

def components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask: 0 outside, 1..n inside."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    n = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not labels[i, j]:
                n += 1
                labels[i, j] = n
                stack = [(i, j)]
                while stack:
                    y, x = stack.pop()
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = n
                            stack.append((ny, nx))
    return labels


def _by_size_rule(rng: np.random.Generator) -> Rule:
    return {"palette": [int(c) for c in rng.choice(np.arange(1, 10), size=3, replace=False)]}


def _by_size_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    return random_grid(rng, h, w, _colours_except(rng, rule["palette"], 1), density=(0.2, 0.45))


def _apply_by_size(rule: Rule, grid: Grid) -> Grid:
    labels = components(grid != 0)
    sizes = np.bincount(labels.ravel())
    size_of_cell = sizes[labels]
    palette = np.asarray(rule["palette"], dtype=np.uint8)
    out = palette[np.minimum(size_of_cell, 3) - 1]
    return np.where(labels > 0, out, 0).astype(np.uint8)


# --- upscale ---------------------------------------------------------------------------------------------------------

def _upscale_rule(rng: np.random.Generator) -> Rule:
    fy, fx = [(2, 2), (2, 1), (1, 2)][int(rng.integers(3))]
    return {"fy": fy, "fx": fx}


def _apply_upscale(rule: Rule, grid: Grid) -> Grid:
    return np.repeat(np.repeat(grid, rule["fy"], axis=0), rule["fx"], axis=1)


def _upscale_scale(rule: Rule) -> tuple[int, int]:
    return (rule["fy"], rule["fx"])


# --- crop to object --------------------------------------------------------------------------------------------------

def _crop_rule(rng: np.random.Generator) -> Rule:
    return {"colour": int(rng.integers(1, 10))}


def _crop_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    c = rule["colour"]
    grid = random_grid(rng, h, w, _colours_except(rng, [c], 2), density=(0.0, 0.2))
    bh = int(rng.integers(1, max(1, h - 1) + 1))
    bw = int(rng.integers(1, max(1, w - 1) + 1))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    block = rng.random((bh, bw)) < 0.7
    block[0, 0] = block[-1, -1] = True  # the object spans its whole box
    grid[y:y + bh, x:x + bw][block] = c
    return grid


def _apply_crop(rule: Rule, grid: Grid) -> Grid:
    ys, xs = np.nonzero(grid == rule["colour"])
    if len(ys) == 0:
        return grid.copy()
    return grid[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()


# --- fill enclosed ---------------------------------------------------------------------------------------------------

def _fill_rule(rng: np.random.Generator) -> Rule:
    return {"colour": int(rng.integers(1, 10))}


def _fill_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    grid = np.zeros((h, w), dtype=np.uint8)
    if h < 3 or w < 3:
        return random_grid(rng, h, w, _colours_except(rng, [rule["colour"]], 2))
    for colour in _colours_except(rng, [rule["colour"]], int(rng.integers(1, 3))):
        rh, rw = int(rng.integers(3, h + 1)), int(rng.integers(3, w + 1))
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        grid[y, x:x + rw] = grid[y + rh - 1, x:x + rw] = colour
        grid[y:y + rh, x] = grid[y:y + rh, x + rw - 1] = colour
    return grid


def _apply_fill(rule: Rule, grid: Grid) -> Grid:
    empty = grid == 0
    outside = np.zeros_like(empty)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = empty[0, :], empty[-1, :], empty[:, 0], empty[:, -1]
    while True:  # flood the background from the border
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= empty
        if np.array_equal(grown, outside):
            break
        outside = grown
    out = grid.copy()
    out[empty & ~outside] = rule["colour"]
    return out


# --- mirror-concatenate ----------------------------------------------------------------------------------------------

def _mirror_rule(rng: np.random.Generator) -> Rule:
    return {"axis": int(rng.integers(2))}


def _apply_mirror(rule: Rule, grid: Grid) -> Grid:
    axis = rule["axis"]
    return np.concatenate([grid, np.flip(grid, axis=axis)], axis=axis)


def _mirror_scale(rule: Rule) -> tuple[int, int]:
    return (2, 1) if rule["axis"] == 0 else (1, 2)


# --- draw border -----------------------------------------------------------------------------------------------------

def _border_rule(rng: np.random.Generator) -> Rule:
    return {"colour": int(rng.integers(1, 10))}


def _border_input(rng: np.random.Generator, rule: Rule, h: int, w: int) -> Grid:
    return random_grid(rng, h, w, _colours_except(rng, [rule["colour"]], int(rng.integers(1, 4))))


def _apply_border(rule: Rule, grid: Grid) -> Grid:
    out = grid.copy()
    c = rule["colour"]
    out[0, :] = out[-1, :] = c
    out[:, 0] = out[:, -1] = c
    return out


FAMILIES: Mapping[str, Family] = MappingProxyType({
    f.name: f
    for f in (
        Family("dihedral", _dihedral_rule, _apply_dihedral),
        Family("transpose", _transpose_rule, _apply_dihedral),
        Family("colour_map", _colour_map_rule, _apply_colour_map),
        Family("translate", _translate_rule, _apply_translate),
        Family("gravity", _gravity_rule, _apply_gravity),
        Family("recolour", _recolour_rule, _apply_recolour, _recolour_input),
        Family("recolour_by_size", _by_size_rule, _apply_by_size, _by_size_input),
        Family("upscale", _upscale_rule, _apply_upscale, scale=_upscale_scale),
        Family("crop_object", _crop_rule, _apply_crop, _crop_input),
        Family("fill_enclosed", _fill_rule, _apply_fill, _fill_input),
        Family("mirror_concat", _mirror_rule, _apply_mirror, scale=_mirror_scale),
        Family("draw_border", _border_rule, _apply_border, _border_input),
    )
})
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """Look a family up by name; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILY_NAMES)}") from None
