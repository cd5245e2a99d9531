"""Instruments: everything optional a run can carry (tracer, invariant checks, live doctor, profiler windows,
TensorBoard, W&B), each a small ``Instrument`` that the trainer calls at fixed points of its loop.

The trainer does the engineering (steps, flushes, evals, checkpoints, DDP) and names no instrument; an instrument
declares what it does at each point (Lightning's callbacks). ``build`` makes a run's instruments from the config and
the CLI's flags, in one place; adding an instrument is a class here and a line in ``build``.

Order of the calls of one training step (``Trainer.train_step``)::

    before_step(step, carry)        before the batch is fetched
    begin_phase(name) / end_phase   around data, h2d, encoder, inner, loss, trace, backward, optimizer
    on_step(record)                 after the loss, before backward (gradient hooks attach here)
    after_backward(step)            gradients present, before the optimizer
    after_step(step)                the optimizer step is done

and of the loop (``Trainer.run``): ``on_start``; per flush ``flush_rows`` (the rows the tracer read back) then
``on_flush(rows, step)``; ``on_eval(step, values)`` then ``on_eval_audit(step, audits)`` (the evaluation audits:
``diagnostics.trace.eval_audits``); ``on_checkpoint(step)`` before a checkpoint is written;
``on_end(step, status, detail)`` once, however the run ends (``end``, ``stopped``, ``crashed``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from rich.markup import escape

from diagnostics.trace import ledger
from diagnostics.doctor.findings import Finding
from diagnostics.doctor.live import LiveDoctor
from diagnostics.trace.eval_audits import EvalAudit
from diagnostics.doctor.eval_findings import LiveEvalDoctor
from diagnostics.doctor.ledger_doctor import diagnose_run as diagnose_ledger_run
from diagnostics.events import PhaseClock, StepEvents
from diagnostics.doctor.spike_rules import SPIKES
from diagnostics.doctor.timing_rules import TimingDoctor
from diagnostics.trace.loading import load_eval_audits, load_evals, load_run, load_timings
from diagnostics.probes import default_probes
from diagnostics.probes.profiling import PROFILER_DIR, ProfilerWindows, WindowSchedule
from diagnostics.properties.runtime_check import InvariantChecker
from diagnostics.session import open_writer
from diagnostics.trace.tb_scalars import TENSORBOARD_DIR, TensorBoardScalars
from diagnostics.probes.tracer import Tracer
from etrm.errors import UserError
from etrm.model import Carry
from etrm.train import distributed

if TYPE_CHECKING:
    from etrm.train.console import Reporter
    from etrm.train.trainer import Trainer

Tensor = torch.Tensor
Rows = list[dict[str, float]]


@dataclass
class StepRecord:
    """One training step as instruments see it after the loss: ``step`` is the count of steps done before it."""

    step: int
    batch: dict[str, Tensor]
    carry: Carry  # after the step
    events: StepEvents
    metrics: dict[str, Tensor]


class Instrument:
    """The interface: every hook does nothing unless overridden. ``times_phases``: wants ``begin/end_phase``."""

    times_phases = False

    def on_start(self, reporter: "Reporter", max_steps: int) -> None: ...
    def before_step(self, step: int, carry: Carry) -> None: ...
    def begin_phase(self, name: str) -> None: ...
    def end_phase(self, name: str) -> None: ...
    def on_step(self, record: StepRecord) -> None: ...
    def after_backward(self, step: int) -> None: ...
    def after_step(self, step: int) -> None: ...
    def flush_rows(self) -> Rows:
        return []
    def on_flush(self, rows: Rows, step: int) -> None: ...
    def on_eval(self, step: int, values: Mapping[str, float]) -> None: ...
    def on_eval_audit(self, step: int, audits: Sequence[EvalAudit]) -> None: ...
    def on_checkpoint(self, step: int) -> None: ...
    def on_end(self, step: int, status: str, detail: str) -> None: ...
    def stop_note(self, step: int) -> str:
        """What this instrument adds to the non-finite stop's line (e.g. the spike that preceded it)."""
        return ""

    def summary(self) -> dict[str, str]:
        """Lines for the end-of-run summary (what was written where)."""
        return {}


