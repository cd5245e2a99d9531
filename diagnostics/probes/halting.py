"""Halting: halting-step histogram, Q-halt precision/recall against sequence correctness, exploration vetoes."""

from __future__ import annotations

import torch

from diagnostics.events import StepEvents, q_says_halt
from diagnostics.probes.base import ADAPTIVE_MODES, Figure, Probe, Row, Tensor, count


class HaltingProbe(Probe):
    """``halt_at_k`` counts slots that halted at step k (1..max); q-halt confusion is over real slots."""

    name = "halting"
    figures = (
        Figure("mean_inflight_step", "mean in-flight step", ("inflight_step_sum",), ("real_slots",), "step",
               "mean ACT step of the real slots, over every step"),
        Figure("early_halt_share", "halts before the maximum step", ("halted_early",), ("halted",), "fraction",
               "share of halts that happened before the maximum ACT step (0: halting is not dynamic)",
               modes=ADAPTIVE_MODES),
        Figure("q_precision", "q-halt precision", ("q_tp",), ("q_tp", "q_fp"), "fraction",
               "share of real slots the Q-head said halt on whose sequence was correct", modes=ADAPTIVE_MODES),
        Figure("q_recall", "q-halt recall", ("q_tp",), ("q_tp", "q_fn"), "fraction",
               "share of correct real slots the Q-head said halt on", modes=ADAPTIVE_MODES),
        Figure("q_base_rate", "q-halt base rate", ("q_correct",), ("real_slots",), "fraction",
               "share of real slots whose sequence was correct (precision above it: the Q-head has learned)",
               modes=ADAPTIVE_MODES),
        Figure("steps_per_sample", "steps per sample", ("real_slots",), ("samples_consumed",), "per sample",
               "slot-steps per sample that entered a slot (mean ACT steps a sample is trained on)"),
    )

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.counters = (
            ("halted", "slots that halted this step"),
            ("halted_early", "real slots that halted before the maximum ACT step"),
            ("inflight_step_sum", "sum of the current step over real slots (mean in-flight step = / real)"),
            ("real_slots", "slots holding a real sample"),
            ("q_says_halt", "real slots whose Q-head said halt (diagnostics.events.q_says_halt)"),
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
        row.set("halted_early", count(halted & (events.steps < self.max_steps)))
        says = q_says_halt(events.q_halt_logits, events.q_continue_logits) & real
        row.set("q_says_halt", count(says))
        row.set("explore_vetoes", count(events.explore_veto))
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
