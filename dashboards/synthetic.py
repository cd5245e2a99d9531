"""Synthetic traces for the dashboard's benchmark and tests: a vectorised numpy stand-in for a traced run.

Rows carry the counters the built-in probes write (same column names, numerator and denominator kept apart).
``write_synthetic`` stores every row through ``TraceWriter``'s flush path, so the dashboard reads them exactly as it
reads a trainer's trace (tests). ``write_bulk`` makes the same schema, for millions of steps, in seconds: numpy draws
a template of the run's rows, SQLite copies it to every step inside large transactions (a recursive CTE), phase
timings are drawn in SQL, and the writer's own rollups summarise each chunk (benchmarks). No torch, no etrm.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter

PHASES = ("data", "h2d", "encoder", "inner", "loss", "trace", "backward", "optimizer")
PHASE_SECONDS = (0.004, 0.001, 0.012, 0.030, 0.002, 0.001, 0.045, 0.006)


def counter_names(max_steps_per_sample: int) -> list[str]:
    """The per-step columns of a trace made by the default probes (with gradient norms)."""
    from diagnostics.probes import default_probes

    return [name for p in default_probes(max_steps_per_sample, {"encoder": [], "rest": []}) for name, _ in p.counters]


def _chunk(rng: np.random.Generator, first: int, n: int, total: int, B: int, M: int, mode: str) -> dict:
    """Counters for steps first..first+n-1: halting spreads over 1..M, accuracy and coverage follow the mode."""
    steps = np.arange(first, first + n)
    progress = steps / max(total, 1)
    halted = rng.binomial(B, 1.0 / (1.0 + 0.5 * M * (1 - 0.5 * progress)))
    resets = np.concatenate([[B], halted[:-1]]) if first == 1 else halted  # slots halted last step are reset
    p = np.linspace(1.5, 0.5, M)
    p = p / p.sum()
    hist = _fast_multinomial(rng, halted, p)
    halted_steps = (hist * np.arange(1, M + 1)).sum(1)
    acc = np.clip(0.05 + 0.85 * progress + rng.normal(0, 0.03, n), 0, 1)
    exact_h = rng.binomial(halted, acc)
    exact_i = rng.binomial(B, acc * 0.9)
    correct = rng.binomial(B, acc * 0.8)
    q_tp = rng.binomial(correct, 0.7)
    q_fn = correct - q_tp
    q_fp = rng.binomial(B - correct, 0.05)
    cov = resets if mode == "cached" else np.full(n, B)
    encoded = resets if mode == "cached" else np.full(n, B)
    loss = (2.5 * np.exp(-3 * progress) + 0.1 + rng.normal(0, 0.05, n)).clip(0.01) * B
    out = {
        "coverage_num": cov, "coverage_den": np.full(n, B), "puzzle_ids_with_grad": np.zeros(n),
        "resets": resets, "samples_consumed": resets, "samples_dropped": np.zeros(n), "slots": np.full(n, B),
        "encoded": encoded, "encode_needed": encoded, "label_mismatch": np.zeros(n), "demo_mismatch": np.zeros(n),
        "carry_mismatch": np.zeros(n), "aligned_den": np.full(n, B), "halted": halted,
        "inflight_step_sum": B * (1 + 0.4 * M * (1 - 0.5 * progress)), "real_slots": np.full(n, B),
        "q_says_halt": q_tp + q_fp, "explore_vetoes": rng.binomial(halted, 0.1), "q_tp": q_tp, "q_fp": q_fp,
        "q_fn": q_fn, "q_correct": correct,
        "loss": loss, "lm_loss": loss * 0.9, "q_halt_loss": loss * 0.08, "q_continue_loss": loss * 0.02,
        "halted_count": halted, "halted_exact": exact_h, "halted_token_acc": halted * np.sqrt(acc),
        "halted_steps": halted_steps, "halted_q_halt_acc": halted * 0.8, "inflight_count": np.full(n, B),
        "inflight_exact": exact_i, "inflight_token_acc": B * np.sqrt(acc), "inflight_steps": np.full(n, B * 2.0),
        "inflight_q_halt_acc": np.full(n, B * 0.8), "non_finite": np.zeros(n),
        "grad_norm_encoder": (cov / B) * (0.5 + rng.random(n) * 0.2), "grad_norm_rest": 1.0 + rng.random(n) * 0.3,
    }
    for k in range(M):
        out[f"halt_at_{k + 1}"] = hist[:, k]
    out["halted_early"] = halted - hist[:, M - 1]
    for name in counter_names(M):  # counters this generator does not model (context diversity) stay 0
        out.setdefault(name, np.zeros(n))
    return {"steps": steps, **out}


def _fast_multinomial(rng: np.random.Generator, counts: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise multinomial draws by sequential binomials (vectorised over rows)."""
    left = counts.astype(np.int64)
    rest = 1.0
    cols = []
    for pk in p[:-1]:
        x = rng.binomial(left, min(pk / rest, 1.0))
        cols.append(x)
        left = left - x
        rest -= pk
    cols.append(left)
    return np.stack(cols, axis=1)


