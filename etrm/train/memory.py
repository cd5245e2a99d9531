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
ACTIVATION_BYTES = 2  # activations kept for backward: bf16 under CUDA autocast, the least any device keeps


def _block_params(h: int, expansion: float) -> int:
    """A transformer block's weights: attention (q, k, v, out) and the SwiGLU MLP (three matrices)."""
    return 4 * h * h + 3 * int(expansion * h) * h


def estimate_parts(cfg: Config, seq_len: int, num_puzzle_ids: int = 1, world: int = 1) -> dict[str, int]:
    """Lower bounds (bytes) of one rank's memory by what drives them (``KNOBS`` names the keys that lower each):
    parameters with their optimizer/EMA copies, the slots (carry, the block activations kept for the gradient
    cycle, the batch's tokens), an evaluation batch (carry and per-ACT-step audit), TRM's puzzle table, and the data
    sets (one byte per token of every input and label)."""
    a, t = cfg.arch, cfg.train
    h, seq, wide = a.hidden_size, a.puzzle_emb_len + seq_len, int(a.expansion * a.hidden_size)
    params = a.L_layers * _block_params(h, a.expansion)
    if cfg.model != "trm":
        params += (cfg.encoder.num_layers + cfg.encoder.set_layers) * _block_params(h, a.expansion)
    local = max(t.batch_size // max(world, 1), 1)
    carry = 2 * local * seq * h
    # each block application of the gradient cycle (L_cycles L-updates and one H-update) keeps at least the inputs
    # of its linear layers for backward (qkv, output, MLP in: h each; MLP down: the hidden width), at 2 bytes (bf16
    # autocast on CUDA; fp32 on CPU keeps twice that)
    activations = local * seq * (3 * h + wide) * a.L_layers * (a.L_cycles + 1)
    tokens = 2 * 8 * local * seq_len // FLOAT_BYTES  # int64 inputs and labels of the slots, in float units
    evaluation = 2 * t.eval_batch_size * seq * h + 3 * t.eval_batch_size * cfg.max_steps_per_sample
    table = num_puzzle_ids * h if cfg.model == "trm" else 0
    return {"params": FLOAT_BYTES * STATE_COPIES * params,
            "slots": FLOAT_BYTES * (carry + tokens) + ACTIVATION_BYTES * activations,
            "eval": FLOAT_BYTES * evaluation, "table": FLOAT_BYTES * table, "data": data_bytes(cfg, seq_len)}


KNOBS = {"params": "arch.hidden_size, arch.L_layers or arch.expansion", "slots": "train.batch_size",
         "eval": "train.eval_batch_size", "table": "data.train_tasks", "data": "data.train_tasks, "
         "data.heldout_tasks or data.num_aug"}


def data_bytes(cfg: Config, seq_len: int) -> int:
    """A lower bound of the data sets' memory: one byte for each token of every sample's input and label (the
    samples known from the config alone: ARC's task count is the data's, counted here as one task)."""
    d = cfg.data
    variants = d.num_aug + 1
    if d.dataset == "fewshot":
        samples = (d.train_tasks + d.heldout_tasks) * d.num_queries
    elif d.dataset in ("sudoku", "maze"):
        samples = d.train_tasks * variants + d.heldout_tasks
    elif d.dataset in ("arc1", "arc2"):
        samples = max(d.max_train_tasks, 1) * variants
    else:  # trm-folder: read from files that exist
        samples = 0
    return 2 * samples * seq_len


def expected_seq_len(cfg: Config) -> int:
    """The tokens per sample the data set will have, from the config alone (0 when only its files know)."""
    d = cfg.data
    return {"fewshot": d.canvas ** 2, "arc1": d.canvas ** 2, "arc2": d.canvas ** 2, "sudoku": 81,
            "maze": d.canvas ** 2}.get(d.dataset, 0)


def estimate_bytes(cfg: Config, seq_len: int, num_puzzle_ids: int = 1, world: int = 1) -> int:
    """A lower bound of one rank's memory (the sum of ``estimate_parts``)."""
    return sum(estimate_parts(cfg, seq_len, num_puzzle_ids, world).values())


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
    parts = estimate_parts(cfg, seq_len, num_puzzle_ids, world)
    estimate, total = sum(parts.values()), total_bytes(device)
    if estimate > total:
        biggest = max(parts, key=parts.__getitem__)
        raise UserError(f"these sizes need {describe(estimate, total)} on {device.type}"
                        f"{' per rank' if world > 1 else ''}, most of it for the {biggest}; lower {KNOBS[biggest]}")
    return estimate


def check_fits_before_data(cfg: Config, device: torch.device, world: int = 1) -> None:
    """The same check from the config alone, before any data is built (or cached): a run that cannot fit is refused
    at once and leaves nothing behind."""
    check_fits(cfg, expected_seq_len(cfg), 1, device, world)