class Instruments(list):
    """A run's instruments, called in order; also the phase clock the model is handed (``start``/``stop``)."""

    @property
    def times_phases(self) -> bool:
        return any(i.times_phases for i in self)

    def clock(self) -> "Instruments | None":
        """What the model times its phases with: these instruments when one wants phases, else nothing."""
        return self if self.times_phases else None

    def start(self, name: str) -> None:
        for i in self:
            i.begin_phase(name)

    def stop(self, name: str) -> None:
        for i in reversed(self):
            i.end_phase(name)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named phase of the step (no sync: the tracer's clock records events, the profiler names a range)."""
        timed = self.times_phases
        if timed:
            self.start(name)
        yield
        if timed:
            self.stop(name)

    def on_start(self, reporter: "Reporter", max_steps: int) -> None:
        for i in self:
            i.on_start(reporter, max_steps)

    def before_step(self, step: int, carry: Carry) -> None:
        for i in self:
            i.before_step(step, carry)

    def on_step(self, record: StepRecord) -> None:
        for i in self:
            i.on_step(record)

    def after_backward(self, step: int) -> None:
        for i in self:
            i.after_backward(step)

    def after_step(self, step: int) -> None:
        for i in self:
            i.after_step(step)

    def on_flush(self, rows: Rows, step: int) -> None:
        for i in self:
            i.on_flush(rows, step)

    def on_eval(self, step: int, values: Mapping[str, float]) -> None:
        for i in self:
            i.on_eval(step, values)

    def on_eval_audit(self, step: int, audits: Sequence[EvalAudit]) -> None:
        for i in self:
            i.on_eval_audit(step, audits)

    def on_checkpoint(self, step: int) -> None:
        for i in self:
            i.on_checkpoint(step)

    def on_end(self, step: int, status: str, detail: str) -> None:
        for i in self:
            i.on_end(step, status, detail)

    def flush_rows(self) -> Rows:
        return [row for i in self for row in i.flush_rows()]

    def summary(self) -> dict[str, str]:
        return {k: v for i in self for k, v in i.summary().items()}

    def stop_note(self, step: int) -> str:
        return "".join(i.stop_note(step) for i in self)

    def find(self, kind: type) -> Any:
        """The first instrument of ``kind``, or None."""
        return next((i for i in self if isinstance(i, kind)), None)


# ------------------------------------------------------------------------------------------------------------------
class OnStep(Instrument):
    """Calls ``fn(step, events, metrics)`` after each step's loss (tests, benchmarks: what a step hook was)."""

    def __init__(self, fn: Callable[[int, StepEvents, dict[str, Tensor]], None]) -> None:
        self.fn = fn

    def on_step(self, record: StepRecord) -> None:
        self.fn(record.step, record.events, record.metrics)


class Trace(Instrument):
    """``--trace``: the probes' counters per step into ``trace.sqlite`` (rank 0 stores; every rank counts), the
    phase timings, evals and lifecycle markers."""

    times_phases = True

    def __init__(self, tracer: Tracer, cuda: bool) -> None:
        self.tracer, self.cuda = tracer, cuda
        self.clock: PhaseClock | None = None
        self.closed = False

    def before_step(self, step: int, carry: Carry) -> None:
        self.clock = PhaseClock(cuda=self.cuda)

    def begin_phase(self, name: str) -> None:
        if self.clock is not None:
            self.clock.start(name)

    def end_phase(self, name: str) -> None:
        if self.clock is not None:
            self.clock.stop(name)

    def on_step(self, record: StepRecord) -> None:
        if not self.closed:  # the trace ends with its run; later steps are not traced
            self.tracer.on_step(record.step, record.events, record.metrics, clock=self.clock)

    def after_backward(self, step: int) -> None:
        if not self.closed:
            self.tracer.after_backward()

    def flush_rows(self) -> Rows:
        return [] if self.closed else self.tracer.flush()

    def on_eval(self, step: int, values: Mapping[str, float]) -> None:
        values = dict(values)
        if not self.closed:
            self.tracer.submit(lambda w: w.write_eval(step, values))

    def on_eval_audit(self, step: int, audits: Sequence[EvalAudit]) -> None:
        audits = list(audits)
        if not self.closed:
            self.tracer.submit(lambda w: w.write_eval_audits(audits))

    def on_checkpoint(self, step: int) -> None:
        if not self.closed:  # the ledger's exits so far become what a resume from this checkpoint keeps
            self.tracer.submit(lambda w: w.ledger_checkpoint(step))
        self.tracer.drain()  # every row up to this step is committed before the checkpoint (resume loses none)

    def on_end(self, step: int, status: str, detail: str) -> None:
        if not self.closed:
            self.tracer.submit(lambda w: w.marker(status, step, detail))
            self.tracer.close()
            self.closed = True


class CheckInvariants(Instrument):
    """``--check-invariants``: the carry/label invariants on every step (one host sync per step: debugging only)."""

    def __init__(self, checker: InvariantChecker) -> None:
        self.checker = checker

    def before_step(self, step: int, carry: Carry) -> None:
        self.checker.before_step(carry.view())

    def on_step(self, record: StepRecord) -> None:
        self.checker.after_step(record.events, record.carry.view(), record.batch, step=record.step + 1)
        self.checker.watch_coverage(record.events)

    def after_backward(self, step: int) -> None:
        self.checker.after_backward(step=step + 1)


class Doctor(Instrument):
    """The live doctor (rank 0 of a traced run): each flush's rows and each evaluation's audits in, findings printed
    and stored the first time they hold. ``new`` holds the findings of the last flush, for instruments after it
    (profiler, W&B); ``findings`` every finding so far."""

    def __init__(self, doctor: LiveDoctor, trace: Trace, evals: LiveEvalDoctor | None = None,
                 timing: TimingDoctor | None = None) -> None:
        self.doctor, self.trace = doctor, trace
        self.evals = evals or LiveEvalDoctor(doctor.meta, doctor.cfg)
        self.timing = timing or TimingDoctor(doctor.meta, doctor.cfg)
        self.reporter: Reporter | None = None
        self.max_steps: int | None = None
        self.new: list[Finding] = []

    def ledger_findings(self, step: int) -> list[Finding]:
        """The run-level findings of the per-sample ledger (``diagnostics.doctor.ledger_doctor``), as ``etrm-doctor`` judges
        them, once the rows up to ``step`` are stored; those that already held (a resume) are not new."""
        tracer = self.trace.tracer
        if tracer.writer is None:
            return []
        tracer.drain()
        known = {f.code for f in self.doctor.findings}
        found = [f for f in diagnose_ledger_run(tracer.writer.path, self.doctor.meta, self.doctor.cfg, step)
                 if f.code not in known]
        self.doctor.findings.extend(found)
        return found

    def on_start(self, reporter: "Reporter", max_steps: int) -> None:
        self.reporter, self.max_steps = reporter, max_steps

    def on_flush(self, rows: Rows, step: int) -> None:
        self.new = self.doctor.update(rows, alignment=self.trace.tracer.last_alignment)
        self.new += self.timing.update(self.trace.tracer.last_timings)
        if self.max_steps is not None and step >= self.max_steps:  # the run's last flush: the ledger's findings
            self.new += self.ledger_findings(step)
        self.report(self.new)

    @property
    def findings(self) -> list[Finding]:
        return [*self.doctor.findings, *self.evals.findings, *self.timing.findings]

    def stop_note(self, step: int) -> str:
        """The spikes (loss-spike, grad-norm-spike) found at or before ``step``: what preceded a non-finite stop."""
        spikes = [f for f in self.doctor.findings if f.code in SPIKES and (f.first_step or 0) <= step]
        return "".join(f"; preceded by {f.code} at step {f.first_step} ({f.evidence.get('value', float('nan')):.4g}, "
                       f"{f.evidence.get('ratio') or float('nan'):.1f}x the median)" for f in spikes)

    def on_eval(self, step: int, values: Mapping[str, float]) -> None:
        self.evals.add_values(step, values)

    def on_eval_audit(self, step: int, audits: Sequence[EvalAudit]) -> None:
        self.report(self.evals.update(audits))  # the evaluation findings (diagnostics.doctor.eval_findings)

    def report(self, findings: Sequence[Finding]) -> None:
        """Print each new finding and store it in the trace."""
        for finding in findings:
            text = f"{finding.code} (step {finding.first_step}): {finding.message}"
            if self.reporter is not None:  # labelled with its severity (an info is a fact, not a defect)
                self.reporter.warn(escape(text), severity=finding.severity)
            self.trace.tracer.submit(finding.store)


class Profile(Instrument):
    """Profiler windows into ``run_dir/profiler``: one opened now (``--profile``) and/or one at the live doctor's
    first warning or error (``profile.on_finding``), so that its trace shows the steps after the finding."""

    times_phases = True

    def __init__(self, windows: ProfilerWindows, doctor: Doctor | None) -> None:
        self.windows, self.doctor = windows, doctor
        self.reporter: Reporter | None = None
        self.max_steps: int | None = None
        self._labels: dict[str, contextlib.AbstractContextManager] = {}

    def on_start(self, reporter: "Reporter", max_steps: int) -> None:
        self.reporter, self.max_steps = reporter, max_steps
        if self.windows.recording and self.windows.windows:
            window = self.windows.windows[-1]
            sched, (first, last) = window.schedule, window.first_active
            again = "" if sched.repeat == 1 else (f", every {sched.cycle} steps" +
                                                   (f", {sched.repeat} times" if sched.repeat else " until the end"))
            reporter.line(escape(f"profiler: recording steps {first}..{last}{again} into {self.windows.out_dir}"))

    def begin_phase(self, name: str) -> None:
        if self.windows.recording:
            label = self._labels[name] = self.windows.label(f"etrm.{name}")
            label.__enter__()

    def end_phase(self, name: str) -> None:
        label = self._labels.pop(name, None)
        if label is not None:
            label.__exit__(None, None, None)

    def after_step(self, step: int) -> None:
        self.windows.step()  # the profiler's schedule advances once per training step

    def on_flush(self, rows: Rows, step: int) -> None:
        if self.doctor is None or (self.max_steps is not None and step >= self.max_steps):
            return  # no step is left to profile
        defects = [f.code for f in self.doctor.new if f.severity != "info"]
        window = self.windows.on_findings(defects, step)
        if window is not None and self.reporter is not None:
            first, last = window.first_active
            self.reporter.line(escape(f"profiler: recording steps {first}..{last} after {window.reason} into "
                                      f"{self.windows.out_dir}"))

    def on_end(self, step: int, status: str, detail: str) -> None:
        self.windows.close()  # an open window is written as far as it got

    def summary(self) -> dict[str, str]:
        files = self.windows.trace_files()
        return {"profiler traces": f"{len(files)} in {self.windows.out_dir}"} if files else {}


class TensorBoard(Instrument):
    """``--tensorboard``: scalars of each flush (ratios of the rows' sums) and the evals into ``run_dir/tensorboard``."""

    def __init__(self, scalars: TensorBoardScalars) -> None:
        self.scalars = scalars

    def on_flush(self, rows: Rows, step: int) -> None:
        self.scalars.write_rows(rows)

    def on_eval(self, step: int, values: Mapping[str, float]) -> None:
        self.scalars.write_eval(step, values)

    def on_end(self, step: int, status: str, detail: str) -> None:
        self.scalars.close()

    def summary(self) -> dict[str, str]:
        return {"tensorboard": f"tensorboard --logdir {self.scalars.log_dir}"}


# ------------------------------------------------------------------------------------------------------------------
# Building a run's instruments

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
        from etrm.train.wandb_log import add_wandb

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
