"""Label alignment: slots whose loss labels, demos or carried identity belong to another sample.

Counts violations of the invariants in ``diagnostics.properties.invariants`` and keeps the first offending slots' sample ids
in a small device buffer, read only at a flush.
"""

from __future__ import annotations

import torch

from diagnostics.events import StepEvents
from diagnostics.properties.invariants import label_content_mismatch
from diagnostics.probes.base import Figure, Probe, Row, Tensor, count

KEEP_FIRST = 32


class AlignmentProbe(Probe):
    name = "alignment"
    counters = (
        ("label_mismatch", "real slots whose loss labels belong to another sample"),
        ("demo_mismatch", "real slots whose context came from another sample's demos"),
        ("carry_mismatch", "continuing slots whose sample or puzzle id changed without a reset"),
        ("aligned_den", "real slots checked"),
        ("label_content_mismatch", "real slots whose loss labels do not match their sample's labels checksum"),
    )
    figures = tuple(
        Figure(f"{kind}_mismatch_per_step", f"{kind} mismatches per step", (f"{kind}_mismatch",), (), "per step",
               f"slots per step whose {what} belong to another sample")
        for kind, what in (("label", "loss labels"), ("demo", "demos"), ("carry", "carried identity")))

    def __init__(self) -> None:
        self.pending: list[Tensor] = []  # one packed [3, B] tensor per step since the last flush
        self.kept = 0

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        sid = events.sample_id_after
        real = sid >= 0
        labels_bad = real & (events.label_sample_id != sid)
        demos_bad = real & (events.demo_sample_id != sid)
        carry_bad = ~events.reset & ((sid != events.sample_id_before) | (events.puzzle_id_after != events.puzzle_id_before))
        row.set("label_mismatch", count(labels_bad))
        row.set("demo_mismatch", count(demos_bad))
        row.set("carry_mismatch", count(carry_bad))
        row.set("aligned_den", count(real))
        row.set("label_content_mismatch", count(label_content_mismatch(events)))  # 0 without checksums
        if self.kept < KEEP_FIRST:
            bad = labels_bad | demos_bad | carry_bad
            self.pending.append(torch.stack([torch.where(bad, sid, -2), events.label_sample_id,
                                             events.demo_sample_id]))

    def flush(self, steps: list[int]) -> dict[str, list[tuple]]:
        rows: list[tuple] = []
        for packed, step in zip(self.pending, steps):
            sid, lab, dem = packed.cpu().tolist()
            for slot, s in enumerate(sid):
                if s != -2 and self.kept < KEEP_FIRST:
                    rows.append((step, slot, s, lab[slot], dem[slot]))
                    self.kept += 1
        self.pending = []
        return {"alignment_samples": rows}
