"""Training throughput, measured side by side in one process: presets, data paths, eager vs compiled.

Builds one Trainer per arm, warms each up, then interleaves timed blocks of ACT steps (round 1: A, B; round 2: B, A;
...) so that a noisy, shared machine slows every arm alike. Per arm it prints the median over rounds of ACT steps/s
(one ACT step = one optimizer step) and samples/s (fresh samples consumed = slots reset), with the per-round min and
max, and the ratio to the comparison's first arm. It measures; it asserts nothing.

    python benchmarks/throughput.py [--compare presets|data-path|compile] [--presets demo demo-trm]
                                    [--steps 20] [--rounds 5] [--warmup 5] [--device auto|cpu|cuda] [--threads N]
                                    [key=value ...]

- ``presets`` (default): the presets against the first one.
- ``data-path``: per preset, ``train.data_path=host`` (the reset mask read back every step, the batch built on the
  host) against ``device`` (no host sync in the step).
- ``compile``: per preset, eager against ``train.compile=true``; also the compile time (the compiled arm's warm-up
  minus the eager one's), the graphs compiled in it, and the break-even step count (compile seconds / seconds saved
  per step). A preset whose core has the same graph as an earlier one's (``demo-trm`` after ``demo``) reuses its
  compiled code in one process: the script says so; measure that preset's compile alone. The compile seconds depend
  on the inductor cache (``TORCHINDUCTOR_CACHE_DIR``): point it at an empty folder for a cold compile.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train.trainer import Trainer, pick_device

COMPARISONS = {
    "presets": [("", [])],
    "data-path": [("host", ["train.data_path=host"]), ("device", ["train.data_path=device"])],
    "compile": [("eager", ["train.compile=false"]), ("compiled", ["train.compile=true"])],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides applied to every arm")
    p.add_argument("--compare", choices=list(COMPARISONS), default="presets", help="what to compare (see above)")
    p.add_argument("--presets", nargs="+", default=["demo", "demo-trm"], help="presets to run (first = base)")
    p.add_argument("--steps", type=int, default=20, help="ACT steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per arm, interleaved")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm before the first round")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's choice)")
    args = p.parse_intermixed_args(argv)
    for name in ("steps", "rounds", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    return args


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


@dataclass
class Arm:
    """One trainer under test and its measurements."""

    name: str
    preset: str
    trainer: Trainer
    warmup_s: float = 0.0
    graphs_compiled: int = 0  # graphs dynamo compiled during this arm's warm-up (0: it reused an earlier arm's)
    steps_per_s: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return 1.0 / statistics.median(self.steps_per_s)


def break_even_steps(compile_s: float, eager_step_s: float, compiled_step_s: float) -> float:
    """Steps after which compiling has paid for itself (``inf`` when the compiled step is not faster)."""
    saved = eager_step_s - compiled_step_s
    return compile_s / saved if saved > 0 else math.inf


def build_arms(args: argparse.Namespace, device: torch.device, root: Path) -> list[list[Arm]]:
    """Groups of arms compared with each other: one group for ``presets``, one per preset otherwise."""
    groups = []
    variants = COMPARISONS[args.compare]
    for preset in args.presets:
        group = []
        for label, extra in variants:
            data = apply_overrides(load_preset(preset), [*args.overrides, *extra, f'train.device="{device.type}"'])
            name = f"{preset} {label}".strip()
            torch.manual_seed(0)
            group.append(Arm(name, preset, Trainer(Config.from_dict(data), root / name.replace(" ", "-"), device)))
        groups.append(group)
    return [[a for g in groups for a in g]] if args.compare == "presets" else groups


def describe(arm: Arm) -> str:
    tr, cfg = arm.trainer, arm.trainer.cfg
    mode = "trm" if cfg.model == "trm" else cfg.encoder.mode
    return (f"  {arm.name}: model {cfg.model} mode {mode}, {tr.model.num_trainable_parameters():,} params, batch "
            f"{cfg.train.batch_size}, hidden {cfg.arch.hidden_size}, H x L cycles {cfg.arch.H_cycles} x "
            f"{cfg.arch.L_cycles}, max ACT steps {cfg.max_steps_per_sample}, data path "
            f"{'device' if tr.feed.on_device else 'host'}, compile {cfg.train.compile}")


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def measure(groups: list[list[Arm]], args: argparse.Namespace) -> None:
    arms = [a for g in groups for a in g]
    for arm in arms:  # the compiled arm's first steps include the compilation
        graphs = compiled_graphs()
        t0 = time.perf_counter()
        if args.warmup:
            timed_block(arm.trainer, args.warmup)
        arm.warmup_s = time.perf_counter() - t0
        arm.graphs_compiled = compiled_graphs() - graphs
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            seconds, resets = timed_block(arm.trainer, args.steps)
            arm.steps_per_s.append(args.steps / seconds)
            arm.samples_per_s.append(resets / seconds)


def print_group(group: list[Arm], args: argparse.Namespace) -> None:
    base = group[0]
    print(f"\n{'arm':<20} {'ACT steps/s':>12} {'(min..max)':>16} {'samples/s':>11} {'(min..max)':>16} "
          f"{'steps/s vs ' + base.name:>28} {'per-round ratio (min..max)':>27}")
    for arm in group:
        s, m = arm.steps_per_s, arm.samples_per_s
        ratios = [a / b for a, b in zip(s, base.steps_per_s)]
        print(f"{arm.name:<20} {statistics.median(s):>12.2f} {f'({min(s):.2f}..{max(s):.2f})':>16} "
              f"{statistics.median(m):>11.1f} {f'({min(m):.1f}..{max(m):.1f})':>16} "
              f"{statistics.median(s) / statistics.median(base.steps_per_s):>28.3f} "
              f"{f'({min(ratios):.3f}..{max(ratios):.3f})':>27}")
    if args.compare == "compile" and args.warmup:
        eager, compiled = group
        compile_s = max(compiled.warmup_s - eager.warmup_s, 0.0)
        even = break_even_steps(compile_s, eager.step_s, compiled.step_s)
        print(f"  {compiled.preset}: step {eager.step_s * 1e3:.1f} ms eager, {compiled.step_s * 1e3:.1f} ms compiled "
              f"(x{compiled.step_s / eager.step_s:.3f}); compile {compile_s:.1f} s (warm-up {compiled.warmup_s:.1f} s "
              f"vs {eager.warmup_s:.1f} s eager, {compiled.graphs_compiled} graphs compiled in it); break-even after "
              + ("never (the compiled step is not faster)" if math.isinf(even) else f"{even:,.0f} steps"))
        if not compiled.graphs_compiled:
            print(f"  {compiled.preset}: its warm-up compiled nothing (it reused the graphs an earlier preset's arm "
                  "compiled, same shapes): its compile seconds are not measured here; run it alone")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="etrm-bench-") as tmp:
        groups = build_arms(args, device, Path(tmp))
        load = " | load average " + " ".join(f"{x:.2f}" for x in _loadavg()) if _loadavg() else ""
        print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f" | torch {torch.__version__} | threads {torch.get_num_threads()} | compare {args.compare} | "
              f"{args.rounds} rounds x {args.steps} steps per arm, {args.warmup} warm-up steps{load}")
        for group in groups:
            for arm in group:
                print(describe(arm))
        measure(groups, args)
        for group in groups:
            print_group(group, args)
        if _loadavg():
            print("\nload average after: " + " ".join(f"{x:.2f}" for x in _loadavg()))
    return 0


def _loadavg() -> tuple[float, ...]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return ()


if __name__ == "__main__":
    sys.exit(main())
