"""Few-shot recolouring tasks and upstream's feed, for the own-loop example (our code, shaped like upstream's data).

A puzzle is a secret permutation of the colours 1..C-1 (0 is padding). A sample is one query of a puzzle: a random
sequence and its recoloured labels, with the puzzle's demo pairs beside it, so the rule can only be read from the
demos (the encoder's job). The batch holds what upstream's few-shot loader yields: ``inputs``, ``labels``,
``puzzle_identifiers``, ``demo_inputs``, ``demo_labels``, and no sample id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class TaskConfig:
    puzzles: int = 16
    queries: int = 32         # samples per puzzle
    colours: int = 6          # tokens 0..colours-1; 0 is padding and never recoloured
    seq_len: int = 8
    num_demos: int = 3
    seed: int = 0


class FewShotTasks:
    """Every sample of every puzzle, made once on the host from a seeded generator."""

    def __init__(self, cfg: TaskConfig = TaskConfig()) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        perms = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(cfg.colours - 1,
                                                                                           generator=g)])
                             for _ in range(cfg.puzzles)])                       # [P, C]: colour -> colour
        n = cfg.puzzles * cfg.queries
        self.puzzle = torch.arange(n) % cfg.puzzles
        self.inputs = torch.randint(1, cfg.colours, (n, cfg.seq_len), generator=g)
        self.labels = torch.gather(perms[self.puzzle], 1, self.inputs)
        demo_in = torch.randint(1, cfg.colours, (cfg.puzzles, cfg.num_demos, cfg.seq_len), generator=g)
        self.demo_inputs = demo_in
        self.demo_labels = torch.gather(perms[:, None, :].expand(-1, cfg.num_demos, -1), 2, demo_in)

    def __len__(self) -> int:
        return len(self.puzzle)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        p = self.puzzle[index]
        return {"inputs": self.inputs[index], "labels": self.labels[index], "puzzle_identifiers": p,
                "demo_inputs": self.demo_inputs[p], "demo_labels": self.demo_labels[p]}


def upstream_feed(data: FewShotTasks, batch_size: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> Iterator[dict[str, Tensor]]:
    """Upstream's feed: epochs of shuffled samples, ``batch_size`` fresh ones in every batch position, every step
    (the ones landing in slots that continue are dropped by the ACT wrapper, as upstream's are)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield {k: v.to(device) for k, v in data.batch(order[start:start + batch_size]).items()}
