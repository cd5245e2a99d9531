"""Adam-atan2 (Everett et al. 2024), the optimizer upstream TRM trains with, written from its definition.

Adam's moments and bias corrections, then the update ``lr * a * atan2(m_hat, b * sqrt(v_hat))`` in place of
``lr * m_hat / (sqrt(v_hat) + eps)``: no epsilon, so a tiny gradient moves a weight as far as a large one of the same
shape (the update is invariant to a common scaling of the gradient), and no coordinate moves more than
``lr * a * pi / 2`` per step. Weight decay is decoupled, as AdamW's: ``p *= 1 - lr * wd`` before the update.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

A_DEFAULT, B_DEFAULT = 1.27, 1.0  # the update's scale and the denominator's (upstream's AdamATan2 defaults)


class AdamAtan2(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with Adam-atan2's rule; state per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``
    (the names AdamW uses, so a checkpoint's optimizer state reads the same way)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, a: float = A_DEFAULT, b: float = B_DEFAULT) -> None:
        if lr < 0 or weight_decay < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamAtan2: lr={lr}, betas={betas}, weight_decay={weight_decay} out of range")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a host int: no device sync, and not a tensor the finite guard reads
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                m_hat = m / (1.0 - beta1 ** t)
                denom = v.div(1.0 - beta2 ** t).sqrt_().mul_(group["b"])
                p.add_(torch.atan2(m_hat, denom), alpha=-lr * group["a"])
        return loss


def build_adam(kind: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
               weight_decay: float) -> torch.optim.Optimizer:
    """The model's optimizer by ``train.optimizer``: ``adamw`` (torch's) or ``adam-atan2`` (upstream's rule)."""
    if kind == "adam-atan2":
        return AdamAtan2(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
