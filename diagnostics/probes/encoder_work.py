"""Encoder work: slots encoded this step vs slots the mode needed (design.md's table)."""

from __future__ import annotations

from diagnostics.events import StepEvents
from diagnostics.probes.base import Figure, Probe, Row, Tensor, count


class EncoderWorkProbe(Probe):
    name = "encoder_work"
    counters = (("encoded", "slots the encoder ran on"), ("encode_needed", "slots the mode needed encoded"))
    figures = (
        Figure("encode_ratio", "slots encoded / needed", ("encoded",), ("encode_needed",), "ratio",
               "slots the encoder ran on per slot the mode needed encoded (1 = no wasted encoder work)"),
        Figure("encoded_per_step", "encoder forwards per step", ("encoded",), (), "per step",
               "slots the encoder ran on, per step"),
        Figure("encode_needed_per_step", "encoder forwards needed per step", ("encode_needed",), (), "per step",
               "slots the mode needed encoded, per step"),
        Figure("encoded_per_sample", "encoder forwards per sample", ("encoded",), ("samples_consumed",),
               "per sample", "slots the encoder ran on per sample that entered a slot"),
    )

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        row.set("encoded", count(events.encoded))
        row.set("encode_needed", count(events.needs_encode))
