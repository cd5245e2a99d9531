"""Which checkpoints a run keeps: the one retention policy (``train.keep_checkpoints``; ``train.keep_best`` joins here).

``checkpoint.pt`` is always the resume point (``etrm.train.checkpoint``), replaced at each save. Besides it:
- ``keep_checkpoints = "every-eval"``: each evaluation also saves, and its checkpoint stays as
  ``checkpoint_step_N.pt`` (upstream's ``checkpoint_every_eval``: a file ``step_N`` per evaluation), so that a series
  of held-out scores can be re-evaluated (``etrm-eval``) and the peak found after the fact;
- ``keep_best``: each evaluation also saves, and the checkpoint whose evaluation scored the best ``train.best_metric``
  so far (held-out exact of the evaluated weights, EMA when on, by default) stays as ``checkpoint_best.pt``, its
  score and step in ``checkpoint_best.json`` (so a resumed run keeps ranking against it). A non-finite score never
  ranks, and no checkpoint is written from non-finite state (the trainer's flush checks it first). ``--resume``
  always continues from ``checkpoint.pt``, never from the best.
Kept files are hard links of the checkpoint just written (a copy where links fail), made atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from etrm.config import TrainConfig

EVERY_EVAL = "every-eval"
STEP_NAME = "checkpoint_step_{step}.pt"
BEST_NAME, BEST_INFO = "checkpoint_best.pt", "checkpoint_best.json"
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
    keep_best: bool = False
    best_metric: str = "exact"

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "Retention":
        return cls(tc.keep_checkpoints, tc.keep_best, tc.best_metric)

    @property
    def saves_at_eval(self) -> bool:
        """Whether every evaluation also writes the checkpoint (the trainer's checkpoint schedule joins it)."""
        return self.keep_checkpoints == EVERY_EVAL or self.keep_best

    def keep(self, run_dir: Path, written: Path, step: int, evaluated: Mapping[str, float] | None) -> list[Path]:
        """After ``written`` (the resume point, at ``step``) was saved: keep what the policy asks for.
        ``evaluated``: the values of the evaluation at this step (None when none ran); returns the files made."""
        made = []
        if self.keep_checkpoints == EVERY_EVAL and evaluated is not None:
            made.append(_link(written, step_path(run_dir, step)))
        if self.keep_best and evaluated is not None:
            value = evaluated.get(self.best_metric)
            best = best_kept(run_dir)
            if value is not None and math.isfinite(value) and (
                    best is None or best.get("metric") != self.best_metric or value > best["value"]):
                made.append(_link(written, Path(run_dir) / BEST_NAME))
                info = Path(run_dir) / BEST_INFO
                info.with_name(BEST_INFO + ".tmp").write_text(json.dumps(
                    {"step": int(step), "metric": self.best_metric, "value": float(value)}))
                os.replace(info.with_name(BEST_INFO + ".tmp"), info)
        return made


def best_kept(run_dir: Path) -> dict | None:
    """The kept best checkpoint's step, metric and score (``checkpoint_best.json``), or None."""
    try:
        return json.loads((Path(run_dir) / BEST_INFO).read_text())
    except (OSError, ValueError):
        return None


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
