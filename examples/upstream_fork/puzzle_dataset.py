"""Few-shot recolouring puzzles and an upstream-shaped loader (our code, upstream's batch shape).

A puzzle is a secret permutation of the colours 2..C-1 (0 is PAD, 1 is EOS). A sample is one query of a puzzle: a
random-length sequence of colours, an EOS, then PAD; its labels are the recoloured sequence, EOS kept, PAD ignored
(-100). The demo pairs beside it carry the rule, so only the encoder can read it. Batches hold upstream's few-shot
keys (``inputs``, ``labels``, ``puzzle_identifiers``, ``demo_inputs``, ``demo_labels``) and no sample id; like
upstream's ``PuzzleDataset`` the loader yields ``(set_name, batch, global_batch_size)`` and drops the last partial
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

Tensor = torch.Tensor
PAD, EOS, IGNORE_LABEL_ID = 0, 1, -100


@dataclass(frozen=True)
class PuzzleDatasetConfig:
    seed: int = 0
    puzzles: int = 12
    queries: int = 24        # samples per puzzle
    colours: int = 7         # token ids 0..colours-1: PAD, EOS, then the recolourable colours
    seq_len: int = 8
    min_len: int = 3         # shortest colour run (the rest is EOS + PAD)
    num_demos: int = 3
    global_batch_size: int = 16


class FewShotPuzzles:
    """Every sample of every puzzle, made once on the host from a seeded generator."""

    def __init__(self, cfg: PuzzleDatasetConfig = PuzzleDatasetConfig()) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        k = cfg.colours - 2
        self.perms = torch.stack([torch.cat([torch.tensor([PAD, EOS]), 2 + torch.randperm(k, generator=g)])
                                  for _ in range(cfg.puzzles)])                         # [P, C]
        n = cfg.puzzles * cfg.queries
        self.puzzle = torch.arange(n) % cfg.puzzles
        self.inputs = self._sequences(n, g)
        self.labels = self._recolour(self.inputs, self.puzzle)
        demo_in = self._sequences(cfg.puzzles * cfg.num_demos, g).view(cfg.puzzles, cfg.num_demos, cfg.seq_len)
        self.demo_inputs = demo_in
        self.demo_labels = torch.stack([torch.gather(self.perms[p].expand(cfg.num_demos, -1), 1, demo_in[p])
                                        for p in range(cfg.puzzles)])

    def _sequences(self, n: int, g: torch.Generator) -> Tensor:
        c = self.cfg
        seq = torch.randint(2, c.colours, (n, c.seq_len), generator=g)
        length = torch.randint(c.min_len, c.seq_len, (n, 1), generator=g)
        pos = torch.arange(c.seq_len)[None]
        return torch.where(pos < length, seq, torch.where(pos == length, EOS, PAD))

    def _recolour(self, inputs: Tensor, puzzle: Tensor) -> Tensor:
        out = torch.gather(self.perms[puzzle], 1, inputs)
        return torch.where(inputs == PAD, IGNORE_LABEL_ID, out)

    def __len__(self) -> int:
        return len(self.puzzle)

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        p = self.puzzle[index]
        return {"inputs": self.inputs[index], "labels": self.labels[index], "puzzle_identifiers": p,
                "demo_inputs": self.demo_inputs[p], "demo_labels": self.demo_labels[p]}


class PuzzleDataset:
    """Upstream's training feed: shuffled epochs, full global batches only (the partial tail is dropped), a fresh
    sample in every batch position every step."""

    def __init__(self, data: FewShotPuzzles, device: torch.device | str = "cpu") -> None:
        self.data, self.device = data, device

    def __iter__(self) -> Iterator[tuple[str, dict[str, Tensor], int]]:
        bs = self.data.cfg.global_batch_size
        g = torch.Generator().manual_seed(self.data.cfg.seed)
        while True:
            order = torch.randperm(len(self.data), generator=g)
            for start in range(0, len(order) - bs + 1, bs):   # a partial last batch is dropped
                batch = self.data.batch(order[start:start + bs])
                yield "all", {k: v.to(self.device) for k, v in batch.items()}, bs

    def test_batches(self) -> Iterator[tuple[str, dict[str, Tensor], int]]:
        """One pass over every sample in order; the last batch padded with PAD inputs, ignored labels and the
        blank puzzle, as upstream's test split is."""
        bs, n = self.data.cfg.global_batch_size, len(self.data)
        for start in range(0, n, bs):
            index = torch.arange(start, min(start + bs, n))
            batch = self.data.batch(index)
            pad = bs - len(index)
            if pad:
                batch = {k: torch.cat([v, torch.full((pad, *v.shape[1:]), IGNORE_LABEL_ID if k == "labels" else 0,
                                                     dtype=v.dtype)]) for k, v in batch.items()}
            yield "all", {k: v.to(self.device) for k, v in batch.items()}, bs
