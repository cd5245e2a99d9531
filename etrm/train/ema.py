"""Exponential moving average of the trainable parameters, used for evaluation and checkpoints (as upstream)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of ``requires_grad`` parameters: ``s <- rate * s + (1 - rate) * p`` after each step."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate = rate
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.rate)

    @torch.no_grad()
    def copy_to(self, target: nn.Module, source: nn.Module) -> None:
        """Load ``source``'s state into ``target``, then overwrite its parameters with the averages."""
        target.load_state_dict(source.state_dict())
        for name, p in target.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)
