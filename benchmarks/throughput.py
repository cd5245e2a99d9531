"""Training throughput of the bundled presets, measured side by side in one process.

Builds one Trainer per preset, warms each up, then interleaves timed blocks of ACT steps (round 1: A, B; round 2:
A, B; ...) so that a noisy, shared machine slows every preset alike. Prints, per preset, the median over rounds of
ACT steps/s (one ACT step = one optimizer step) and of samples/s (fresh samples consumed = slots reset), and the
ratio of each preset to the first. It measures; it asserts nothing.

    python benchmarks/throughput.py [--steps 20] [--rounds 5] [--warmup 5] [--device auto|cpu|cuda] [--threads N]
                                    [--presets demo demo-trm] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train.trainer import Trainer, pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides applied to every preset")
    p.add_argument("--presets", nargs="+", default=["demo", "demo-trm"], help="presets to compare (first = base)")
    p.add_argument("--steps", type=int, default=20, help="ACT steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per preset, interleaved")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per preset before the first round")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's choice)")
    return p.parse_intermixed_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(trainer: Trainer, steps: int) -> tuple[float, int]:
    """Run ``steps`` ACT steps; return (seconds, fresh samples consumed). Reset counts stay on the device until
    the end of the block, so the measurement adds no per-step sync of its own."""
    device = trainer.device
    resets = torch.zeros((), dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        events, _ = trainer.train_step()
        resets += events.reset.sum()
    sync(device)
    return time.perf_counter() - t0, int(resets.item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="etrm-bench-")
    trainers: dict[str, Trainer] = {}
    for name in args.presets:
        data = apply_overrides(load_preset(name), [*args.overrides, f'train.device="{device.type}"'])
        trainers[name] = Trainer(Config.from_dict(data), Path(tmp.name) / name, device=device)

    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f" | torch {torch.__version__} | threads {torch.get_num_threads()} | {args.rounds} rounds x "
          f"{args.steps} steps per preset, {args.warmup} warm-up steps")
    for name, tr in trainers.items():
        cfg = tr.cfg
        mode = "trm" if cfg.model == "trm" else cfg.encoder.mode
        print(f"  {name}: model {cfg.model} mode {mode}, {tr.model.num_trainable_parameters():,} params, batch "
              f"{cfg.train.batch_size}, hidden {cfg.arch.hidden_size}, H x L cycles {cfg.arch.H_cycles} x "
              f"{cfg.arch.L_cycles}, max ACT steps {cfg.max_steps_per_sample}")

    for tr in trainers.values():
        if args.warmup:
            timed_block(tr, args.warmup)

    steps_per_s: dict[str, list[float]] = {n: [] for n in trainers}
    samples_per_s: dict[str, list[float]] = {n: [] for n in trainers}
    for _ in range(args.rounds):
        for name, tr in trainers.items():
            seconds, resets = timed_block(tr, args.steps)
            steps_per_s[name].append(args.steps / seconds)
            samples_per_s[name].append(resets / seconds)

    base = args.presets[0]
    med_steps = {n: statistics.median(v) for n, v in steps_per_s.items()}
    med_samples = {n: statistics.median(v) for n, v in samples_per_s.items()}
    print()
    print(f"{'preset':<12} {'ACT steps/s':>12} {'(min..max)':>16} {'samples/s':>11} {'(min..max)':>16} "
          f"{'steps/s vs ' + base:>18} {'samples/s vs ' + base:>20}")
    for name in trainers:
        s, m = steps_per_s[name], samples_per_s[name]
        print(f"{name:<12} {med_steps[name]:>12.2f} {f'({min(s):.2f}..{max(s):.2f})':>16} "
              f"{med_samples[name]:>11.1f} {f'({min(m):.1f}..{max(m):.1f})':>16} "
              f"{med_steps[name] / med_steps[base]:>18.3f} {med_samples[name] / med_samples[base]:>20.3f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
