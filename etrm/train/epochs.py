"""Run length in epochs as upstream's ``pretrain.py`` counts them (``train.epochs``, ``train.eval_every_epochs``).

One epoch is ``total_groups * mean_puzzle_examples / global_batch_size`` optimizer steps: upstream's sampler draws,
per group (a task and its augmentations), one puzzle and all of its examples. Under ``refill`` the same number of
steps runs (the sampler then consumes one sample per reset, so an epoch's steps see fewer fresh samples than
upstream's batches; under ``trm`` a whole batch is fed per step, as upstream). ``train.epochs`` replaces a preset's
``train.max_steps`` and ``train.eval_every``; given beside an explicit ``max_steps`` it is refused (``check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from etrm.config import Config
from etrm.errors import UserError

GROUPS, EXAMPLES = "total_groups", "mean_puzzle_examples"  # upstream's dataset.json keys, kept in ``info``


@dataclass(frozen=True)
class EpochPlan:
    """What ``train.epochs`` resolves to: the data's size as upstream counts it and the steps it gives."""

    total_groups: int
    mean_puzzle_examples: float
    batch_size: int
    epochs: int
    eval_every_epochs: int

    @property
    def steps_per_epoch(self) -> float:
        return self.total_groups * self.mean_puzzle_examples / self.batch_size

    @property
    def max_steps(self) -> int:
        """Upstream's ``total_steps``: ``int(epochs * total_groups * mean_puzzle_examples / global_batch_size)``."""
        return max(1, int(self.epochs * self.total_groups * self.mean_puzzle_examples / self.batch_size))

    @property
    def eval_every(self) -> int:
        """Steps between evaluations (``eval_every_epochs`` epochs; 0: only at the end, upstream's default)."""
        if not self.eval_every_epochs:
            return self.max_steps
        return max(1, int(self.eval_every_epochs * self.steps_per_epoch))

    def line(self) -> str:
        every = (f"evaluation every {self.eval_every_epochs} epochs = {self.eval_every} steps"
                 if self.eval_every_epochs else "evaluation at the end")
        return (f"epochs: {self.epochs} x {self.steps_per_epoch:.2f} steps per epoch ({self.total_groups} groups x "
                f"{self.mean_puzzle_examples:.2f} examples per puzzle / batch {self.batch_size}) = {self.max_steps} "
                f"steps; {every}")


def data_size(train_ds: Any) -> tuple[int, float]:
    """(total_groups, mean_puzzle_examples) of a training set: upstream's ``dataset.json`` figures when the set
    carries them (``info``: a TRM data folder, Sudoku, Maze), else counted: a puzzle is a puzzle id, a group is a
    task (``puzzle_task``: a task and its augmented variants), examples are rows."""
    info: Mapping[str, Any] = getattr(train_ds, "info", {}) or {}
    if GROUPS in info and EXAMPLES in info:
        return int(info[GROUPS]), float(info[EXAMPLES])
    puzzles, counts = np.unique(np.asarray(train_ds.puzzle_ids), return_counts=True)
    task = getattr(train_ds, "puzzle_task", None)
    groups = len(np.unique(np.asarray(task)[puzzles])) if task is not None else len(puzzles)
    return int(groups), float(counts.mean()) if len(counts) else 0.0


def plan(cfg: Config, train_ds: Any) -> EpochPlan | None:
    """The epoch plan of ``cfg`` on ``train_ds`` (None when the run counts steps: ``train.epochs = 0``)."""
    tc = cfg.train
    if not tc.epochs:
        return None
    groups, examples = data_size(train_ds)
    return EpochPlan(groups, examples, tc.batch_size, tc.epochs, tc.eval_every_epochs)


def apply(cfg: Config, train_ds: Any) -> EpochPlan | None:
    """Set ``train.max_steps`` and ``train.eval_every`` from ``train.epochs`` (a new run, before its config is
    written: a resumed run keeps the steps it was given). Returns the plan, for the start line."""
    p = plan(cfg, train_ds)
    if p is not None:
        cfg.train.max_steps, cfg.train.eval_every = p.max_steps, p.eval_every
    return p


def check(explicit: Mapping[str, Any]) -> None:
    """Refuse ``train.epochs`` beside an explicit ``train.max_steps`` (``explicit``: what the command line and the
    ``--config`` file set, without the preset's)."""
    train = explicit.get("train") or {}
    if isinstance(train, dict) and train.get("epochs") and "max_steps" in train:
        raise UserError(f"train.epochs={train['epochs']} and train.max_steps={train['max_steps']} are both given; "
                        "the run's length is one of them: drop train.max_steps (--max-steps), or set train.epochs=0")
