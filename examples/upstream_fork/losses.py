"""The loss head, in upstream's ``ACTLossHead`` shape (our code): ``forward(return_keys, **model_kwargs)`` calls the
model and returns ``(new_carry, loss, metrics, detached outputs filtered by return_keys, all_halted)``.

The loss function is an attribute (``self.loss_fn``), called per token as ``loss_fn(logits, labels,
ignore_index=..., valid_mask=...)``. The LM loss is the per-sample mean over valid tokens summed over the batch; the
Q-halt BCE sums over every slot, padding rows too. Metrics count halted slots only (TRM's semantics).

``labels_from_batch`` is ETRM's old fallback, ``outputs.get("labels", batch["labels"])`` with a model that returns
no labels: the incoming batch's labels, another sample's in every slot that did not just reset.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upstream_fork.puzzle_dataset import IGNORE_LABEL_ID

Tensor = torch.Tensor


def softmax_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_LABEL_ID,
                          valid_mask: Tensor | None = None) -> Tensor:
    """Per-token cross entropy in float32; 0 where the label is ignored."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.long().flatten(), ignore_index=ignore_index,
                           reduction="none").view(labels.shape)


def stablemax_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_LABEL_ID,
                            valid_mask: Tensor | None = None) -> Tensor:
    """Per-token cross entropy under stablemax (s(x) = x + 1 for x >= 0, 1 / (1 - x) below), in float64."""
    x = logits.double()
    s = torch.where(x < 0, 1 / (1 - x + 1e-30), x + 1)
    logp = torch.log(s / s.sum(-1, keepdim=True))
    mask = labels != ignore_index if valid_mask is None else valid_mask
    picked = torch.gather(logp, -1, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, -picked, 0.0)


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy, "stablemax_cross_entropy": stablemax_cross_entropy}


class ACTLossHead(nn.Module):
    def __init__(self, model: nn.Module, loss_type: str = "softmax_cross_entropy", labels_from_batch: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = LOSSES[loss_type]
        self.labels_from_batch = labels_from_batch

    def initial_carry(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.initial_carry(*args, **kwargs)

    def forward(self, return_keys: Sequence[str], **model_kwargs: Any
                ) -> Tuple[Any, Tensor, Dict[str, Tensor], Dict[str, Tensor], Tensor]:
        new_carry, outputs = self.model(**model_kwargs)
        if self.labels_from_batch:
            labels = outputs.get("labels", model_kwargs["batch"]["labels"])
        else:
            labels = new_carry.current_data["labels"]

        with torch.no_grad():
            outputs["preds"] = torch.argmax(outputs["logits"], dim=-1)
            mask = labels != IGNORE_LABEL_ID
            loss_counts = mask.sum(-1)
            loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)
            is_correct = mask & (outputs["preds"] == labels)
            seq_is_correct = is_correct.sum(-1) == loss_counts
            valid = new_carry.halted & (loss_counts > 0)
            metrics = {
                "count": valid.sum(),
                "accuracy": torch.where(valid, (is_correct.float() / loss_divisor).sum(-1), 0).sum(),
                "exact_accuracy": (valid & seq_is_correct).sum(),
                "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_is_correct)).sum(),
                "steps": torch.where(valid, new_carry.steps, 0).sum(),
            }

        lm_loss = (self.loss_fn(outputs["logits"], labels, ignore_index=IGNORE_LABEL_ID, valid_mask=mask)
                   / loss_divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"], seq_is_correct.float(),
                                                         reduction="sum")
        metrics.update({"lm_loss": lm_loss.detach(), "q_halt_loss": q_halt_loss.detach()})
        detached = {k: outputs[k].detach() for k in return_keys if k in outputs}
        return new_carry, lm_loss + 0.5 * q_halt_loss, metrics, detached, new_carry.halted.all()
