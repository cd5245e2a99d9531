"""Maze generation speed: seconds per 1k mazes, wall and CPU time (one process, no cache), at 30x30 (Maze-Hard)
and the CPU preset's 10x10, with the shortest-path lengths produced, the wall share and how many mazes have one
shortest path only.

`python benchmarks/maze_gen.py [mazes per setting]` (default 300; the figure is scaled to 1k). On a shared
machine the wall time swings with the load; the process's CPU time does much less.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from etrm.data.maze import (
    DEFAULT_LOOPS, GOAL, START, WALL, MazeSpec, bfs, generate_split, hard_min_path, neighbours, path_lengths,
)


def shortest_paths(row: np.ndarray, side: int) -> int:
    """How many distinct shortest S-G paths a maze has (counted over the BFS layers from S)."""
    dist = bfs(row != WALL, int(np.flatnonzero(row == START)[0]), side)
    ways = np.zeros(side * side, dtype=object)
    ways[int(np.flatnonzero(row == START)[0])] = 1
    for i in np.argsort(dist, kind="stable"):
        if dist[i] > 0:
            ways[i] = sum(ways[j] for j in neighbours(side)[i] if dist[j] == dist[i] - 1)
    return int(ways[int(np.flatnonzero(row == GOAL)[0])])


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"{count} mazes per setting, braid probability {DEFAULT_LOOPS}, one process")
    for side in (30, 10):
        spec = MazeSpec(side=side, min_path=hard_min_path(side), train=count, test=0)
        t0, c0 = time.perf_counter(), time.process_time()
        inputs, labels = generate_split(spec, 0, count)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        lengths = path_lengths(labels)
        p = np.percentile(lengths, [0, 10, 50, 90, 100]).astype(int)
        unique = np.mean([shortest_paths(row, side) == 1 for row in inputs])
        print(f"{side}x{side} (min path {spec.min_path}): {dt / count * 1000:6.2f} s per 1k mazes "
              f"(CPU time {cpu / count * 1000:.2f} s; {count} in {dt:.2f} s) | path moves min {p[0]} p10 {p[1]} "
              f"median {p[2]} p90 {p[3]} max {p[4]} "
              f"| walls {float((inputs == WALL).mean()):.1%} | unique shortest path {unique:.1%}")


if __name__ == "__main__":
    main()
