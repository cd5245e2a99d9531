"""Which checkpoints a run keeps: the one retention policy (``train.keep_checkpoints``; ``train.keep_best`` joins here).

``checkpoint.pt`` is always the resume point (``etrm.train.checkpoint``), replaced at each save. Besides it:
- ``keep_checkpoints = "every-eval"``: each evaluation also saves, and its checkpoint stays as
  ``checkpoint_step_N.pt`` (upstream's ``checkpoint_every_eval``: a file ``step_N`` per evaluation), so that a series
  of held-out scores can be re-evaluated (``etrm-eval``) and the peak found after the fact;
- ``keep_best`` (the findings issue, not yet built) will keep ``checkpoint_best.pt`` by ``train.best_metric``: it
  belongs in ``Retention.keep``, which already sees every saved checkpoint with its evaluation's values.
Kept files are hard links of the checkpoint just written (a copy where links fail), made atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from etrm.config import TrainConfig

EVERY_EVAL = "every-eval"
STEP_NAME = "checkpoint_step_{step}.pt"
_STEP_RE = re.compile(r"^checkpoint_step_(\d+)\.pt$")


def step_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint kept for the evaluation at ``step`` lies."""
    return Path(run_dir) / STEP_NAME.format(step=int(step))


def kept_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's kept per-evaluation checkpoints, in step order."""
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


@dataclass
class Retention:
    """A run's retention policy (from ``TrainConfig``)."""

    keep_checkpoints: str = "last"

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "Retention":
        return cls(tc.keep_checkpoints)

    @property
    def saves_at_eval(self) -> bool:
        """Whether every evaluation also writes the checkpoint (the trainer's checkpoint schedule joins it)."""
        return self.keep_checkpoints == EVERY_EVAL

    def keep(self, run_dir: Path, written: Path, step: int, evaluated: Mapping[str, float] | None) -> list[Path]:
        """After ``written`` (the resume point, at ``step``) was saved: keep what the policy asks for.
        ``evaluated``: the values of the evaluation at this step (None when none ran); returns the files made."""
        made = []
        if self.saves_at_eval and evaluated is not None:
            made.append(_link(written, step_path(run_dir, step)))
        return made


def _link(src: Path, dst: Path) -> Path:
    tmp = dst.with_name(dst.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst
