"""Per-step correctness and the loss probe's slot metrics, from logits and the labels a loss used.

One definition for every producer: the bundled loss head (``etrm.loss``) and the own-loop session
(``diagnostics.session``) both call these, so ``halted.*`` (upstream TRM's semantics: slots that halted this step)
and ``inflight.*`` (upstream ETRM's: every slot with a valid target) mean the same in every trace. Device tensors
only, under ``no_grad``; nothing is read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diagnostics.events import q_says_halt

Tensor = torch.Tensor
IGNORE_LABEL = -100


@dataclass
class Correctness:
    """Per slot: valid target tokens, correctly predicted ones, and whether the whole sequence is right."""

    counts: Tensor
    n_correct: Tensor
    seq_correct: Tensor

    @property
    def valid(self) -> Tensor:
        return self.counts > 0


@torch.no_grad()
def correctness(logits: Tensor, labels: Tensor, ignore_label: int = IGNORE_LABEL) -> Correctness:
    """Argmax correctness of ``logits`` [B, S, V] against ``labels`` [B, S]; ignored positions do not count."""
    mask = labels != ignore_label
    counts = mask.sum(-1)
    n_correct = (mask & (logits.argmax(-1) == labels)).sum(-1)
    return Correctness(counts, n_correct, (counts > 0) & (n_correct == counts))


@torch.no_grad()
def slot_metrics(c: Correctness, q_halt_logits: Tensor, halted: Tensor, steps: Tensor,
                 q_continue_logits: Tensor | None = None) -> dict[str, Tensor]:
    """Sums with their counts over halted slots and over in-flight slots (``halted.count``, ``inflight.exact``...);
    the Q accuracy uses the one "Q says halt" rule (with ``q_continue_logits`` where the Q-continue variant is on)."""
    token_acc = c.n_correct / c.counts.clamp_min(1)
    q_right = q_says_halt(q_halt_logits, q_continue_logits) == c.seq_correct
    out: dict[str, Tensor] = {}
    for name, sel in (("halted", c.valid & halted), ("inflight", c.valid)):
        out[f"{name}.count"] = sel.sum()
        out[f"{name}.exact"] = (sel & c.seq_correct).sum()
        out[f"{name}.token_acc"] = (token_acc * sel).sum()
        out[f"{name}.steps"] = (steps * sel).sum()
        out[f"{name}.q_halt_acc"] = (sel & q_right).sum()
    return out


__all__ = ["IGNORE_LABEL", "Correctness", "correctness", "slot_metrics"]
