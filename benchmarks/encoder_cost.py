"""Encoder cost against the number of reset slots: `cached` mode's subset encode vs `encode-full-batch`.

In `cached` mode only the k slots reset this step need a fresh context. The progress summary's performance bug
encoded all B slots and discarded B - k of them through a `torch.where`; its fix encodes only the k reset slots.
This times the demo encoder's forward + backward both ways on the preset's real demos, for several k, interleaved
(subset, full, subset, full, ...) so that a noisy machine slows both alike, and prints the median times and their
ratio. The full-batch column is also what `reencode` and `fct` pay every step (they need all B slots). It asserts
nothing.

    python benchmarks/encoder_cost.py [--preset demo] [--threads 1] [--repeats 15] [--ks 1 2 4 8 16 32 64]
                                      [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etrm.config import Config, apply_overrides
from etrm.model.act import DEMO_KEYS
from etrm.model.carry import slot_where
from etrm.presets import load_preset
from etrm.train.trainer import Trainer


def subset_step(encoder: torch.nn.Module, demos: list[torch.Tensor], slots: torch.Tensor,
                cached: torch.Tensor) -> float:
    """The fix: encode only the reset slots, write them into the cached context, backward. Seconds."""
    t0 = time.perf_counter()
    fresh = encoder(*(d[slots] for d in demos))
    context = cached.index_put((slots,), fresh)
    context.square().sum().backward()
    return time.perf_counter() - t0


def full_step(encoder: torch.nn.Module, demos: list[torch.Tensor], reset: torch.Tensor,
              cached: torch.Tensor) -> float:
    """The bug (`fault=encode-full-batch`): encode all B slots, keep the reset ones through where, backward."""
    t0 = time.perf_counter()
    fresh = encoder(*demos)
    context = slot_where(reset, fresh, cached)
    context.square().sum().backward()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--preset", default="demo")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=15, help="timed pairs per k (median reported)")
    p.add_argument("--ks", type=int, nargs="+", help="reset-slot counts (default: powers of two up to B)")
    args = p.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config.from_dict(apply_overrides(load_preset(args.preset), [*args.overrides, 'train.device="cpu"']))
    with tempfile.TemporaryDirectory(prefix="etrm-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", device=torch.device("cpu"))
    encoder = trainer.model.encoder
    if encoder is None:
        print(f"preset {args.preset} has no demo encoder (model {cfg.model})", file=sys.stderr)
        return 2
    b = cfg.train.batch_size
    batch = trainer.train_ds.batch(np.arange(b, dtype=np.int64) % len(trainer.train_ds))
    demos = [batch[k] for k in DEMO_KEYS]
    with torch.no_grad():
        cached = encoder(*demos).detach()
    ks = args.ks or [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k < b] + [b]
    gen = torch.Generator().manual_seed(0)

    for _ in range(3):  # warm-up
        full_step(encoder, demos, torch.ones(b, dtype=torch.bool), cached)
        encoder.zero_grad(set_to_none=True)
    print(f"preset {args.preset} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch B={b} | "
          f"encoder {sum(p.numel() for p in encoder.parameters()):,} params | {args.repeats} interleaved pairs per "
          "k, median")
    print(f"{'reset slots k':>13} {'k/B':>6} {'subset encode (ms)':>19} {'full-batch encode (ms)':>23} "
          f"{'full / subset':>14}")
    for k in ks:
        k = min(k, b)
        sub_t, full_t = [], []
        for _ in range(args.repeats):
            slots = torch.randperm(b, generator=gen)[:k].sort().values
            reset = torch.zeros(b, dtype=torch.bool)
            reset[slots] = True
            sub_t.append(subset_step(encoder, demos, slots, cached))
            encoder.zero_grad(set_to_none=True)
            full_t.append(full_step(encoder, demos, reset, cached))
            encoder.zero_grad(set_to_none=True)
        s, f = statistics.median(sub_t) * 1e3, statistics.median(full_t) * 1e3
        print(f"{k:>13} {k / b:>6.3f} {s:>19.2f} {f:>23.2f} {f / s:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
