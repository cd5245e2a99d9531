"""Sudoku generated locally (Sudoku-Extreme lives on a hub this project cannot reach), tokenised as upstream.

A puzzle is a full random solution with cells removed one at a time, in random order, while a solver still finds
exactly one solution (it counts up to 2), until ``givens`` cells remain: fewer givens, harder puzzle. When no further
cell can go, the puzzle is abandoned and a new one drawn. Shuffles that keep validity and uniqueness (upstream's
augmentation): a permutation of digits 1-9, an optional transpose, and permutations of bands, rows within bands,
stacks and columns within stacks.

Tokens (upstream): value + 1, so blank = 1 and digits 1-9 = 2-10, vocab 11, 81 cells, every cell supervised.
Upstream gives every puzzle identifier 0; here 0 is the blank id of padding rows, so every real puzzle shares id 1
(``num_puzzle_ids`` = 2): still one shared embedding row.
"""

from __future__ import annotations

import numpy as np

from etrm.data.dataset import GridDataset

SUDOKU_VOCAB = 11
SUDOKU_SEQ = 81
SUDOKU_PUZZLE_ID = 1
_ALL = 0x3FE  # bits 1..9

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]


def count_solutions(grid: np.ndarray, limit: int = 2) -> int:
    """Number of solutions of a 9x9 grid (0 = blank), counting no further than ``limit``."""
    cells = [int(v) for v in np.asarray(grid).reshape(81)]
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    empty = []
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            empty.append(i)
    count = 0

    def solve(todo: list[int]) -> None:
        nonlocal count
        if not todo:
            count += 1
            return
        # Most constrained cell first.
        best_j, best_free, best_n = -1, 0, 10
        for j, i in enumerate(todo):
            free = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = bin(free).count("1")
            if n < best_n:
                best_j, best_free, best_n = j, free, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        i = todo[best_j]
        rest = todo[:best_j] + todo[best_j + 1:]
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        free = best_free
        while free and count < limit:
            bit = free & -free
            free ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            solve(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit

    solve(empty)
    return count


def is_valid_solution(grid: np.ndarray) -> bool:
    """Every row, column and box holds 1..9 once."""
    g = np.asarray(grid).reshape(9, 9)
    want = set(range(1, 10))
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    return all(set(line) == want for part in (g, g.T, boxes) for line in part.tolist())


def shuffle(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One validity-preserving shuffle applied to a puzzle and its solution alike (upstream's augmentation)."""
    digits = np.concatenate([[0], rng.permutation(np.arange(1, 10))])
    transpose = bool(rng.integers(2))
    rows = np.concatenate([b * 3 + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([s * 3 + rng.permutation(3) for s in rng.permutation(3)])

    def apply(g: np.ndarray) -> np.ndarray:
        g = np.asarray(g).reshape(9, 9)
        g = g.T if transpose else g
        return digits[g[rows][:, cols]].astype(np.uint8)

    return apply(puzzle), apply(solution)


def random_solution(rng: np.random.Generator) -> np.ndarray:
    """A random complete grid: the canonical pattern under a random shuffle (every valid grid class is reachable by
    the later removals' randomness only in part; the puzzles still differ in their givens)."""
    base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)], dtype=np.uint8)
    _, sol = shuffle(base, base, rng)
    return sol


def generate_puzzle(rng: np.random.Generator, givens: int, max_restarts: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle with ``givens`` givens and a unique solution, solution), both [9, 9] uint8 with 0 = blank."""
    if not 17 <= givens <= 81:
        raise ValueError(f"givens must lie in 17..81, got {givens}")
    for _ in range(max_restarts):
        solution = random_solution(rng)
        puzzle = solution.copy().reshape(81)
        filled = 81
        for cell in rng.permutation(81):
            if filled == givens:
                break
            value = puzzle[cell]
            puzzle[cell] = 0
            if count_solutions(puzzle, 2) == 1:
                filled -= 1
            else:
                puzzle[cell] = value
        if filled == givens:
            return puzzle.reshape(9, 9), solution
    raise ValueError(f"could not reach {givens} givens with a unique solution in {max_restarts} tries; "
                     "ask for more givens")


def tokens(grid: np.ndarray) -> np.ndarray:
    """Upstream tokens: value + 1 (blank 1, digits 2..10), flat uint8 [81]."""
    return (np.asarray(grid).reshape(81) + 1).astype(np.uint8)


def build_sudoku(train_puzzles: int, heldout_puzzles: int, givens: int, num_aug: int, seed: int,
                 ) -> tuple[GridDataset, GridDataset, dict]:
    """(train set: base puzzles and ``num_aug`` shuffles each, held-out set: fresh puzzles, info)."""
    train_in, train_out, eval_in, eval_out = [], [], [], []
    seen: set[bytes] = set()
    for split, count in (("train", train_puzzles), ("eval", heldout_puzzles)):
        i = 0
        while (len(train_in) if split == "train" else len(eval_in)) < count * (1 + (num_aug if split == "train"
                                                                                    else 0)):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            i += 1
            puzzle, solution = generate_puzzle(rng, givens)
            if puzzle.tobytes() in seen:
                continue
            seen.add(puzzle.tobytes())
            if split == "eval":
                eval_in.append(tokens(puzzle))
                eval_out.append(tokens(solution))
                continue
            train_in.append(tokens(puzzle))
            train_out.append(tokens(solution))
            for _ in range(num_aug):
                p, s = shuffle(puzzle, solution, rng)
                train_in.append(tokens(p))
                train_out.append(tokens(s))

    def dataset(inputs: list[np.ndarray], outputs: list[np.ndarray]) -> GridDataset:
        x = np.stack(inputs) if inputs else np.zeros((0, SUDOKU_SEQ), np.uint8)
        y = (np.stack(outputs) if outputs else np.zeros((0, SUDOKU_SEQ), np.uint8)).astype(np.int16)
        ds = GridDataset(x, y, np.full(len(x), SUDOKU_PUZZLE_ID, dtype=np.int32))
        ds.validate(SUDOKU_VOCAB)
        return ds

    info = {"line": f"data sudoku: {train_puzzles} puzzles x {1 + num_aug} shuffles for training, "
                    f"{heldout_puzzles} held-out puzzles, {givens} givens each",
            "total_groups": train_puzzles, "mean_puzzle_examples": 1.0}  # upstream's epoch (etrm.train.epochs)
    return dataset(train_in, train_out), dataset(eval_in, eval_out), info
