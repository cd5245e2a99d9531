"""Trace overhead, measured side by side: the same preset traced and untraced, interleaved in one process.

Prints the median step-time ratio (traced / untraced), each probe's cost per step (and as a share of the untraced
step), the trace writer's rows/s and the tracer's memory after 1k vs 10k steps of synthetic events. The context-
diversity probe measures one step in ``train.diversity_every``: its line gives its cost measuring every step too,
and the error of its figures against their exact values (every step) over the doctor's collapse window and over the
whole stretch, from steps traced here (``--error-steps``) and from any traces recorded with
``train.diversity_every=1`` (``--error-traces``). It asserts nothing.

    python benchmarks/trace_overhead.py [--preset demo] [--rounds 8] [--steps 20] [--error-steps 80]
        [--error-traces RUN ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diagnostics import figures
from diagnostics.loading import load_run
from diagnostics.probes import ContextDiversityProbe, default_probes
from diagnostics.probes.diversity import context_stats
from diagnostics.thresholds import DoctorConfig
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
    """Microseconds per step each probe's ``observe`` takes, on the trainer's real events (the diversity probe as
    configured, measuring one step in ``every``, and as ``diversity (every step)``), interleaved round by round."""
    captured = {}
    trainer.add(instruments.OnStep(lambda step, ev, m: captured.update(ev=ev, m=m)))
    trainer.train_step()
    ev, metrics = captured["ev"], captured["m"]
    tracer = trainer.instruments.find(instruments.Trace).tracer
    probes = {p.name: p for p in tracer.probes}
    probes["diversity (every step)"] = ContextDiversityProbe(1)
    times: dict[str, list[float]] = {name: [] for name in probes}
    row = _NullRow()
    for _ in range(5):  # rounds, each timing every probe, so that the machine's drift hits all of them
        for name, probe in probes.items():
            t0 = time.perf_counter()
            for _ in range(repeats // 5):
                probe.observe(ev, metrics, row)
            times[name].append((time.perf_counter() - t0) / (repeats // 5) * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


DIVERSITY_FIGURES = [f.name for f in ContextDiversityProbe.figures]


def exact_context_steps(trainer: Trainer, n: int) -> pd.DataFrame:
    """``n`` more training steps with the diversity statistics of every step (exact), as a steps table: kept on the
    device during the steps, read once at the end."""
    kept: list[dict[str, torch.Tensor]] = []

    def capture(step, ev, metrics):
        row = {"step": torch.tensor(float(len(kept) + 1))}
        if ev.encoder_out is not None and ev.encoder_out.shape[0] > 0:  # else nothing encoded: the sums are 0
            with torch.no_grad():
                row.update(context_stats(ev.encoder_out.detach(), ev.puzzle_id_after[ev.encoded_slots],
                                         ev.sample_id_after[ev.encoded_slots] >= 0))
                if ev.token_embed_rms is not None:
                    row["token_ms"] = ev.token_embed_rms.detach().float().square() * row["context_rows"]
        kept.append(row)

    trainer.add(instruments.OnStep(capture))
    for _ in range(n):
        trainer.train_step()
        if trainer.step % trainer.cfg.train.trace_every == 0:
            trainer.instruments.flush_rows()
    rows = [{k: float(v) for k, v in r.items()} for r in kept]
    return pd.DataFrame(rows).set_index("step").fillna(0.0) if rows else pd.DataFrame()


def diversity_error(df: pd.DataFrame, every: int, window: int | None) -> dict[str, tuple[float, float, int]]:
    """For each diversity figure: (median, max) relative error over the ``window``-step windows of ``df`` (a steps
    table with the probe's counters on every step; the whole table when ``window`` is None) of the figure over the
    steps the probe would measure (the first, then one in ``every``) against the figure over every step; and how
    many windows."""
    df = df.sort_index()
    measured = df.iloc[::every]
    bounds = ([(int(df.index[0]), int(df.index[-1]))] if window is None else
              [(int(s), int(s) + window - 1) for s in df.index[::window] if int(s) + window - 1 <= df.index[-1]])
    errs: dict[str, list[float]] = {name: [] for name in DIVERSITY_FIGURES}
    for lo, hi in bounds:
        exact, est = figures.over(df, lo, hi), figures.over(measured, lo, hi)
        for name in DIVERSITY_FIGURES:
            e, x = exact.get(name, float("nan")), est.get(name, float("nan"))
            if np.isfinite(e) and e != 0 and np.isfinite(x):
                errs[name].append(abs(x / e - 1.0))
    return {name: (float(np.median(v)) if v else float("nan"), float(max(v)) if v else float("nan"), len(v))
            for name, v in errs.items()}


def print_errors(source: str, df: pd.DataFrame, everies: tuple[int, ...]) -> None:
    """One line per rate: each figure's relative error over the collapse window, 100 steps and the whole stretch."""
    w = DoctorConfig().collapse_window
    for every in everies:
        per = {label: diversity_error(df, every, window)
               for window, label in ((w, f"{w}-step"), (100, "100-step"), (None, "whole"))}
        parts = []
        for name in DIVERSITY_FIGURES:
            cells = [f"{label} median {e[name][0]:.2%} max {e[name][1]:.2%} (n={e[name][2]})"
                     for label, e in per.items() if e[name][2]]
            parts.append(f"{name}: " + (", ".join(cells) if cells else "n/a (exact value 0 or undefined)"))
        print(f"  {source}, 1 step in {every}: " + "; ".join(parts))


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
    # replaces the trainer's instruments: call last
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
    parser.add_argument("--error-steps", type=int, default=80,
                        help="traced steps whose exact diversity statistics give the estimate's error (0: none)")
    parser.add_argument("--error-traces", nargs="*", type=Path, default=[],
                        help="run directories traced with train.diversity_every=1: more exact steps for the error")
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
        tracer = traced.instruments.find(instruments.Trace).tracer
        exact = exact_context_steps(traced, args.error_steps) if args.error_steps else pd.DataFrame()
        mem_1k = tracer_memory(traced, 1000)
        mem_10k = tracer_memory(traced, 10000)
        tracer.close()
    print(f"preset {args.preset} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    print(f"untraced step: median {statistics.median(base) * 1e3:.2f} ms; traced step: median "
          f"{statistics.median(tr) * 1e3:.2f} ms")
    print(f"median step-time ratio traced/untraced: {statistics.median(ratios):.4f} "
          f"(per-round min {min(ratios):.4f}, max {max(ratios):.4f})")
    step_us = statistics.median(base) * 1e6
    print("probe cost per step (observe, microseconds): " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
    print(f"diversity probe (1 step in {cfg.train.diversity_every}): {costs['diversity']:.0f} us per step = "
          f"{costs['diversity'] / step_us:.3%} of the untraced step; measuring every step: "
          f"{costs['diversity (every step)']:.0f} us = {costs['diversity (every step)'] / step_us:.3%}; all probes "
          f"as configured: {sum(v for k, v in costs.items() if k != 'diversity (every step)') / step_us:.2%}")
    everies = tuple(dict.fromkeys((cfg.train.diversity_every, 4, 16)))
    print("diversity estimate vs exact (relative error of each figure, median and max over the windows):")
    if len(exact):
        print_errors(f"{len(exact)} steps traced here ({cfg.model}, {cfg.encoder.mode})", exact, everies)
    for run in args.error_traces:
        df = load_run(run)
        every = int(df.attrs.get("meta", {}).get("diversity_every", 1))
        if every != 1 or "context_cross_ss" not in df.columns:
            print(f"  {run}: skipped (traced with train.diversity_every={every}, not every step)")
            continue
        print_errors(f"{run} ({len(df)} steps, {df.attrs.get('meta', {}).get('mode')})", df,
                     (cfg.train.diversity_every,))
    print(f"trace writer: {rows_s:,.0f} rows/s (blocks of 20 rows, one commit per block)")
    print(f"tracer memory: {mem_1k[0] / 1024:.1f} KiB python heap after 1k steps, {mem_10k[0] / 1024:.1f} KiB "
          f"after 10k; device buffer {mem_1k[1]} B vs {mem_10k[1]} B")


if __name__ == "__main__":
    main()
