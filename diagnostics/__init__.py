"""Diagnostics for recurrent ACT training; works with any model that emits ``StepEvents`` (never imports etrm)."""

from diagnostics.events import EVENTS_VERSION, CarryView, PhaseClock, StepEvents

__all__ = ["EVENTS_VERSION", "CarryView", "PhaseClock", "StepEvents"]
