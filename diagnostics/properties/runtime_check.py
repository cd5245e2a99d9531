"""``--check-invariants``: the cheap per-step invariants of ``diagnostics.properties.invariants`` run on every training step.

For debugging runs. Reading the checks back costs one host sync per step, which is why it is opt-in (the traced path
only counts violations on the device). The first violation stops the run with an ``InvariantError`` naming the
invariant, the step and the slots.

    checker = InvariantChecker(max_steps)
    checker.before_step(carry.view())                       # before the model's forward
    new_carry, out, events = model(carry, batch)
    checker.after_step(events, new_carry.view(), batch, step=step)   # raises InvariantError
    rows = checker.watch_coverage(events)                   # optional: before backward
    loss.backward(); checker.after_backward(step=step)      # optional: raises on a coverage mismatch
"""

from __future__ import annotations

from typing import Optional

import torch

from diagnostics.events import CarryView, StepEvents
from diagnostics.properties.invariants import STEP_INVARIANTS, GradRows, Invariant, StepContext, Violation, violations

Tensor = torch.Tensor


class InvariantError(RuntimeError):
    """A carry or label invariant failed at a training step. ``violations`` holds every one that failed there."""

    def __init__(self, step: int, found: list[Violation]) -> None:
        self.step = step
        self.violations = found
        first = found[0]
        self.name, self.slots = first.name, first.slots
        parts = [f"invariant '{v.name}' violated at step {step}, slots {_slots(v.slots)}: {v.description}"
                 for v in found]
        super().__init__("; ".join(parts))


def _slots(slots: list[int], shown: int = 8) -> str:
    """The first few offending slots and how many more (keeps the message to one readable line)."""
    head = ", ".join(map(str, slots[:shown]))
    return f"[{head}]" if len(slots) <= shown else f"[{head}, ... {len(slots) - shown} more]"


def _snapshot(view: CarryView) -> CarryView:
    """Clone what the checks compare, so an in-place carry update cannot hide a change (state is not compared)."""
    def c(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().clone()
    return CarryView(steps=c(view.steps), halted=c(view.halted), sample_id=c(view.sample_id),
                     puzzle_id=c(view.puzzle_id), fields={k: c(v) for k, v in view.fields.items()})


class InvariantChecker:
    """Runs ``STEP_INVARIANTS`` (and optionally the coverage check) on every step; raises on the first violation."""

    def __init__(self, max_steps: int, invariants: tuple[Invariant, ...] = STEP_INVARIANTS) -> None:
        self.max_steps = int(max_steps)
        self.invariants = invariants
        self.steps_checked = 0
        self._before: Optional[CarryView] = None
        self._events: Optional[StepEvents] = None
        self._rows: Optional[GradRows] = None
        self._ctx: Optional[StepContext] = None

    def before_step(self, carry_view: CarryView) -> None:
        """Remember the carry the step starts from (call before the forward)."""
        self._before = _snapshot(carry_view)

    def after_step(self, events: StepEvents, after_view: CarryView, batch_fields: Optional[dict[str, Tensor]] = None,
                   step: Optional[int] = None) -> None:
        """Check the step. ``batch_fields`` may be the whole incoming batch: only keys that are also carry fields are
        compared. ``step`` names the step in the message (default: the count of steps checked so far)."""
        if self._before is None:
            raise RuntimeError("InvariantChecker.after_step called without before_step")
        step = self.steps_checked if step is None else int(step)
        self._ctx = StepContext(events, self._before, after_view, self.max_steps, batch_fields)
        self._before = None
        self.steps_checked += 1
        found = violations(self._ctx, invariants=self.invariants)
        if found:
            raise InvariantError(step, found)

    def watch_coverage(self, events: StepEvents) -> GradRows:
        """Hook the fresh encoder output before ``backward``; ``after_backward`` then checks coverage."""
        self._events, self._rows = events, GradRows(events)
        return self._rows

    def after_backward(self, step: Optional[int] = None) -> None:
        """Check that encoder-output gradient reached exactly the slots the mode needs (after ``backward``)."""
        if self._rows is None or self._ctx is None:
            return
        step = self.steps_checked - 1 if step is None else int(step)
        rows, ctx = self._rows, self._ctx
        self._rows = self._events = None
        found = violations(ctx, grad_rows=rows.mask, invariants=())
        if found:
            raise InvariantError(step, found)
