"""Resets: slots that took a new sample, samples consumed, and fresh samples the feed dropped."""

from __future__ import annotations

from diagnostics.events import StepEvents
from diagnostics.probes.base import Probe, Row, Tensor, count


class ResetProbe(Probe):
    name = "resets"
    counters = (
        ("resets", "slots reset this step (halted last step)"),
        ("samples_consumed", "real samples that entered a slot this step"),
        ("samples_dropped", "real fresh samples fed to continuing slots, which did not take them"),
        ("slots", "slots in the batch (B)"),
    )

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        real_fed = events.batch_sample_id >= 0
        row.set("resets", count(events.reset))
        row.set("samples_consumed", count(events.reset & (events.sample_id_after >= 0)))
        row.set("samples_dropped", count(~events.reset & real_fed))
        row.set("slots", float(events.batch_size))
