"""An upstream-shaped training loop (``pretrain.py``'s ``train_batch``, reduced to its core), traced with etrm.

One forward of the ACT wrapper, one backward and one optimizer step per batch, over a carry made once from the
first batch and kept across batches; upstream's feed puts a fresh sample in every batch position. The lines with
an ``etrm`` comment (here, and one in act_loss.py) are everything tracing adds: delete them and this is the plain
loop (docs/own-loop.md lists them).

    python examples/own_loop/pretrain.py --variant cached --run-dir runs/own-cached
    etrm-doctor runs/own-cached          # gradient-starvation
    etrm-dash                            # the run appears beside the bundled ones

Variants reproduce the ETRM story's faults in code that is not etrm's: ``cached`` (a cached, detached context),
``labels-from-batch`` (the loss takes the incoming batch's labels), ``full-batch-encode`` (cached, but every slot is
encoded and most rows are thrown away); ``healthy`` re-encodes every slot every step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from act_loss import ACTLossHead
from tasks import FewShotTasks, TaskConfig, upstream_feed
from tiny_etrm import ModelConfig, TinyETRM

from diagnostics import RunSpec, trace_run  # etrm

# variant -> (how the model builds its context, whether the loss reads the batch's labels)
VARIANTS = {"healthy": ("reencode", False), "cached": ("cached", False),
            "labels-from-batch": ("reencode", True), "full-batch-encode": ("full-batch", False)}
MODE = {"reencode": "reencode", "cached": "cached", "full-batch": "cached"}  # the encoder mode the code means


def pretrain(run_dir: str | Path, variant: str = "healthy", steps: int = 300, batch_size: int = 16, seed: int = 0,
             lr: float = 1e-3, trace_every: int = 20) -> float:
    """Train ``steps`` optimizer steps; returns the last step's loss per sample."""
    encoder, labels_from_batch = VARIANTS[variant]
    torch.manual_seed(seed)
    data = FewShotTasks(TaskConfig(seed=seed))
    model = TinyETRM(ModelConfig(vocab=data.cfg.colours, seq_len=data.cfg.seq_len, encoder=encoder))
    loss_head = ACTLossHead(model, labels_from_batch=labels_from_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = upstream_feed(data, batch_size, seed)
    carry = loss_head.initial_carry(next(batches))  # once, from the first batch; it persists across batches
    spec = RunSpec(model="tiny-etrm", mode=MODE[encoder], batch_size=batch_size, max_steps=steps,  # etrm
                   max_steps_per_sample=model.config.halt_max_steps, trace_every=trace_every)  # etrm
    run = trace_run(run_dir, spec, model, encoder=model.encoder)  # etrm
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        batch = next(batches)
        before = carry  # etrm
        carry, loss, metrics, outputs = loss_head(carry, batch)
        run.step(before, carry, batch, outputs, loss, labels=outputs["labels"], terms=metrics)  # etrm
        (loss / batch_size).backward()  # upstream normalises by the global batch size
        run.after_backward()  # etrm
        optimizer.step()
        optimizer.zero_grad()
        if run.non_finite:  # etrm: a flush saw a non-finite loss; stop before anything is saved
            break  # etrm
    run.close()  # etrm
    return float(loss.detach()) / batch_size


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="The own-loop example: an upstream-shaped loop traced with etrm.")
    p.add_argument("--variant", default="healthy", help=f"one of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="default runs/own-loop-VARIANT")
    args = p.parse_args(argv)
    if args.variant not in VARIANTS:
        print(f"pretrain.py: error: unknown --variant {args.variant!r}; pick one of {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    run_dir = args.run_dir or f"runs/own-loop-{args.variant}"
    torch.set_num_threads(1)
    try:
        last = pretrain(run_dir, args.variant, args.steps, args.batch_size, args.seed)
    except (ValueError, OSError) as exc:
        print(f"pretrain.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{args.variant}: {args.steps} steps, last loss per sample {last:.4f}, run in {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
