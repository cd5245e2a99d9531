"""Encoder work: slots encoded this step vs slots the mode needed (design.md's table)."""

from __future__ import annotations

from diagnostics.events import StepEvents
from diagnostics.probes.base import Probe, Row, Tensor, count


class EncoderWorkProbe(Probe):
    name = "encoder_work"
    counters = (("encoded", "slots the encoder ran on"), ("encode_needed", "slots the mode needed encoded"))

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        row.set("encoded", count(events.encoded))
        row.set("encode_needed", count(events.needs_encode))
