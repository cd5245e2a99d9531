"""Own-loop tracing overhead, measured side by side: the example loop of examples/own_loop with and without its
``etrm`` lines (``diagnostics.session``), interleaved rounds in one process. It asserts nothing.

Each call trains from scratch (data, model, optimizer, and for the traced loop the run directory, every flush and
the final drain), so the per-step time is what a user's run pays, setup included. Besides wall time it reads the
process's CPU time (the trace writer thread's included), which a loaded machine inflates less; the tracing cost per
step is traced minus plain, per round.

    python benchmarks/own_loop_overhead.py [--variant healthy] [--rounds 5] [--steps 100] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop"
sys.path.insert(0, str(EXAMPLE))

import plain  # noqa: E402
import pretrain  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="healthy", choices=list(pretrain.VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    untraced = plain.plain_pretrain()
    times: dict[str, list[float]] = {"plain": [], "traced": []}
    cpu: dict[str, list[float]] = {"plain": [], "traced": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up both
            for name, loop in (("plain", untraced), ("traced", pretrain)):
                t0, c0 = time.perf_counter(), time.process_time()
                loop.pretrain(Path(tmp) / f"{name}-{r}", args.variant, args.steps, args.batch_size)
                if r:
                    times[name].append((time.perf_counter() - t0) / args.steps)
                    cpu[name].append((time.process_time() - c0) / args.steps)
    ratios = [t / u for t, u in zip(times["traced"], times["plain"])]
    cpu_ratios = [t / u for t, u in zip(cpu["traced"], cpu["plain"])]
    cost = [t - u for t, u in zip(times["traced"], times["plain"])]
    cpu_cost = [t - u for t, u in zip(cpu["traced"], cpu["plain"])]
    print(f"own loop {args.variant} | torch {torch.__version__} | threads {args.threads} | {args.rounds} rounds x "
          f"{args.steps} steps, batch {args.batch_size}, interleaved, {len(plain.marked_lines())} traced lines")
    print(f"plain step: median {statistics.median(times['plain']) * 1e3:.2f} ms; traced step: median "
          f"{statistics.median(times['traced']) * 1e3:.2f} ms (setup, flushes and drain included)")
    print(f"median step-time ratio traced/plain: {statistics.median(ratios):.4f} (per-round min {min(ratios):.4f}, "
          f"max {max(ratios):.4f})")
    print(f"tracing cost per step: median {statistics.median(cost) * 1e3:.2f} ms wall, "
          f"{statistics.median(cpu_cost) * 1e3:.2f} ms CPU (CPU-time ratio {statistics.median(cpu_ratios):.4f}; plain "
          f"step {statistics.median(cpu['plain']) * 1e3:.2f} ms CPU)")


if __name__ == "__main__":
    main()
