"""The instrument interface: a new instrument is called at every point of the loop without any trainer change."""

from __future__ import annotations

import ast
import inspect

import torch

from etrm.train import instrument_setup, instruments
from etrm.train.checkpoint import CHECKPOINT_NAME
from etrm.train.console import Reporter
from etrm.train.instruments import Instrument
from etrm.train.trainer import Trainer


class Recorder(Instrument):
    """Writes down every call, and what was on disk or in hand at the time."""

    times_phases = True

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.calls = trainer, []

    def on_start(self, reporter, max_steps):
        self.calls.append(("start", max_steps))

    def before_step(self, step, carry):
        self.calls.append(("before", step))

    def begin_phase(self, name):
        self.calls.append(("begin", name))

    def end_phase(self, name):
        self.calls.append(("end", name))

    def on_step(self, record):
        grads = [p.grad for p in self.trainer.model.parameters()]
        self.calls.append(("step", record.step, record.events.reset.shape[0], all(g is None for g in grads)))

    def after_backward(self, step):
        self.calls.append(("backward", step, any(p.grad is not None for p in self.trainer.model.parameters())))

    def after_step(self, step):
        self.calls.append(("after", step))

    def on_flush(self, rows, step):
        self.calls.append(("flush", step))

    def on_eval(self, step, values):
        self.calls.append(("eval", step, "exact" in values and "baseline.copy_input.exact" in values))

    def on_checkpoint(self, step):
        self.calls.append(("checkpoint", step, (self.trainer.run_dir / CHECKPOINT_NAME).exists()))

    def on_end(self, step, status, detail):
        self.calls.append(("end-run", step, status))


def test_a_new_instrument_sees_every_phase_in_order(make_trainer):
    trainer = make_trainer("reencode", "train.trace_every=2", "train.eval_every=3", "train.checkpoint_every=3")
    rec = trainer.add(Recorder(trainer))
    trainer.run(3, Reporter(3, live=False))
    calls = rec.calls
    assert calls[0] == ("start", 3) and calls[-1] == ("end-run", 3, "end")
    steps = [c for c in calls if c[0] in ("before", "step", "backward", "after")]
    assert steps == [x for s in range(3) for x in (("before", s), ("step", s, 8, True), ("backward", s, True),
                                                   ("after", s + 1))]
    phases = [c[1] for c in calls if c[0] == "begin"][:8]
    assert phases == ["data", "h2d", "encoder", "inner", "loss", "trace", "backward", "optimizer"]
    tail = [c for c in calls if c[0] in ("flush", "eval", "checkpoint")]
    # flush at 2 (trace_every); at 3: flush, then eval, then the checkpoint (none on disk before it)
    assert tail == [("flush", 2), ("flush", 3), ("eval", 3, True), ("checkpoint", 3, False)]
    assert (trainer.run_dir / CHECKPOINT_NAME).exists()


def test_a_crash_ends_every_instrument_once_as_crashed(make_trainer):
    trainer = make_trainer("reencode")
    rec = trainer.add(Recorder(trainer))

    def boom(step, events, metrics):
        if step == 1:
            raise RuntimeError("boom")

    trainer.add(instruments.OnStep(boom))
    try:
        trainer.run(4, Reporter(4, live=False))
    except RuntimeError:
        pass
    ends = [c for c in rec.calls if c[0] == "end-run"]
    assert ends == [("end-run", 1, "crashed")]


def test_the_loop_names_no_instrument():
    """``Trainer.run`` and ``train_step`` read only the interface: no instrument class or attribute by name."""
    named = {"Trace", "Doctor", "Profile", "TensorBoard", "WandB", "CheckInvariants", "tracer", "doctor", "profiling",
             "scalars", "checker", "wandb"}
    source = inspect.getsource(Trainer)
    tree = ast.parse(source)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not used & named
    run_lines = inspect.getsource(Trainer.run).splitlines()
    assert len(run_lines) <= 40, len(run_lines)


def test_flags_build_the_instruments_in_calling_order(make_trainer):
    trainer = make_trainer("reencode", "profile.on_finding=true")
    built = instrument_setup.build(trainer, instrument_setup.Options(trace=True, tensorboard=True, check_invariants=True))
    assert [type(i).__name__ for i in built] == ["CheckInvariants", "Trace", "Doctor", "Profile", "TensorBoard"]
    built.on_end(0, "end", "")
    untraced = make_trainer("reencode")
    assert list(instrument_setup.build(untraced, instrument_setup.Options())) == []  # nothing asked: nothing runs
    assert untraced.instruments.clock() is None and torch.is_tensor(untraced.train_step()[1]["loss"])
