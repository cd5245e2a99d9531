"""Trace overhead, measured side by side: the same preset traced and untraced, interleaved in one process.

Prints the median step-time ratio (traced / untraced), each probe's cost per step, the trace writer's rows/s and
the tracer's memory after 1k vs 10k steps of synthetic events. It asserts nothing.

    python benchmarks/trace_overhead.py [--preset demo] [--rounds 8] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from diagnostics.probes import default_probes
from diagnostics.store import TraceWriter
from diagnostics.tracer import Tracer
from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train import instruments
from etrm.train.trainer import Trainer


def build(cfg: Config, root: Path, name: str, traced: bool) -> Trainer:
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, root / name, device=torch.device("cpu"))
    (root / name).mkdir()
    if traced:
        instruments.add_trace(trainer)
    return trainer


def timed_steps(trainer: Trainer, n: int) -> float:
    """Seconds per step over ``n`` steps, flushes included (as the trainer's loop does them)."""
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
        if trainer.step % trainer.cfg.train.trace_every == 0:
            trainer.instruments.flush_rows()
    return (time.perf_counter() - t0) / n


def probe_costs(trainer: Trainer, repeats: int) -> dict[str, float]:
    """Microseconds per step each probe's ``observe`` takes, on the trainer's real events."""
    captured = {}
    trainer.add(instruments.OnStep(lambda step, ev, m: captured.update(ev=ev, m=m)))
    trainer.train_step()
    ev, metrics = captured["ev"], captured["m"]
    tracer = trainer.instruments.find(instruments.Trace).tracer
    out = {}
    for probe in tracer.probes:
        row = _NullRow()
        t0 = time.perf_counter()
        for _ in range(repeats):
            probe.observe(ev, metrics, row)
        out[probe.name] = (time.perf_counter() - t0) / repeats * 1e6
    return out


class _NullRow:
    def set(self, name, value):
        pass

    def later(self, name):
        return lambda value: None


def writer_rows_per_s(root: Path, n_rows: int = 20000, block: int = 20) -> float:
    probes = default_probes(4)
    names = [name for p in probes for name, _ in p.counters]
    writer = TraceWriter(root / "bench.sqlite")
    writer.add_counters((n, "bench", "") for n in names)
    rows = [(i, *([float(i)] * len(names))) for i in range(1, n_rows + 1)]
    t0 = time.perf_counter()
    for start in range(0, n_rows, block):
        writer.write_steps(names, rows[start:start + block])
        writer.commit()
    elapsed = time.perf_counter() - t0
    writer.close()
    return n_rows / elapsed


def tracer_memory(trainer: Trainer, steps: int, every: int = 20) -> tuple[int, int]:
    """(python heap bytes held after ``steps`` synthetic steps, device buffer bytes) with flushes every ``every``."""
    captured = {}
    trainer.instruments[:] = [instruments.OnStep(lambda step, ev, m: captured.update(ev=ev, m=m))]
    trainer.train_step()
    ev, metrics = captured["ev"], captured["m"]
    # One recorded step replayed many times: detach its encoder output, or every replay would stack another
    # gradient hook on the same tensor (a real step's tensor, and its hooks, are freed after its backward).
    ev = dataclasses.replace(ev, encoder_out=ev.encoder_out.detach() if ev.encoder_out is not None else None)
    tracer = Tracer(default_probes(trainer.cfg.max_steps_per_sample), None, torch.device("cpu"), capacity=every)
    tracemalloc.start()
    for s in range(steps):
        tracer.on_step(s, ev, metrics)
        if (s + 1) % every == 0:
            tracer.flush()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current, tracer.buffer.numel() * tracer.buffer.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_dict(apply_overrides(load_preset(args.preset), args.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, traced = build(cfg, root, "plain", False), build(cfg, root, "traced", True)
        for t in (plain, traced):
            timed_steps(t, 5)
        ratios, base, tr = [], [], []
        for _ in range(args.rounds):  # interleaved, alternating order, so drift hits both
            a, b = timed_steps(plain, args.steps), timed_steps(traced, args.steps)
            base.append(a)
            tr.append(b)
            ratios.append(b / a)
        costs = probe_costs(traced, 200)
        rows_s = writer_rows_per_s(root)
        mem_1k = tracer_memory(traced, 1000)
        mem_10k = tracer_memory(traced, 10000)
        traced.instruments.find(instruments.Trace).tracer.close()
    print(f"preset {args.preset} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    print(f"untraced step: median {statistics.median(base) * 1e3:.2f} ms; traced step: median "
          f"{statistics.median(tr) * 1e3:.2f} ms")
    print(f"median step-time ratio traced/untraced: {statistics.median(ratios):.4f} "
          f"(per-round min {min(ratios):.4f}, max {max(ratios):.4f})")
    print("probe cost per step (observe, microseconds): " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
    print(f"trace writer: {rows_s:,.0f} rows/s (blocks of 20 rows, one commit per block)")
    print(f"tracer memory: {mem_1k[0] / 1024:.1f} KiB python heap after 1k steps, {mem_10k[0] / 1024:.1f} KiB "
          f"after 10k; device buffer {mem_1k[1]} B vs {mem_10k[1]} B")


if __name__ == "__main__":
    main()
