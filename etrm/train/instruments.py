"""Instruments: everything optional a run can carry (tracer, invariant checks, live doctor, profiler windows,
TensorBoard, W&B), each a small ``Instrument`` that the trainer calls at fixed points of its loop.

The trainer does the engineering (steps, flushes, evals, checkpoints, DDP) and names no instrument; an instrument
declares what it does at each point (Lightning's callbacks). ``etrm.train.instrument_setup.build`` makes a run's
instruments from the config and the CLI's flags, in one place; adding an instrument is a class here and a line there.

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

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.live import LiveDoctor
from diagnostics.trace.eval_audits import EvalAudit
from diagnostics.doctor.eval_findings import LiveEvalDoctor
from diagnostics.doctor.ledger_doctor import diagnose_run as diagnose_ledger_run
from diagnostics.events import PhaseClock, StepEvents
from diagnostics.doctor.spike_rules import SPIKES
from diagnostics.doctor.timing_rules import TimingDoctor
from diagnostics.probes.profiling import ProfilerWindows
from diagnostics.properties.runtime_check import InvariantChecker
from diagnostics.trace.tb_scalars import TensorBoardScalars
from diagnostics.probes.tracer import Tracer
from etrm.model import Carry

if TYPE_CHECKING:
    from etrm.train.console import Reporter

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
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this instrument (under ``"instruments"``), handed back on resume."""
        return {}

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

    def state_dict(self) -> dict[str, Any]:
        """Each instrument's resumable state, by kind (``trace``, ...); only those that keep any."""
        return {type(i).__name__.lower(): s for i in self if (s := i.state_dict())}

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

    def state_dict(self) -> dict[str, Any]:
        """The probes' resumable state (their phase is the step; per-slot state of samples in flight)."""
        return {"probes": {p.name: p.state_dict() for p in self.tracer.probes}}

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
