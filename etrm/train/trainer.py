"""The training loop: one ACT step per optimizer step over a persistent carry, as upstream ``pretrain.py``.

Reads top to bottom: ``Trainer.__init__`` builds data, model and optimizers; ``train_step`` does one ACT step;
``run`` loops, logs, evaluates and checkpoints; ``state_dict``/``load_state_dict`` make ``--resume`` exact.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.markup import escape

from diagnostics.events import PhaseClock, StepEvents
from diagnostics.doctor import LiveDoctor
from diagnostics.loading import load_run
from diagnostics.probes import default_probes
from diagnostics.profiling import PROFILER_DIR, ProfilerWindows, WindowSchedule
from diagnostics.runtime_check import InvariantChecker
from diagnostics.session import grad_groups, open_writer
from diagnostics.tb_scalars import TENSORBOARD_DIR, TensorBoardScalars
from diagnostics.tracer import Tracer
from etrm.config import Config
from etrm.data.build import build_datasets
from etrm.data.feed import Feed, build_feed, to_device
from etrm.errors import UserError
from etrm.loss import ACTLoss
from etrm.model import ACTModel, Carry
from etrm.model.puzzle_emb import SignSGD
from etrm.train import distributed, finite_guard, memory
from etrm.train.checkpoint import load_checkpoint, save_checkpoint
from etrm.train.console import Reporter, format_eval
from etrm.train.distributed import SINGLE, DistEnv
from etrm.train.ema import EMA
from etrm.train.evaluate import baselines, evaluate
from etrm.train.schedule import lr_factor, set_lr

@contextlib.contextmanager
def _phase(clock: PhaseClock | None, name: str, windows: ProfilerWindows | None = None):
    """Time a phase of the step when tracing (no sync: perf_counter on CPU, CUDA events on GPU); name it in the
    profiler's trace while a profiler window is open."""
    if windows is not None and windows.recording:
        with windows.label(f"etrm.{name}"), _phase(clock, name):
            yield
        return
    if clock is None:
        yield
        return
    clock.start(name)
    yield
    clock.stop(name)


StepHook = Callable[[int, StepEvents, dict[str, torch.Tensor]], None]


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    step: int
    stopped_early: bool
    non_finite: bool = False
    message: str = ""  # why the run stopped early (the non-finite guard's line)
    last_eval: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)
    steps_per_s: float = 0.0
    samples_per_s: float = 0.0
    seconds: float = 0.0


