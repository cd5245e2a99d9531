"""The probe interface: one small class per measured quantity, reducing step events to device counters.

A probe declares its counters, fills them from each step's events (device tensors, no host sync) and may fill some
later, from a gradient hook or after backward. The tracer owns the buffers and reads them back at a flush.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from diagnostics.events import StepEvents

Tensor = torch.Tensor


class Row(Protocol):
    """Where a probe writes one step's counters."""

    def set(self, name: str, value: Tensor | float) -> None: ...

    def later(self, name: str) -> Callable[[Tensor], None]: ...


class Probe:
    """Base class: ``counters`` are (name, description) pairs; ``observe`` fills them for one step."""

    name = "probe"
    counters: tuple[tuple[str, str], ...] = ()

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        raise NotImplementedError

    def after_backward(self, row: Row) -> None:
        """Called after the step's backward, before the optimizer (gradient norms)."""

    def flush(self, steps: list[int]) -> dict[str, list[tuple]]:
        """Extra rows for the store, per table, read at a flush (e.g. offending sample ids)."""
        return {}


def count(mask: Tensor) -> Tensor:
    """Number of true entries, as a float device scalar (no sync)."""
    return mask.sum().to(torch.float32)
