"""``etrm-train``: resolve the config (preset, file, overrides), make or resume the run directory, train.

Bad input (unknown preset or key, bad value, existing run directory, corrupt checkpoint) prints one line and exits 2.

Under ``torchrun`` every rank runs this; rank 0 alone creates the run directory and prints (see
``etrm.train.distributed``). ``ETRM_RANK_STATE_DIR`` (for tests and debugging): each rank saves its final model state
there as ``rank<R>.pt``, to check that ranks agree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from diagnostics.trace import killpoints

from diagnostics.trace import liveness
from diagnostics.properties.runtime_check import InvariantError
from diagnostics.trace.store import TRACE_NAME
from etrm.config import Config, ConfigError, apply_overrides, load_toml
from etrm.data.maze import VALID_PATH_KEY
from etrm.errors import UserError
from etrm.presets import load_preset
from etrm.train import elastic, epochs
from etrm.train.resume import check_overrides, compare, finished_message
from etrm.train.rundir import CONFIG_NAME, auto_name, check_run_dir_parent, create_run_dir, write_config

DEFAULT_PRESET = "demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see etrm-train --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="etrm-train", description="Train TRM / ETRM with ACT carry, optionally traced.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. arch.L_cycles=4")
    p.add_argument("--preset", help=f"named preset (default {DEFAULT_PRESET} when no --config is given)")
    p.add_argument("--config", help="a TOML config file, applied over the preset")
    p.add_argument("--run-dir", help="run directory (default runs/<automatic name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--trace", action="store_true", help="trace every step into RUN_DIR/trace.sqlite")
    p.add_argument("--profile", action="store_true",
                   help="record torch.profiler windows ([profile] wait/warmup/active/repeat) into RUN_DIR/profiler, "
                        "for tensorboard --logdir (torch-tb-profiler) and Perfetto")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars of the trace (at each flush) into RUN_DIR/tensorboard; "
                        "turns --trace on")
    p.add_argument("--check-invariants", action="store_true",
                   help="check carry/label invariants every step (debugging: one host sync per step)")
    p.add_argument("--wandb", action="store_true",
                   help="log the trace's figures, evals, findings and the config to Weights & Biases ([wandb] "
                        "project/name/mode; offline without a login); turns --trace on; needs pip install etrm[wandb]")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")
    p.add_argument("--seed", type=int, help="train.seed")
    return p


def resolve_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """Preset, then --config file, then key=value overrides, then the flag shortcuts."""
    data: dict[str, Any] = {}
    preset = args.preset if args.preset is not None else (None if args.config else DEFAULT_PRESET)
    if preset is not None:  # an empty --preset is an unknown name, not the default
        data = load_preset(preset)
    explicit = apply_overrides(load_toml(args.config) if args.config else {},
                               list(args.overrides) + _flag_overrides(args))
    epochs.check(explicit)  # train.epochs beside an explicit train.max_steps: one error
    return Config.from_dict(_merge(data, explicit)), preset


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.max_steps is not None:
        out.append(f"train.max_steps={args.max_steps}")
    if args.device is not None:
        out.append(f'train.device="{args.device}"')
    if args.seed is not None:
        out.append(f"train.seed={args.seed}")
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resume_config(args: argparse.Namespace, run_dir: Path) -> Config:
    """A resumed run keeps its own config; only the allow-list (``etrm.train.resume.RESUMABLE``: --max-steps,
    --device, cadence overrides) may change."""
    if args.preset is not None or args.config is not None or args.seed is not None:
        raise UserError("--resume continues a run with its own config; drop --preset, --config and --seed")
    check_overrides(args.overrides)
    cfg_file = run_dir / CONFIG_NAME
    if not cfg_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_NAME}); check --run-dir")
    return Config.from_dict(apply_overrides(load_toml(cfg_file), list(args.overrides) + _flag_overrides(args)))


def _continuation(args: argparse.Namespace, cfg: Config, run_dir: Path, restart: int) -> tuple[Any, list[str]]:
    """The checkpoint to continue from (``--resume``, or a torchrun restart finding the run it started) and the
    allowed config changes it gets; ``(None, [])`` for a new run, or a restart from before the first checkpoint.

    The config to continue with must be the checkpoint's but for ``RESUMABLE``; on a restart it must also be the
    run's ``config.toml``'s (the restarted command is the original one)."""
    from etrm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint

    if not args.resume and not (restart and run_dir.exists()):
        return None, []
    cfg_file = run_dir / CONFIG_NAME
    if not args.resume:
        if not cfg_file.is_file():
            raise UserError(f"torchrun restart {restart}: {run_dir} exists but holds no {CONFIG_NAME}; it is not this "
                            "run's directory")
        compare(cfg.to_dict(), load_toml(cfg_file), f"the restarted command's config (vs {cfg_file})")
        if not (run_dir / CHECKPOINT_NAME).is_file():
            return None, []
    state = load_checkpoint(run_dir)
    source = str(cfg_file) + (" with this command's overrides" if args.overrides or args.max_steps else "")
    applied = compare(cfg.to_dict(), state.get("config") or cfg.to_dict(), source)
    return state, applied


def main(argv: list[str] | None = None) -> int:
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone prints
    try:
        return _main(argv)
    except (UserError, ConfigError) as exc:
        if main_rank:
            print(f"etrm-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_rank:
            print("etrm-train: interrupted before a checkpoint could be written", file=sys.stderr)
        return 130
    finally:
        from etrm.train import distributed

        distributed.shutdown()


class _Quiet:
    """The reporter of ranks other than 0: says nothing."""

    def step(self, step: int, stats: dict[str, float]) -> None: ...
    def line(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def close(self) -> None: ...
    def summary(self, title: str, rows: dict[str, str]) -> None: ...


def _main(argv: list[str] | None) -> int:
    # Intermixed, so that overrides may follow options (``--preset demo --max-steps 6 arch.L_cycles=4``).
    args = build_parser().parse_intermixed_args(argv)
    if args.wandb:
        from etrm.train.wandb_log import require_wandb

        require_wandb()  # before anything is built or written
    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir pointing at the run to continue")
        run_dir = Path(args.run_dir)
        cfg, preset = _resume_config(args, run_dir), None
    else:
        cfg, preset = resolve_config(args)
        if elastic.max_restarts() and not args.run_dir:
            raise UserError("torchrun --max-restarts needs --run-dir: a restarted group finds the run to resume "
                            "there (an automatic name differs on each start)")
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / auto_name(cfg, preset)
        if not run_dir.exists():
            check_run_dir_parent(run_dir)
    restart = elastic.restart_count()
    state, applied = _continuation(args, cfg, run_dir, restart)
    if state is not None and int(state["step"]) >= cfg.train.max_steps:
        if os.environ.get("RANK", "0") == "0":
            print(f"etrm-train: {finished_message(run_dir, int(state['step']), cfg.train.max_steps)}",
                  file=sys.stderr)
        return 0

    import torch

    from etrm.train import distributed  # heavy imports after argument checks
    from etrm.train.trainer import pick_device

    env = distributed.env_from_torchrun()
    device = distributed.rank_device(pick_device(cfg.train.device), env)
    distributed.local_batch(cfg.train.batch_size, env)  # an uneven split fails before the group forms
    distributed.init(env, device)
    if env.enabled and not args.run_dir:  # automatic names hold a timestamp: take rank 0's
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    if not args.resume and not restart and run_dir.exists():
        raise UserError(f"run directory {run_dir} already exists; pass --resume to continue it or choose "
                        "another --run-dir")
    made: dict[str, Any] = {"state": state, "applied": applied, "restart": restart}
    with contextlib.ExitStack() as made["held"], _out_of_memory(cfg, run_dir, made, env):
        return _train(args, cfg, preset, run_dir, env, device, made)


def _hold(made: dict[str, Any], run_dir: Path) -> None:
    """Rank 0 holds the run's lock while it trains (``diagnostics.trace.liveness``: readers tell a killed trainer)."""
    try:
        made["held"].enter_context(liveness.hold(run_dir))
    except liveness.LockHeld as exc:
        raise UserError(str(exc)) from None


