"""GPU check: traced bf16 steps of a mid-size preset under ``torch.cuda.set_sync_debug_mode("error")``, and a table
of eager vs compiled vs CUDA-graph steps.

One short script for when a GPU is at hand (under 10 minutes by default; ``--budget-s`` bounds it). It prints:
- sync check: ``--steps`` traced steps (default 100), each whole step (data path included: the device data path
  reads nothing back) under sync-debug mode "error", so that any host sync in the step raises. On a failure the
  remaining steps run under "warn" to list every sync site, each marked as tracing's (``diagnostics/``) or the
  model's/trainer's own;
- phase timings from the tracer's CUDA events (the trace store's timings table), median ms per phase;
- traced vs untraced step time, interleaved blocks (alternating order), median ratio;
- peak memory (``torch.cuda.max_memory_allocated``) during a traced and an untraced block;
- the variants table, one row per variant printed as soon as it finishes (``VARIANTS``: eager, torch.compile and
  ``mode="reduce-overhead"`` CUDA graphs; traced and untraced; the device, pinned and host data paths): warm-up
  (compile) seconds, host syncs per step (counted under sync-debug "warn", flushes excluded), median step time,
  samples/s and peak memory. A variant the step does not allow (e.g. CUDA graphs over a data-dependent shape) prints its error.

    python benchmarks/gpu_check.py [--preset demo] [--steps 100] [--rounds 6] [--block 10]
                                   [--variants eager,compiled,...] [key=value ...]

Default run: ``demo`` (re-encode) with hidden 512 and batch 256 on 10x10 grids. Use re-encode, fct or trm:
``cached`` mode's subset encode syncs by design (the model reads how many slots to encode). Exit 0 when tracing
added no sync (and, with no GPU here, after saying so), 1 when it did, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

# A mid-size model on larger grids; the user's key=value overrides come after these and win.
DEFAULT_OVERRIDES = ("arch.hidden_size=512", "arch.num_heads=8", "train.batch_size=256", "data.canvas=10",
                     "data.max_grid=8")
CHECK_WARMUP = 2  # unchecked traced steps before the sync check: one-time initialisation is not a per-step cost
SYNCING_MODES = {"cached": "cached mode's subset encode reads the reset count back: a sync by design, not tracing's"}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    """One row of the variants table: how the step is compiled, whether it is traced, which data path feeds it."""

    compile: str  # "eager", "default" (torch.compile) or "reduce-overhead" (torch.compile with CUDA graphs)
    traced: bool
    data_path: str = "device"

    @property
    def overrides(self) -> list[str]:
        return [f"train.data_path={self.data_path}"]


VARIANTS = {
    "eager": Variant("eager", False),
    "eager-traced": Variant("eager", True),
    "eager-host-data": Variant("eager", False, "host"),
    "eager-pinned-data": Variant("eager", False, "pinned"),
    "compiled": Variant("default", False),
    "compiled-traced": Variant("default", True),
    "cudagraphs": Variant("reduce-overhead", False),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, after the defaults")
    p.add_argument("--preset", default="demo", help="preset to check (default demo: ETRM re-encode)")
    p.add_argument("--steps", type=int, default=100, help="traced steps under the sync check (default 100)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (default 6)")
    p.add_argument("--block", type=int, default=10, help="steps per timed block (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per trainer first (default 5)")
    p.add_argument("--sync-steps", type=int, default=10, help="steps per variant whose syncs are counted (default 10)")
    p.add_argument("--budget-s", type=float, default=180.0,
                   help="stop adding timing rounds after this many seconds (default 180; one round always runs)")
    p.add_argument("--variants", default=",".join(VARIANTS), metavar="A,B,...",
                   help=f"rows of the variants table, comma-separated (default all: {','.join(VARIANTS)}; "
                        "an empty string skips the table)")
    p.add_argument("--table-budget-s", type=float, default=330.0,
                   help="skip the remaining variants after this many seconds of the table (default 330)")
    p.add_argument("--preset-only", action="store_true",
                   help=f"use the preset as it is, without the mid-size defaults ({' '.join(DEFAULT_OVERRIDES)})")
    args = p.parse_intermixed_args(argv)
    for name, low in (("steps", 1), ("rounds", 1), ("block", 1), ("warmup", 0), ("sync_steps", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    for name in ("budget_s", "table_budget_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


# The context-diversity probe measures one step in train.diversity_every: the check measures every step, so that the
# probe's measured path runs under the sync check (its few steps follow warm-up steps that would take the one in 8).
CHECK_OVERRIDES = ("train.diversity_every=1",)


def overrides_for(args: argparse.Namespace) -> list[str]:
    """The overrides applied to the preset: the mid-size defaults (unless --preset-only), the check's own, the
    user's, CUDA."""
    return [*(() if args.preset_only else DEFAULT_OVERRIDES), *CHECK_OVERRIDES, *args.overrides,
            'train.device="cuda"']