class Trainer:
    """Owns the model, optimizers, EMA, sampler and carry of one run (of this rank's share under ``torchrun``:
    see ``etrm.train.distributed`` for what is global and what is per rank)."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device | None = None,
                 dist_env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist_env or SINGLE
        self.device = distributed.rank_device(device or pick_device(cfg.train.device), self.dist)
        distributed.init(self.dist, self.device)
        tc = cfg.train
        self.local_batch = distributed.local_batch(tc.batch_size, self.dist)
        torch.manual_seed(tc.seed)
        self.train_ds, self.eval_ds, shape = build_datasets(cfg)
        self.memory_estimate = memory.check_fits(cfg, shape.seq_len, shape.num_puzzle_ids, self.device, self.dist.world)
        self.model = ACTModel(cfg, shape).to(self.device)
        self.model.halt_seed = distributed.halt_seed(tc.seed, self.dist)  # each rank explores on its own draws
        self.loss_fn = ACTLoss(cfg.loss)
        self.optimizers = self._build_optimizers()
        self.ema = EMA(self.model, tc.ema_rate) if tc.ema else None
        self.eval_model = ACTModel(cfg, shape).to(self.device) if tc.ema else self.model
        # The data path (train.data_path): the sampler and the training set on the device (no host sync per step),
        # or on the host. Either way the sampler is this rank's share under torchrun.
        self.feed: Feed = build_feed(tc.data_path, tc.sampler, self.train_ds, self.local_batch, tc.seed, self.device)
        self.sampler = distributed.shard_sampler(self.feed.sampler, self.dist)
        if tc.compile:  # in place: parameter names (checkpoints) stay those of the plain modules
            self.model.core.compile()
            if hasattr(self.model, "encoder"):
                self.model.encoder.compile()
        # What train_step calls: the model itself, or its DDP wrapper (gradients all-reduced, i.e. averaged, in
        # backward). DDP leaves buffers alone (the TRM puzzle table is kept equal by SignSGD's gather); in cached
        # mode a step without resets leaves the encoder unused, which DDP must be told to expect.
        self.forward_model: torch.nn.Module = self.model
        if self.dist.enabled:
            unused = self.model.mode == "cached" or cfg.fault != "none"
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=unused, **distributed.no_buffer_sync())
        self.carry: Carry = self.model.initial_carry(self._to_device(self._padding_batch()))
        self.step = 0
        self.step_hooks: list[StepHook] = []
        self.stop_requested = False
        self.tracer: Tracer | None = None
        self.checker: InvariantChecker | None = None
        self.doctor: LiveDoctor | None = None
        self.profiling: ProfilerWindows | None = None  # exists only when asked for, or to profile a finding
        self.scalars: TensorBoardScalars | None = None
        self.until_step: int | None = None  # the step the current ``run`` ends at
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk (written or resumed from)

    def enable_trace(self, preset: str | None = None) -> None:
        """Trace every step into ``run_dir/trace.sqlite`` (call after the run directory exists, or after resume)."""
        cfg = self.cfg
        meta = {
            "model": cfg.model, "mode": self.model.mode, "fault": cfg.fault, "preset": preset or "",
            "sampler": cfg.train.sampler, "batch_size": cfg.train.batch_size,
            "max_steps_per_sample": cfg.max_steps_per_sample, "max_steps": cfg.train.max_steps,
            "trace_every": cfg.train.trace_every, "device": self.device.type, "config": cfg.to_dict(),
            "doctor": cfg.doctor.to_dict(),
        }
        if preset is None and self.step:  # resumed (the CLI knows no preset then): keep the one the trace names
            del meta["preset"]
        if self.dist.enabled:
            meta["world_size"] = self.dist.world
        writer = None
        if self.dist.is_main:  # every rank traces (the counters are summed at each flush); rank 0 stores
            writer = open_writer(self.run_dir, meta, self.step)
        groups = grad_groups(self.model, getattr(self.model, "encoder", None))
        probes = default_probes(cfg.max_steps_per_sample, groups)
        columns = [name for p in probes for name, _ in p.counters]
        reduce = gather = None
        if self.dist.enabled:
            reduce = distributed.trace_reduce(columns, self.dist.world)
            gather = lambda timings: distributed.gather_objects(timings, self.dist)  # noqa: E731
        self.tracer = Tracer(probes, writer, self.device, capacity=cfg.train.trace_every, rank=self.dist.rank,
                             reduce=reduce, gather=gather)
        self.step_hooks.append(self.tracer.on_step)
        if not self.dist.is_main:
            return
        self.doctor = LiveDoctor(meta, cfg.doctor)
        if self.step:  # resumed: findings that already held must not fire (and be re-stored) again
            self.doctor.replay(load_run(self.run_dir))

    def enable_profile(self, requested: bool = True) -> ProfilerWindows | None:
        """Profiler windows into ``run_dir/profiler`` (``[profile]`` settings): one opens now when ``requested``
        (``--profile``); when traced with ``profile.on_finding``, one opens at the live doctor's first finding.
        Call after ``enable_trace``. Without either, nothing is created and the run pays nothing."""
        pc = self.cfg.profile
        if not self.dist.is_main or (not requested and not (pc.on_finding and self.doctor is not None)):
            return None  # under torchrun, rank 0's steps are profiled
        self.profiling = ProfilerWindows(
            self.run_dir / PROFILER_DIR,
            WindowSchedule(wait=pc.wait, warmup=pc.warmup, active=pc.active, repeat=pc.repeat),
            on_finding=pc.on_finding, cuda=self.device.type == "cuda", record_shapes=pc.record_shapes,
            profile_memory=pc.profile_memory, with_stack=pc.with_stack)
        if requested:
            self.profiling.start(self.step)
        return self.profiling

    def enable_tensorboard(self) -> TensorBoardScalars | None:
        """TensorBoard scalars of the flushed trace rows and the evals into ``run_dir/tensorboard`` (needs tracing)."""
        if self.tracer is None:
            raise UserError("--tensorboard writes the trace's rows: enable tracing first (--trace)")
        if self.dist.is_main:
            self.scalars = TensorBoardScalars(self.run_dir / TENSORBOARD_DIR, self.model.mode)
        return self.scalars

    # ----------------------------------------------------------------------------------------------------------
    def _build_optimizers(self) -> list:
        tc = self.cfg.train
        enc_ids = {id(p) for p in self.model.encoder.parameters()} if hasattr(self.model, "encoder") else set()
        core = [p for p in self.model.parameters() if id(p) not in enc_ids]
        groups = [{"params": core, "base_lr": tc.lr}]
        if enc_ids:
            enc = [p for p in self.model.parameters() if id(p) in enc_ids]
            groups.append({"params": enc, "base_lr": tc.lr * tc.encoder_lr_scale})
        adam = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
        optimizers: list[Any] = [adam]
        if self.model.is_trm:
            sign = SignSGD(self.model.puzzle_emb, tc.puzzle_emb_lr, tc.puzzle_emb_weight_decay)
            sign.param_groups[0]["base_lr"] = tc.puzzle_emb_lr
            optimizers.append(sign)
        return optimizers

    def _padding_batch(self) -> dict[str, torch.Tensor]:
        return self.train_ds.batch(np.full(self.local_batch, -1, dtype=np.int64))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(batch, self.device)

    @property
    def samples_dropped(self) -> int:
        """Fed ids the ``trm`` sampler dropped so far (on the device path a read of a device counter)."""
        return self.feed.samples_dropped

    @samples_dropped.setter
    def samples_dropped(self, value: int) -> None:
        self.feed.samples_dropped = value

    def autocast(self):
        """bf16 autocast on CUDA; fp32 on CPU (bf16 is several times slower on CPUs without bf16 units)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------------------------
    def next_batch(self, clock: PhaseClock | None = None) -> dict[str, torch.Tensor]:
        """Fresh samples for the slots that halted last step: ``data`` chooses their ids from the reset mask, ``h2d``
        brings their rows to the device (on the device path both stay on the device: no host sync)."""
        with _phase(clock, "data", self.profiling):
            drawn = self.feed.draw(self.carry.halted)
        with _phase(clock, "h2d", self.profiling):
            return self.feed.gather(drawn)

    def train_step(self) -> tuple[StepEvents, dict[str, torch.Tensor]]:
        """One ACT step for every slot, one backward, one optimizer step. Returns the step's events and metrics."""
        tc = self.cfg.train
        clock = PhaseClock(cuda=self.device.type == "cuda") if self.tracer is not None else None
        batch = self.next_batch(clock)
        self.model.train()
        if self.checker is not None:
            self.checker.before_step(self.carry.view())
        with self.autocast():
            carry, out, events = self.forward_model(self.carry, batch, clock=clock)
            with _phase(clock, "loss", self.profiling):
                loss, metrics = self.loss_fn(out, events)
        if self.checker is not None:  # debugging runs only: each check reads results back (a sync per step)
            self.checker.after_step(events, carry.view(), batch, step=self.step + 1)
            self.checker.watch_coverage(events)
        with _phase(clock, "trace", self.profiling):
            for hook in self.step_hooks:  # after the loss (events complete), before backward (grad hooks attach)
                hook(self.step, events, metrics)
        with _phase(clock, "backward", self.profiling):
            # Upstream normalises by the global batch: per rank by its slots, then DDP averages over the ranks.
            (loss / self.local_batch).backward()
        if self.checker is not None:
            self.checker.after_backward(step=self.step + 1)
        if self.tracer is not None:
            self.tracer.after_backward()
        puzzle_rows = self.model.puzzle_emb.last_rows if self.model.is_trm else None
        metrics.update(finite_guard.grad_flags(self.model, puzzle_rows, self.device))
        with _phase(clock, "optimizer", self.profiling):
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            set_lr(self.optimizers, lr_factor(self.step, tc))
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
        self.carry = carry
        self.step += 1
        metrics["resets"] = events.reset.sum()
        metrics["non_finite"] = events.non_finite
        if self.profiling is not None:  # the profiler's schedule advances once per training step
            self.profiling.step()
        return events, metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics with the EMA weights (when enabled) and a fresh carry."""
        if self.ema is not None:
            self.ema.copy_to(self.eval_model, self.model)
        if not self.dist.enabled or getattr(self.eval_ds, "arc_index", None) is not None:
            # One process, or ARC (voting over augmentations needs every prediction of a task in one place): rank 0
            # evaluates the whole set (and writes the submission) and sends the results to the other ranks.
            out = None
            if self.dist.is_main:
                out = evaluate(self.eval_model, self.eval_ds, self.cfg.train.eval_batch_size, self.device,
                               self.autocast, out_dir=self.run_dir)
            return distributed.broadcast_object(out, self.dist)
        # Under torchrun each rank evaluates every world-th sample; the per-sample sums are added over ranks.
        shard = distributed.EvalShard(self.eval_ds, self.dist)
        out = evaluate(self.eval_model, shard, self.cfg.train.eval_batch_size, self.device, self.autocast)
        keys = [k for k in out if k != "count"]
        sums = torch.tensor([out[k] * out["count"] for k in keys] + [out["count"]], dtype=torch.float64,
                            device=self.device)
        sums = distributed.all_reduce_sum(sums).tolist()
        total = sums[-1]
        return {**{k: v / max(total, 1.0) for k, v in zip(keys, sums)}, "count": total}

    # ----------------------------------------------------------------------------------------------------------
    def run(self, max_steps: int, reporter: Reporter) -> RunResult:
        """Train until ``max_steps``, Ctrl-C or a non-finite loss; evaluate and checkpoint on schedule and at the end."""
        tc = self.cfg.train
        base = baselines(self.eval_ds.inputs, self.eval_ds.labels)
        if self.train_ds.info.get("line"):
            reporter.line(escape(self.train_ds.info["line"]))
        result = RunResult(step=self.step, stopped_early=False, baselines=base)
        acc: dict[str, torch.Tensor] = {}
        t_start = time.perf_counter()
        t_log, step_log, resets_log = t_start, self.step, 0.0
        start_step = self.step
        self.until_step = max_steps
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            stop = self.stop_requested
            while self.step < max_steps and not stop:
                _, metrics = self.train_step()
                # Read the Ctrl-C flag once per step: the loop may only end on a value that also forced the flush
                # below, so the stop checkpoint is never written over unflushed (possibly non-finite) steps. Under
                # torchrun the ranks must agree, so the flag is only read (and or-ed over ranks) at the flushes.
                stop = self.stop_requested and not self.dist.enabled
                for k, v in metrics.items():
                    acc[k] = acc[k] + v.detach().float() if k in acc else v.detach().float()
                last = self.step >= max_steps
                eval_due = self.step % tc.eval_every == 0 or last
                ckpt_due = self.step % tc.checkpoint_every == 0 or last
                # Flush (the only host read of the step metrics) before anything is evaluated or saved, so that a
                # non-finite loss stops the run before a bad checkpoint could replace the last good one.
                if self.step % tc.trace_every == 0 or eval_due or ckpt_due or stop:
                    if self.tracer is not None:
                        rows = self.tracer.flush()
                        if self.dist.is_main:
                            self.on_trace_rows(rows, reporter)
                    ema_state = self.ema.state_dict() if self.ema is not None else {}
                    acc.update(finite_guard.state_flags(self.model, ema_state, self.optimizers, self.device))
                    stats = self._global_stats(acc)
                    acc = {}
                    if self.dist.enabled and stats.pop("stop_requested") > 0:
                        stop = True
                    if bad := finite_guard.failed(stats):  # before any eval or checkpoint of this state
                        result.message = finite_guard.stop_message(bad, step_log + 1, self.step, self.checkpoint_step)
                        reporter.warn(escape(result.message))
                        result.stopped_early = result.non_finite = True
                        result.step = self.step
                        self._end_trace("stopped", "non-finite loss")
                        return result
                    now = time.perf_counter()
                    n = self.step - step_log
                    reporter.step(self.step, {
                        "loss": stats["loss"] / max(n, 1) / tc.batch_size,  # global sums over the global batch
                        "exact": stats["inflight.exact"] / max(stats["inflight.count"], 1),
                        "steps_per_s": n / max(now - t_log, 1e-9),
                        "samples_per_s": stats["resets"] / max(now - t_log, 1e-9),
                    })
                    resets_log += stats["resets"]
                    t_log, step_log = now, self.step
                if eval_due:
                    result.last_eval = self.evaluate()
                    reporter.line(format_eval(self.step, result.last_eval, base))
                    if self.tracer is not None:
                        step, values = self.step, {**result.last_eval, **{f"baseline.{k}": v for k, v in base.items()}}
                        self.tracer.submit(lambda w: w.write_eval(step, values))
                        if self.scalars is not None:
                            self.scalars.write_eval(step, values)
                if ckpt_due:
                    self.save()
            if stop:
                self.save()
                result.stopped_early = True
                reporter.line(f"stopped at step {self.step} on request; checkpoint saved, continue with --resume")
            self._end_trace("stopped" if stop else "end", "")
        except BaseException as exc:
            self._end_trace("crashed", f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            if self.profiling is not None:  # an open window is written as far as it got
                self.profiling.close()
            if self.scalars is not None:
                self.scalars.close()
        elapsed = time.perf_counter() - t_start
        result.step = self.step
        result.seconds = elapsed
        result.steps_per_s = (self.step - start_step) / max(elapsed, 1e-9)
        result.samples_per_s = resets_log / max(elapsed, 1e-9)
        return result

    def _global_stats(self, acc: dict[str, torch.Tensor]) -> dict[str, float]:
        """The accumulated step metrics on the host (the one read-back), summed over ranks under torchrun, with
        ``stop_requested`` (how many ranks saw Ctrl-C) so that every rank stops at the same step."""
        if not self.dist.enabled:
            return {k: v.item() for k, v in acc.items()}
        keys = sorted(acc)
        flat = torch.stack([acc[k].reshape(()).float() for k in keys] +
                           [torch.tensor(float(self.stop_requested), device=self.device)])
        values = distributed.all_reduce_sum(flat).tolist()
        return {**dict(zip(keys, values[:-1])), "stop_requested": values[-1]}

    def save(self) -> None:
        """Checkpoint, after the trace has committed every row up to this step (so resume loses no row). Under
        torchrun every rank sends its own state (carry, sampler, RNGs) and rank 0 alone writes."""
        if self.tracer is not None:
            self.tracer.drain()
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(self.run_dir, state)
        self.checkpoint_step = self.step

    def on_trace_rows(self, rows: list[dict[str, float]], reporter: Reporter) -> None:
        """Flushed trace rows go to the live doctor; a finding is printed and stored the first time it holds. The
        rows also go to TensorBoard (``--tensorboard``), and the first warning or error opens a profiler window
        (``profile.on_finding``), so that its trace shows the steps after the finding."""
        assert self.tracer is not None and self.doctor is not None
        found = self.doctor.update(rows, alignment=self.tracer.last_alignment)
        for finding in found:
            text = f"{finding.code} (step {finding.first_step}): {finding.message}"
            if finding.severity == "info":  # a fact about the run (e.g. dropped-samples), not a defect to warn of
                reporter.line(f"[cyan]info:[/] {escape(text)}")
            else:
                reporter.warn(escape(text))
            self.tracer.submit(finding.store)
        if self.scalars is not None:
            self.scalars.write_rows(rows)
        defects = [f.code for f in found if f.severity != "info"]
        if self.until_step is not None and self.step >= self.until_step:
            defects = []  # no step is left to profile
        if self.profiling is not None and (window := self.profiling.on_findings(defects, self.step)) is not None:
            first, last = window.first_active
            reporter.line(escape(f"profiler: recording steps {first}..{last} after {window.reason} into "
                                 f"{self.profiling.out_dir}"))

    def _end_trace(self, kind: str, detail: str) -> None:
        if self.tracer is not None:
            step = self.step
            self.tracer.submit(lambda w: w.marker(kind, step, detail))
            self.tracer.close()
            self.step_hooks.remove(self.tracer.on_step)
            self.tracer = None

    def _on_sigint(self, signum, frame) -> None:
        # A second Ctrl-C stops at once. Not under torchrun: each rank gets the terminal's signal and the one the
        # agent forwards, and the ranks must stop together (at the next flush) for the checkpoint to be written.
        if self.stop_requested and not self.dist.enabled:
            raise KeyboardInterrupt
        self.stop_requested = True

    # ----------------------------------------------------------------------------------------------------------
    RANK_KEYS = ("sampler", "carry", "halt_rng", "torch_rng", "samples_dropped")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue as if never interrupted (tensors, dicts and plain values only).

        Under torchrun (a collective: every rank calls it) the per-rank parts (``RANK_KEYS``) of every rank are
        gathered into ``ranks`` on rank 0, whose own are also at the top level; other ranks get their own only."""
        gen = self.model.generator(self.device)
        own = {
            "sampler": self.sampler.state_dict(),
            "carry": {k: v.detach().cpu() for k, v in self.carry.tensors().items()},
            "halt_rng": gen.get_state().cpu(),
            "torch_rng": torch.get_rng_state(),
            "samples_dropped": self.samples_dropped,
        }
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "ema": self.ema.state_dict() if self.ema is not None else {},
            **own,
            "config": self.cfg.to_dict(),
        }
        if self.dist.enabled:
            state["world_size"] = self.dist.world
            ranks = distributed.gather_objects(own, self.dist)
            if ranks is not None:
                state["ranks"] = ranks
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        world = int(state.get("world_size", 1))
        if world != self.dist.world:
            raise UserError(f"checkpoint in {self.run_dir} was written by {world} process(es) and holds each one's "
                            f"carry and data position; resume it with {world} (this job has {self.dist.world})")
        if self.dist.enabled:
            state = {**state, **state["ranks"][self.dist.rank]}
        try:
            self.model.load_state_dict(state["model"])
            for opt, opt_state in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(opt_state)
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.sampler.load_state_dict(state["sampler"])
            self.carry = Carry.from_tensors(state["carry"]).to(self.device)
            self.model.generator(self.device).set_state(state["halt_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.samples_dropped = int(state["samples_dropped"])
            self.step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())  # torch's state-dict errors span lines; the CLI prints one
            raise UserError(f"checkpoint in {self.run_dir} does not match this run's config ({detail[:200]}); "
                            "resume with the run's own config or start a new run") from None

    def resume(self, state: dict[str, Any] | None = None) -> None:
        """Restore the run's checkpoint (``--resume``), or ``state`` when the caller has read it already."""
        self.load_state_dict(load_checkpoint(self.run_dir) if state is None else state)
        self.checkpoint_step = self.step
