"""Loss head: deep-supervision LM loss, Q-halt/Q-continue BCE, and metrics that say over which slots they hold.

Metrics are device tensors holding sums with their counts (numerator and denominator), so they can be summed across
steps and ranks before dividing. ``halted.*`` is upstream TRM's semantics (slots that halted this step),
``inflight.*`` is upstream ETRM's (every slot with a valid target, whatever its step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diagnostics.events import StepEvents
from diagnostics.probes.step_metrics import IGNORE_LABEL, correctness, slot_metrics
from etrm.config import LossConfig
from etrm.model.act import StepOutput



def stablemax_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of stablemax: s(x) = 1/(1-x) for x<0, x+1 otherwise, normalised; in float64 as upstream."""
    x = logits.to(torch.float64)
    s = torch.where(x < 0, 1.0 / (1.0 - x + 1e-30), x + 1.0)
    return torch.log(s / s.sum(-1, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token stablemax cross-entropy [B, S] (float64); ignored positions give 0."""
    valid = labels != IGNORE_LABEL
    logp = stablemax_log_probs(logits)
    picked = torch.gather(logp, -1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -picked, 0.0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token softmax cross-entropy [B, S] in fp32; ignored positions give 0."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_LABEL, reduction="none")
    return flat.view(labels.shape)


class ACTLoss:
    """``lm + q_weight * (q_halt + q_continue)``, summed over slots (the trainer divides by the global batch)."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        self.ce = stablemax_cross_entropy if cfg.kind == "stablemax" else softmax_cross_entropy

    def __call__(self, out: StepOutput, events: StepEvents | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = out.labels
        right = correctness(out.logits, labels)
        counts, n_correct, seq_correct, valid = right.counts, right.n_correct, right.seq_correct, right.valid
        lm_loss = (self.ce(out.logits, labels).sum(-1) / counts.clamp_min(1)).sum()

        validf = valid.to(out.q_halt_logits.dtype)
        q_halt_loss = (F.binary_cross_entropy_with_logits(
            out.q_halt_logits, seq_correct.to(out.q_halt_logits.dtype), reduction="none") * validf).sum()
        q_cont_loss = torch.zeros_like(q_halt_loss)
        if out.target_q_continue is not None:
            q_cont_loss = (F.binary_cross_entropy_with_logits(
                out.q_continue_logits, out.target_q_continue, reduction="none") * validf).sum()
        loss = lm_loss + self.cfg.q_weight * (q_halt_loss + q_cont_loss)

        with torch.no_grad():
            metrics = {
                "loss": loss.detach(), "lm_loss": lm_loss.detach(),
                "q_halt_loss": q_halt_loss.detach(), "q_continue_loss": q_cont_loss.detach(),
            }
            # the Q-continue variant is on when the step's events carry its logits (or, without events, a target)
            q_cont = (getattr(events, "q_continue_logits", None) if events is not None
                      else out.q_continue_logits if out.target_q_continue is not None else None)
            metrics.update(slot_metrics(right, out.q_halt_logits, out.halted, out.steps, q_cont))
            non_finite = ~torch.isfinite(loss)
        if events is not None:
            events.seq_correct, events.token_correct, events.token_count = seq_correct, n_correct, counts
            events.losses = {k: metrics[k] for k in ("lm_loss", "q_halt_loss", "q_continue_loss")}
            events.non_finite = non_finite
            events.loss_labels = labels
        return loss, metrics
