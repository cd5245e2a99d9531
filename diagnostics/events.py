"""The step-event contract: what one ACT step tells every probe, invariant check and user adapter.

Versioned like a public API (``EVENTS_VERSION``). The ACT step fills a ``StepEvents`` with references to tensors it
already holds, so building one costs nothing when nobody listens; all fields stay on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

# 1: the first contract. 2: optional ``token_embed_rms`` (ETRM: RMS of the token-embedding table), for the context
# diversity probe's context-to-token norm ratio; producers that leave it None still satisfy version 2.
# 3: optional ``content_checksum`` (the [B, 3] checksums the slot's data carries, ``diagnostics.fingerprints``) and
# ``loss_labels`` (the labels the loss head used, filled by it): the runtime content check of label alignment.
EVENTS_VERSION = 3

Tensor = torch.Tensor


@dataclass
class PhaseClock:
    """Phase timings of one step: CUDA events on GPU (read at flush), perf_counter on CPU. Never syncs."""

    cuda: bool = False
    marks: dict[str, tuple] = field(default_factory=dict)

    def start(self, phase: str) -> None:
        self.marks[phase] = (self._now(), None)

    def stop(self, phase: str) -> None:
        begin, _ = self.marks[phase]
        self.marks[phase] = (begin, self._now())

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Elapsed seconds per phase; on CUDA this waits for the recorded events (call at flush only)."""
        out: dict[str, float] = {}
        for phase, (begin, end) in self.marks.items():
            if end is None:
                continue
            if self.cuda:
                end.synchronize()
                out[phase] = begin.elapsed_time(end) / 1000.0
            else:
                out[phase] = end - begin
        return out


@dataclass
class StepEvents:
    """Everything one ACT step did, per slot ([B] tensors unless noted).

    Sample ids are -1 for padding slots. ``encoder_out`` is the fresh task-conditioning output (ETRM encoder output,
    or TRM's gathered puzzle-embedding rows) hooked before any mixing with cached context; its rows belong to the
    slots listed in ``encoded_slots``. ``token_embed_rms`` (optional, 0-d) is the RMS of the token embeddings the
    inner model reads, in ``encoder_out``'s units (before any scaling applied to both alike).
    """

    # Carry bookkeeping
    reset: Tensor
    steps: Tensor
    halted: Tensor
    sample_id_before: Tensor
    sample_id_after: Tensor
    puzzle_id_before: Tensor
    puzzle_id_after: Tensor
    batch_sample_id: Tensor
    # Alignment: whose labels the loss used, whose demos the context was built from
    label_sample_id: Tensor
    demo_sample_id: Tensor
    # Encoder work and the hook point for gradient coverage
    encoded: Tensor
    needs_encode: Tensor
    encoded_slots: Tensor
    encoder_out: Optional[Tensor]
    # Halting
    q_halt_logits: Tensor
    q_continue_logits: Optional[Tensor]
    q_says_halt: Tensor
    explore_veto: Tensor
    is_last_step: Tensor
    # Filled by the loss head
    seq_correct: Optional[Tensor] = None
    token_correct: Optional[Tensor] = None
    token_count: Optional[Tensor] = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    non_finite: Optional[Tensor] = None
    # Scale of the token embeddings beside the context (version 2; None when the model does not say)
    token_embed_rms: Optional[Tensor] = None
    # Content (version 3; None when the batch carries no checksum / no loss head filled it)
    content_checksum: Optional[Tensor] = None
    loss_labels: Optional[Tensor] = None
    # What kind of step this was
    mode: str = "reencode"
    training: bool = True
    clock: Optional[PhaseClock] = None
    version: int = EVENTS_VERSION

    @property
    def batch_size(self) -> int:
        return int(self.reset.shape[0])


@dataclass
class CarryView:
    """A model-agnostic reading of an ACT carry: what invariant checks need, under our field names.

    ``fields`` holds per-slot data that must stay fixed while a sample is in flight (inputs, labels, demos...);
    ``state`` holds the recurrent state tensors (only checked for gradient detachment). Missing fields are None.
    """

    steps: Tensor
    halted: Tensor
    sample_id: Optional[Tensor] = None
    puzzle_id: Optional[Tensor] = None
    fields: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)
