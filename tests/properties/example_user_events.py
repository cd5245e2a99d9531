"""The upstream-shaped ``ToyACT`` of example_user_model.py with ``StepEvents``, built by
``diagnostics.session.build_events`` from the step it already has, so the property suite runs its events checks
(label and demo alignment, encoder work, coverage) on it. The data carries a ``sample_id`` (the suite checks the
events' ids against the ids it fed). ``labels_from_batch`` is the classic bug: the loss reads the batch's labels.

    pytest -p diagnostics.pytest_plugin --etrm-model example_user_events:make_adapter
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from diagnostics.properties.adapter import Supports
from diagnostics.session import CarryShape, RunSpec, build_events
from example_user_model import ToyAdapter

SHAPE = CarryShape(sample_id="sample_id")


class ToyEventsAdapter(ToyAdapter):
    supports = Supports(events=True, loss=True, eval_run=True, checkpoint=True)

    def __init__(self, labels_from_batch: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.labels_from_batch = labels_from_batch
        self.spec = RunSpec(model="toy", mode="trm", batch_size=self.batch_size, max_steps=1,
                            max_steps_per_sample=self.max_steps)
        self.rows: list[torch.Tensor] = []  # the puzzle-embedding rows of the current step (TRM's "encoder")
        self.model.puzzle.register_forward_hook(lambda mod, args, out: self.rows.append(out))

    def make_batch(self, sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = super().make_batch(sample_ids)
        batch["sample_id"] = torch.tensor(list(sample_ids), dtype=torch.long)
        return batch

    def step(self, carry, batch, force_halt):
        self.rows = []
        new_carry, outputs = self.model(carry, batch, force_halt)
        labels = batch["labels"] if self.labels_from_batch else new_carry["current_data"]["labels"]
        outputs["loss_labels"] = labels
        rows = self.rows[-1] if self.rows and self.rows[-1].requires_grad else None
        return new_carry, build_events(self.spec, carry, new_carry, batch, outputs, labels, rows, SHAPE), outputs

    def loss(self, outputs, events):
        return F.cross_entropy(outputs["logits"].flatten(0, 1), outputs["loss_labels"].flatten(), ignore_index=-100,
                               reduction="sum")


def make_adapter() -> ToyEventsAdapter:
    return ToyEventsAdapter()


def make_label_bug_adapter() -> ToyEventsAdapter:
    return ToyEventsAdapter(labels_from_batch=True)
