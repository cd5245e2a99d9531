"""Resets: slots that took a new sample, samples consumed, and fresh samples the feed dropped."""

from __future__ import annotations

from diagnostics.events import StepEvents
from diagnostics.probes.base import Figure, Probe, Row, Tensor, count


class ResetProbe(Probe):
    name = "resets"
    counters = (
        ("resets", "slots reset this step (halted last step)"),
        ("samples_consumed", "real samples that entered a slot this step"),
        ("samples_dropped", "real fresh samples fed to continuing slots, which did not take them"),
        ("slots", "slots in the batch (B)"),
    )
    figures = (
        Figure("reset_fraction", "reset fraction", ("resets",), ("slots",), "fraction",
               "share of slots that took a new sample this step"),
        Figure("drop_fraction", "dropped sample fraction", ("samples_dropped",),
               ("samples_dropped", "samples_consumed"), "fraction",
               "share of fresh samples fed to continuing slots, which did not take them (the trm sampler's feed)"),
        Figure("slots_per_step", "batch (B)", ("slots",), (), "per step", "slots per step (the global batch)"),
    )

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        real_fed = events.batch_sample_id >= 0
        row.set("resets", count(events.reset))
        row.set("samples_consumed", count(events.reset & (events.sample_id_after >= 0)))
        row.set("samples_dropped", count(~events.reset & real_fed))
        row.set("slots", float(events.batch_size))
