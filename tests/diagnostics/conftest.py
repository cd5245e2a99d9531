"""Synthetic traces for the doctor tests: a tiny numpy simulation of ACT slot bookkeeping, stored with TraceWriter.

The simulation produces the counters the probes would (same column names), for each encoder mode and both samplers,
with the seed's faults injectable, so every rule can be shown to fire on its signature and to stay quiet on healthy
runs. No torch, no etrm: fast and independent of the trainer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter


def simulate(steps: int = 60, B: int = 16, M: int = 4, mode: str = "reencode", sampler: str = "refill",
             fault: str | None = None, halting: str | list[tuple[int, str]] = "mixed", q: str = "learned",
             base_rate: float = 0.3, nan_at: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """Rows of per-step counters (dicts with 'step', 1-based) as the tracer would flush them.

    halting: 'mixed' (halt at a random step 1..M), 'max' (every slot runs M steps: untrained Q, or fct), 'one'
    (everything halts at step 1), or a schedule [(from_step, policy), ...]. q: 'learned' (Q says halt mostly on
    correct sequences), 'none' (never says halt), 'all' (always says halt).
    """
    rng = np.random.default_rng(seed)
    schedule = [(1, halting)] if isinstance(halting, str) else halting
    cur = np.zeros(B, dtype=int)
    target = np.zeros(B, dtype=int)
    halted = np.ones(B, dtype=bool)
    rows = []
    for t in range(1, steps + 1):
        policy = [p for s, p in schedule if s <= t][-1]
        reset = halted.copy()
        if mode == "fct":
            reset = np.full(B, (t - 1) % M == 0)
        n_reset = int(reset.sum())
        draw = {"mixed": rng.integers(1, M + 1, B), "max": np.full(B, M), "one": np.ones(B, dtype=int)}[policy]
        target = np.where(reset, draw, target)
        cur = np.where(reset, 0, cur) + 1
        halted = cur >= target
        if mode == "fct":
            halted = cur >= M
        correct = rng.random(B) < base_rate
        says = {"learned": np.where(correct, rng.random(B) < 0.8, rng.random(B) < 0.05),
                "none": np.zeros(B, dtype=bool), "all": np.ones(B, dtype=bool)}[q]
        cont = B - n_reset
        encoded = n_reset if mode == "cached" else B
        needed = n_reset if mode == "cached" else B
        if fault == "encode-full-batch":
            encoded = B
        exact = correct & halted
        row: dict[str, float] = {
            "step": t,
            "coverage_num": float(n_reset if mode == "cached" else B), "coverage_den": float(B),
            "puzzle_ids_with_grad": float(B if mode == "trm" else 0),
            "resets": float(n_reset), "samples_consumed": float(n_reset),
            "samples_dropped": float(cont if sampler == "trm" else 0), "slots": float(B),
            "encoded": float(encoded), "encode_needed": float(needed),
            "label_mismatch": float(cont if fault == "label-from-batch" else 0),
            "demo_mismatch": 0.0, "carry_mismatch": 0.0, "aligned_den": float(B),
            "halted": float(halted.sum()), "halted_early": float((halted & (cur < M)).sum()),
            "inflight_step_sum": float(cur.sum()), "real_slots": float(B),
            "q_says_halt": float(says.sum()), "explore_vetoes": 0.0,
            "q_tp": float((says & correct).sum()), "q_fp": float((says & ~correct).sum()),
            "q_fn": float((~says & correct).sum()), "q_correct": float(correct.sum()),
            "loss": float(B * (2.0 - t / steps)), "lm_loss": float(B * (1.8 - t / steps)),
            "q_halt_loss": 0.1 * B, "q_continue_loss": 0.0,
            "halted_count": float(halted.sum()), "halted_exact": float(exact.sum()),
            "halted_token_acc": float(halted.sum()) * 0.5, "halted_steps": float(cur[halted].sum()),
            "halted_q_halt_acc": 0.0,
            "inflight_count": float(B), "inflight_exact": float(correct.sum()), "inflight_token_acc": B * 0.5,
            "inflight_steps": float(cur.sum()), "inflight_q_halt_acc": 0.0,
            "non_finite": 0.0, "grad_norm_encoder": 0.5, "grad_norm_rest": 1.0,
        }
        for k in range(1, M + 1):
            row[f"halt_at_{k}"] = float((halted & (cur == k)).sum())
        if nan_at is not None and t >= nan_at:
            row["loss"] = math.nan
            row["non_finite"] = 1.0
            row["grad_norm_rest"] = math.nan
        rows.append(row)
    return rows


def meta_for(mode: str = "reencode", M: int = 4, B: int = 16, model: str | None = None, **extra: Any) -> dict:
    return {"model": model or ("trm" if mode == "trm" else "etrm"), "mode": mode, "max_steps_per_sample": M,
            "batch_size": B, "sampler": "refill", "fault": "", "max_steps": 60, **extra}


def write_trace(run_dir: Path, rows: list[dict[str, float]], meta: dict, alignment: list[tuple] = (),
                markers: tuple[str, ...] = ("start", "end"), evals: dict[int, dict[str, float]] | None = None,
                heartbeat: bool = True) -> Path:
    """Store rows as a run directory's trace.sqlite, as the trainer would (counters declared, then rows)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    w = TraceWriter(run_dir / TRACE_NAME, meta)
    names = [k for k in rows[0] if k != "step"] if rows else []
    w.add_counters((n, "synthetic", n) for n in names)
    if markers[:1]:
        w.marker(markers[0], 0)
    w.write_steps(names, [(r["step"], *(r[n] for n in names)) for r in rows])
    if alignment:
        w.write_alignment(list(alignment))
    for step, values in (evals or {}).items():
        w.write_eval(step, values)
    if heartbeat and rows:
        w.heartbeat(int(rows[-1]["step"]))
    for kind in markers[1:]:
        w.marker(kind, int(rows[-1]["step"]) if rows else 0)
    w.close()
    return run_dir


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """make_run(name, rows, meta, **write_trace options) -> the run directory."""

    def make(name: str, rows: list[dict[str, float]], meta: dict, **kw: Any) -> Path:
        return write_trace(tmp_path / name, rows, meta, **kw)

    return make


@pytest.fixture
def sim() -> Callable[..., list[dict[str, float]]]:
    return simulate


@pytest.fixture
def meta() -> Callable[..., dict]:
    return meta_for


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch):
    """rich wraps at 80 columns off a terminal; keep each warning line whole (torch runs one thread: tests/conftest)."""
    monkeypatch.setenv("COLUMNS", "200")
