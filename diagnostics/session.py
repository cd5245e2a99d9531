"""Trace your own training loop: the tracer, the live doctor and the dashboard for an ACT model trained by code this
project did not write (an upstream-shaped ``initial_carry`` / ``forward(carry, batch)`` loop).

    run = trace_run("runs/mine", RunSpec(model="my-etrm", mode="reencode", batch_size=B, max_steps=N,
                                         max_steps_per_sample=16), model, encoder=model.encoder)
    for step in range(N):
        before = carry
        carry, loss, metrics, outputs = loss_head(carry, next(batches))
        run.step(before, carry, batch, outputs, loss, labels=outputs["labels"])  # after the loss, before backward
        loss.backward()
        run.after_backward()        # gradient norms; every ``trace_every`` steps one flush and the live doctor
        optimizer.step(); optimizer.zero_grad()
    run.close()

Nothing on this path reads a device value back: events are built from the step's own tensors on the device, the
encoder output is caught by a forward hook, and counters are read only at a flush. Sample identity comes from the
carry's content (``content_ids``) unless the data holds a sample id. Part of the public API, versioned with the
step-event contract (``diagnostics.events.EVENTS_VERSION``; version 3 added this module). See docs/own-loop.md.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.integrity_rules import NonFiniteLoss
from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.doctor.timing_rules import TimingDoctor
from diagnostics.events import PhaseClock, StepEvents
from diagnostics.doctor.eval_findings import LiveEvalDoctor
from diagnostics.eval_recorder import Evaluation
from diagnostics.trace.eval_audits import RAW, EvalAudit, without_act_steps
from diagnostics.forks import ContextPicker, LossHeadCatch, Selector, next_free_run_dir
from diagnostics.probes import DIVERSITY_EVERY, default_probes
from diagnostics.probes.step_metrics import IGNORE_LABEL, correctness, slot_metrics
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter
from diagnostics.probes.tracer import Tracer

Tensor = torch.Tensor
MODES = ("reencode", "cached", "fct", "trm")  # design.md's encoder modes, and TRM's puzzle table
UNKNOWN_ID = -2   # label id of labels that belong to no sample the step saw (neither the slot's nor the fed one's)
_PRIME = (1 << 31) - 1
LOSS_TERMS = ("lm_loss", "q_halt_loss", "q_continue_loss")


@dataclass(frozen=True)
class RunSpec:
    """What the run is: stored in the trace's meta, read by the doctor (mode rules) and the dashboard (chips).

    ``max_steps`` is the run's optimizer steps, ``max_steps_per_sample`` the ACT halting limit (upstream's
    ``halt_max_steps``). ``sampler`` names the feed: ``trm`` (upstream's, a fresh sample in every batch position)
    or ``refill``. ``trace_every`` is the flush cadence in steps; ``diversity_every`` how often (in steps) the
    context-diversity probe measures.
    """

    model: str
    mode: str
    batch_size: int
    max_steps: int
    max_steps_per_sample: int
    sampler: str = "trm"
    fault: str = "none"
    trace_every: int = 20
    diversity_every: int = DIVERSITY_EVERY  # the context-diversity probe measures one step in this many
    q_continue_halts: bool = False   # halting compares q_halt with q_continue (HRM), not q_halt with 0 (TRM)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RunSpec.mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("batch_size", "max_steps", "max_steps_per_sample", "trace_every", "diversity_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RunSpec.{name} must be a positive integer, not {value!r}")

    def meta(self, device: str) -> dict[str, Any]:
        """The trace's meta table, under the bundled trainer's keys (plus ``source: own-loop``); ``extra`` adds
        keys but cannot replace these (the doctor's rules read them)."""
        return {"preset": "", **dict(self.extra), "model": self.model, "mode": self.mode, "fault": self.fault,
                "source": "own-loop", "sampler": self.sampler, "batch_size": self.batch_size,
                "max_steps_per_sample": self.max_steps_per_sample, "max_steps": self.max_steps,
                "trace_every": self.trace_every, "diversity_every": self.diversity_every, "device": device}


@dataclass(frozen=True)
class CarryShape:
    """Where an upstream-shaped step keeps what the events need: attribute (dataclass carry) or key (dict) names.

    The defaults are upstream TRM's: ``carry.halted``, ``carry.steps``, ``carry.current_data`` (a dict with the
    batch's keys: ``inputs``, ``labels``, ``puzzle_identifiers``), outputs ``logits``/``q_halt_logits``/
    ``q_continue_logits``. Without a ``sample_id`` key, a sample is known by the content of its ``identity`` keys.
    """

    halted: str = "halted"
    steps: str = "steps"
    data: str = "current_data"
    labels: str = "labels"
    puzzle_id: str = "puzzle_identifiers"
    sample_id: Optional[str] = None
    identity: tuple[str, ...] = ("inputs", "puzzle_identifiers")
    logits: str = "logits"
    q_halt: str = "q_halt_logits"
    q_continue: str = "q_continue_logits"
    ignore_label: int = IGNORE_LABEL


def field_of(obj: Any, name: str, what: str = "carry") -> Any:
    """``obj[name]`` for a mapping, else ``obj.name``; a missing field is a one-line ValueError naming it."""
    try:
        return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)
    except (KeyError, AttributeError):
        raise ValueError(f"the {what} has no field {name!r}; tell the session where it is with "
                         f"CarryShape({name}=...)") from None


_WEIGHTS: dict[tuple[int, str], Tensor] = {}  # content_ids' position weights, per (row width, device)


def _position_weights(n: int, device: torch.device) -> Tensor:
    key = (n, str(device))
    weights = _WEIGHTS.get(key)
    if weights is None:
        mix = torch.arange(1, n + 1, device=device, dtype=torch.int64) * 0x2545F4914F6CDD1D
        mix = (mix ^ (mix >> 29)) * 0x5851F42D4C957F2D  # int64 products wrap: a deterministic scramble
        weights = _WEIGHTS[key] = torch.remainder(mix ^ (mix >> 32), _PRIME)
    return weights


def content_ids(*parts: Tensor) -> Tensor:
    """A per-row id from content ([B] int64 in [0, 2^31 - 1)): equal rows give equal ids, different rows different
    ones but for a ~2^-31 chance. On the device, no sync: a sum of the values under pseudo-random position weights
    (a mixing hash of the position, so no structured difference such as a swap or a shift cancels out), mod a prime."""
    flat = torch.cat([p.reshape(p.shape[0], -1).to(torch.int64) for p in parts], 1)
    weights = _position_weights(flat.shape[1], flat.device)
    terms = torch.remainder(torch.remainder(flat + 1, _PRIME) * weights, _PRIME)  # each < 2^31: sums cannot wrap
    return torch.remainder(terms.sum(1), _PRIME)


def content_ids_of(groups: list[list[Tensor]]) -> list[Tensor]:
    """``content_ids`` of several row sets at once (one hash over their rows stacked: a row's id does not depend on
    the rows beside it), each set a list of parts; one call per set when their shapes differ."""
    shapes = [[tuple(p.shape) for p in parts] for parts in groups]
    if any(s != shapes[0] for s in shapes[1:]):
        return [content_ids(*parts) for parts in groups]
    ids = content_ids(*(torch.cat(column) for column in zip(*groups)))
    return list(ids.split(groups[0][0].shape[0]))


def _ids(datas: list[tuple[Any, str]], shape: CarryShape) -> list[Tensor]:
    if shape.sample_id is not None:
        return [field_of(data, shape.sample_id, what).to(torch.int64) for data, what in datas]
    return content_ids_of([[field_of(data, k, what) for k in shape.identity] for data, what in datas])


def build_events(spec: RunSpec, before: Any, after: Any, batch: Mapping[str, Tensor], outputs: Mapping[str, Tensor],
                 labels: Tensor, encoder_rows: Optional[Tensor] = None, shape: CarryShape = CarryShape(),
                 clock: Optional[PhaseClock] = None) -> StepEvents:
    """The ``StepEvents`` of one upstream-shaped step, from the carry before and after it, the batch fed, the
    model's outputs and the ``labels`` the loss used ([B, S], compared by content with the slot's own).

    ``encoder_rows``: the fresh encoder output (or puzzle-table rows), all B slots or, when fewer rows, the reset
    slots in slot order (``x[halted]``, as a cached model encodes). Halting decisions are read back from the carry
    (a Q-halt that did not halt was vetoed by exploration); demos are taken to be the slot's own.
    """
    reset = field_of(before, shape.halted).to(torch.bool)
    b = reset.shape[0]
    data_before, data_after = field_of(before, shape.data), field_of(after, shape.data)
    sid_before, sid_after, fed = _ids([(data_before, "data"), (data_after, "data"), (batch, "batch")], shape)
    own_labels, fed_labels, used = content_ids_of([[field_of(data_after, shape.labels, "data")],
                                                   [field_of(batch, shape.labels, "batch")], [labels]])
    label_sid = torch.where(used == own_labels, sid_after,
                            torch.where(used == fed_labels, fed, torch.full_like(fed, UNKNOWN_ID)))

    everyone = torch.ones_like(reset)
    needs = reset if spec.mode == "cached" else everyone
    if encoder_rows is None or encoder_rows.shape[0] == 0:
        encoder_rows, encoded, slots = None, torch.zeros_like(reset), torch.zeros(0, dtype=torch.long,
                                                                                  device=reset.device)
    elif encoder_rows.shape[0] == b:
        encoded, slots = everyone, torch.arange(b, device=reset.device)
    else:  # the reset slots, in slot order: the first n of a stable sort that puts reset slots first
        slots = torch.sort((~reset).to(torch.int8), stable=True).indices[:encoder_rows.shape[0]]
        encoded = torch.zeros_like(reset).index_fill(0, slots, True)

    steps, halted = field_of(after, shape.steps), field_of(after, shape.halted).to(torch.bool)
    q_halt, q_cont = field_of(outputs, shape.q_halt, "outputs"), outputs.get(shape.q_continue)
    if spec.mode == "fct":  # fixed computation time: the Q-head decides nothing
        q_says = torch.zeros_like(halted)
    else:
        q_says = q_halt > q_cont if spec.q_continue_halts and q_cont is not None else q_halt > 0
    def puzzle(data: Any) -> Tensor:
        return field_of(data, shape.puzzle_id, "data").to(torch.int64)

    return StepEvents(
        reset=reset, steps=steps, halted=halted,
        sample_id_before=sid_before, sample_id_after=sid_after,
        puzzle_id_before=puzzle(data_before), puzzle_id_after=puzzle(data_after), batch_sample_id=fed,
        label_sample_id=label_sid, demo_sample_id=sid_after,
        encoded=encoded, needs_encode=needs, encoded_slots=slots, encoder_out=encoder_rows,
        q_halt_logits=q_halt, q_continue_logits=q_cont if spec.q_continue_halts else None,
        q_says_halt=q_says, explore_veto=q_says & ~halted, is_last_step=steps >= spec.max_steps_per_sample,
        mode=spec.mode, training=True, clock=clock,
    )


def loss_metrics(events: StepEvents, loss: Tensor, logits: Tensor, labels: Tensor,
                 terms: Optional[Mapping[str, Tensor]] = None, ignore_label: int = IGNORE_LABEL) -> dict[str, Tensor]:
    """The loss probe's metrics (``diagnostics.probes.step_metrics``) from the step's logits and the labels the loss used;
    fills the events' correctness, loss terms and non-finite flag. ``loss`` and ``terms`` are sums over the batch,
    as upstream's loss head returns them."""
    with torch.no_grad():
        right = correctness(logits.detach(), labels, ignore_label)
        terms = {k: v.detach() for k, v in (terms or {}).items() if k in LOSS_TERMS and isinstance(v, Tensor)}
        metrics = {"loss": loss.detach(), **terms,
                   **slot_metrics(right, events.q_halt_logits.detach(), events.halted, events.steps,
                                   getattr(events, "q_continue_logits", None))}
        events.seq_correct, events.token_correct, events.token_count = right.seq_correct, right.n_correct, right.counts
        events.losses = terms
        events.non_finite = ~torch.isfinite(loss.detach())
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# Shared wiring (the bundled trainer's enable_trace uses the same two functions)

def open_writer(run_dir: Path, meta: Mapping[str, Any], step: int = 0) -> TraceWriter:
    """The run's trace writer: meta stored, rows past ``step`` deleted (a resume), a start/resume marker."""
    writer = TraceWriter(Path(run_dir) / TRACE_NAME, dict(meta))
    writer.truncate_after(step)
    writer.marker("resume" if step else "start", step)
    writer.commit()
    return writer


def grad_groups(model: nn.Module, encoder: Optional[nn.Module]) -> dict[str, list[nn.Parameter]]:
    """The gradient-norm probe's groups: the encoder's (or puzzle table's) parameters and all the others."""
    enc = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    return {"encoder": [p for p in model.parameters() if id(p) in enc],
            "rest": [p for p in model.parameters() if id(p) not in enc]}


def print_finding(finding: Finding) -> None:
    """The default report of a live finding: one line on stderr, labelled with its severity (error, warning, info)."""
    print(f"etrm: {finding.severity}: {finding.code} (step {finding.first_step}): {finding.message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------------
# The session

class TracedRun:
    """One traced run of a user's loop: ``step`` once per step (after the loss, before backward),
    ``after_backward`` once after it, ``close`` at the end (or use it as a context manager).

    Rows are flushed every ``spec.trace_every`` steps (and at ``flush``/``close``); the live doctor reads each flush,
    its new findings are stored and reported (``on_finding``) and returned. ``non_finite`` turns true at the flush
    that sees a non-finite loss or gradient: stop before you checkpoint.
    """

    def __init__(self, run_dir: str | Path, spec: RunSpec, device: torch.device | str = "cpu",
                 groups: Optional[dict[str, list[nn.Parameter]]] = None, shape: CarryShape = CarryShape(),
                 on_finding: Optional[Callable[[Finding], None]] = print_finding,
                 doctor: Optional[DoctorConfig] = None) -> None:
        asked = Path(run_dir)
        self.run_dir = next_free_run_dir(asked, TRACE_NAME)
        if self.run_dir != asked:
            print(f"etrm: {asked} already holds a trace; this run writes {self.run_dir}", file=sys.stderr)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spec, self.shape, self.device = spec, shape, torch.device(device)
        self.meta = spec.meta(self.device.type)
        probes = default_probes(spec.max_steps_per_sample, groups, spec.diversity_every)
        self.tracer = Tracer(probes, open_writer(self.run_dir, self.meta), self.device, capacity=spec.trace_every)
        self.doctor = LiveDoctor(self.meta, doctor)
        self.timing = TimingDoctor(self.meta, doctor)  # step-time-regression, phase-dominates: as etrm-doctor
        self.on_finding = on_finding
        self.steps = 0
        self.findings: list[Finding] = []
        self.non_finite = False
        self._rows: list[Tensor] = []
        self._handles: list[Any] = []
        self._clock: Optional[PhaseClock] = None
        self._closed = False
        self._catch: Optional[LossHeadCatch] = None
        self._model: Optional[nn.Module] = None   # the ACT model (trace_run's): evaluations hook it
        self.eval_doctor = LiveEvalDoctor(self.meta, self.doctor.cfg)
        self._encoder_problem: Optional[str] = None

    # -- where the encoder output comes from --------------------------------------------------------------------
    def watch(self, module: nn.Module, select: Selector = None) -> None:
        """Catch ``module``'s output (the encoder, or the puzzle embedding) on every training forward with grad:
        the fresh rows, before any mixing with cached context, for coverage, encoder work and diversity. A
        non-tensor output gives its context by ``ContextPicker``'s rule or ``select``; one it cannot use is a
        one-line error here when the forward's return annotation shows it, else at the next ``step``."""
        pick = ContextPicker(select)
        pick.check_module(module)

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not (mod.training and torch.is_grad_enabled()):
                return
            rows = output if isinstance(output, Tensor) and select is None else pick.rows(output)
            if rows is not None:
                self.encoder_output(rows)
            else:  # never raise inside the user's forward: run.step raises it
                self._encoder_problem = self._encoder_problem or pick.problem(output)

        self._handles.append(module.register_forward_hook(hook))

    def encoder_output(self, rows: Tensor) -> Tensor:
        """Hand over this step's fresh encoder rows by hand (when no module's output is the right tensor)."""
        self._rows.append(rows)
        return rows

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (perf_counter on CPU, CUDA events on GPU; read at a flush). A phase belongs to the step
        being recorded: from after the previous ``after_backward`` to this step's ``after_backward``."""
        self._clock = self._clock or PhaseClock(cuda=self.device.type == "cuda")
        self._clock.start(name)
        try:
            yield
        finally:
            self._clock.stop(name)

    # -- once per step --------------------------------------------------------------------------------------------
    def step(self, before: Any, after: Any, batch: Mapping[str, Tensor], outputs: Mapping[str, Tensor],
             loss: Tensor, labels: Tensor, terms: Optional[Mapping[str, Tensor]] = None) -> StepEvents:
        """Record one step (after the loss, before backward): ``before``/``after`` the carry around the model call,
        the ``batch`` fed, the model's ``outputs``, the ``loss`` (sum over the batch), the ``labels`` the loss read,
        optional loss ``terms`` (``lm_loss``, ``q_halt_loss``, ``q_continue_loss``)."""
        if self._encoder_problem is not None:
            raise ValueError(self._encoder_problem)
        if len(self._rows) > 1:
            raise ValueError(f"the watched module ran {len(self._rows)} times with grad in one step; hand the "
                             "fresh rows over with run.encoder_output(rows) instead")
        slots = field_of(before, self.shape.halted).shape[0]
        if slots != self.spec.batch_size:  # a shape, known on the host: no sync
            raise ValueError(f"the carry has {slots} slots but RunSpec.batch_size is {self.spec.batch_size}; the "
                             "batch size of a traced run is fixed (drop the last partial batch, as upstream does)")
        rows = self._rows[0] if self._rows else None
        self._clock = self._clock or PhaseClock(cuda=self.device.type == "cuda")  # phases until after_backward
        events = build_events(self.spec, before, after, batch, outputs, labels, rows, self.shape, self._clock)
        logits = field_of(outputs, self.shape.logits, "outputs")
        metrics = loss_metrics(events, loss, logits, labels, terms, self.shape.ignore_label)
        self.tracer.on_step(self.steps, events, metrics)
        self.steps += 1
        self._rows = []
        return events

    def record(self, loss: Tensor, terms: Optional[Mapping[str, Tensor]] = None) -> StepEvents:
        """Record one step of a caught loss head (``trace_run(..., loss_head=...)``): after the loss-head call,
        before backward; ``terms`` its metrics (the loss terms are picked from them)."""
        if self._catch is None:
            raise ValueError("run.record needs trace_run(..., loss_head=...); without it call run.step(before, after, "
                             "batch, outputs, loss, labels=...)")
        before, batch, after, outputs, labels = self._catch.take()
        return self.step(before, after, batch, outputs, loss, labels, terms)

    def evaluation(self, weights: str = RAW, model: Optional[nn.Module] = None) -> Evaluation:
        """Record one evaluation of the user's model (``diagnostics.eval_recorder``): open it around the loop's own
        evaluation (``with run.evaluation(): evaluate(...)``, or ``audit = run.evaluation()`` ... ``audit.close()``);
        ``weights`` is ``raw`` or ``ema``, ``model`` the ACT model it runs (default: trace_run's). At close the audit
        (exact and token per ACT step, would-halt step per sample) is stored and the evaluation findings judged."""
        target = model or self._model
        if target is None:
            raise ValueError("run.evaluation needs the ACT model: pass run.evaluation(model=...)")
        return Evaluation(target, self.steps, weights, self.spec.q_continue_halts,
                          lambda obj, key: field_of(obj, getattr(self.shape, key)), self._evaluated,
                          self.shape.ignore_label)

    def _evaluated(self, audit: EvalAudit, values: dict[str, float]) -> None:
        plain = without_act_steps(values)
        self.tracer.submit(lambda w: w.write_eval(audit.step, plain))
        self.tracer.submit(lambda w: w.write_eval_audits([audit]))
        self._report(self.eval_doctor.update([audit]))

    def _report(self, found: list[Finding]) -> None:
        for finding in found:
            self.tracer.submit(finding.store)
            if self.on_finding is not None:
                self.on_finding(finding)
        self.findings.extend(found)

    def after_backward(self) -> list[Finding]:
        """Gradient norms (before clipping and the optimizer); on the cadence, a flush. Its new findings."""
        self.tracer.after_backward()
        self._clock = None
        if self.steps % self.spec.trace_every == 0 or self.steps == self.spec.max_steps:
            return self.flush()
        return []

    # -- at a flush -----------------------------------------------------------------------------------------------
    def flush(self) -> list[Finding]:
        """Read the buffered rows back (the one sync), store them, run the live doctor; its new findings."""
        rows = self.tracer.flush()
        found = self.doctor.update(rows, alignment=self.tracer.last_alignment) if rows else []
        found += self.timing.update(self.tracer.last_timings) if rows else []
        self._report(found)
        self.non_finite = (self.non_finite or any((r.get("non_finite") or 0) > 0 for r in rows)
                           or any(f.code == NonFiniteLoss.code for f in found))  # a gradient's, too
        return found

    def close(self, kind: str = "end", detail: str = "") -> None:
        """Flush what is left, write the end marker (``end``, ``stopped`` or ``crashed``), wait for the disk."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        if self._catch is not None:
            self._catch.remove()
        try:
            if kind != "crashed":
                self.flush()
        finally:
            step = self.steps
            self.tracer.submit(lambda w: w.marker(kind, step, detail))
            self.tracer.close()

    def __enter__(self) -> "TracedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("end")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("stopped", "KeyboardInterrupt")
        else:
            self.close("crashed", f"{exc_type.__name__}: {exc}"[:500])


def trace_run(run_dir: str | Path, spec: RunSpec, model: nn.Module, encoder: Optional[nn.Module] = None,
              shape: CarryShape = CarryShape(), loss_head: Optional[nn.Module] = None,
              encoder_select: Selector = None, **options: Any) -> TracedRun:
    """Open a traced run for ``model`` (its device; gradient norms of ``encoder`` vs the rest) and watch
    ``encoder``'s output when given (``encoder_select`` picks the context from a non-tensor output). With
    ``loss_head`` (upstream's ``ACTLossHead`` shape) the session catches ``model``'s calls and the loss's labels:
    call ``run.record(loss, metrics)`` per step. A ``run_dir`` that holds a trace gives the next free ``run_dir-N``
    (``run.run_dir``). ``options`` go to ``TracedRun`` (``on_finding``, ``doctor``)."""
    device = next(model.parameters()).device
    picker_ok = ContextPicker(encoder_select)  # a bad selector or output type: refused before anything is created
    if encoder is not None:
        picker_ok.check_module(encoder)
    catch = LossHeadCatch(model, loss_head) if loss_head is not None else None
    try:
        run = TracedRun(run_dir, spec, device, grad_groups(model, encoder), shape, **options)
    except BaseException:
        if catch is not None:
            catch.remove()
        raise
    run._catch, run._model = catch, model
    if encoder is not None:
        run.watch(encoder, encoder_select)
    return run


__all__ = ["MODES", "UNKNOWN_ID", "CarryShape", "RunSpec", "TracedRun", "build_events", "content_ids",
           "field_of", "grad_groups", "loss_metrics", "open_writer", "print_finding", "trace_run"]
