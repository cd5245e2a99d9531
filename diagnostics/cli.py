"""``etrm-doctor RUN [--json] [--export csv|parquet FILE]``: findings of a run, recomputed from its steps table
and its evaluation audits.

Exit 0 when no error finding holds, 1 when one does, 2 on bad input (missing or corrupt run, bad arguments). With
``--export`` the exit is 0 once the file is written (scripts that export must not fail on a finding), unless
``--strict`` is given. The trace is opened read-only: the doctor never writes to a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from diagnostics.trace import figures
from diagnostics.doctor.diagnose import diagnose, summary
from diagnostics.doctor.findings import Finding, has_error, ordered
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.doctor.eval_findings import diagnose_evals
from diagnostics.doctor.ledger_doctor import diagnose_run
from diagnostics.doctor.timing_rules import diagnose_timings
from diagnostics.trace.loading import as_json_value, load_eval_audits, load_evals, load_run, load_timings
from diagnostics.trace.outputs import check_output, write_atomic
from diagnostics.trace.schema import TraceError

PROG = "etrm-doctor"
COLOURS = {"error": "bold red", "warning": "yellow", "info": "cyan"}
STATUS_COLOURS = {"live": "green", "finished": "green", "stopped": "yellow", "crashed": "red"}


class _BadInput(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise _BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Findings of a traced etrm run: gradient starvation, label misalignment, "
                                       "wasted encoder work, non-finite loss, halting collapse, dropped samples, "
                                       "evaluation halting mismatch, EMA gap, evaluation regression, step-time "
                                       "regression, a dominating phase, loss and gradient-norm spikes.")
    p.add_argument("run", metavar="RUN", help="run directory (holding trace.sqlite) or the trace file itself")
    p.add_argument("--json", action="store_true", help="print JSON with 'summary' and 'findings' instead of a report")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "FILE"),
                   help="also write the steps table (with derived ratios) as csv or parquet")
    p.add_argument("--force", action="store_true",
                   help="with --export, replace an existing file (never one inside a run directory)")
    p.add_argument("--strict", action="store_true",
                   help="with --export, still exit 1 when an error finding holds (without --export it always does)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="what-if: re-judge with another threshold, e.g. --set window=20 --set coverage_min=0.3 "
                        "(read-only: the run, its config and its stored findings are unchanged)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        DoctorConfig().with_overrides(args.set)  # bad --set input fails before the trace is read
        if args.export and args.export[0] not in ("csv", "parquet"):
            raise _BadInput(f"--export format must be csv or parquet, not {args.export[0]!r}")
        if args.export:  # refused before anything is read: a new file outside every run directory
            check_output(args.export[1], force=args.force)
        df = load_run(args.run)
        evals = load_evals(args.run)
        audits = load_eval_audits(args.run)
        timings = load_timings(args.run)
    except (_BadInput, TraceError, ValueError) as exc:
        return _fail(exc)
    meta = df.attrs.get("meta", {})
    cfg = DoctorConfig.from_meta(meta).with_overrides(args.set)  # the run's own thresholds, then any what-if
    if args.set:
        print(f"{PROG}: what-if with {', '.join(args.set)}: findings recomputed with these thresholds; read-only, "
              "the run's config and stored findings are unchanged", file=sys.stderr)
    try:  # the ledger's run-level findings beside the window rules' (none for a trace without a ledger)
        ledger_found = diagnose_run(args.run, meta, cfg, int(df.index.max()) if len(df) else None)
        findings = ordered(diagnose(df, meta, cfg) + diagnose_evals(audits, meta, cfg, evals=evals) + ledger_found
                           + diagnose_timings(timings, meta, cfg))
        info = summary(df, meta, cfg=cfg)
    except TraceError as exc:
        return _fail(exc)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # values an etrm trainer never writes
        return _fail(f"{args.run}: the trace holds values this etrm cannot read ({exc}); its meta or tables were "
                     "edited, or it is not an etrm trace")
    info["what_if"] = list(args.set)
    if len(evals):
        info["last_eval"] = as_json_value({"step": int(evals.index[-1]), **evals.iloc[-1].to_dict()})
    if args.export:
        try:
            _export(df, args.export[0], Path(args.export[1]))
        except (OSError, ValueError, ImportError) as exc:
            return _fail(exc)
        print(f"{PROG}: exported {len(df)} steps to {args.export[1]}", file=sys.stderr)
    if args.json:
        print(json.dumps({"run": str(args.run), "summary": info, "findings": [f.to_dict() for f in findings]},
                         indent=2))
    else:
        _report(str(args.run), info, findings)
    return 1 if has_error(findings) and (args.strict or not args.export) else 0


def _fail(exc: BaseException) -> int:
    print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def _export(df, fmt: str, path: Path) -> None:
    out = df.copy()
    out.attrs = {"meta": df.attrs.get("meta", {})}
    check_output(path, force=True)  # again at the moment of writing: the path may have become a run's meanwhile
    write_atomic(path, (lambda tmp: out.to_csv(tmp)) if fmt == "csv" else (lambda tmp: out.to_parquet(tmp)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _report(run: str, info: dict[str, Any], findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"etrm-doctor: {run}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in info.items():
        if key in ("last_eval", "figures", "final", "thresholds", "what_if") or value is None:
            continue
        text = escape(_fmt(value))
        if key == "status":
            text = f"[{STATUS_COLOURS.get(value, 'white')}]{text}[/]"
        table.add_row(key, text)
    if "last_eval" in info:
        table.add_row("last_eval", escape(_fmt(info["last_eval"])))
    console.print(table)
    final = info.get("final") or {}
    window = final.get("window")
    figs = Table(title="figures (diagnostics.trace.figures)", title_justify="left")
    figs.add_column("figure", style="bold")
    figs.add_column("whole run", justify="right")
    figs.add_column(f"steps {window[0]}..{window[1]}" if window else "last window", justify="right")
    for name, value in (info.get("figures") or {}).items():
        fig = figures.REGISTRY[name]
        last = final.get(name)
        figs.add_row(f"{fig.label} [dim]({name})[/]", figures.format_value(fig, value),
                     figures.format_value(fig, last))
    console.print(figs)
    if info.get("what_if"):
        console.print(f"[yellow]what-if[/] ({', '.join(info['what_if'])}): read-only, the run is unchanged")
    if not findings:
        console.print("[green]no findings[/]: no rule holds on this run")
        return
    ft = Table(title="findings", title_justify="left")
    ft.add_column("severity", no_wrap=True)
    ft.add_column("code", style="bold", no_wrap=True)
    ft.add_column("step", justify="right", no_wrap=True)
    ft.add_column("message and evidence")
    for f in findings:
        colour = COLOURS.get(f.severity, "white")
        evidence = "\n".join(f"  {k} = {_fmt(v)}" for k, v in f.evidence.items())
        ft.add_row(f"[{colour}]{f.severity}[/]", f"[{colour}]{f.code}[/]", _fmt(f.first_step),
                   escape(f.message) + "\n[dim]" + escape(evidence) + "[/]")
    console.print(ft)
    errors = sum(f.severity == "error" for f in findings)
    if errors:
        console.print(f"[bold red]{errors} error finding(s)[/]: exit 1")


if __name__ == "__main__":
    raise SystemExit(main())
