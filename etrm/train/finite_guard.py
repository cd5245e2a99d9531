"""The non-finite guard: loss, gradients, parameters, EMA weights, optimizer state and TRM's puzzle table.

Each check is a device-side flag (``1.0`` when some value is NaN or infinite), added to the trainer's step metrics
so that it is read at the flush with everything else: no host sync per step. The gradients are checked every step
(they do not outlive it); the state (parameters, buffers such as the puzzle-embedding table, EMA, optimizer state)
is checked at each flush, and every checkpoint follows a flush, so no checkpoint is written from non-finite state.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

LOSS = "non_finite"  # the loss head's own flag (``etrm.loss``), also a trace column
PREFIX = "non_finite."
GRADS = PREFIX + "grads"
PARAMS = PREFIX + "parameters"
BUFFERS = PREFIX + "puzzle_emb"  # the model's floating buffers: TRM's puzzle table (moved by sign-SGD)
EMA_KEY = PREFIX + "ema"
OPTIMIZER = PREFIX + "optimizer"
# What each flag is called in the message.
WHAT = {LOSS: "loss", GRADS: "gradients", PARAMS: "parameters", BUFFERS: "puzzle-embedding table",
        EMA_KEY: "EMA weights", OPTIMIZER: "optimizer state"}


def any_non_finite(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    """``1.0`` (a 0-d float tensor on ``device``) when any value of ``tensors`` is NaN or infinite, else ``0.0``.

    One fused max-abs reduction per tensor (``_foreach_norm``, ord inf: no overflow of finite values)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros((), device=device)
    norms = torch.stack([n.float() for n in torch._foreach_norm(floats, float("inf"))])
    return (~torch.isfinite(norms)).any().float().to(device)


def grad_flags(model: nn.Module, puzzle_rows: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """The step's gradient flag: the parameters' ``.grad`` and the looked-up puzzle rows' gradient (TRM)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if puzzle_rows is not None and puzzle_rows.grad is not None:
        grads.append(puzzle_rows.grad)
    return {GRADS: any_non_finite(grads, device)}


def state_flags(model: nn.Module, ema_state: Mapping[str, Tensor], optimizers: Iterable[Any],
                device: torch.device) -> dict[str, Tensor]:
    """Flags of everything a checkpoint holds that could go non-finite: parameters, floating buffers, EMA and
    optimizer state (e.g. AdamW's moments)."""
    opt_tensors = [v for opt in optimizers for s in getattr(opt, "state", {}).values()
                   for v in s.values() if isinstance(v, Tensor)]
    return {
        PARAMS: any_non_finite(model.parameters(), device),
        BUFFERS: any_non_finite(model.buffers(), device),
        EMA_KEY: any_non_finite(ema_state.values(), device),
        OPTIMIZER: any_non_finite(opt_tensors, device),
    }


def failed(stats: Mapping[str, float]) -> list[str]:
    """The names (``WHAT``) of the flags that are set in the host-read ``stats``."""
    return [WHAT[k] for k in WHAT if stats.get(k, 0.0) > 0]


def stop_message(what: list[str], first: int, last: int, kept_step: int | None) -> str:
    """One line: what went non-finite, within which steps, and which checkpoint (if any) is kept."""
    kept = (f"the checkpoint of step {kept_step} is kept" if kept_step is not None
            else "no checkpoint exists (none was written before it)")
    return f"non-finite {', '.join(what)} within steps {first}..{last}; stopping, {kept}"
