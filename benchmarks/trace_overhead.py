"""Trace overhead, measured side by side: the same preset traced and untraced, interleaved in one process.

Prints the median step-time ratio (traced / untraced), each probe's cost per step (and as a share of the untraced
step), the trace writer's rows/s and the tracer's memory after 1k vs 10k steps of synthetic events. The context-
diversity probe measures one step in ``train.diversity_every``: its line gives its cost measuring every step too,
and the error of its figures against their exact values (every step) over the doctor's collapse window and over the
whole stretch, from steps traced here (``--error-steps``) and from any traces recorded with
``train.diversity_every=1`` (``--error-traces``). For the per-sample ledger: its cost per step (the traced step with
and without the ledger probe, interleaved, and its flush), and its bytes in the trace per 1k steps at 10k, 20k, 50k
and 100k steps of a synthetic slot simulation (``--ledger-steps``; no model: sample ids, halting steps, correctness
and logits drawn per sample, the ledger probe and the real store). It asserts nothing.

    python benchmarks/trace_overhead.py [--preset demo] [--rounds 8] [--steps 20] [--error-steps 80]
        [--error-traces RUN ...] [--ledger-steps 100000] [--ledger-batch 256] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diagnostics.trace import figures

from diagnostics.trace import ledger
from diagnostics.events import Mode, StepEvents
from diagnostics.trace.loading import load_run
from diagnostics.probes import ContextDiversityProbe, LedgerProbe, default_probes
from diagnostics.probes.diversity import context_stats
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.writer import TraceWriter
from diagnostics.probes.tracer import Tracer
from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train import instrument_setup, instruments
from etrm.train.trainer import Trainer


def build(cfg: Config, root: Path, name: str, traced: bool) -> Trainer:
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, root / name, device=torch.device("cpu"))
    (root / name).mkdir()
    if traced:
        instrument_setup.add_trace(trainer)
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
    step = 1

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


def without_ledger(trainer: Trainer) -> Trainer:
    """The same traced trainer with the ledger probe taken out of its tracer (the side-by-side baseline)."""
    tracer = trainer.instruments.find(instruments.Trace).tracer
    tracer.probes = [p for p in tracer.probes if not isinstance(p, LedgerProbe)]
    return trainer


class SlotSimulation:
    """Synthetic ACT slot bookkeeping (numpy): each sample draws its halting step (1..M, its task's difficulty
    shifting it) and whether it ends exact; the events carry what the ledger reads. No model, no gradient."""

    def __init__(self, batch: int, max_steps: int, tasks: int, aug: int = 8, seed: int = 0) -> None:
        self.b, self.m, self.tasks, self.aug = batch, max_steps, tasks, aug
        self.rng = np.random.default_rng(seed)
        self.halted = np.ones(batch, dtype=bool)
        self.cur = np.zeros(batch, dtype=np.int64)
        self.target = np.zeros(batch, dtype=np.int64)
        self.sid = np.full(batch, -1, dtype=np.int64)
        self.next_id = 0
        self.task_of_puzzle = np.r_[0, np.repeat(np.arange(1, tasks + 1), aug)].astype(np.int64)
        self.fixed = {"zeros": torch.zeros(batch, dtype=torch.bool), "slots": torch.arange(batch),
                      "count": torch.full((batch,), 30)}

    def step(self) -> StepEvents:
        reset = self.halted.copy()
        n = int(reset.sum())
        before = self.sid.copy()
        self.sid[reset] = np.arange(self.next_id, self.next_id + n)
        self.next_id += n
        self.target[reset] = self.rng.integers(1, self.m + 1, n)
        self.cur = np.where(reset, 0, self.cur) + 1
        self.halted = self.cur >= self.target
        last = self.cur >= self.m
        pid = 1 + self.sid % (self.tasks * self.aug)
        q_halt = self.rng.normal(0.0, 2.0, self.b).astype(np.float32)
        t = torch.from_numpy
        b = self.b
        zeros, sid = self.fixed["zeros"], t(self.sid.copy())
        return StepEvents(
            reset=t(reset), steps=t(self.cur.astype(np.int32)), halted=t(self.halted),
            sample_id_before=t(before), sample_id_after=sid, puzzle_id_before=t(pid),
            puzzle_id_after=t(pid), batch_sample_id=sid, label_sample_id=sid,
            demo_sample_id=sid, encoded=zeros, needs_encode=zeros,
            encoded_slots=self.fixed["slots"], encoder_out=None, q_halt_logits=t(q_halt), q_continue_logits=None,
            q_says_halt=t(self.halted & ~last), explore_veto=t(self.rng.random(b) < 0.02), is_last_step=t(last),
            mode=Mode.REENCODE, seq_correct=t(self.rng.random(b) < 0.3), token_correct=t(self.rng.integers(0, 30, b)),
            token_count=self.fixed["count"])


LEDGER_TABLES = ("ledger", "ledger_exit", "ledger_tasks", "ledger_bins", "sqlite_autoindex_ledger_tasks_1",
                 "sqlite_autoindex_ledger_bins_1")


def ledger_bytes(db: Path) -> tuple[int, int]:
    """(bytes of the ledger's raw records and their index, bytes of its per-task aggregates) in the trace file."""
    with sqlite3.connect(db) as conn:
        sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    raw = sizes.get("ledger", 0) + sizes.get("ledger_exit", 0)
    return raw, sum(sizes.get(n, 0) for n in LEDGER_TABLES) - raw


def ledger_growth(root: Path, steps: int, batch: int, max_steps: int = 16, tasks: int = 1000, every: int = 20,
                  checkpoint_every: int = 5000, marks: tuple[int, ...] = (10_000, 20_000, 50_000, 100_000)):
    """Bytes of the ledger per 1k steps at each mark of one synthetic run (the ledger probe alone, the real store,
    a checkpoint every ``checkpoint_every`` steps), and the seconds its flushes took per step."""
    sim = SlotSimulation(batch, max_steps, tasks)
    db = root / "ledger.sqlite"
    k = ledger.sample_every(batch)
    writer = TraceWriter(db, {"ledger_sample_every": k})
    probe = LedgerProbe(sim.task_of_puzzle)
    tracer = Tracer([probe], writer, torch.device("cpu"), capacity=every)
    out, flush_s, records = [], 0.0, 0
    for s in range(1, steps + 1):
        tracer.on_step(s - 1, sim.step(), {})
        if s % every == 0:
            t0 = time.perf_counter()
            tracer.flush()
            flush_s += time.perf_counter() - t0
            records += len(tracer.last_ledger)
        if s % checkpoint_every == 0:
            tracer.submit(lambda w, s=s: w.ledger_checkpoint(s))
        if s in marks:
            tracer.drain()
            raw, agg = ledger_bytes(db)
            out.append((s, raw, agg, records))
            print(f"  (ledger run at {s:,} steps: {raw + agg:,} bytes)", flush=True)
    tracer.close()
    return out, flush_s / steps, k


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
    parser.add_argument("--ledger-steps", type=int, default=100_000, help="steps of the synthetic ledger run")
    parser.add_argument("--ledger-batch", type=int, default=256, help="slots of the synthetic ledger run")
    parser.add_argument("--memory-steps", type=int, default=10_000, help="synthetic steps of the memory reading")
    parser.add_argument("--ledger-only", action="store_true", help="only the ledger's bytes (the synthetic run)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ledger_only:
        with tempfile.TemporaryDirectory() as tmp:
            report_ledger(*ledger_growth(Path(tmp), args.ledger_steps, args.ledger_batch), args.ledger_batch)
        return
    cfg = Config.from_dict(apply_overrides(load_preset(args.preset), args.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, traced = build(cfg, root, "plain", False), build(cfg, root, "traced", True)
        no_ledger = without_ledger(build(cfg, root, "traced-no-ledger", True))
        for t in (plain, traced, no_ledger):
            timed_steps(t, 5)
        ratios, base, tr, nl, ledger_ratios = [], [], [], [], []
        for _ in range(args.rounds):  # interleaved, alternating order, so drift hits both
            a, b, c = timed_steps(plain, args.steps), timed_steps(traced, args.steps), timed_steps(no_ledger, args.steps)
            base.append(a)
            tr.append(b)
            nl.append(c)
            ratios.append(b / a)
            ledger_ratios.append(b / c)
        no_ledger.instruments.find(instruments.Trace).tracer.close()
        costs = probe_costs(traced, 200)
        rows_s = writer_rows_per_s(root)
        tracer = traced.instruments.find(instruments.Trace).tracer
        exact = exact_context_steps(traced, args.error_steps) if args.error_steps else pd.DataFrame()
        mem_1k = tracer_memory(traced, 1000)
        mem_10k = tracer_memory(traced, args.memory_steps)
        tracer.close()  # tracer_memory replaced the instruments: this is the traced trainer's own tracer
        growth, ledger_flush_s, k = ledger_growth(root, args.ledger_steps, args.ledger_batch)
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
          f"after {args.memory_steps / 1000:g}k; device buffer {mem_1k[1]} B vs {mem_10k[1]} B")
    print(f"ledger cost per step: traced step {statistics.median(tr) * 1e3:.2f} ms with the ledger vs "
          f"{statistics.median(nl) * 1e3:.2f} ms without (median ratio {statistics.median(ledger_ratios):.4f}, "
          f"per-round min {min(ledger_ratios):.4f}, max {max(ledger_ratios):.4f}); observe {costs['ledger']:.0f} us")
    report_ledger(growth, ledger_flush_s, k, args.ledger_batch)


def report_ledger(growth: list[tuple[int, int, int, int]], ledger_flush_s: float, k: int, batch: int) -> None:
    print(f"ledger bytes (synthetic slot simulation, no model: {batch} slots, 16 max ACT steps, 1000 "
          f"tasks x 8 augmentations, every {k}-th raw record kept, flush every 20 steps, {ledger_flush_s * 1e6:.0f} "
          f"us of flush per step):")
    for s, raw, agg, records in growth:
        print(f"  {s:>7,} steps: {records:>10,} exits, {(raw + agg) / (s / 1000) / 1024:8.1f} KiB per 1k steps "
              f"(raw records {raw / 1024 / 1024:.1f} MiB, per-task aggregates {agg / 1024:.0f} KiB)")
    if len(growth) > 1:  # the aggregates stop growing once every task's bins exist: the rate is the raw records'
        rates = [((r1 + a1) - (r0 + a0)) / ((s1 - s0) / 1000)
                 for (s0, r0, a0, _), (s1, r1, a1, _) in zip(growth, growth[1:])]
        spans = ", ".join(f"{s0 // 1000}k-{s1 // 1000}k {r / 1024:.1f} KiB"
                          for (s0, *_), (s1, *_), r in zip(growth, growth[1:], rates))
        print(f"  bytes added per 1k steps between marks: {spans}; largest / smallest {max(rates) / min(rates):.4f}")


if __name__ == "__main__":
    main()