@dataclass
class CheckResult:
    """Everything the summary block shows (plain values, so the formatting is testable without a GPU)."""

    device: str
    torch_version: str
    preset: str
    mode: str
    overrides: list[str]
    params: int
    batch_size: int
    traced_steps: int
    sync_error: str | None = None
    sync_sites: list[tuple[str, str]] = field(default_factory=list)  # (site, "tracing" | "model/trainer")
    phase_ms: dict[str, float] = field(default_factory=dict)
    phase_steps: int = 0
    step_ms_untraced: float | None = None
    step_ms_traced: float | None = None
    ratios: list[float] = field(default_factory=list)
    peak_mib_traced: float | None = None
    peak_mib_untraced: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tracing_syncs(self) -> list[str]:
        return [site for site, who in self.sync_sites if who == "tracing"]

    @property
    def passed(self) -> bool:
        return not self.tracing_syncs


def format_summary(r: CheckResult) -> str:
    """The one block the script prints."""
    rule = "=" * 100
    lines = [rule, "etrm gpu_check", rule]

    def row(key: str, value: str) -> None:
        lines.append(f"{key:<16} {value}")

    row("device", f"{r.device} | torch {r.torch_version} | bf16 autocast")
    row("run", f"preset {r.preset} (mode {r.mode}) | {r.params:,} params | batch {r.batch_size}")
    row("overrides", " ".join(r.overrides) or "-")
    if not r.sync_sites and r.sync_error is None:
        row("sync check", f"PASS: {r.traced_steps} traced steps under set_sync_debug_mode(\"error\"), no host sync "
                          f"(after {CHECK_WARMUP} unchecked steps; the whole step, data path included)")
    else:
        verdict = "FAIL" if r.tracing_syncs else "PASS for tracing"
        row("sync check", f"{verdict}: {len(r.sync_sites)} sync site(s) in the traced step"
                          + (f"; first error: {r.sync_error}" if r.sync_error else ""))
        for site, who in r.sync_sites:
            row("", f"  {who:<13} {site}")
    if r.phase_ms:
        total = sum(r.phase_ms.values())
        parts = " | ".join(f"{k} {v:.2f}" for k, v in r.phase_ms.items())
        row("phase ms", f"{parts} | sum {total:.2f}  (CUDA events, median over {r.phase_steps} steps)")
    if r.ratios:
        row("step time", f"untraced {_ms(r.step_ms_untraced)}, traced {_ms(r.step_ms_traced)}: traced/untraced "
                         f"{statistics.median(r.ratios):.3f} (median of {len(r.ratios)} interleaved rounds, "
                         f"{min(r.ratios):.3f}..{max(r.ratios):.3f})")
    if r.peak_mib_traced is not None:
        row("peak memory", f"traced block {r.peak_mib_traced:,.0f} MiB, untraced block {r.peak_mib_untraced:,.0f} MiB "
                           "(max_memory_allocated; both models resident)")
    for note in r.notes:
        row("note", note)
    row("wall time", f"{r.seconds:.0f} s")
    lines.append(rule)
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def no_gpu_message() -> str:
    build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
    return (f"gpu_check: no CUDA GPU is available here (torch {torch.__version__}, {build}); nothing to check. "
            "Run it on a machine with a GPU.")


# ---------------------------------------------------------------------------------------------------------------
# The GPU part

def _site(frames: Sequence[Any]) -> tuple[str, str] | None:
    """The innermost frame in ``etrm/`` or ``diagnostics/``: ``path:line``, and whose code it is."""
    for fr in reversed(list(frames)):
        path = Path(fr.filename).resolve()
        if REPO not in path.parents:
            continue
        rel = path.relative_to(REPO).as_posix()
        if not rel.startswith(("etrm/", "diagnostics/")):  # this script, the venv's torch, tests
            continue
        return f"{rel}:{fr.lineno}", "tracing" if rel.startswith("diagnostics/") else "model/trainer"
    return None


def _tracer(trainer: Any) -> Any:
    from etrm.train.instruments import Trace

    return trainer.instruments.find(Trace).tracer


def _flush_due(trainer: Any) -> None:
    if trainer.step % trainer.cfg.train.trace_every == 0:
        trainer.instruments.flush_rows()  # the one read-back, outside the checked step as in the trainer's loop


def sync_checked_steps(trainer: Any, steps: int) -> tuple[str | None, tuple[str, str] | None, int]:
    """Run steps under mode "error"; returns (error text, its site, steps completed) or (None, None, steps)."""
    for i in range(steps):
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step()
        except RuntimeError as exc:
            if "synchroniz" not in str(exc).lower():
                raise
            return " ".join(str(exc).split())[:200], _site(traceback.extract_tb(exc.__traceback__)), i
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _flush_due(trainer)
    return None, None, steps


