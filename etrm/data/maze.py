"""Maze-Hard generated locally (upstream's ``maze-30x30-hard-1k`` lives on a hub this project cannot reach).

Tokens (upstream's charset ``"# SGo"`` at 1..5): wall 1, open 2, start 3, goal 4, path 5; PAD 0 unused, vocab 6, one
token per cell (seq = side * side, 900 at 30x30), every cell supervised. The input holds walls, open cells, S and G;
the label is the input with the cells of one shortest S-G path (S and G excluded) turned into path tokens.

A maze is carved, then braided, then given endpoints (see docs/datasets.md for the measured path lengths):
- carve: a random growing tree over the cell grid; a wall cell is opened only while exactly one of its 4 neighbours
  is open, so the open cells form a tree of one-cell corridors (irregular, no fixed lattice);
- braid: each remaining wall cell that touches at least two open cells is opened with probability ``loops``, which
  makes cycles, hence alternative (sometimes equally short) routes;
- endpoints: S uniform over the open cells, G uniform over the open cells at BFS distance >= ``min_path`` moves
  from S (a new S when there are none, a new maze after a few tries). "Hard" is that threshold: upstream's Maze-Hard
  keeps instances whose shortest path is longer than 110 (HRM paper); here ``HARD_MIN_PATH`` = 110 moves at 30x30,
  scaled with the side for smaller grids (``hard_min_path``).
The label's path is one shortest path, picked by a fixed rule (walk back from G, always to the first neighbour in
up, left, down, right order that is one move nearer S), so equal mazes get equal labels. Shortest paths need not be
unique: evaluation also scores a prediction correct when it is *a* valid shortest path (``valid_shortest_path``).

Every maze comes from its own generator ``default_rng([seed, split, i])``: deterministic, and maze i does not depend
on how many were asked for. Upstream gives every maze identifier 0; here 0 is the blank id of padding rows, so every
real maze shares id 1 (``num_puzzle_ids`` = 2), as Sudoku.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from etrm.data.dataset import GridDataset
from etrm.data.families import dihedral

WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
MAZE_VOCAB = 6
MAZE_PUZZLE_ID = 1
PAPER_SIDE = 30
HARD_MIN_PATH = 110  # moves, at PAPER_SIDE x PAPER_SIDE (upstream's Maze-Hard filter)
DEFAULT_LOOPS = 0.03  # braid probability: more loops, shorter paths (docs/datasets.md)
CACHE_ENV = "ETRM_DATA_CACHE"  # where generated sets are cached; default ./data/cache (git-ignored)
GENERATOR_VERSION = 1  # bump when the generator's output changes, so that old caches are not reused
_ENDPOINT_TRIES = 8
_MAX_MAZES = 200
_PERMS = list(itertools.permutations(range(4)))


def hard_min_path(side: int) -> int:
    """The hardness threshold for a ``side`` x ``side`` maze: 110 moves at 30x30, scaled with the area (a depth-first
    carve fills the grid, so its path lengths grow about with the number of cells): 12 at 10x10."""
    return max(1, round(HARD_MIN_PATH * side * side / (PAPER_SIDE * PAPER_SIDE)))


@dataclass(frozen=True)
class MazeSpec:
    """What a maze set is: grid side, shortest-path threshold (moves), braid probability, sizes and seed."""

    side: int = PAPER_SIDE
    min_path: int = HARD_MIN_PATH
    loops: float = DEFAULT_LOOPS
    train: int = 1000
    test: int = 1000
    seed: int = 0

    def key(self) -> str:
        """A short digest naming the cached file of this spec (and generator version)."""
        text = repr(sorted({**asdict(self), "version": GENERATOR_VERSION}.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def neighbours(side: int) -> list[list[int]]:
    """Flat-index 4-neighbours of every cell, in up, left, down, right order (memoised: pure in ``side``; callers
    only read the lists)."""
    out = []
    for i in range(side * side):
        r, c = divmod(i, side)
        out.append([j for ok, j in ((r > 0, i - side), (c > 0, i - 1), (r < side - 1, i + side),
                                    (c < side - 1, i + 1)) if ok])
    return out


def carve(rng: np.random.Generator, side: int, loops: float) -> np.ndarray:
    """Open cells of a carved, braided maze: flat bool [side * side]."""
    nb = neighbours(side)
    n = side * side
    is_open = [False] * n
    touching = [0] * n  # open 4-neighbours of each cell
    order = rng.integers(len(_PERMS), size=n).tolist()  # the order in which each opened cell offers its neighbours

    def open_cell(cell: int) -> list[int]:
        is_open[cell] = True
        around = nb[cell]
        for m in around:
            touching[m] += 1
        return [around[t] for t in _PERMS[order[cell]] if t < len(around) and not is_open[around[t]]]

    stack = open_cell(int(rng.integers(n)))
    while stack:  # depth first: always the newest candidate, hence long winding corridors
        cell = stack.pop()
        if not is_open[cell] and touching[cell] == 1:  # touching only grows: a cell refused once stays refused
            stack.extend(open_cell(cell))
    out = np.array(is_open)
    if loops > 0:
        out |= (~out) & (np.array(touching) >= 2) & (rng.random(n) < loops)
    return out


def bfs(is_open: np.ndarray, start: int, side: int) -> np.ndarray:
    """BFS distance in moves from ``start`` over open cells, -1 where unreachable: int32 [side * side]."""
    nb = neighbours(side)
    open_ = is_open.tolist()
    dist = [-1] * (side * side)
    dist[start] = 0
    queue = deque([start])
    while queue:
        i = queue.popleft()
        d = dist[i] + 1
        for j in nb[i]:
            if open_[j] and dist[j] < 0:
                dist[j] = d
                queue.append(j)
    return np.array(dist, dtype=np.int32)


def trace_back(dist: np.ndarray, goal: int, side: int) -> list[int]:
    """Cells strictly between start and ``goal`` on the shortest path the fixed rule picks (up, left, down, right)."""
    nb = neighbours(side)
    cells, i = [], goal
    while dist[i] > 1:
        i = next(j for j in nb[i] if dist[j] == dist[i] - 1)
        cells.append(i)
    return cells[::-1]


def generate_maze(rng: np.random.Generator, side: int, min_path: int, loops: float = DEFAULT_LOOPS,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(input, label) token grids [side, side] uint8 of one maze whose S-G shortest path is >= ``min_path`` moves."""
    if side < 2:
        raise ValueError(f"a maze needs a side of at least 2, got {side}")
    for _ in range(_MAX_MAZES):
        is_open = carve(rng, side, loops)
        cells = np.flatnonzero(is_open)
        for _ in range(_ENDPOINT_TRIES):
            start = int(cells[rng.integers(len(cells))])
            dist = bfs(is_open, start, side)
            far = np.flatnonzero(dist >= max(min_path, 1))
            if len(far):
                goal = int(far[rng.integers(len(far))])
                grid = np.where(is_open, OPEN, WALL).astype(np.uint8)
                grid[start], grid[goal] = START, GOAL
                label = grid.copy()
                label[trace_back(dist, goal, side)] = PATH
                return grid.reshape(side, side), label.reshape(side, side)
    raise ValueError(f"no {side}x{side} maze with a shortest path of {min_path} moves or more in {_MAX_MAZES} tries; "
                     "lower data.min_path")