@contextlib.contextmanager
def _out_of_memory(cfg: Config, run_dir: Path, made: dict[str, Any], env: Any) -> Iterator[None]:
    """A ``MemoryError`` or ``torch.OutOfMemoryError`` becomes one line with the memory estimate; a run directory
    this invocation created, and that holds no checkpoint yet, is removed (nothing half-made is left)."""
    import torch

    from etrm.train import memory

    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not memory.is_out_of_memory(exc):
            raise
        trainer = made.get("trainer")
        estimate = trainer.memory_estimate if trainer is not None else memory.estimate_bytes(cfg, 1)
        kept = ""
        if made.get("created") and env.is_main:
            if trainer is None or trainer.checkpoint_step is None:
                shutil.rmtree(run_dir, ignore_errors=True)
                kept = f"; {run_dir} was removed"
            else:
                kept = f"; {run_dir} keeps the checkpoint of step {trainer.checkpoint_step}"
        raise UserError(f"out of memory (these sizes need {memory.describe(estimate)}, by estimate); lower "
                        f"{memory.SIZES}{kept}") from None


def _train(args: argparse.Namespace, cfg: Config, preset: str | None, run_dir: Path, env: Any, device: Any,
           made: dict[str, Any]) -> int:
    """Build the trainer, make or resume the run directory, train, and print the summary."""
    import torch
    from rich.markup import escape

    from etrm.train import distributed, instruments
    from etrm.train.console import Reporter
    from etrm.train.trainer import Trainer

    trainer = made["trainer"] = Trainer(cfg, run_dir, device=device, dist_env=env)  # every rank checked above
    restart, continued = made["restart"], made["state"] is not None or (made["restart"] and run_dir.exists())
    if continued and env.is_main:
        _hold(made, run_dir)  # before anything of the run is written: a second trainer on it is refused
    plan = None if continued else epochs.apply(cfg, trainer.train_ds)  # train.epochs: before the config is written
    if made["state"] is not None:
        trainer.resume(made["state"])
        made["state"] = None  # the checkpoint's tensors are the trainer's now
        if made["applied"] and env.is_main:  # so that the next resume compares against what this one ran with
            write_config(run_dir, cfg)
    elif not continued and env.is_main:
        create_run_dir(run_dir, cfg)
        made["created"] = True
        _hold(made, run_dir)
    trace = args.trace or args.tensorboard or args.wandb or (args.resume and (run_dir / TRACE_NAME).exists())
    trace = distributed.broadcast_object(trace, env)  # rank 0's view of the run directory decides for every rank
    instruments.build(trainer, instruments.Options(trace=trace, preset=preset, profile=args.profile,
                                                   tensorboard=args.tensorboard, wandb=args.wandb,
                                                   check_invariants=args.check_invariants))
    tracer = trainer.instruments.find(instruments.Trace)
    if restart and tracer is not None:  # the dashboard marks it; rows past the checkpoint were dropped
        step, detail = trainer.step, f"torchrun restart {restart}"
        tracer.tracer.submit(lambda w: w.marker("restart", step, detail))
    if os.environ.get(killpoints.ENV):  # tests only: see diagnostics.trace.killpoints
        trainer.add(instruments.OnStep(killpoints.step_hook))
    reporter = Reporter(total=cfg.train.max_steps, start=trainer.step) if env.is_main else _Quiet()
    if continued:
        how = f"torchrun restart {restart}: " if restart and not args.resume else ""
        reporter.line(escape(f"{how}resumed from step {trainer.step}" if trainer.checkpoint_step is not None else
                             f"{how}no checkpoint yet: starting again from step 0 in {run_dir}"))
        for line in made["applied"]:
            reporter.line(escape(f"changed on resume: {line}"))
    if plan is not None:
        reporter.line(escape(plan.line()))
    where = f"{trainer.device}" + (f" x {env.world} ranks ({trainer.local_batch} slots each)" if env.enabled else "")
    reporter.line(f"run {run_dir} | model {cfg.model} mode {cfg.mode} | {trainer.model.num_trainable_parameters():,} "
                  f"params | train {len(trainer.train_ds)} eval {len(trainer.eval_ds)} samples | {where}")
    try:
        result = trainer.run(cfg.train.max_steps, reporter)
    except InvariantError as exc:
        reporter.close()
        print(f"etrm-train: invariant check failed: {exc}; no checkpoint was written for this step"
              + (f" (rank {env.rank})" if env.enabled else ""), file=sys.stderr)
        return 1
    finally:
        reporter.close()
    dropped = int(distributed.all_reduce_sum(torch.tensor([trainer.samples_dropped], device=trainer.device)).item())
    if os.environ.get("ETRM_RANK_STATE_DIR"):
        _save_rank_state(Path(os.environ["ETRM_RANK_STATE_DIR"]), trainer, env.rank)
    if not env.is_main:
        return 1 if result.non_finite else 0
    rows = {"run": str(run_dir), "steps": str(result.step), "wall time": f"{result.seconds:.1f} s",
            "steps/s": f"{result.steps_per_s:.2f}", "samples/s": f"{result.samples_per_s:.1f}",
            "samples dropped": str(dropped)}
    ev, base = result.last_eval, result.baselines
    if ev:
        rows.update({
            "held-out exact (max steps)": f"{ev['exact']:.3f}",
            "held-out token (max steps)": f"{ev['token']:.3f}",
            "held-out exact (would-halt)": f"{ev['halt.exact']:.3f} at mean step {ev['halt.step']:.2f}",
            "baseline copy-input exact": f"{base['copy_input.exact']:.3f}",
            "baseline common-output exact": f"{base['common_output.exact']:.3f}",
        })
        if VALID_PATH_KEY in ev:
            rows["held-out valid shortest path"] = (f"{ev[VALID_PATH_KEY]:.3f} (would-halt "
                                                    f"{ev['halt.' + VALID_PATH_KEY]:.3f})")
    rows.update(trainer.instruments.summary())
    reporter.summary("etrm-train summary", rows)
    if result.non_finite:
        print(f"etrm-train: error: {result.message}", file=sys.stderr)
        return 1
    return 0


def _save_rank_state(out_dir: Path, trainer: Any, rank: int) -> None:
    """``ETRM_RANK_STATE_DIR``: this rank's final model (puzzle table included), EMA and sampler state."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema else {},
                "sampler": trainer.sampler.state_dict(), "slots": trainer.local_batch, "step": trainer.step},
               out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())
