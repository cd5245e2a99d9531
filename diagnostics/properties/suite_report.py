"""What a property-suite run reports: the suite's own check names, violation messages, the checks an adapter cannot
get (and why), and the run's statistics (examples, steps, checks, cases reached, dropped samples per feed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from diagnostics.events import CarryView, Mode, StepEvents
from diagnostics.properties import suite_checks as sc
from diagnostics.properties.adapter import ACTAdapter
from diagnostics.properties.invariants import STEP_INVARIANTS, Violation

Tensor = torch.Tensor

#: Checks that need only the carry: they run for every model, with or without ``StepEvents``.
CARRY_ONLY = ("reset-takes-sample", "continuing-keeps-sample", "steps-in-range", "carry-detached")

#: Checks the suite adds beyond ``diagnostics.properties.invariants`` (they need to re-run the model).
SUITE_CHECKS = {
    "reset-from-init": "a reset slot's outputs must equal a fresh carry's first step on that sample alone",
    "slot-permutation-independence": "permuting the slots (carry, batch, mask) must permute the outputs",
    "eval-runs-to-max": "in eval every slot must run exactly max steps, halting only at the last",
    "eval-leaves-carry": "an eval run must leave the training carry untouched",
    "training-mode-restored": "after an eval run the model must step in training mode again",
    "checkpoint-restore": "restoring a saved carry and replaying the same steps must give identical results",
    "events-match-carry": "the step's events must agree with the carry before and after it",
    "model-raises-nothing": "the model must not raise inside a rule (reported with the steps that led there)",
    "coverage-matches-mode": "encoder-output gradient must reach exactly the slots the mode needs (by content)",
    **sc.CHECKS,
}

#: Every invariant name a run can report (what ``skip=`` / ``--etrm-skip`` accept).
ALL_INVARIANTS = tuple(sorted({*SUITE_CHECKS, *(inv.name for inv in STEP_INVARIANTS), "demos-aligned",
                               "initial-carry-halted"}))

#: The feeds the suite draws (``trm``: upstream's fresh-batch feed, as ``train.sampler=trm``; ``adapter``: the
#: adapter's own). Only ``refill`` and ``tail`` never drop a sample.
FEED_NAMES = ("refill", "trm", "tail", "adapter")


def check_skip_names(skip: Sequence[str]) -> tuple[str, ...]:
    """The opted-out invariant names, validated: an unknown name raises ``ValueError`` with the known ones."""
    unknown = [n for n in skip if n not in ALL_INVARIANTS]
    if unknown:
        raise ValueError(f"unknown invariant {unknown[0]!r} to skip; known: {', '.join(ALL_INVARIANTS)}")
    return tuple(dict.fromkeys(skip))


def snapshot(view: CarryView) -> CarryView:
    """A detached copy of a view, so a model that updates its carry in place cannot make the checks vacuous."""
    def c(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().clone()
    return CarryView(steps=c(view.steps), halted=c(view.halted), sample_id=c(view.sample_id),
                     puzzle_id=c(view.puzzle_id), fields={k: c(v) for k, v in view.fields.items()}, state={})


def derived_events(before: CarryView, after: CarryView, fed: Tensor, expected_ids: Tensor,
                   training: bool = True) -> StepEvents:
    """Events read off the carry alone, for models that emit none: enough for the ``CARRY_ONLY`` checks."""
    reset = before.halted.clone()
    zeros = torch.zeros_like(reset)
    minus = torch.full_like(fed, -1)
    return StepEvents(
        reset=reset, steps=after.steps, halted=after.halted,
        sample_id_before=minus if before.sample_id is None else before.sample_id,
        sample_id_after=expected_ids if after.sample_id is None else after.sample_id,
        puzzle_id_before=minus, puzzle_id_after=minus, batch_sample_id=fed,
        label_sample_id=expected_ids, demo_sample_id=expected_ids,
        encoded=zeros, needs_encode=zeros, encoded_slots=torch.zeros(0, dtype=torch.long), encoder_out=None,
        q_halt_logits=torch.zeros(reset.shape), q_continue_logits=None, q_says_halt=zeros, explore_veto=zeros,
        is_last_step=zeros, mode=Mode.UNKNOWN, training=training,
    )


def format_violations(found: Sequence[Violation], step: int | str, where: str = "") -> str:
    """``invariant 'NAME' violated at step N, slots [...]: what it means`` per violation, then the context."""
    at = f"step {step}" if isinstance(step, int) else step
    lines = [f"invariant '{v.name}' violated at {at}, slots {v.slots}: {v.description}" for v in found]
    if where:
        lines.append(f"  ({where})")
    return "\n".join(lines)


def suite_violation(name: str, bad: Tensor | Sequence[int]) -> Optional[Violation]:
    return sc.violation(name, bad, SUITE_CHECKS[name])


class ModelRaised(AssertionError):
    """The model raised inside a rule: reported like a violation, with the steps that led there (so it shrinks)."""


def skipped_checks(a: ACTAdapter) -> dict[str, str]:
    """The checks this adapter cannot get, and why (the plugin lists them)."""
    sup, out = a.supports, {}
    v2 = getattr(a, "protocol", 1) >= 2 and a.content_spec is not None
    hooks = a.hooks
    if not v2:
        for name in ("embeds-own-inputs", "embeds-own-puzzle-row", "encoder-reads-own-demos",
                     "reported-ids-match-content"):
            out[name] = "adapter protocol v1: the suite does not make the content (set protocol = 2, content_spec)"
    else:
        if not hooks.inputs_table:
            out["embeds-own-inputs"] = "hooks.inputs_table not named"
        if not hooks.puzzle_table:
            out["embeds-own-puzzle-row"] = "hooks.puzzle_table not named (no puzzle table?)"
        if not hooks.encoder:
            out["encoder-reads-own-demos"] = "hooks.encoder not named (no demo encoder?)"
        if not sup.events:
            out["reported-ids-match-content"] = "no StepEvents: no reported ids to cross-check"
    if not sup.events:
        for name in ("loss-labels-aligned (ids)", "demos-aligned", "events-match-carry"):
            out[name] = "no StepEvents (supports.events=False)"
        if not (v2 and hooks.encoder):
            out["encoder-work-matches-mode"] = "no StepEvents and no hooked encoder"
    if not (v2 and sup.loss_metrics):
        why = "needs protocol v2 with supports.loss_metrics (loss_and_metrics)"
        for name in ("loss-labels-aligned (content)", "padding-adds-nothing", "halted-metrics-halted-only"):
            out[name] = why
    elif not a.halted_metrics:
        out["halted-metrics-halted-only"] = "adapter names no halted_metrics"
    if not (sup.events and sup.loss) and not coverage_by_content(a):
        out["coverage-matches-mode"] = ("needs StepEvents and a loss, or protocol v2 with hooks.encoder, "
                                        "encoder_on_reset_only declared and loss_and_metrics")
    if getattr(a, "drops_partial_batches", False):
        out["padding-adds-nothing"] = ("the adapter declares drops_partial_batches: its training feed makes no "
                                       "padding rows (the suite feeds no padded tail)")
    if not sup.evaluate:
        out["eval-returns-every-step"] = out["eval-fresh-carry"] = "no evaluate() (supports.evaluate=False)"
    if not sup.eval_run:
        out["eval-runs-to-max"] = "no eval_run() (supports.eval_run=False)"
    if not sup.checkpoint:
        for name in ("checkpoint-restore", "slot-permutation-independence", "continuing-ignores-batch",
                     "q-continue-target"):
            out[name] = "no carry_state/carry_from_state (supports.checkpoint=False)"
    if a.fixed_steps is None:
        out["fct-runs-fct-steps"] = "not a fixed-step (fct) model"
    else:
        out["exploration-only-delays"] = "fixed-step (fct) model: the Q-head decides nothing"
    return out


def coverage_by_content(a: ACTAdapter) -> bool:
    """Whether coverage runs without events: encoder rows identified by the content of the demos they encoded."""
    sup = a.supports
    return (getattr(a, "protocol", 1) >= 2 and a.content_spec is not None and bool(a.hooks.encoder)
            and a.encoder_on_reset_only is not None and sup.loss_metrics and not (sup.events and sup.loss))


@dataclass
class SuiteStats:
    """What one suite run exercised (counted over every example Hypothesis ran)."""

    examples: int = 0
    steps: int = 0
    eval_runs: int = 0
    evaluate_runs: int = 0
    restores: int = 0
    resets: int = 0
    reset_checks: int = 0
    permutation_checks: int = 0
    metamorphic_checks: int = 0
    coverage_checks: int = 0
    content_checks: int = 0
    loss_checks: int = 0
    q_target_checks: int = 0
    fed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    patterns: dict[str, int] = field(default_factory=dict)
    #: rare cases the run reached: all-halt, none-halt, exploration-veto, q-halt-at-last-step, padding-in-loss
    cases: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    #: hooked content checks -> what they captured over the run (a check that captured nothing is reported skipped)
    captured: dict[str, int] = field(default_factory=dict)
    #: every invariant that failed in the run (first message each), across examples and shrinking
    failures: dict[str, str] = field(default_factory=dict)
    #: monotonic time of the run's first failure (the shrink budget runs from it); whether shrinking stopped early
    first_failure_at: Optional[float] = None
    shrink_stopped: bool = False
    shrink_seconds: Optional[float] = None

    def count(self, case: str, n: int = 1) -> None:
        if n:
            self.cases[case] = self.cases.get(case, 0) + n

    def capture(self, check: str, n: int) -> None:
        self.captured[check] = self.captured.get(check, 0) + n

    def mark_silent(self) -> None:
        """Report as skipped every content check that ran but captured nothing (no silent pass)."""
        why = {"embeds-own-inputs": "captured no [B, S] lookup into hooks.inputs_table in any step (is it the tensor "
                                    "the forward indexes?)",
               "embeds-own-puzzle-row": "captured no [B] lookup into hooks.puzzle_table in any step",
               "encoder-reads-own-demos": "hooks.encoder was never called with [B, K, S] demos in any step"}
        for check, n in self.captured.items():
            if n == 0 and check not in self.skipped:
                self.skipped[check] = f"checked nothing: {why[check]}"

    def report_lines(self) -> list[str]:
        """The run's skips, dropped samples per feed, failing invariants and shrink stop, one line each."""
        lines = [f"  skipped {name}: {why}" for name, why in sorted(self.skipped.items())]
        for feed in sorted(self.fed):
            lines.append(f"  info dropped-samples: feed '{feed}' dropped {self.dropped.get(feed, 0)} of "
                         f"{self.fed[feed]} fed samples ({100 * self.dropped_fraction(feed):.0f}%)"
                         + (": they landed in continuing slots" if self.dropped.get(feed) else ""))
        if len(self.failures) > 1:
            lines.append("  failing invariants: " + ", ".join(sorted(self.failures)))
        if self.shrink_stopped:
            lines.append(f"  shrinking stopped early at its {self.shrink_seconds:g} s budget: the example below may "
                         "not be minimal")
        return lines

    def dropped_fraction(self, feed: str) -> float:
        return self.dropped.get(feed, 0) / max(1, self.fed.get(feed, 0))



def describe(step: int, pattern: tuple, feed: str, reset: Tensor) -> str:
    """One step of the history a model exception is reported with: ``step 3 (reset 0,2; halt=single 1; refill)``."""
    slots = reset.nonzero().flatten().tolist()
    resets = "all" if len(slots) == reset.numel() else (",".join(map(str, slots)) or "none")
    return f"step {step} (reset {resets}; halting={' '.join(map(str, pattern))}; feed={feed})"
