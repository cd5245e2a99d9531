"""TensorBoard scalars of a traced run (``--tensorboard``), so that it also shows in a tool users already have open.

Written at flush time only, never from the training step: each flush becomes one point per registered figure at its
last step, the figure over the flushed rows (a ratio of their sums, so the point is exact for those steps).
Evaluations become ``eval/*`` points. The per-step truth stays in ``trace.sqlite``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from diagnostics.trace import figures

TENSORBOARD_DIR = "tensorboard"

def flush_scalars(rows: Sequence[Mapping[str, float]], mode: str | None = None) -> dict[str, float]:
    """The scalars of one flush: ``train/<figure>`` for every registered figure defined over the rows
    (``diagnostics.trace.figures``; a figure whose denominator is 0 over the flush gets no point)."""
    return {f"train/{name}": v for name, v in figures.of_rows(rows, mode).items() if math.isfinite(v)}


class TensorBoardScalars:
    """A ``SummaryWriter`` into ``log_dir`` fed with flushed trace rows and evaluation results."""

    def __init__(self, log_dir: str | Path, mode: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (a dependency)

        self.log_dir = Path(log_dir)
        self.mode = mode
        self._make = lambda: SummaryWriter(log_dir=str(self.log_dir))
        self.writer: Any = None

    def _w(self) -> Any:
        if self.writer is None:
            self.writer = self._make()
        return self.writer

    def write_rows(self, rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """One point per scalar at the flush's last step; returns what was written."""
        if not rows:
            return {}
        step = int(max(r["step"] for r in rows))
        values = flush_scalars(rows, self.mode)
        w = self._w()
        for tag, value in values.items():
            w.add_scalar(tag, value, step)
        w.flush()
        return values

    def write_eval(self, step: int, values: Mapping[str, float]) -> None:
        w = self._w()
        for name, value in values.items():
            if value is not None and math.isfinite(float(value)):
                w.add_scalar(f"eval/{name}", float(value), int(step))
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
