"""A ``pretrain.py``-style loop of a fork (our code, upstream's shape): a train state with a carry made from the first
batch and kept across batches, one forward of the loss head per batch (``return_keys=[]``, as upstream trains), one
backward of ``loss / global_batch_size``, a warmup learning rate, full batches only, and an ``evaluate`` that runs
every test batch from a fresh carry until all slots halt.

The lines with an ``etrm`` comment are all that tracing adds; the model (model.py) and the loss head (losses.py) are
untouched. Fault variants reproduce the ETRM story's bugs:

    python examples/upstream_fork/pretrain.py --variant cached --run-dir runs/fork-cached
    python examples/upstream_fork/pretrain.py --variant cached --declare reencode --run-dir runs/fork-cached
    etrm-doctor runs/fork-cached-1      # the second run went to the next free directory: mode-mismatch

``healthy`` re-encodes every slot; ``cached`` keeps a cached, detached context and encodes only reset slots;
``full-batch-encode`` is cached but encodes every slot and throws most rows away; ``labels-from-batch`` trains on the
incoming batch's labels. ``--declare`` is the encoder mode the run says it has (default: what the code does).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the example's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from upstream_fork.losses import ACTLossHead
from upstream_fork.model import ForkConfig, TRMWithEncoder
from upstream_fork.puzzle_dataset import FewShotPuzzles, PuzzleDataset, PuzzleDatasetConfig

from diagnostics import RunSpec, trace_run  # etrm

# variant -> (context_mode of the model, labels from the batch, the encoder mode the code means)
VARIANTS = {"healthy": ("reencode", False, "reencode"), "cached": ("cached", False, "cached"),
            "full-batch-encode": ("full-batch", False, "cached"), "labels-from-batch": ("reencode", True, "reencode")}


@dataclass
class TrainState:
    model: ACTLossHead
    optimizer: torch.optim.Optimizer
    carry: Any = None
    step: int = 0
    total_steps: int = 0


def compute_lr(base_lr: float, warmup: int, step: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(warmup, 1))


def train_batch(train_state: TrainState, batch: dict, global_batch_size: int, base_lr: float, warmup: int,
                run: Any = None) -> dict:
    if train_state.carry is None:
        train_state.carry = train_state.model.initial_carry(batch)
    train_state.step += 1
    train_state.carry, loss, metrics, _, _ = train_state.model(carry=train_state.carry, batch=batch, return_keys=[])
    run.record(loss, metrics)  # etrm: after the loss, before backward
    ((1 / global_batch_size) * loss).backward()
    run.after_backward()  # etrm
    for group in train_state.optimizer.param_groups:
        group["lr"] = compute_lr(base_lr, warmup, train_state.step)
    train_state.optimizer.step()
    train_state.optimizer.zero_grad()
    return metrics


def evaluate(loss_head: ACTLossHead, data: PuzzleDataset) -> dict:
    """Every test batch from a fresh carry, ACT steps until all slots halt; the final step's metrics summed."""
    loss_head.eval()
    totals: dict = {}
    with torch.inference_mode():
        for _, batch, _ in data.test_batches():
            carry = loss_head.initial_carry(batch)
            while True:
                carry, _, metrics, _, all_halted = loss_head(carry=carry, batch=batch, return_keys=[])
                if all_halted:
                    break
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + float(v)
    loss_head.train()
    return totals


def pretrain(run_dir: str | Path, variant: str = "healthy", steps: int = 60, batch_size: int = 16, seed: int = 0,
             lr: float = 1e-3, warmup: int = 5, trace_every: int = 20, declare: Optional[str] = None,
             forward_dtype: str = "float32", hidden_size: int = 32, eval_at_end: bool = True) -> dict:
    """Train ``steps`` optimizer steps of a variant, then evaluate; returns the last step's metrics and the
    evaluation's (``eval/`` keys), as floats."""
    context_mode, labels_from_batch, means = VARIANTS[variant]
    torch.manual_seed(seed)
    puzzles = FewShotPuzzles(PuzzleDatasetConfig(seed=seed, global_batch_size=batch_size))
    data = PuzzleDataset(puzzles)
    model = TRMWithEncoder(ForkConfig(vocab_size=puzzles.cfg.colours, seq_len=puzzles.cfg.seq_len,
                                      hidden_size=hidden_size, context_mode=context_mode,
                                      forward_dtype=forward_dtype))
    loss_head = ACTLossHead(model, labels_from_batch=labels_from_batch)
    train_state = TrainState(loss_head, torch.optim.AdamW(loss_head.parameters(), lr=lr), total_steps=steps)
    spec = RunSpec(model="upstream-fork", mode=declare or means, batch_size=batch_size, max_steps=steps,  # etrm
                   max_steps_per_sample=model.config.halt_max_steps, trace_every=trace_every)  # etrm
    run = trace_run(run_dir, spec, model, encoder=model.encoder, loss_head=loss_head)  # etrm
    loss_head.train()
    metrics: dict = {}
    for _, batch, global_batch_size in data:
        if train_state.step >= train_state.total_steps:
            break
        metrics = train_batch(train_state, batch, global_batch_size, lr, warmup, run)
    out = {k: float(v) for k, v in metrics.items()}
    if eval_at_end:
        audit = run.evaluation(weights="raw")  # etrm: records the evaluation below (per ACT step, would-halt step)
        out.update({f"eval/{k}": v for k, v in evaluate(loss_head, data).items()})
        audit.close()  # etrm
    run.close()  # etrm
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="A fork-shaped ETRM loop, traced with etrm.")
    p.add_argument("--variant", default="healthy", help=f"one of {', '.join(VARIANTS)}")
    p.add_argument("--declare", default=None, help="the encoder mode the run declares (default: what the code does)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--run-dir", default=None, help="default runs/fork-VARIANT")
    args = p.parse_args(argv)
    if args.variant not in VARIANTS:
        print(f"pretrain.py: error: unknown --variant {args.variant!r}; pick one of {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    run_dir = args.run_dir or f"runs/fork-{args.variant}"
    torch.set_num_threads(1)
    try:
        last = pretrain(run_dir, args.variant, args.steps, args.batch_size, args.seed, declare=args.declare,
                        forward_dtype=args.dtype)
    except (ValueError, OSError) as exc:
        print(f"pretrain.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{args.variant}: {args.steps} steps, last lm_loss per sample {last.get('lm_loss', 0.0) / args.batch_size:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
