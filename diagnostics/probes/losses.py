"""Loss terms, accuracies under both semantics (halted slots as TRM, in-flight slots as ETRM) with counts."""

from __future__ import annotations

import torch

from diagnostics.events import StepEvents
from diagnostics.probes.base import ADAPTIVE_MODES, Figure, Probe, Row, Tensor

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
    figures = (
        Figure("loss_per_slot", "loss per slot", ("loss",), ("slots",), "per slot",
               "training loss (LM + weighted Q terms) per batch slot; the stored `loss` is its per-step sum"),
        Figure("lm_loss_per_slot", "LM loss per slot", ("lm_loss",), ("slots",), "per slot",
               "LM (cross-entropy, mean over tokens) loss per batch slot"),
        Figure("q_halt_loss_per_slot", "Q-halt loss per slot", ("q_halt_loss",), ("slots",), "per slot",
               "Q-halt BCE loss per batch slot", modes=ADAPTIVE_MODES),
        Figure("exact_inflight", "exact accuracy, in-flight (ETRM)", ("inflight_exact",), ("inflight_count",),
               "fraction", "share of every valid slot whose whole sequence is right, whatever its step (ETRM)"),
        Figure("exact_halted", "exact accuracy, at halt (TRM)", ("halted_exact",), ("halted_count",), "fraction",
               "share of the slots that halted this step whose whole sequence is right (TRM)"),
        Figure("token_acc_inflight", "token accuracy, in-flight", ("inflight_token_acc",), ("inflight_count",),
               "fraction", "mean token accuracy over every valid slot"),
        Figure("token_acc_halted", "token accuracy, at halt", ("halted_token_acc",), ("halted_count",), "fraction",
               "mean token accuracy over the slots that halted"),
        Figure("mean_halt_step", "mean halting step", ("halted_steps",), ("halted_count",), "step",
               "mean ACT step at which slots halted"),
    )

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        for m in METRICS:
            if m in metrics:
                row.set(column(m), metrics[m])
        flag = events.non_finite if events.non_finite is not None else torch.zeros((), dtype=torch.bool)
        row.set("non_finite", flag)
