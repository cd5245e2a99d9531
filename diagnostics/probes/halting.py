"""Halting: halting-step histogram, Q-halt precision/recall against sequence correctness, exploration vetoes."""

from __future__ import annotations

import torch

from diagnostics.events import StepEvents
from diagnostics.probes.base import Probe, Row, Tensor, count


class HaltingProbe(Probe):
    """``halt_at_k`` counts slots that halted at step k (1..max); q-halt confusion is over real slots."""

    name = "halting"

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.counters = (
            ("halted", "slots that halted this step"),
            ("inflight_step_sum", "sum of the current step over real slots (mean in-flight step = / real)"),
            ("real_slots", "slots holding a real sample"),
            ("q_says_halt", "slots whose Q-head asked to halt"),
            ("explore_vetoes", "Q-halts vetoed by exploration"),
            ("q_tp", "Q said halt and the sequence was correct"),
            ("q_fp", "Q said halt and the sequence was wrong"),
            ("q_fn", "Q said continue and the sequence was correct"),
            ("q_correct", "real slots whose sequence was correct (the base rate's numerator)"),
            ("q_halt_logit_sum", "sum of the q-halt logits over real slots (mean q-halt logit = / real)"),
        ) + tuple((f"halt_at_{k}", f"slots that halted at step {k}") for k in range(1, max_steps + 1))
        self.ks = torch.arange(1, max_steps + 1)

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        real = events.sample_id_after >= 0
        halted = events.halted & real
        row.set("halted", count(halted))
        row.set("inflight_step_sum", (events.steps * real).sum().to(torch.float32))
        row.set("real_slots", count(real))
        row.set("q_says_halt", count(events.q_says_halt & real))
        row.set("explore_vetoes", count(events.explore_veto))
        says = (events.q_halt_logits > 0) & real
        correct = events.seq_correct & real if events.seq_correct is not None else torch.zeros_like(real)
        row.set("q_tp", count(says & correct))
        row.set("q_fp", count(says & ~correct))
        row.set("q_fn", count(~says & correct))
        row.set("q_correct", count(correct))
        row.set("q_halt_logit_sum", (events.q_halt_logits.detach().float() * real).sum())
        ks = self.ks.to(events.steps.device)
        hist = ((events.steps[None, :] == ks[:, None]) & halted[None, :]).sum(1).to(torch.float32)
        for k in range(self.max_steps):
            row.set(f"halt_at_{k + 1}", hist[k])
