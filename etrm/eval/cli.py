"""``etrm-eval SOURCE --out DIR``: evaluate a checkpoint, or every kept checkpoint of a run, without training.

Writes a fresh run directory (``--out``: never an existing path, never inside the source) with ``config.toml`` and a
``trace.sqlite`` holding, per checkpoint in step order, the evaluation (``evals``), its audit at every ACT step
(``eval_audits``) and the evaluation findings, so that ``etrm-doctor`` and ``etrm-dash`` open it like a training
run; ARC data also gets its pass@K votes and ``submission.json`` (of the last checkpoint). The source is only read.
Not yet written: the per-sample replays of the replay issue (whichever of the two lands second wires them here).

Bad input (a missing or foreign checkpoint, one that does not fit the architecture, an existing ``--out``) prints
one line and exits 2; a run directory this invocation made is then removed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from etrm.config import ConfigError
from etrm.errors import UserError

WEIGHTS = ("ema", "raw", "both")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see etrm-eval --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="etrm-eval", description="Evaluate TRM/ETRM checkpoints (ours or upstream's) into a new run "
                                              "directory that etrm-doctor and etrm-dash open.")
    p.add_argument("source", help="a checkpoint file (checkpoint.pt, checkpoint_step_N.pt, upstream's step_N), a run "
                                  "directory (its every-eval checkpoints) or a folder of upstream step_N files")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.eval_batch_size=64")
    p.add_argument("--out", required=True, help="the new run directory to write (must not exist)")
    p.add_argument("--weights", choices=WEIGHTS,
                   help="ours: the EMA weights (default when the checkpoint has them), the raw ones, or both; "
                        "upstream's file holds one set: this names it (default: ema when its all_config.yaml says "
                        "ema: true, else raw)")
    p.add_argument("--preset", help="architecture of an upstream checkpoint (default: its all_config.yaml)")
    p.add_argument("--config", help="a TOML config applied over the checkpoint's (or the preset's)")
    p.add_argument("--data", help="an upstream-built data folder (train/, test/) to evaluate on")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (UserError, ConfigError) as exc:
        print(f"etrm-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("etrm-eval: interrupted", file=sys.stderr)
        return 130


def _check_out(out: Path, source: Path) -> None:
    from etrm.eval.sources import source_dir
    from etrm.train.rundir import check_run_dir_parent

    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists; etrm-eval writes a new run directory: choose another --out")
    inside = source_dir(source).resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        raise UserError(f"--out {out} lies inside the source {inside}; etrm-eval never writes into the run it "
                        "evaluates: choose a path outside it")
    check_run_dir_parent(out)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from etrm.checkpoints.upstream import read
    from etrm.eval.sources import resolve_config, series

    source, out = Path(args.source), Path(args.out)
    paths = series(source)
    _check_out(out, source)
    first = read(paths[0])
    cfg, arch = resolve_config(first, args.preset, args.config, args.overrides, args.data)
    cfg.train.device = args.device
    weights = _weights(args.weights, first, cfg)
    from etrm.train.rundir import create_run_dir

    made = False
    try:
        from etrm.data.build import build_datasets

        train_ds, eval_ds, shape = build_datasets(cfg)  # bad data settings fail before anything is written
        create_run_dir(out, cfg)
        made = True
        id_shift = int(train_ds.info.get("id_shift", 0))  # our reader shifted upstream's puzzle ids by this
        _evaluate(cfg, arch, paths, first, weights, eval_ds, shape, id_shift, out, source)
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return 0


def _weights(flag: str | None, first, cfg) -> list[str]:
    """Which weights to evaluate (and the name the audits carry)."""
    from etrm.checkpoints.upstream import ETRM

    if first.kind == ETRM:
        if flag == "both":
            return ["ema", "raw"]
        return [flag or ("ema" if first.ema else "raw")]
    if flag == "both":
        raise UserError(f"{first.path} is an upstream checkpoint, which holds one set of weights; pass --weights "
                        "ema or raw to name it")
    return [flag or ("ema" if cfg.train.ema else "raw")]


def _evaluate(cfg, arch: str, paths: list[Path], first, weights: list[str], eval_ds, shape, id_shift: int,
              out: Path, source: Path) -> None:
    """Each checkpoint in step order, each of ``weights``: evaluate, print, write the trace, judge the findings."""
    import torch

    from diagnostics.doctor.eval_findings import LiveEvalDoctor
    from diagnostics.events import q_halt_rule
    from diagnostics.session import open_writer
    from diagnostics.trace import liveness
    from diagnostics.trace.eval_audits import EVALUATED_FROM, EvalAudit, without_act_steps
    from etrm.checkpoints.upstream import load_weights, read
    from etrm.model.faults import build_model
    from etrm.train.console import format_eval
    from etrm.train.distributed import SINGLE
    from etrm.train.evaluate import baselines, evaluate
    from etrm.train.instrument_setup import trace_meta
    from etrm.train.trainer import pick_device

    device = pick_device(cfg.train.device)
    model = build_model(cfg, shape, cfg.train.seed).to(device)
    meta = trace_meta(SimpleNamespace(cfg=cfg, device=device, step=0, dist=SINGLE), None)
    meta.update({EVALUATED_FROM: str(source), "checkpoints": len(paths), "weights_source": first.kind})
    base = baselines(eval_ds.inputs, eval_ds.labels)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    doctor = LiveEvalDoctor(meta, cfg.doctor)
    with liveness.hold(out):
        writer = open_writer(out, meta, 0)
        last = 0
        try:
            for i, path in enumerate(paths):
                opened = first if i == 0 else read(path)
                step = opened.step if opened.step is not None else i
                audits = []
                for w in weights:
                    load_weights(model, opened, w, id_shift, arch)
                    values = evaluate(model, eval_ds, cfg.train.eval_batch_size, device, autocast,
                                      out_dir=out if i == len(paths) - 1 and w == weights[0] else None)
                    audits.append(EvalAudit.from_values(step, w, values, cfg.digest(), q_halt_rule(cfg.act.q_continue)))
                    plain = without_act_steps(values)
                    print(f"{path.name} ({w}): {format_eval(step, plain, base)}", flush=True)
                    if w == weights[0]:
                        writer.write_eval(step, {**plain, **{f"baseline.{k}": v for k, v in base.items()}})
                writer.write_eval_audits(audits)
                for finding in doctor.update(audits):
                    print(f"etrm-eval: {finding.severity}: {finding.code} (step {finding.first_step}): "
                          f"{finding.message}", flush=True)
                    finding.store(writer)
                writer.commit()
                last = max(last, step)
            writer.marker("end", last, f"etrm-eval of {source}")
        finally:
            writer.close()
    print(f"etrm-eval: {len(paths)} checkpoint(s) evaluated into {out}; etrm-doctor {out} judges it, etrm-dash "
          "shows it")


if __name__ == "__main__":
    sys.exit(main())