def _start(run_dir: str | Path, steps: int, mode: str, batch_size: int, max_steps_per_sample: int, seed: int,
           preset: str) -> tuple[Path, np.random.Generator, dict]:
    """The run directory (created), the random generator and the trace meta of a synthetic run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": "etrm", "mode": mode, "fault": "none", "preset": preset, "sampler": "refill",
            "batch_size": batch_size, "max_steps_per_sample": max_steps_per_sample, "max_steps": steps,
            "trace_every": 20, "device": "cpu"}
    return run_dir, np.random.default_rng(seed), meta


def write_synthetic(run_dir: str | Path, steps: int, *, mode: str = "cached", batch_size: int = 64,
                    max_steps_per_sample: int = 16, timings: bool = True, finished: bool = True,
                    chunk: int = 50_000, seed: int = 0, preset: str = "synthetic",
                    doctor: dict | None = None) -> Path:
    """Write a ``steps``-step synthetic trace into ``run_dir`` (created); returns the directory."""
    run_dir, rng, meta = _start(run_dir, steps, mode, batch_size, max_steps_per_sample, seed, preset)
    M, B = max_steps_per_sample, batch_size
    if doctor is not None:  # the run's doctor thresholds, as the trainer stores its config's [doctor]
        meta["doctor"] = doctor
    w = TraceWriter(run_dir / TRACE_NAME, meta)
    names = counter_names(M)
    w.add_counters((n, "synthetic", n) for n in names)
    w.conn.commit()
    w.conn.execute("PRAGMA synchronous=OFF")
    w.marker("start", 0)
    live = LiveDoctor(meta, DoctorConfig.from_meta(meta))  # as the trainer does: findings stored when first held
    for first in range(1, steps + 1, chunk):
        n = min(chunk, steps - first + 1)
        c = _chunk(rng, first, n, steps, B, M, mode)
        cols = [c["steps"]] + [np.asarray(c[name], dtype=float) for name in names]
        w.write_steps(names, list(zip(*(col.tolist() for col in cols))))
        if timings:
            base = np.asarray(PHASE_SECONDS)
            sec = base[None, :] * (1 + 0.15 * rng.standard_normal((n, len(PHASES))).clip(-0.9, 3))
            w.write_timings([(int(s), 0, ph, float(sec[i, j])) for i, s in enumerate(c["steps"].tolist())
                             for j, ph in enumerate(PHASES)])
        frame = {"step": c["steps"].tolist(), **{name: np.asarray(c[name], dtype=float).tolist() for name in names}}
        rows = [dict(zip(frame, vals)) for vals in zip(*frame.values())]
        for finding in live.update(rows):
            finding.store(w)
        w.heartbeat(first + n - 1)
        w.commit()
    for s in range(max(steps // 10, 1), steps + 1, max(steps // 10, 1)):
        w.write_eval(s, {"exact": min(0.9, s / steps), "token": min(0.97, 0.3 + s / steps)})
    if finished:
        w.marker("end", steps)
    w.close()
    return run_dir


def _template_index(steps: np.ndarray, total: int, size: int) -> np.ndarray:
    """The template row each step copies: its place in the run, jittered by up to 32 rows so neighbours differ.
    The same integer arithmetic as ``_TEMPLATE_SQL``."""
    i = (steps - 1) * size // total + (steps * 7919) % 65 - 32
    return np.clip(i, 0, size - 1)


_TEMPLATE_SQL = "MIN(MAX((s - 1) * {size} / {total} + (s * 7919) % 65 - 32, 0), {size} - 1)"
# a phase's seconds: its base time times a noise of +-15% hashed from (step, phase), the same in SQL and numpy
_NOISE_SQL = "(1.0 + 0.15 * (((s * 2654435761 + p.k * 40503) % 2001) - 1000) / 1000.0)"


def _noise(steps: np.ndarray, k: int) -> np.ndarray:
    return 1.0 + 0.15 * (((steps * 2654435761 + k * 40503) % 2001) - 1000) / 1000.0


def _timing_sums(steps: np.ndarray) -> list[tuple[int, str, int, float]]:
    """(finest bucket, phase, rows, seconds) sums of the timings ``_NOISE_SQL`` draws for ``steps``."""
    from diagnostics.trace.schema import ROLLUP_WIDTHS

    keys = (steps - 1) // ROLLUP_WIDTHS[0]
    at = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    n = np.diff(np.r_[at, len(steps)]).tolist()
    out = []
    for k, (phase, base) in enumerate(zip(PHASES, PHASE_SECONDS)):
        sums = np.add.reduceat(base * _noise(steps, k), at).tolist()
        out += [(b, phase, c, v) for b, c, v in zip(keys[at].tolist(), n, sums)]
    return out


def write_bulk(run_dir: str | Path, steps: int, *, mode: str = "cached", batch_size: int = 64,
               max_steps_per_sample: int = 16, timings: bool = True, finished: bool = True,
               template: int = 65_536, chunk: int = 262_144, seed: int = 0, preset: str = "synthetic",
               progress=None) -> Path:
    """Write a ``steps``-step synthetic trace fast (the schema ``TraceWriter`` writes, rollups included).

    ``template`` rows drawn as ``write_synthetic`` draws a run (its trends over the run's length) are copied by
    SQLite to every step, each step taking the row for its place in the run (``_template_index``); timings are
    drawn in SQL (a noise hashed from step and phase, ``_NOISE_SQL``, so numpy knows their sums); each chunk of
    ``chunk`` steps is one transaction, summarised by the writer's own rollups (``Rollups.add`` on the same values,
    ``TraceWriter.add_timing_sums``). Findings come from the live doctor over the template. ``progress`` (optional)
    is called with the steps written so far."""
    run_dir, rng, meta = _start(run_dir, steps, mode, batch_size, max_steps_per_sample, seed, preset)
    M, B = max_steps_per_sample, batch_size
    w = TraceWriter(run_dir / TRACE_NAME, meta)
    names = counter_names(M)
    w.add_counters((n, "synthetic", n) for n in names)
    w.marker("start", 0)
    w.commit()
    conn = w.conn
    conn.execute("PRAGMA journal_mode=OFF")  # one writer, nobody reading yet: no journal while bulk loading
    conn.execute("PRAGMA synchronous=OFF")
    size = min(template, steps)
    t = _chunk(rng, 1, size, size, B, M, mode)
    tpl = np.stack([np.asarray(t[n], dtype=float) for n in names], axis=1)
    cols = ", ".join(f'"{n}"' for n in names)
    conn.execute(f"CREATE TEMP TABLE tpl (i INTEGER PRIMARY KEY, {cols})")
    conn.executemany(f"INSERT INTO tpl VALUES ({', '.join('?' * (len(names) + 1))})",
                     [(i, *r) for i, r in enumerate(tpl.tolist())])
    conn.execute("CREATE TEMP TABLE phases (k INTEGER PRIMARY KEY, phase TEXT, base REAL)")
    conn.executemany("INSERT INTO phases VALUES (?, ?, ?)", list(zip(range(len(PHASES)), PHASES, PHASE_SECONDS)))
    index = _TEMPLATE_SQL.format(size=size, total=steps)
    seq = "WITH RECURSIVE seq(s) AS (SELECT ? UNION ALL SELECT s + 1 FROM seq WHERE s < ?) "
    step_sql = (f"{seq}INSERT INTO steps (step, {cols}) SELECT s, {', '.join('t.' + c for c in cols.split(', '))} "
                f"FROM seq JOIN tpl t ON t.i = {index}")
    timing_sql = (f"{seq}INSERT INTO timings (step, rank, phase, seconds) SELECT s, 0, p.phase, "
                  f"p.base * {_NOISE_SQL} FROM seq CROSS JOIN phases p")
    for first in range(1, steps + 1, chunk):
        last = min(first + chunk - 1, steps)
        conn.execute(step_sql, (first, last))
        at = np.arange(first, last + 1, dtype=np.int64)
        w.rollups.add(names, at, tpl[_template_index(at, steps, size)])
        if timings:
            conn.execute(timing_sql, (first, last))
            w.add_timing_sums(_timing_sums(at))
        w.heartbeat(last)
        w.commit()
        if progress is not None:
            progress(last)
    live = LiveDoctor(meta, DoctorConfig.from_meta(meta))  # the template as the run: its findings, at its steps
    pick = np.arange(0, size, max(1, size // 8192))  # 8k rows are enough for the doctor's windows
    where = np.linspace(1, steps, size).round().astype(np.int64)[pick]
    rows = [{"step": int(s), **dict(zip(names, r))} for s, r in zip(where.tolist(), tpl[pick].tolist())]
    for finding in live.update(rows):
        finding.store(w)
    for s in range(max(steps // 10, 1), steps + 1, max(steps // 10, 1)):
        w.write_eval(s, {"exact": min(0.9, s / steps), "token": min(0.97, 0.3 + s / steps)})
    if finished:
        w.marker("end", steps)
    w.commit()
    conn.execute("DROP TABLE tpl")
    conn.execute("DROP TABLE phases")
    conn.execute("PRAGMA journal_mode=WAL")
    w.close()
    return run_dir


if __name__ == "__main__":  # python -m dashboards.synthetic DIR STEPS
    import sys

    t = time.perf_counter()
    write_synthetic(sys.argv[1], int(sys.argv[2]))
    print(f"wrote {sys.argv[2]} steps in {time.perf_counter() - t:.1f} s")
