"""The training loop: one ACT step per optimizer step over a persistent carry, as upstream ``pretrain.py``.

Reads top to bottom: ``Trainer.__init__`` builds data, model and optimizers; ``train_step`` does one ACT step;
``run`` loops through its phases (step, accumulate, flush, eval, checkpoint); ``state_dict``/``load_state_dict``
make ``--resume`` exact. Everything optional (tracing, checks, doctor, profiler, TensorBoard, W&B) is an instrument
(``etrm.train.instruments``) called at fixed points; the trainer names none of them.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.markup import escape

from diagnostics.trace.eval_audits import EMA as EMA_WEIGHTS, RAW, EvalAudit, without_act_steps
from diagnostics.events import StepEvents, q_halt_rule
from diagnostics.session import grad_groups
from etrm.config import Config
from etrm.data.build import build_datasets
from etrm.data.feed import Feed, build_feed, to_device
from etrm.errors import UserError
from etrm.loss import ACTLoss
from etrm.model import Carry
from etrm.model.faults import build_model
from etrm.model.puzzle_emb import SignSGD
from etrm.train import distributed, finite_guard, memory
from etrm.train.adam_atan2 import build_adam
from etrm.train.checkpoint import load_checkpoint, save_checkpoint
from etrm.train.console import Reporter, format_eval, format_raw_eval
from etrm.train.distributed import SINGLE, DistEnv
from etrm.train.ema import EMA
from etrm.train.evaluate import baselines, evaluate
from etrm.train.instruments import Instrument, Instruments, StepRecord
from etrm.train.retention import Retention
from etrm.train.schedule import lr_factor, set_lr


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


I = TypeVar("I", bound=Instrument)


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


@dataclass
class Flushed:
    """What a flush decided: ``stop`` (a rank saw Ctrl-C, or non-finite), ``non_finite`` (stop without saving)."""

    stop: bool
    non_finite: bool
    message: str = ""  # the non-finite guard's line


class Meter:
    """The step metrics summed on the device between flushes, and the throughput of the logged intervals."""

    def __init__(self, step: int) -> None:
        self.acc: dict[str, torch.Tensor] = {}
        self.t_start = self.t_log = time.perf_counter()
        self.start_step = self.logged_step = step
        self.samples = 0.0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.acc[k] = self.acc[k] + v if k in self.acc else v

    def take(self) -> dict[str, torch.Tensor]:
        acc, self.acc = self.acc, {}
        return acc

    def log(self, stats: dict[str, float], step: int, batch_size: int) -> dict[str, float]:
        """The progress line's figures since the last one (``stats``: global sums over the global batch)."""
        now = time.perf_counter()
        n, dt = step - self.logged_step, max(now - self.t_log, 1e-9)
        self.samples += stats["resets"]
        self.t_log, self.logged_step = now, step
        return {"loss": stats["loss"] / max(n, 1) / batch_size,
                "exact": stats["inflight.exact"] / max(stats["inflight.count"], 1),
                "steps_per_s": n / dt, "samples_per_s": stats["resets"] / dt}

    def finish(self, result: RunResult, step: int) -> RunResult:
        elapsed = time.perf_counter() - self.t_start
        result.step, result.seconds = step, elapsed
        result.steps_per_s = (step - self.start_step) / max(elapsed, 1e-9)
        result.samples_per_s = self.samples / max(elapsed, 1e-9)
        return result


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
        memory.check_fits_before_data(cfg, self.device, self.dist.world)  # before any data is built or cached
        self.train_ds, self.eval_ds, shape = build_datasets(cfg)
        self.memory_estimate = memory.check_fits(cfg, shape.seq_len, shape.num_puzzle_ids, self.device, self.dist.world)
        seed = distributed.halt_seed(tc.seed, self.dist)  # each rank explores on its own draws
        self.model = build_model(cfg, shape, seed).to(self.device)
        self.loss_fn = ACTLoss(cfg.loss)
        self.optimizers = self._build_optimizers()
        self.ema = EMA(self.model, tc.ema_rate) if tc.ema else None
        self.eval_model = build_model(cfg, shape, seed).to(self.device) if tc.ema else self.model
        # The data path (train.data_path): the sampler and the training set on the device (no host sync per step),
        # or on the host. Either way the sampler is this rank's share under torchrun.
        self.feed: Feed = build_feed(tc.data_path, tc.sampler, self.train_ds, self.local_batch, tc.seed, self.device)
        self.sampler = distributed.shard_sampler(self.feed.sampler, self.dist)
        if tc.compile:  # in place: parameter names (checkpoints) stay those of the plain modules
            self.model.core.compile()
            if hasattr(self.model, "encoder"):
                self.model.encoder.compile()
        # What train_step calls: the model itself, or its DDP wrapper (gradients all-reduced, i.e. averaged, in
        # backward). DDP leaves buffers alone (the TRM puzzle table is kept equal by SignSGD's gather); a step that
        # may leave parameters without gradient (cached mode without resets, a fault) must say so to DDP.
        self.forward_model: torch.nn.Module = self.model
        if self.dist.enabled:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=self.model.leaves_parameters_unused,
                **distributed.no_buffer_sync())
        self.carry: Carry = self.model.initial_carry(self._to_device(self._padding_batch()))
        self.step = 0
        self.stop_requested = False
        self.instruments = Instruments()  # everything optional (etrm.train.instrument_setup.build)
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk (written or resumed from)
        self.retention = Retention.from_config(tc)  # which checkpoints stay besides checkpoint.pt
        self.restored_instruments: dict[str, Any] = {}  # the resumed checkpoint's instrument state (by kind)

    def add(self, instrument: I) -> I:
        """Attach an instrument (called in the order added); returns it."""
        self.instruments.append(instrument)
        return instrument

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The model's parameters as the encoder's and the rest (separate learning rates, separate grad norms)."""
        return grad_groups(self.model, getattr(self.model, "encoder", None))

    # ----------------------------------------------------------------------------------------------------------
    def _build_optimizers(self) -> list:
        tc = self.cfg.train
        parts = self.parameter_groups()
        groups = [{"params": parts["rest"], "base_lr": tc.lr}]
        if parts["encoder"]:
            groups.append({"params": parts["encoder"], "base_lr": tc.lr * tc.encoder_lr_scale})
        adam = build_adam(tc.optimizer, groups, tc.lr, (tc.beta1, tc.beta2), tc.weight_decay)
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
    def next_batch(self) -> dict[str, torch.Tensor]:
        """Fresh samples for the slots that halted last step: ``data`` chooses their ids from the reset mask, ``h2d``
        brings their rows to the device (on the device path both stay on the device: no host sync)."""
        with self.instruments.phase("data"):
            drawn = self.feed.draw(self.carry.halted)
        with self.instruments.phase("h2d"):
            return self.feed.gather(drawn)

    def train_step(self) -> tuple[StepEvents, dict[str, torch.Tensor]]:
        """One ACT step for every slot, one backward, one optimizer step. Returns the step's events and metrics."""
        tc, inst = self.cfg.train, self.instruments
        inst.before_step(self.step, self.carry)
        batch = self.next_batch()
        self.model.train()
        with self.autocast():
            carry, out, events = self.forward_model(self.carry, batch, clock=inst.clock())
            with inst.phase("loss"):
                loss, metrics = self.loss_fn(out, events)
        with inst.phase("trace"):  # after the loss (events complete), before backward (gradient hooks attach)
            inst.on_step(StepRecord(self.step, batch, carry, events, metrics))
        with inst.phase("backward"):
            # Upstream normalises by the global batch: per rank by its slots, then DDP averages over the ranks.
            (loss / self.local_batch).backward()
        inst.after_backward(self.step)
        puzzle_rows = self.model.puzzle_emb.last_rows if self.model.is_trm else None
        metrics.update(finite_guard.grad_flags(self.model, puzzle_rows, self.device))  # read at the flush
        with inst.phase("optimizer"):
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
        inst.after_step(self.step)
        return events, metrics

    @property
    def eval_weights(self) -> str:
        """The weights evaluations score: ``ema`` when EMA is on, else ``raw``."""
        return EMA_WEIGHTS if self.ema is not None else RAW

    def evaluate(self, weights: str | None = None) -> dict[str, float]:
        """Held-out metrics with a fresh carry: with the EMA weights when enabled (``weights="raw"``: the raw ones
        even then; only the evaluation of ``eval_weights`` writes an ARC submission). Keys: see ``evaluate``."""
        model, out_dir = self.model, self.run_dir
        if weights is None or weights == self.eval_weights:
            if self.ema is not None:
                self.ema.copy_to(self.eval_model, self.model)
                model = self.eval_model
        else:
            out_dir = None
        if not self.dist.enabled or getattr(self.eval_ds, "arc_index", None) is not None:
            # One process, or ARC (voting over augmentations needs every prediction of a task in one place): rank 0
            # evaluates the whole set (and writes the submission) and sends the results to the other ranks.
            out = None
            if self.dist.is_main:
                out = evaluate(model, self.eval_ds, self.cfg.train.eval_batch_size, self.device,
                               self.autocast, out_dir=out_dir)
            return distributed.broadcast_object(out, self.dist)
        # Under torchrun each rank evaluates every world-th sample; the per-sample sums (the per-ACT-step ones too)
        # are added over ranks.
        shard = distributed.EvalShard(self.eval_ds, self.dist)
        out = evaluate(model, shard, self.cfg.train.eval_batch_size, self.device, self.autocast)
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
        result, meter = self._begin(reporter, max_steps)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        status, detail = "end", ""
        try:
            stop = self.stop_requested
            while self.step < max_steps and not stop:
                # step: one ACT step and one optimizer step; the metrics are summed on the device
                meter.add(self.train_step()[1])
                # Ctrl-C: read once per step, so that the loop only ends on a value that also forced the flush
                # below; under torchrun the ranks must agree, so the flag is only read (and voted on) at a flush
                stop = self.stop_requested and not self.dist.enabled
                eval_due, ckpt_due = self._due(tc.eval_every, max_steps), self._due(tc.checkpoint_every, max_steps)
                ckpt_due = ckpt_due or (eval_due and self.retention.saves_at_eval)
                # flush: the one host read, before anything is evaluated or saved; a non-finite loss stops the
                # run here, before a bad checkpoint could replace the last good one
                if self._due(tc.trace_every, max_steps) or eval_due or ckpt_due or stop:
                    flushed = self.flush(meter, reporter)
                    if flushed.non_finite:
                        result.message = flushed.message
                        result.stopped_early = result.non_finite = True
                        status, detail = "stopped", flushed.message  # what went non-finite, and what is kept
                        break
                    stop = stop or flushed.stop
                if eval_due:  # eval: the EMA weights on the held-out set, from a fresh carry (and the raw ones)
                    result.last_eval = self.evaluate_and_report(reporter, result.baselines,
                                                                last=self.step >= max_steps)
                if ckpt_due:  # checkpoint (and what the retention policy keeps of it)
                    self.save(result.last_eval if eval_due else None)
            if stop and not result.non_finite:  # Ctrl-C (on any rank): save where the run stands
                status = self._stop_on_request(result, reporter)
        except BaseException as exc:
            status, detail = "crashed", f"{type(exc).__name__}: {exc}"[:500]
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            self.instruments.on_end(self.step, status, detail)
        return meter.finish(result, self.step)

    def _begin(self, reporter: Reporter, max_steps: int) -> tuple[RunResult, "Meter"]:
        """The run's result (with the held-out baselines) and meter; the data line; instruments started."""
        result = RunResult(step=self.step, stopped_early=False,
                           baselines=baselines(self.eval_ds.inputs, self.eval_ds.labels))
        if self.train_ds.info.get("line"):
            reporter.line(escape(self.train_ds.info["line"]))
        self.instruments.on_start(reporter, max_steps)
        return result, Meter(self.step)

    def _due(self, every: int, max_steps: int) -> bool:
        """Whether a scheduled phase is due after this step (every ``every`` steps, and at the last one)."""
        return self.step % every == 0 or self.step >= max_steps

    def _stop_on_request(self, result: RunResult, reporter: Reporter) -> str:
        self.save()
        result.stopped_early = True
        reporter.line(f"stopped at step {self.step} on request; checkpoint saved, continue with --resume")
        return "stopped"

    def flush(self, meter: "Meter", reporter: Reporter) -> "Flushed":
        """The flush: the instruments' rows read back and handed on (rank 0), the accumulated step metrics summed
        over ranks with the Ctrl-C vote, then the non-finite check and the progress line."""
        rows = self.instruments.flush_rows()
        self.instruments.on_flush(rows, self.step)
        acc = meter.take()  # the guard's state flags join the step metrics: one read for all of them
        ema_state = self.ema.state_dict() if self.ema is not None else {}
        acc.update(finite_guard.state_flags(self.model, ema_state, self.optimizers, self.device))
        stats = self._global_stats(acc)
        stop = self.dist.enabled and stats.pop("stop_requested") > 0
        if bad := finite_guard.failed(stats):  # before any eval or checkpoint of this state
            message = finite_guard.stop_message(bad, meter.logged_step + 1, self.step, self.checkpoint_step)
            message += self.instruments.stop_note(self.step)  # a spike that preceded it (the live doctor's)
            reporter.warn(escape(message))
            return Flushed(stop=True, non_finite=True, message=message)
        reporter.step(self.step, meter.log(stats, self.step, self.cfg.train.batch_size))
        return Flushed(stop=stop, non_finite=False)

    def raw_audit_due(self, last: bool = False) -> bool:
        """Whether this evaluation also scores the raw weights (EMA on; every ``train.eval_raw_every``-th
        evaluation, counted as step // eval_every so that a resumed run keeps the cadence, and the last one)."""
        k = self.cfg.train.eval_raw_every
        return self.ema is not None and k > 0 and (last or (self.step // self.cfg.train.eval_every) % k == 0)

    def audit(self, weights: str, values: dict[str, float]) -> EvalAudit:
        """The evaluation audit of ``values`` (``evaluate``'s result for ``weights``) at this step."""
        return EvalAudit.from_values(self.step, weights, values, self.cfg.digest(),
                                     q_halt_rule(self.cfg.act.q_continue))

    def evaluate_and_report(self, reporter: Reporter, base: dict[str, float], last: bool = False) -> dict[str, float]:
        """Evaluate (and, when ``raw_audit_due``, the raw weights beside the EMA ones), print the lines, and hand
        the results (with the baselines) and the audits to the instruments."""
        values = self.evaluate()
        audits = [self.audit(self.eval_weights, values)]
        values = without_act_steps(values)
        reporter.line(format_eval(self.step, values, base))
        if self.raw_audit_due(last):
            raw = self.evaluate(RAW)
            audits.append(self.audit(RAW, raw))
            reporter.line(format_raw_eval(self.step, without_act_steps(raw), values))
        self.instruments.on_eval(self.step, {**values, **{f"baseline.{k}": v for k, v in base.items()}})
        self.instruments.on_eval_audit(self.step, audits)
        return values

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

    def save(self, evaluated: dict[str, float] | None = None) -> None:
        """Checkpoint, after the trace has committed every row up to this step (so resume loses no row). Under
        torchrun every rank sends its own state (carry, sampler, RNGs) and rank 0 alone writes. ``evaluated``: this
        step's evaluation, for the retention policy (``etrm.train.retention``)."""
        self.instruments.on_checkpoint(self.step)
        state = self.state_dict()
        if self.dist.is_main:
            written = save_checkpoint(self.run_dir, state)
            self.retention.keep(self.run_dir, written, self.step, evaluated)
        self.checkpoint_step = self.step

    def _on_sigint(self, signum, frame) -> None:
        # A second Ctrl-C stops at once. Not under torchrun: each rank gets the terminal's signal and the one the
        # agent forwards, and the ranks must stop together (at the next flush) for the checkpoint to be written.
        if self.stop_requested and not self.dist.enabled:
            raise KeyboardInterrupt
        self.stop_requested = True

    # ----------------------------------------------------------------------------------------------------------
    RANK_KEYS = ("sampler", "carry", "halt_rng", "torch_rng", "samples_dropped", "instruments")

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
            "instruments": self.instruments.state_dict(),  # per rank: e.g. the ledger's samples in flight
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
            self.restored_instruments = dict(state.get("instruments") or {})  # handed to them when they are built
            self.step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())  # torch's state-dict errors span lines; the CLI prints one
            raise UserError(f"checkpoint in {self.run_dir} does not match this run's config ({detail[:200]}); "
                            "resume with the run's own config or start a new run") from None

    def resume(self, state: dict[str, Any] | None = None) -> None:
        """Restore the run's checkpoint (``--resume``), or ``state`` when the caller has read it already."""
        self.load_state_dict(load_checkpoint(self.run_dir) if state is None else state)
        self.checkpoint_step = self.step
