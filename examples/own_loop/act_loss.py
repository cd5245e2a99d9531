"""The loss head, shaped like upstream's ``ACTLossHead``: it calls the model, reads the labels from the new carry
and returns ``(new_carry, loss, metrics, outputs)``; the loss is a sum over the batch. The line with an ``etrm``
comment hands back the labels it read, so the tracer can check whose they are.

``labels_from_batch`` is the bug of ETRM's old fallback (``outputs.get("labels", batch["labels"])``): the incoming
batch's labels, which belong to another sample in every slot that did not just reset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_LABEL = -100


class ACTLossHead(nn.Module):
    def __init__(self, model: nn.Module, labels_from_batch: bool = False, q_weight: float = 0.5) -> None:
        super().__init__()
        self.model, self.labels_from_batch, self.q_weight = model, labels_from_batch, q_weight

    def initial_carry(self, batch):
        return self.model.initial_carry(batch)

    def forward(self, carry, batch):
        new_carry, outputs = self.model(carry, batch)
        labels = batch["labels"] if self.labels_from_batch else new_carry.current_data["labels"]
        outputs["labels"] = labels  # etrm: what the loss read
        logits = outputs["logits"]
        counts = (labels != IGNORE_LABEL).sum(-1)
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_LABEL,
                             reduction="none").view(labels.shape)
        lm_loss = (ce.sum(-1) / counts.clamp_min(1)).sum()
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels) & (labels != IGNORE_LABEL)
            seq_is_correct = (counts > 0) & (correct.sum(-1) == counts)
        q_halt_loss = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"], seq_is_correct.float(),
                                                         reduction="sum")
        loss = lm_loss + self.q_weight * q_halt_loss
        metrics = {"lm_loss": lm_loss.detach(), "q_halt_loss": q_halt_loss.detach(),
                   "count": (counts > 0).sum(), "exact_accuracy": (seq_is_correct & new_carry.halted).sum()}
        return new_carry, loss, metrics, outputs
