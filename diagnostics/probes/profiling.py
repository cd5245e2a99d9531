"""Profiler windows: ``torch.profiler`` traces of a few training steps, for TensorBoard and Perfetto.

A window follows torch's wait / warmup / active schedule, stepped once per training step by the trainer, and is
written with ``tensorboard_trace_handler`` as ``<worker>.<ms>.pt.trace.json`` files into one folder: open it with
``tensorboard --logdir`` (torch-tb-profiler's PyTorch Profiler tab) or load a file in Perfetto (ui.perfetto.dev).

Windows open on request (``--profile``) or once, automatically, when the live doctor first reports a warning or an
error (an ``info`` finding is a fact, not a defect), so that the trace shows the steps that made it hold. Until a
window opens no profiler exists: an unprofiled run pays nothing.

    windows = ProfilerWindows(run_dir / "profiler", schedule=WindowSchedule(wait=1, warmup=1, active=3))
    windows.start()                      # --profile; or later: windows.on_findings(["encoder-collapse"], step)
    for ...: train_step(); windows.step()
    windows.close()
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

PROFILER_DIR = "profiler"


@dataclass(frozen=True)
class WindowSchedule:
    """torch.profiler's schedule: skip ``wait`` steps, warm up ``warmup``, record ``active``; ``repeat`` cycles
    (0: cycle until the run ends)."""

    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1

    def __post_init__(self) -> None:
        for name, low in (("wait", 0), ("warmup", 0), ("active", 1), ("repeat", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"profile.{name}={value!r} is not valid; allowed: an integer >= {low}")

    @property
    def cycle(self) -> int:
        return self.wait + self.warmup + self.active

    @property
    def total_steps(self) -> int | None:
        """Steps until the last cycle's trace is written; None when it repeats until the run ends."""
        return self.cycle * self.repeat if self.repeat else None


@dataclass
class Window:
    """One opened window: why, the training step before its first profiled step, the worker name of its files."""

    reason: str
    after_step: int
    worker: str
    schedule: WindowSchedule

    @property
    def first_active(self) -> tuple[int, int]:
        """The training steps (1-based, inclusive) recorded by the first cycle's active phase."""
        first = self.after_step + self.schedule.wait + self.schedule.warmup + 1
        return first, first + self.schedule.active - 1


@dataclass
class ProfilerWindows:
    """Opens torch.profiler windows into ``out_dir`` and steps the open one; at most one is open at a time.

    ``on_finding``: open one window (``finding_schedule``: no wait, the same warmup and active, once) the first
    time ``on_findings`` is told of a finding, unless a window is open then (its trace already shows those steps).
    """

    out_dir: Path
    schedule: WindowSchedule = field(default_factory=WindowSchedule)
    on_finding: bool = True
    cuda: bool = False
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    windows: list[Window] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._prof: Any = None
        self._left: int | None = None
        self._auto_used = False
        self._range: Any = None
        self._next_step = 0

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """Whether a window is open (its schedule may still be waiting or warming up)."""
        return self._prof is not None

    @property
    def finding_schedule(self) -> WindowSchedule:
        return WindowSchedule(wait=0, warmup=self.schedule.warmup, active=self.schedule.active, repeat=1)

    def label(self, name: str) -> contextlib.AbstractContextManager:
        """A named range in the trace while a window is open; nothing otherwise."""
        if self._prof is None:
            return contextlib.nullcontext()
        import torch

        return torch.profiler.record_function(name)

    # -- opening ---------------------------------------------------------------------------------------------
    def start(self, step: int = 0, reason: str = "requested") -> Window:
        """Open a window on the configured schedule (``--profile``); ``step`` is the last completed step."""
        return self._open(reason, "train", self.schedule, step)

    def on_findings(self, codes: Sequence[str], step: int) -> Window | None:
        """The live doctor reported findings (codes of warnings and errors) at ``step``: open the automatic window
        if it is allowed, unused, and no window is open. Returns the window opened, if any."""
        if not codes or not self.on_finding or self._auto_used or self._prof is not None:
            return None
        self._auto_used = True
        return self._open(f"finding {codes[0]}", f"finding-{codes[0]}", self.finding_schedule, step)

    def _open(self, reason: str, worker: str, schedule: WindowSchedule, step: int) -> Window:
        import torch
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        self.close()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with _quiet_warmup(schedule), _without_kineto_noise():
            prof = profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=schedule.wait, warmup=schedule.warmup, active=schedule.active,
                                                 repeat=schedule.repeat),
                on_trace_ready=tensorboard_trace_handler(str(self.out_dir), worker_name=worker),
                record_shapes=self.record_shapes, profile_memory=self.profile_memory, with_stack=self.with_stack,
            )
            prof.start()
        self._prof, self._left = prof, schedule.total_steps
        self._begin_range(step + 1)
        window = Window(reason, step, worker, schedule)
        self.windows.append(window)
        return window

    # -- stepping and closing --------------------------------------------------------------------------------
    def step(self) -> None:
        """One training step has completed (call once per step); closes the window once its schedule is done."""
        if self._prof is None:
            return
        self._end_range()
        with _without_kineto_noise():  # a cycle's warmup/active transitions start and stop kineto
            self._prof.step()
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self.close()
                return
        self._begin_range(self._next_step + 1)

    def close(self) -> None:
        """Stop the open window, writing what it recorded (a cut-short active phase is written as it is)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            self._end_range()
            with _without_kineto_noise():
                prof.stop()

    def _begin_range(self, step: int) -> None:
        """Name each training step in the trace by its etrm step number (the trace store's row), beside torch's
        own ``ProfilerStep#k`` (which counts from the window's start)."""
        import torch

        self._next_step = step
        self._range = torch.profiler.record_function(f"etrm.step {step}")
        self._range.__enter__()

    def _end_range(self) -> None:
        rng, self._range = self._range, None
        if rng is not None:
            rng.__exit__(None, None, None)

    def trace_files(self) -> list[Path]:
        """The trace files written so far, oldest first."""
        if not self.out_dir.is_dir():
            return []
        return sorted(self.out_dir.glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)


@contextlib.contextmanager
def _quiet_warmup(schedule: WindowSchedule) -> Iterator[None]:
    """torch warns that a schedule without warmup may skew results; a user who set warmup=0 chose it."""
    import warnings

    with warnings.catch_warnings():
        if schedule.warmup == 0:
            warnings.filterwarnings("ignore", message=".*warmup.*")
        yield


# kineto's own trace lines ("USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start"), written by
# C++ straight to file descriptor 2 on every start and stop: noise in a run's console and log.
KINETO_NOISE = re.compile(r"^USDT:.*\] profiler_(start|stop)\s*$")


@contextlib.contextmanager
def _without_kineto_noise() -> Iterator[None]:
    """Capture file descriptor 2 (where kineto writes, whatever ``sys.stderr`` is) around a profiler call and write
    back every line but kineto's start/stop lines: a Python warning raised meanwhile still reaches stderr."""
    fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
