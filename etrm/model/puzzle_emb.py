"""TRM's per-puzzle embedding table (a zero-initialised buffer) and its sign-SGD optimizer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class PuzzleEmbedding(nn.Module):
    """Lookup of one row per puzzle id, laid out as a prefix of ``prefix_len`` tokens (row in token 0, rest zeros).

    The table is a buffer: in training the looked-up rows become a leaf tensor that receives gradient, and
    ``SignSGD`` applies it to the touched rows only, as upstream's sparse embedding does.
    """

    def __init__(self, num_ids: int, dim: int, prefix_len: int) -> None:
        super().__init__()
        self.prefix_len = prefix_len
        self.register_buffer("weights", torch.zeros(num_ids, dim))
        self.last_ids: torch.Tensor | None = None
        self.last_rows: torch.Tensor | None = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The [B, dim] rows of ``ids``; a gradient-receiving leaf when training with grad enabled."""
        if self.training and torch.is_grad_enabled():
            rows = self.weights[ids].detach().requires_grad_(True)
            self.last_ids, self.last_rows = ids, rows
            return rows
        return self.weights[ids]

    def prefix(self, rows: torch.Tensor) -> torch.Tensor:
        """Zero-pad [B, dim] rows into the [B, prefix_len, dim] prefix."""
        b, d = rows.shape
        pad = rows.new_zeros(b, self.prefix_len - 1, d)
        return torch.cat([rows[:, None, :], pad], dim=1)


class SignSGD:
    """``w <- w * (1 - lr * wd) - lr * sign(g)`` on the rows touched by the last training lookup.

    Gradients of duplicate ids are summed first. Exposes ``param_groups`` so the trainer's schedule sets its lr.

    Under DDP the table is a buffer that DDP does not reduce: every rank gathers all ranks' ids and row gradients
    (equal shapes: each rank looks up one row per slot) and applies the same summed update, so the tables stay equal.
    """

    def __init__(self, emb: PuzzleEmbedding, lr: float, weight_decay: float) -> None:
        self.emb = emb
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay}]

    @torch.no_grad()
    def step(self) -> None:
        ids, rows = self.emb.last_ids, self.emb.last_rows
        if ids is None or rows is None:  # no training lookup this step (the same on every rank)
            return
        row_grad = rows.grad
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank joins the gather, with or without grad
            row_grad = row_grad if row_grad is not None else torch.zeros_like(rows)
            ids, row_grad = _gather(ids), _gather(row_grad)
        elif row_grad is None:
            return
        group = _groups(ids)
        grad = torch.zeros(ids.shape[0], rows.shape[1], dtype=row_grad.dtype, device=rows.device)
        grad.index_add_(0, group, row_grad)
        lr, wd = self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]
        w = self.emb.weights
        # Every occurrence of an id writes the same new row (its group's summed gradient), so duplicates agree.
        w[ids] = w[ids] * (1.0 - lr * wd) - lr * torch.sign(grad[group]).to(w.dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.emb.last_ids = self.emb.last_rows = None

    def state_dict(self) -> dict[str, Any]:
        return {"param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param_groups = [dict(g) for g in state["param_groups"]]


def _groups(ids: torch.Tensor) -> torch.Tensor:
    """Per position, a group index shared by equal ids (0..B-1), found by sorting: ``torch.unique``'s inverse
    without its data-dependent output size, which would read the device back (a host sync)."""
    order = torch.argsort(ids)
    ranked = ids[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    group = torch.empty_like(ids)
    group[order] = torch.cumsum(first, 0) - 1
    return group


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's equally shaped ``t``, concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