def sync_sites_warned(trainer: Any, steps: int) -> list[tuple[str, str]]:
    """Run steps under mode "warn" and list every distinct sync site (the Python line that called the op)."""
    sites: dict[str, str] = {}
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                found = _site([traceback.FrameSummary(w.filename, w.lineno, "")])
                site, who = found or (f"{w.filename}:{w.lineno}", "model/trainer")
                sites.setdefault(site, who)
        _flush_due(trainer)
    return list(sites.items())


def timed_block(trainer: Any, steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
        _flush_due(trainer)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_check(args: argparse.Namespace, device: torch.device | None = None) -> CheckResult:
    """Build the traced and untraced trainers on ``device`` (CUDA; tests pass the CPU with torch.cuda faked)."""
    from diagnostics.trace.loading import load_timings
    from etrm.config import Config, apply_overrides
    from etrm.presets import load_preset
    from etrm.train import instrument_setup, instruments
    from etrm.train.trainer import Trainer

    t_start = time.perf_counter()
    overrides = overrides_for(args)
    cfg = Config.from_dict(apply_overrides(load_preset(args.preset), overrides))
    device = device or torch.device("cuda")
    tmp = tempfile.TemporaryDirectory(prefix="etrm-gpu-check-")
    root = Path(tmp.name)

    def build(name: str, traced: bool) -> Trainer:
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, root / name, device=device)
        (root / name).mkdir()
        if traced:
            instrument_setup.add_trace(trainer, args.preset)
        return trainer

    traced = build("traced", True)
    mode = traced.model.mode
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    result = CheckResult(device=name, torch_version=torch.__version__,
                         preset=args.preset, mode=mode, overrides=overrides[:-1],
                         params=traced.model.num_trainable_parameters(), batch_size=cfg.train.batch_size,
                         traced_steps=args.steps)
    if mode in SYNCING_MODES:
        result.notes.append(SYNCING_MODES[mode])

    # 1. the sync check, and the phase timings of the same traced steps (after steps that initialise lazily:
    #    the halting RNG, the optimizer state, cuBLAS handles)
    for _ in range(CHECK_WARMUP):
        traced.train_step()
        _flush_due(traced)
    error, site, done = sync_checked_steps(traced, args.steps)
    if error is not None:
        result.sync_error = error
        result.traced_steps = done
        _tracer(traced).close()  # a step was cut short: start over on a fresh trainer, listing every site
        traced = build("traced-warn", True)
        result.sync_sites = sync_sites_warned(traced, min(args.steps, 10))
        if site is not None and site[0] not in dict(result.sync_sites):
            result.sync_sites.insert(0, site)
    _tracer(traced).drain()
    timings = load_timings(traced.run_dir)
    if len(timings):
        med = timings.groupby("phase")["seconds"].median() * 1e3
        order = ["data", "h2d", "encoder", "inner", "loss", "trace", "backward", "optimizer"]
        result.phase_ms = {p: float(med[p]) for p in order if p in med.index}
        result.phase_ms.update({p: float(v) for p, v in med.items() if p not in result.phase_ms})
        result.phase_steps = int(timings["step"].nunique())

    # 2. traced vs untraced, interleaved in alternating order; peak memory in the first round
    plain = build("untraced", False)
    if args.warmup:
        timed_block(plain, args.warmup)
        timed_block(traced, args.warmup)
    base, tr = [], []
    for r in range(args.rounds):
        first_round = r == 0
        pair = [(plain, base), (traced, tr)] if r % 2 == 0 else [(traced, tr), (plain, base)]
        for trainer, out in pair:
            if first_round:
                torch.cuda.reset_peak_memory_stats()
            out.append(timed_block(trainer, args.block))
            if first_round:
                peak = torch.cuda.max_memory_allocated() / 2**20
                if trainer is traced:
                    result.peak_mib_traced = peak
                else:
                    result.peak_mib_untraced = peak
        if time.perf_counter() - t_start > args.budget_s:
            result.notes.append(f"stopped after {r + 1} timing rounds: --budget-s {args.budget_s:g} reached")
            break
    result.ratios = [b / a for a, b in zip(base, tr)]
    result.step_ms_untraced, result.step_ms_traced = statistics.median(base), statistics.median(tr)
    _tracer(traced).close()
    tmp.cleanup()
    result.seconds = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------------------------------------
# The variants table

@dataclass
class Row:
    """One variant's figures (``error`` set instead when the variant could not run)."""

    name: str
    warmup_s: float = 0.0
    syncs_per_step: float | None = None
    step_ms: float | None = None
    samples_per_s: float | None = None
    peak_mib: float | None = None
    error: str | None = None


