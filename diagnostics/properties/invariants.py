"""Carry and label invariants of one ACT step, each a named check over the step's events and the carry around it.

Every check returns a [B] bool tensor of violating slots, computed on the device without a host sync, so the same
functions serve the property tests (which read them at once), ``--check-invariants`` (which reads them every step)
and the probes (which only count them). ``violations()`` is the reading side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from diagnostics.events import CarryView, Mode, StepEvents
from diagnostics.properties.fingerprints import CHECKSUM_KEY, checksum

Tensor = torch.Tensor


@dataclass
class StepContext:
    """One step seen from outside: its events, the carry before and after, and (optionally) the incoming batch."""

    events: StepEvents
    before: CarryView
    after: CarryView
    max_steps: int
    batch_fields: Optional[dict[str, Tensor]] = None
    batch_puzzle_id: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.batch_puzzle_id is None and self.batch_fields is not None:
            self.batch_puzzle_id = self.batch_fields.get("puzzle_id")


@dataclass(frozen=True)
class Invariant:
    """A named per-slot check; ``check`` returns the violating slots."""

    name: str
    description: str
    check: Callable[[StepContext], Tensor]


@dataclass
class Violation:
    """A failed invariant at one step, with the offending slots (read back to the host)."""

    name: str
    slots: list[int]
    description: str

    def __str__(self) -> str:
        shown = ", ".join(map(str, self.slots[:8])) + (" ..." if len(self.slots) > 8 else "")
        return f"{self.name}: {self.description} (slots {shown})"


def _fields_differ(a: dict[str, Tensor], b: dict[str, Tensor], batch_size: int, device) -> Tensor:
    """Per slot: does any shared field differ between ``a`` and ``b``?"""
    out = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for key in a.keys() & b.keys():
        out |= (a[key] != b[key]).reshape(batch_size, -1).any(1)
    return out


def expected_needs(events: StepEvents) -> Tensor:
    """Slots the encoder must run on (design.md's table): all for TRM, re-encode and FCT in training; else resets.

    In evaluation a deterministic encoder encodes each sample once, so only fresh samples need it.
    """
    if Mode(events.mode).conditions_every_slot(events.training):
        return torch.ones_like(events.reset)
    return events.reset


def _real(ctx: StepContext) -> Tensor:
    return ctx.events.sample_id_after >= 0


def check_reset_takes_sample(ctx: StepContext) -> Tensor:
    ev, after = ctx.events, ctx.after
    bad = after.steps != 1
    if after.sample_id is not None:
        bad |= after.sample_id != ev.batch_sample_id
    if after.puzzle_id is not None and ctx.batch_puzzle_id is not None:
        bad |= after.puzzle_id != ctx.batch_puzzle_id
    if ctx.batch_fields is not None:
        bad |= _fields_differ(after.fields, ctx.batch_fields, ev.batch_size, ev.reset.device)
    return ev.reset & bad


def check_continuing_keeps_sample(ctx: StepContext) -> Tensor:
    ev, before, after = ctx.events, ctx.before, ctx.after
    bad = after.steps != before.steps + 1
    if after.sample_id is not None and before.sample_id is not None:
        bad |= after.sample_id != before.sample_id
    if after.puzzle_id is not None and before.puzzle_id is not None:
        bad |= after.puzzle_id != before.puzzle_id
    bad |= _fields_differ(after.fields, before.fields, ev.batch_size, ev.reset.device)
    return ~ev.reset & bad


def check_steps_in_range(ctx: StepContext) -> Tensor:
    s, halted = ctx.after.steps, ctx.after.halted
    return (s < 1) | (s > ctx.max_steps) | ((s >= ctx.max_steps) & ~halted)


def check_loss_labels_aligned(ctx: StepContext) -> Tensor:
    ev = ctx.events
    return _real(ctx) & (ev.label_sample_id != ev.sample_id_after)


def check_demos_aligned(ctx: StepContext) -> Tensor:
    ev = ctx.events
    return _real(ctx) & (ev.demo_sample_id != ev.sample_id_after)


def check_carry_detached(ctx: StepContext) -> Tensor:
    """Reading ``requires_grad`` is metadata, not a device sync."""
    tensors = list(ctx.after.state.values()) + list(ctx.after.fields.values())
    leaked = any(t.requires_grad for t in tensors)
    return torch.full_like(ctx.events.reset, leaked)


def check_encoder_work(ctx: StepContext) -> Tensor:
    ev = ctx.events
    return (ev.needs_encode != expected_needs(ev)) | (ev.encoded != ev.needs_encode)


def label_content_mismatch(events: StepEvents) -> Tensor:
    """Real slots whose loss labels do not hash to the labels checksum their data carries (all False without
    checksums). Device-only: the runtime checker reads it, the alignment probe counts it."""
    cs, labels = events.content_checksum, events.loss_labels
    if cs is None or labels is None:
        return torch.zeros_like(events.reset)
    return (events.sample_id_after >= 0) & (checksum(labels) != cs[:, 1])


def check_loss_labels_content(ctx: StepContext) -> Tensor:
    return label_content_mismatch(ctx.events)


def check_data_content(ctx: StepContext) -> Tensor:
    """A slot's carried inputs and labels must still hash to the checksums carried beside them."""
    f, ev = ctx.after.fields, ctx.events
    if CHECKSUM_KEY not in f or "inputs" not in f or "labels" not in f:
        return torch.zeros_like(ev.reset)
    cs = f[CHECKSUM_KEY]
    return (ev.sample_id_after >= 0) & ((checksum(f["inputs"]) != cs[:, 0]) | (checksum(f["labels"]) != cs[:, 1]))


STEP_INVARIANTS: tuple[Invariant, ...] = (
    Invariant("reset-takes-sample", "a reset slot must take the incoming sample and be at step 1",
              check_reset_takes_sample),
    Invariant("continuing-keeps-sample", "a continuing slot must keep its sample and data and advance one step",
              check_continuing_keeps_sample),
    Invariant("steps-in-range", "steps must lie in [1, max] and reaching max must halt", check_steps_in_range),
    Invariant("loss-labels-aligned", "the loss must use the labels of the slot's own sample",
              check_loss_labels_aligned),
    Invariant("demos-aligned", "the context must come from the slot's own demos", check_demos_aligned),
    Invariant("carry-detached", "carry tensors must not require grad (no gradient path into an earlier step)",
              check_carry_detached),
    Invariant("encoder-work-matches-mode", "the encoder must run on exactly the slots its mode needs",
              check_encoder_work),
    Invariant("loss-labels-content", "the loss's labels must hash to the labels checksum the slot's sample carries",
              check_loss_labels_content),
    Invariant("slot-data-content", "a slot's carried inputs and labels must hash to its sample's checksums",
              check_data_content),
)


class GradRows:
    """Which slots' fresh encoder output received a non-zero gradient: a hook placed before any mixing.

    Attach before ``backward``; afterwards ``mask`` is [B] bool on the device (no sync). A row that was encoded and
    then discarded by a ``torch.where`` gets an exact-zero gradient and does not count.
    """

    def __init__(self, events: StepEvents) -> None:
        self.events = events
        self.mask = torch.zeros_like(events.reset)
        out = events.encoder_out
        if out is not None and out.requires_grad:
            out.register_hook(self._hook)

    def _hook(self, grad: Tensor) -> None:
        got = grad.reshape(grad.shape[0], -1).ne(0).any(1)
        self.mask.index_put_((self.events.encoded_slots,), got)


def check_coverage(events: StepEvents, grad_rows: Tensor) -> Tensor:
    """Per slot: did gradient reach exactly the fresh rows the mode needs (real samples only)?"""
    expected = expected_needs(events) & (events.sample_id_after >= 0) & events.training
    return grad_rows != expected


def violations(ctx: StepContext, grad_rows: Tensor | None = None,
               invariants: tuple[Invariant, ...] = STEP_INVARIANTS) -> list[Violation]:
    """Run the checks and read them back (this syncs: for tests and ``--check-invariants``, not the traced path)."""
    found = []
    for inv in invariants:
        bad = inv.check(ctx)
        if bool(bad.any()):
            found.append(Violation(inv.name, bad.nonzero().flatten().tolist(), inv.description))
    if grad_rows is not None:
        bad = check_coverage(ctx.events, grad_rows)
        if bool(bad.any()):
            found.append(Violation("coverage-matches-mode",
                                   bad.nonzero().flatten().tolist(),
                                   "encoder-output gradient must reach exactly the slots the mode needs"))
    return found
