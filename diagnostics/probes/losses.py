"""Loss terms, accuracies under both semantics (halted slots as TRM, in-flight slots as ETRM) with counts."""

from __future__ import annotations

import torch

from diagnostics.events import StepEvents
from diagnostics.probes.base import Probe, Row, Tensor

METRICS = ("loss", "lm_loss", "q_halt_loss", "q_continue_loss",
           "halted.count", "halted.exact", "halted.token_acc", "halted.steps", "halted.q_halt_acc",
           "inflight.count", "inflight.exact", "inflight.token_acc", "inflight.steps", "inflight.q_halt_acc")


def column(metric: str) -> str:
    return metric.replace(".", "_")


class LossProbe(Probe):
    """Copies the loss head's device metrics (sums with their counts) and the non-finite flag."""

    name = "loss"
    counters = tuple((column(m), f"loss head: {m} (sum over slots)") for m in METRICS) + (
        ("non_finite", "1 when the step's loss was not finite"),)

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        for m in METRICS:
            if m in metrics:
                row.set(column(m), metrics[m])
        flag = events.non_finite if events.non_finite is not None else torch.zeros((), dtype=torch.bool)
        row.set("non_finite", flag)
