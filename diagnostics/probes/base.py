"""The probe interface: one small class per measured quantity, reducing step events to device counters.

A probe declares its counters, fills them from each step's events (device tensors, no host sync) and may fill some
later, from a gradient hook or after backward. The tracer owns the buffers and reads them back at a flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from diagnostics.events import StepEvents

Tensor = torch.Tensor


class Row(Protocol):
    """Where a probe writes one step's counters; ``step`` is the optimizer step the row completes (1-based)."""

    step: int

    def set(self, name: str, value: Tensor | float) -> None: ...

    def later(self, name: str) -> Callable[[Tensor], None]: ...


MODES = ("reencode", "cached", "fct", "trm")
ETRM_MODES = ("reencode", "cached", "fct")
ADAPTIVE_MODES = ("reencode", "cached", "trm")  # modes whose slots may halt before the maximum step


@dataclass(frozen=True)
class Figure:
    """A figure a probe makes from its counters: ``sum(num) / sum(den)`` over any step range (per step when ``den``
    is empty), so re-bucketing stays exact. ``scale``: "fraction" (drawn as %), "per slot", "per step", "step",
    "ratio"; ``sqrt`` takes the root of the ratio (an RMS ratio from mean squares). ``modes``: where it applies."""

    name: str
    label: str
    num: tuple[str, ...]
    den: tuple[str, ...]
    scale: str
    description: str
    modes: tuple[str, ...] = MODES
    sqrt: bool = False

    @property
    def terms(self) -> tuple[str, ...]:
        """Every stored counter the figure reads."""
        return tuple(dict.fromkeys(self.num + self.den))

    @property
    def percent(self) -> bool:
        return self.scale == "fraction"


class Probe:
    """Base class: ``counters`` are (name, description) pairs; ``observe`` fills them for one step. ``figures``
    are the derived figures it declares from its counters (``diagnostics.trace.figures`` does their arithmetic)."""

    name = "probe"
    counters: tuple[tuple[str, str], ...] = ()
    figures: tuple[Figure, ...] = ()

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        raise NotImplementedError

    def after_backward(self, row: Row) -> None:
        """Called after the step's backward, before the optimizer (gradient norms)."""

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of this probe (per-slot state carried across steps), for ``resume``."""
        return {}

    def resume(self, step: int, state: dict[str, Tensor] | None = None) -> None:
        """Continue a resumed run as if steps 1..``step`` had been observed, from the ``state_dict`` saved with the
        checkpoint (a probe's phase and per-slot state are resumable: the resumed trace equals an uninterrupted
        one)."""

    def flush(self, steps: list[int]) -> dict[str, list[tuple]]:
        """Extra rows for the store, per table, read at a flush (e.g. offending sample ids)."""
        return {}


def count(mask: Tensor) -> Tensor:
    """Number of true entries, as a float device scalar (no sync)."""
    return mask.sum().to(torch.float32)