def valid_shortest_path(inputs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Per row: the prediction keeps every wall, S and G, marks only open cells as path, and its path cells form an
    S-G route as short as the label's (so exactly a shortest path, though maybe not the label's). bool [B]."""
    inputs, labels, preds = (np.asarray(a).reshape(len(a), -1) for a in (inputs, labels, preds))
    out = np.zeros(len(inputs), dtype=bool)
    side = int(round(inputs.shape[1] ** 0.5))
    for b in range(len(inputs)):
        x, p = inputs[b], preds[b]
        free = x == OPEN
        if not (np.array_equal(p[~free], x[~free]) and np.isin(p[free], (OPEN, PATH)).all()):
            continue
        moves = int((labels[b] == PATH).sum()) + 1
        if int((p == PATH).sum()) != moves - 1:
            continue
        start, goal = int(np.flatnonzero(x == START)[0]), int(np.flatnonzero(x == GOAL)[0])
        # G reached through path cells only, with exactly moves - 1 of them: a route of exactly ``moves`` moves.
        out[b] = bfs((p == PATH) | (x == GOAL), start, side)[goal] == moves
    return out


VALID_PATH_KEY = "maze.valid_path"  # the eval figure's name (``halt.`` + it: at the would-halt step)


class MazeScorer:
    """Evaluation's extra per-row score on a maze set: ``maze.valid_path`` (a valid shortest path, any of them)."""

    names = (VALID_PATH_KEY,)

    def __call__(self, inputs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> dict[str, np.ndarray]:
        return {VALID_PATH_KEY: valid_shortest_path(inputs, labels, preds)}


def generate_split(spec: MazeSpec, split: int, count: int, avoid: set[bytes] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct mazes of one split (0 train, 1 test), none of whose inputs is in ``avoid``: uint8 [N, S]."""
    seen = set(avoid or ())
    xs, ys = [], []
    i = 0
    while len(xs) < count:
        rng = np.random.default_rng([spec.seed, split, i])
        i += 1
        x, y = generate_maze(rng, spec.side, spec.min_path, spec.loops)
        if x.tobytes() in seen:
            continue
        seen.add(x.tobytes())
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    empty = np.zeros((0, spec.side * spec.side), np.uint8)
    return (np.stack(xs) if xs else empty), (np.stack(ys) if ys else empty)


def cache_dir() -> Path:
    """Where generated sets are cached: ``$ETRM_DATA_CACHE`` or ./data/cache (git-ignored)."""
    return Path(os.environ.get(CACHE_ENV) or Path("data") / "cache")


def load_or_generate(spec: MazeSpec) -> tuple[dict[str, np.ndarray], bool]:
    """The train and test arrays of ``spec`` from the cache, generated and cached when missing or unreadable;
    returns (arrays, came from the cache)."""
    path = cache_dir() / f"maze-{spec.key()}.npz"
    names = ("train_inputs", "train_labels", "test_inputs", "test_labels")
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in names}
            if len(arrays["train_inputs"]) == spec.train and len(arrays["test_inputs"]) == spec.test:
                return arrays, True
        except (OSError, ValueError, KeyError):
            pass  # a broken or partial file: generate again and replace it
    train_x, train_y = generate_split(spec, 0, spec.train)
    test_x, test_y = generate_split(spec, 1, spec.test, avoid={r.tobytes() for r in train_x})
    arrays = dict(zip(names, (train_x, train_y, test_x, test_y)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    except OSError:
        pass  # a read-only place: the set is still built, only not kept
    return arrays, False


def augment(inputs: np.ndarray, labels: np.ndarray, num_aug: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Each maze followed by its first ``num_aug`` non-identity dihedral variants (upstream's ``aug`` gives all 7)."""
    if not 0 <= num_aug <= 7:
        raise ValueError(f"a maze has 7 non-identity dihedral variants; num_aug must lie in 0..7, got {num_aug}")
    xs, ys = [], []
    for x, y in zip(inputs, labels):
        for t in range(num_aug + 1):
            xs.append(dihedral(x.reshape(side, side), t).reshape(-1))
            ys.append(dihedral(y.reshape(side, side), t).reshape(-1))
    return np.stack(xs), np.stack(ys)


def path_lengths(labels: np.ndarray) -> np.ndarray:
    """Shortest-path length in moves of each label row (path cells + 1)."""
    return (np.asarray(labels) == PATH).sum(-1) + 1


def build_maze(spec: MazeSpec, num_aug: int = 0) -> tuple[GridDataset, GridDataset, dict]:
    """(train set: mazes and ``num_aug`` dihedral variants each, test set: fresh mazes, info with a summary line)."""
    arrays, cached = load_or_generate(spec)
    train_x, train_y = augment(arrays["train_inputs"], arrays["train_labels"], num_aug, spec.side)

    def dataset(x: np.ndarray, y: np.ndarray) -> GridDataset:
        ds = GridDataset(x.astype(np.uint8), y.astype(np.int16), np.full(len(x), MAZE_PUZZLE_ID, dtype=np.int32))
        ds.validate(MAZE_VOCAB)
        return ds

    train_ds, test_ds = dataset(train_x, train_y), dataset(arrays["test_inputs"], arrays["test_labels"])
    test_ds.row_scorer = MazeScorer()
    lengths = path_lengths(arrays["test_labels"])
    variants = f" x {1 + num_aug} (itself and {num_aug} dihedral variants)" if num_aug else ""
    info = {"line": f"data maze: {spec.side}x{spec.side}, shortest path >= {spec.min_path} moves, {spec.train} mazes"
                    f"{variants} for training, {spec.test} test mazes (test path length median "
                    f"{int(np.median(lengths)) if len(lengths) else 0}, max {int(lengths.max()) if len(lengths) else 0}"
                    f"; {'cached' if cached else 'generated, cached'} in {cache_dir()})",
            "total_groups": spec.train, "mean_puzzle_examples": 1.0}  # upstream's epoch (etrm.train.epochs)
    return train_ds, test_ds, info
