"""The step-event contract: what one ACT step tells every probe, invariant check and user adapter.

Versioned like a public API (``EVENTS_VERSION``). The ACT step fills a ``StepEvents`` with references to tensors it
already holds, so building one costs nothing when nobody listens; all fields stay on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

import torch

# 1: the first contract. 2: optional ``token_embed_rms`` (ETRM: RMS of the token-embedding table), for the context
# diversity probe's context-to-token norm ratio; producers that leave it None still satisfy version 2.
# 3: ``mode`` is a ``Mode`` and required (version 2 silently defaulted it to "reencode"); its values are unchanged.
#    The own-loop session API (``diagnostics.session``: RunSpec, CarryShape, TracedRun, build_events) joined the
#    contract, building version-3 events from an upstream-shaped step. Optional ``content_checksum`` (the
#    [B, 3] checksums the slot's data carries, ``diagnostics.properties.fingerprints``) and ``loss_labels`` (the labels the
#    loss head used, filled by it): the runtime content check of label alignment.
EVENTS_VERSION = 3


class Mode(StrEnum):
    """How a step conditions each slot on its task (design.md's mode table); the values are what traces store.

    A ``StrEnum``: a member equals its value, so ``meta["mode"] == Mode.FCT`` holds for a trace's stored string.
    """

    TRM = "trm"            # TRM: a learned row per puzzle id (the puzzle table), looked up every step
    REENCODE = "reencode"  # ETRM: the demo encoder runs on every slot every training step
    CACHED = "cached"      # ETRM: the encoder runs on reset slots only; others reuse their carried context
    FCT = "fct"            # ETRM, fixed computation time: every slot re-encoded, a fixed number of steps
    UNKNOWN = "unknown"    # a user model behind the adapter protocol that does not say

    def conditions_every_slot(self, training: bool) -> bool:
        """Whether every slot gets fresh task conditioning (and its gradient) this step: TRM always; re-encode
        and FCT while training; cached mode (and ETRM in eval, encoding once per sample) only on reset slots."""
        return self is Mode.TRM or (training and self in (Mode.REENCODE, Mode.FCT))

    @property
    def halts_adaptively(self) -> bool:
        """Whether the Q-head decides halting (every mode but FCT, whose steps are fixed)."""
        return self is not Mode.FCT

Tensor = torch.Tensor


def q_says_halt(q_halt_logits: Tensor, q_continue_logits: Optional[Tensor] = None) -> Tensor:
    """The one "Q says halt" rule: q_halt > 0, or q_halt > q_continue where the Q-continue variant is on.

    Used alike by the halting decision, the loss's Q accuracy, the halting probe and evaluation.
    """
    if q_continue_logits is not None:
        return q_halt_logits > q_continue_logits
    return q_halt_logits > 0


def q_halt_rule(q_continue: bool) -> str:
    """The name of the rule ``q_says_halt`` applies (what an evaluation audit records it halted by)."""
    return "q_halt > q_continue" if q_continue else "q_halt > 0"


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
    # What kind of step this was (version 3: required)
    mode: Mode
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
