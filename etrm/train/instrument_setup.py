"""Which instruments a run carries (``etrm.train.instruments``), from its config and the CLI's flags: ``build``
adds them in calling order; ``add_trace``, ``add_profile``, ... add one each (tests and benchmarks call them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.doctor.eval_findings import LiveEvalDoctor
from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.timing_rules import TimingDoctor
from diagnostics.probes import default_probes
from diagnostics.probes.profiling import PROFILER_DIR, ProfilerWindows, WindowSchedule
from diagnostics.probes.tracer import Tracer
from diagnostics.properties.runtime_check import InvariantChecker
from diagnostics.session import open_writer
from diagnostics.trace import ledger
from diagnostics.trace.loading import load_eval_audits, load_evals, load_run, load_timings
from diagnostics.trace.tb_scalars import TENSORBOARD_DIR, TensorBoardScalars
from etrm.errors import UserError
from etrm.train import distributed
from etrm.train.instruments import CheckInvariants, Doctor, Instruments, Profile, TensorBoard, Trace
from etrm.train.wandb_log import add_wandb

if TYPE_CHECKING:
    from etrm.train.trainer import Trainer

@dataclass
class Options:
    """What the CLI asked for (``etrm-train`` flags)."""

    trace: bool = False
    preset: str | None = None
    profile: bool = False
    tensorboard: bool = False
    check_invariants: bool = False
    wandb: bool = False


def build(trainer: "Trainer", opts: Options) -> Instruments:
    """Add the instruments ``opts`` asks for to ``trainer`` (after the run directory exists, or after resume), in
    the order they are called: invariant checks first (a violation stops the step before anything records it),
    the tracer, the live doctor, then what reads the doctor's findings."""
    if opts.check_invariants:
        add_invariant_checks(trainer)
    if opts.trace:
        add_trace(trainer, opts.preset)
    add_profile(trainer, requested=opts.profile)
    if opts.tensorboard:
        add_tensorboard(trainer)
    if opts.wandb:
        add_wandb(trainer)
    return trainer.instruments


def add_invariant_checks(trainer: "Trainer") -> CheckInvariants:
    return trainer.add(CheckInvariants(InvariantChecker(trainer.model.max_steps)))


def trace_meta(trainer: "Trainer", preset: str | None) -> dict[str, Any]:
    """What the trace's meta table says about the run (the doctor's rules read model, mode, max steps)."""
    cfg = trainer.cfg
    meta = {
        "model": str(cfg.model), "mode": str(cfg.mode), "fault": str(cfg.fault), "preset": preset or "",
        "sampler": str(cfg.train.sampler), "batch_size": cfg.train.batch_size,
        "max_steps_per_sample": cfg.max_steps_per_sample, "max_steps": cfg.train.max_steps,
        "trace_every": cfg.train.trace_every, "diversity_every": cfg.train.diversity_every, "device": trainer.device.type, "config": cfg.to_dict(),
        "doctor": cfg.doctor.to_dict(),
        "ledger_sample_every": ledger.sample_every(cfg.train.batch_size, cfg.train.ledger_every),
    }
    if preset is None and trainer.step:  # resumed (the CLI knows no preset then): keep the one the trace names
        del meta["preset"]
    if trainer.dist.enabled:
        meta["world_size"] = trainer.dist.world
    return meta


def grad_norm_groups(trainer: "Trainer") -> dict:
    """The gradient-norm probe's groups: the trainer's parameter groups, except that TRM's "encoder" group is its
    puzzle table's rows looked up this step (the table is a buffer; the rows are a fresh gradient-receiving leaf)."""
    groups = trainer.parameter_groups()
    emb = getattr(trainer.model, "puzzle_emb", None)
    if emb is not None and not groups["encoder"]:
        groups["encoder"] = lambda: [emb.last_rows] if emb.last_rows is not None else []
    return groups


def add_trace(trainer: "Trainer", preset: str | None = None) -> Trace:
    """Trace every step into ``run_dir/trace.sqlite``; on rank 0 also the live doctor."""
    meta = trace_meta(trainer, preset)
    dist = trainer.dist
    writer = None
    if dist.is_main:  # every rank traces (the counters are summed at each flush); rank 0 stores
        writer = open_writer(trainer.run_dir, meta, trainer.step)
    probes = default_probes(trainer.cfg.max_steps_per_sample, grad_norm_groups(trainer),
                            trainer.cfg.train.diversity_every, trainer.train_ds.puzzle_task, dist.rank)
    saved = trainer.restored_instruments.get("trace", {}).get("probes", {})
    for probe in probes:  # resumed: each probe continues its phase and per-slot state (nothing for a new run)
        probe.resume(trainer.step, saved.get(probe.name))
    columns = [name for p in probes for name, _ in p.counters]
    reduce = gather = None
    if dist.enabled:
        reduce = distributed.trace_reduce(columns, dist.world)
        gather = lambda timings: distributed.gather_objects(timings, dist)  # noqa: E731
    tracer = Tracer(probes, writer, trainer.device, capacity=trainer.cfg.train.trace_every, rank=dist.rank,
                    reduce=reduce, gather=gather)
    trace = trainer.add(Trace(tracer, cuda=trainer.device.type == "cuda"))
    if dist.is_main:
        doctor, evals = LiveDoctor(meta, trainer.cfg.doctor), LiveEvalDoctor(meta, trainer.cfg.doctor)
        timing = TimingDoctor(meta, trainer.cfg.doctor)
        if trainer.step:  # resumed: findings that already held must not fire (and be re-stored) again
            doctor.replay(load_run(trainer.run_dir))
            evals.replay(load_eval_audits(trainer.run_dir), load_evals(trainer.run_dir))
            timing.update(load_timings(trainer.run_dir))
        trainer.add(Doctor(doctor, trace, evals, timing))
    return trace


def add_profile(trainer: "Trainer", requested: bool = True) -> Profile | None:
    """Profiler windows (``[profile]`` settings): one opens now when ``requested`` (``--profile``); when traced with
    ``profile.on_finding``, one opens at the live doctor's first finding. Without either, nothing is created and
    the run pays nothing. Call after ``add_trace``."""
    pc = trainer.cfg.profile
    doctor = trainer.instruments.find(Doctor)
    if not trainer.dist.is_main or (not requested and not (pc.on_finding and doctor is not None)):
        return None  # under torchrun, rank 0's steps are profiled
    windows = ProfilerWindows(
        trainer.run_dir / PROFILER_DIR,
        WindowSchedule(wait=pc.wait, warmup=pc.warmup, active=pc.active, repeat=pc.repeat),
        on_finding=pc.on_finding, cuda=trainer.device.type == "cuda", record_shapes=pc.record_shapes,
        profile_memory=pc.profile_memory, with_stack=pc.with_stack)
    if requested:
        windows.start(trainer.step)
    return trainer.add(Profile(windows, doctor))


def add_tensorboard(trainer: "Trainer") -> TensorBoard | None:
    """TensorBoard scalars of the flushed trace rows and the evals into ``run_dir/tensorboard`` (needs tracing)."""
    if trainer.instruments.find(Trace) is None:
        raise UserError("--tensorboard writes the trace's rows: enable tracing first (--trace)")
    if not trainer.dist.is_main:
        return None
    return trainer.add(TensorBoard(TensorBoardScalars(trainer.run_dir / TENSORBOARD_DIR, str(trainer.cfg.mode))))