TABLE_HEADER = (f"{'variant':<17} {'compile':<16} {'traced':<6} {'data':<6} {'warm-up s':>9} {'syncs/step':>10} "
                f"{'step ms':>9} {'samples/s':>10} {'peak MiB':>9}")


def format_row(row: Row, variant: Variant) -> str:
    head = f"{row.name:<17} {variant.compile:<16} {'yes' if variant.traced else 'no':<6} {variant.data_path:<6}"
    if row.error is not None:
        return f"{head} failed: {row.error}"
    return (f"{head} {row.warmup_s:>9.1f} {row.syncs_per_step:>10.2f} {row.step_ms:>9.2f} "
            f"{row.samples_per_s:>10.0f} {row.peak_mib:>9,.0f}")


def compile_modules(trainer: Any, mode: str) -> None:
    """torch.compile the recursion core and the encoder in place, as ``train.compile=true`` does, in ``mode``."""
    kwargs = {} if mode == "default" else {"mode": mode}
    trainer.model.core.compile(**kwargs)
    if hasattr(trainer.model, "encoder"):
        trainer.model.encoder.compile(**kwargs)


def count_syncs(step: Any, trainer: Any, steps: int) -> float:
    """Host syncs per step under sync-debug "warn" (each synchronizing call warns once); flushes not counted."""
    total = 0
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        total += sum("synchroniz" in str(w.message).lower() for w in caught)
        _flush_due(trainer)
    return total / steps


def measure_variant(name: str, variant: Variant, cfg_data: dict, device: torch.device, root: Path,
                    args: argparse.Namespace) -> Row:
    """Build the variant's trainer, warm it up (compiling), count its syncs, time it; any failure is the row's."""
    from etrm.config import Config, apply_overrides
    from etrm.train import instrument_setup, instruments
    from etrm.train.trainer import Trainer

    row = Row(name)
    trainer = None
    try:
        torch.manual_seed(0)
        cfg = Config.from_dict(apply_overrides(cfg_data, variant.overrides))
        trainer = Trainer(cfg, root / name, device=device)
        (root / name).mkdir()
        if variant.traced:
            instrument_setup.add_trace(trainer, args.preset)
        if variant.compile != "eager":
            compile_modules(trainer, variant.compile)
        graphs = variant.compile == "reduce-overhead"

        def step() -> Any:
            if graphs:  # a new step: CUDA-graph outputs of the last one may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
            return trainer.train_step()

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, CHECK_WARMUP)):
            step()
            _flush_due(trainer)
        torch.cuda.synchronize()
        row.warmup_s = time.perf_counter() - t0
        row.syncs_per_step = count_syncs(step, trainer, args.sync_steps)
        torch.cuda.reset_peak_memory_stats()
        seconds, samples = [], []
        for _ in range(args.rounds):
            resets = torch.zeros((), dtype=torch.long, device=device)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.block):
                events, _ = step()
                resets += events.reset.sum()
                _flush_due(trainer)
            torch.cuda.synchronize()
            seconds.append((time.perf_counter() - t0) / args.block)
            samples.append(int(resets.item()) / (seconds[-1] * args.block))
        row.step_ms = statistics.median(seconds) * 1e3
        row.samples_per_s = statistics.median(samples)
        row.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # a variant the step does not allow: its error is the row
        row.error = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    finally:
        if trainer is not None and (trace := trainer.instruments.find(instruments.Trace)) is not None:
            trace.tracer.close()
        torch.compiler.reset()
    return row


def run_table(args: argparse.Namespace, device: torch.device | None = None, out: Any = print) -> list[Row]:
    """Measure each variant of ``--variants`` in turn; ``out`` gets the header and each row as it finishes."""
    from etrm.config import apply_overrides
    from etrm.presets import load_preset

    if not args.variants:
        return []
    device = device or torch.device("cuda")
    cfg_data = apply_overrides(load_preset(args.preset), overrides_for(args))
    t_start = time.perf_counter()
    rows: list[Row] = []
    out(f"variants (preset {args.preset}, {args.rounds} blocks x {args.block} steps each after {args.warmup} warm-up "
        f"steps; syncs counted over {args.sync_steps} steps; rows run one after another)")
    out(TABLE_HEADER)
    with tempfile.TemporaryDirectory(prefix="etrm-gpu-table-") as tmp:
        for name in args.variants:
            if time.perf_counter() - t_start > args.table_budget_s:
                rows.append(Row(name, error=f"skipped: --table-budget-s {args.table_budget_s:g} reached"))
            else:
                rows.append(measure_variant(name, VARIANTS[name], cfg_data, device, Path(tmp), args))
            out(format_row(rows[-1], VARIANTS[name]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(no_gpu_message())
        return 0
    result = run_check(args)
    print(format_summary(result), flush=True)
    run_table(args, out=lambda line: print(line, flush=True))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
