"""Will the run fit? A lower bound of the memory the sizes need, checked against the memory there is.

Only what cannot fit is refused up front (the bound exceeds the machine's memory, or one GPU's on CUDA, per rank);
anything else is tried, and the CLI turns a ``MemoryError`` or ``torch.OutOfMemoryError`` into one line with this
estimate.
"""

from __future__ import annotations

import os

import torch

from etrm.config import Config
from etrm.errors import UserError

FLOAT_BYTES = 4  # fp32 weights and state (bf16 autocast on CUDA still keeps fp32 weights, grads and moments)
STATE_COPIES = 6  # weights, gradients, AdamW's two moments, the EMA shadow, the evaluation copy
GIB = 1024 ** 3


def _block_params(h: int, expansion: float) -> int:
    """A transformer block's weights: attention (q, k, v, out) and the SwiGLU MLP (three matrices)."""
    return 4 * h * h + 3 * int(expansion * h) * h


def estimate_bytes(cfg: Config, seq_len: int, num_puzzle_ids: int = 1, world: int = 1) -> int:
    """A lower bound of one rank's memory: parameters with their optimizer/EMA copies, the carry (z_H, z_L), one
    activation per layer of the gradient cycle, an evaluation batch's carry, and TRM's puzzle table."""
    a, t = cfg.arch, cfg.train
    h, seq = a.hidden_size, a.puzzle_emb_len + seq_len
    params = a.L_layers * _block_params(h, a.expansion)
    if cfg.model != "trm":
        params += (cfg.encoder.num_layers + cfg.encoder.set_layers) * _block_params(h, a.expansion)
    local = max(t.batch_size // max(world, 1), 1)
    carry = 2 * local * seq * h
    activations = local * seq * h * a.L_layers
    evaluation = 2 * t.eval_batch_size * seq * h
    table = num_puzzle_ids * h if cfg.model == "trm" else 0
    return FLOAT_BYTES * (STATE_COPIES * params + carry + activations + evaluation + table)


def total_bytes(device: torch.device) -> int:
    """The memory one rank may use: its GPU's on CUDA, the machine's RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe(estimate: int, total: int | None = None) -> str:
    """``at least X GiB`` (``of the Y GiB there is``)."""
    text = f"at least {estimate / GIB:,.1f} GiB"
    return text if total is None else f"{text}, more than the {total / GIB:,.1f} GiB there is"


SIZES = "train.batch_size, train.eval_batch_size or arch.hidden_size"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: ``MemoryError``, ``torch.OutOfMemoryError``, or the ``RuntimeError`` torch's CPU
    allocator raises (it has no type of its own)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)


def check_fits(cfg: Config, seq_len: int, num_puzzle_ids: int, device: torch.device, world: int = 1) -> int:
    """Refuse sizes whose lower bound exceeds the memory of ``device``; returns the estimate."""
    estimate = estimate_bytes(cfg, seq_len, num_puzzle_ids, world)
    total = total_bytes(device)
    if estimate > total:
        raise UserError(f"these sizes need {describe(estimate, total)} on {device.type}"
                        f"{' per rank' if world > 1 else ''}; lower {SIZES}")
    return estimate
