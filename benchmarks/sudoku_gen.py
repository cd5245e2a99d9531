"""Sudoku generation speed (puzzles/s, one process) by number of givens, and shuffle speed.

`python benchmarks/sudoku_gen.py [seconds per setting]`; each puzzle is checked unique by the counting solver.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from etrm.data.sudoku import generate_puzzle, shuffle


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rng = np.random.default_rng(0)
    for givens in (45, 36, 30, 25, 22):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget:
            generate_puzzle(rng, givens)
            n += 1
        dt = time.perf_counter() - t0
        print(f"givens {givens:>2}: {n / dt:8.1f} puzzles/s ({n} in {dt:.1f} s)")
    p, s = generate_puzzle(rng, 30)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        shuffle(p, s, rng)
        n += 1
    print(f"shuffles: {n / (time.perf_counter() - t0):8.0f} /s")


if __name__ == "__main__":
    main()
