"""TensorBoard scalars of a traced run (``--tensorboard``), so that it also shows in a tool users already have open.

Written at flush time only, never from the training step: each flush becomes one point per scalar at its last step,
a ratio of the flushed rows' sums (so the point is exact for those steps, as the trace store's re-bucketing is).
Evaluations become ``eval/*`` points. The per-step truth stays in ``trace.sqlite``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

TENSORBOARD_DIR = "tensorboard"

# tag -> (numerator columns, denominator columns, transform); the columns are trace counters, summed over the rows.
SCALARS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "train/coverage": (("coverage_num",), ("coverage_den",), "ratio"),
    "train/reset_fraction": (("resets",), ("slots",), "ratio"),
    "train/loss": (("loss",), ("slots",), "ratio"),
    "train/lm_loss": (("lm_loss",), ("slots",), "ratio"),
    "train/exact_inflight": (("inflight_exact",), ("inflight_count",), "ratio"),
    "train/exact_halted": (("halted_exact",), ("halted_count",), "ratio"),
    "train/mean_halt_step": (("halted_steps",), ("halted_count",), "ratio"),
    "train/mean_inflight_step": (("inflight_step_sum",), ("real_slots",), "ratio"),
    "train/encode_ratio": (("encoded",), ("encode_needed",), "ratio"),
    "train/drop_fraction": (("samples_dropped",), ("samples_dropped", "samples_consumed"), "ratio"),
    "train/context_cross_puzzle_share": (("context_cross_ss",), ("context_sq_norm",), "ratio"),
    "train/context_to_token_rms": (("context_ms",), ("token_ms",), "sqrt"),
}


def flush_scalars(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The scalars of one flush: each tag whose columns are present and whose denominator is non-zero."""
    out: dict[str, float] = {}
    if not rows:
        return out
    for tag, (nums, dens, kind) in SCALARS.items():
        value = ratio_of_sums(rows, nums, dens)
        if value is not None:
            out[tag] = math.sqrt(value) if kind == "sqrt" else value
    return out


def ratio_of_sums(rows: Sequence[Mapping[str, float]], nums: Sequence[str], dens: Sequence[str]) -> float | None:
    """sum(numerator columns) / sum(denominator columns) over ``rows`` (non-finite values count 0); None when a
    column is missing or the denominator is 0."""
    if not rows or any(c not in rows[0] for c in (*nums, *dens)):
        return None
    num = sum(_finite(r.get(c)) for r in rows for c in nums)
    den = sum(_finite(r.get(c)) for r in rows for c in dens)
    return num / den if den > 0 else None


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


class TensorBoardScalars:
    """A ``SummaryWriter`` into ``log_dir`` fed with flushed trace rows and evaluation results."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (a dependency)

        self.log_dir = Path(log_dir)
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
        values = flush_scalars(rows)
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
