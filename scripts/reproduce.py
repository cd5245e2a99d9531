"""The progress summary's gradient-starvation study, redone on CPU from our traces: one command for all of it.

Trains the `demo` preset in `reencode`, `cached` and `fct` modes and `demo-trm`, each for the same number of optimizer
steps (``--steps``, default the preset's 1500; the samples each mode consumes in them differ and are reported), then
writes into ``--out`` (default docs/figures):

  repro-coverage.png       encoder gradient coverage per step per mode (and cached mode's reset fraction)
  repro-accuracy.png       training exact accuracy (in-flight, rolling) and held-out exact per mode, with baselines
  repro-encoder-work.png   slots encoded per step per mode (rolling), and the slots cached mode needed
  repro-tables.md          the efficiency table of the summary regenerated from the traces, and the accuracy table

PNG export: plotly's static export when kaleido is installed, else matplotlib when installed, else headless
chromium (the browser the dashboard's screenshot tool and browser tests use) on the figure's HTML.

    python scripts/reproduce.py                          # train all four for 1500 steps each, then draw
    python scripts/reproduce.py --use reencode=runs/d-re --use cached=runs/d-ca \\
        --use fct=runs/d-fct --use demo-trm=runs/d-trm   # figures and tables from existing traced runs
    python scripts/reproduce.py --steps 300 --jobs 2     # shorter
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboards.figures.compare import efficiency_table  # noqa: E402
from diagnostics import load_run
from diagnostics.trace import figures  # noqa: E402
from diagnostics.trace.loading import load_evals  # noqa: E402

COLORS = {"reencode": "#1f77b4", "cached": "#d62728", "fct": "#2ca02c", "demo-trm": "#9467bd"}
ROLL = 40  # steps in the rolling means (a multiple of the 4-step ACT cycle, so bursts average out)


def _demo_module():
    spec = importlib.util.spec_from_file_location("etrm_demo_script", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


# The progress summary's regime (halt_max_steps 16, exploration 0.5, batch 256): name -> etrm-train arguments
SUMMARY_RUNS = {"reencode": ["--preset", "summary-regime"],
                "cached": ["--preset", "summary-regime", "encoder.mode=cached"]}
SUMMARY_STEPS = 3000  # the preset's train.max_steps; the time cap below ends the runs sooner on a slow machine
SUMMARY_CAP_MIN = 60  # CPU minutes per run (one thread each, two side by side): 60 minutes on 2 idle cores
# Step ranges of the summary-regime coverage table: the first step, the first ACT cycle, then the rest in blocks
PHASES = ((1, 1), (2, 16), (17, 100), (101, 1000), (1001, 2000), (2001, 3000))


def train(names: list[str], steps: int, jobs: int, root: Path, extra: list[str],
          args: dict[str, list[str]] | None = None, cap_s: float | None = None) -> dict[str, Path]:
    demo = _demo_module()
    args = args or {n: demo.RUNS[n][0] for n in names}
    todo = [demo.Job(n, args[n], 0, root / n, root / f"{n}.log") for n in names]
    cap = f", each capped at {cap_s / 60:g} min of its CPU time" if cap_s else ""
    print(f"reproduce: training {', '.join(names)} for {steps} steps each into {root} ({jobs} at a time{cap})",
          flush=True)
    t0 = time.perf_counter()
    demo.train_all(todo, steps, jobs, extra, cap_s)
    print(f"reproduce: trained in {time.perf_counter() - t0:.0f} s (load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})", flush=True)
    failed = [j.name for j in todo if j.rc != 0]
    if failed:
        raise SystemExit(f"reproduce: training failed for {', '.join(failed)}; see the logs in {root}")
    return {j.name: j.run_dir for j in todo}


# ------------------------------------------------------------------------------------------------------------------
# Figures

def _roll(s: pd.Series) -> pd.Series:
    return s.rolling(ROLL, min_periods=1).mean()


def coverage_figure(frames: dict[str, pd.DataFrame]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.08,
                        subplot_titles=(f"Encoder gradient coverage per step (rolling mean of {ROLL})",
                                        "Cached mode, steps 1..80: coverage is the reset fraction"))
    for name, df in frames.items():
        fig.add_trace(go.Scatter(x=df.index, y=_roll(df["coverage"]), name=name, mode="lines",
                                 line=dict(color=COLORS.get(name), width=2)), 1, 1)
    if "cached" in frames:
        c = frames["cached"].loc[:80]
        fig.add_trace(go.Scatter(x=c.index, y=c["coverage"], name="cached coverage (per step)", mode="lines+markers",
                                 line=dict(color=COLORS["cached"], width=1.5), marker=dict(size=4)), 1, 2)
        fig.add_trace(go.Scatter(x=c.index, y=c["reset_fraction"], name="cached reset fraction", mode="lines",
                                 line=dict(color="black", width=1, dash="dot")), 1, 2)
    fig.add_hline(y=0.5, line=dict(color="grey", dash="dash", width=1), row=1, col=1,
                  annotation_text="doctor threshold 0.5", annotation_position="bottom right")
    fig.update_yaxes(range=[-0.03, 1.05], tickformat=".0%")
    fig.update_xaxes(title_text="optimizer step")
    fig.update_layout(width=1200, height=460, margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")
    return fig


def accuracy_figure(frames: dict[str, pd.DataFrame], evals: dict[str, pd.DataFrame]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=(f"Training exact accuracy, in-flight slots (rolling mean of {ROLL})",
                                        "Held-out exact accuracy (new tasks, max ACT steps)"))
    for name, df in frames.items():
        acc = _roll(df["inflight_exact"].fillna(0)) / _roll(df["inflight_count"].fillna(0)).replace(0, np.nan)
        fig.add_trace(go.Scatter(x=df.index, y=acc, name=name, mode="lines", legendgroup=name,
                                 line=dict(color=COLORS.get(name), width=2)), 1, 1)
        ev = evals[name]
        if len(ev):
            fig.add_trace(go.Scatter(x=ev.index, y=ev["exact"], name=f"{name} held-out", mode="lines+markers",
                                     legendgroup=name, showlegend=False, line=dict(color=COLORS.get(name), width=2),
                                     marker=dict(size=8)), 1, 2)
    any_ev = next((e for e in evals.values() if len(e)), None)
    if any_ev is not None:
        last = any_ev.iloc[-1]
        copy, common = last.get("baseline.copy_input.exact"), last.get("baseline.common_output.exact")
        if copy is not None and common is not None:
            fig.add_hline(y=max(copy, common), line=dict(color="grey", dash="dot", width=1), row=1, col=2,
                          annotation_text=f"baselines: copy-input {copy:.3f}, common-output {common:.3f}",
                          annotation_position="top left")
    fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%")
    fig.update_xaxes(title_text="optimizer step")
    fig.update_layout(width=1200, height=460, margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")
    return fig


def encoder_work_figure(frames: dict[str, pd.DataFrame]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=(f"Slots encoded per step (rolling mean of {ROLL})",
                                        f"New samples taken per step (rolling mean of {ROLL})"))
    for name, df in frames.items():
        label = name + (" (table rows)" if name == "demo-trm" else "")
        fig.add_trace(go.Scatter(x=df.index, y=_roll(df["encoded"]), name=label, mode="lines", legendgroup=name,
                                 line=dict(color=COLORS.get(name), width=2,
                                           dash="dash" if name in ("fct", "demo-trm") else None)), 1, 1)
        fig.add_trace(go.Scatter(x=df.index, y=_roll(df["samples_consumed"]), name=name, mode="lines",
                                 legendgroup=name, showlegend=False,
                                 line=dict(color=COLORS.get(name), width=2,
                                           dash="dash" if name in ("fct", "demo-trm") else None)), 1, 2)
    b = max(float(df["slots"].max()) for df in frames.values())
    fig.update_yaxes(range=[0, b * 1.05], title_text="slots per step")
    fig.update_xaxes(title_text="optimizer step")
    fig.update_layout(width=1200, height=460, margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")
    return fig


def export_png(fig: go.Figure, path: Path) -> str:
    """Write ``fig`` as PNG with the first exporter available; returns its name."""
    w, h = int(fig.layout.width or 1200), int(fig.layout.height or 460)
    if importlib.util.find_spec("kaleido") is not None:
        fig.write_image(str(path), width=w, height=h)
        return "kaleido"
    if importlib.util.find_spec("matplotlib") is not None:
        _matplotlib_png(fig, path, w, h)
        return "matplotlib"
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("reproduce: no PNG exporter: install kaleido or matplotlib, or chromium (make browser)")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(str(page), include_plotlyjs=True, full_html=True, config={"staticPlot": True})
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={w + 16},{h + 16}", f"--screenshot={path.resolve()}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    return "chromium"


def _matplotlib_png(fig: go.Figure, path: Path, w: int, h: int) -> None:
    """Line traces only: enough for these figures when kaleido is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = sorted({(t.xaxis or "x") for t in fig.data})
    f, axes = plt.subplots(1, len(axes_names), figsize=(w / 100, h / 100), squeeze=False)
    for t in fig.data:
        ax = axes[0][axes_names.index(t.xaxis or "x")]
        ax.plot(list(t.x), list(t.y), label=t.name, color=t.line.color, linewidth=t.line.width or 1.5)
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.set_xlabel("optimizer step")
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)


# ------------------------------------------------------------------------------------------------------------------
# Tables

def markdown(df: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    head = [str(df.index.name or "")] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


def totals_of(df: pd.DataFrame) -> dict[str, float]:
    """Whole-run sums of every counter the registered figures read (``diagnostics.trace.figures``), with ``steps``."""
    out = figures.frame_sums(df)
    out["steps"] = float(len(df))
    return out


def tables(frames: dict[str, pd.DataFrame], evals: dict[str, pd.DataFrame]) -> str:
    eff = efficiency_table({n: (df.attrs["meta"], totals_of(df)) for n, df in frames.items()})
    rows = []
    for name, df in frames.items():
        ev = evals[name]
        last = df.tail(100)
        train_exact = last["inflight_exact"].sum() / max(last["inflight_count"].sum(), 1)
        cells = {"run": name, "steps": len(df), "samples consumed": int(df["samples_consumed"].sum()),
                 "train exact (in-flight, last 100 steps)": f"{train_exact:.3f}"}
        for step in ev.index:
            cells[f"held-out exact @ {int(step)}"] = f"{ev.loc[step, 'exact']:.3f}"
        rows.append(cells)
    acc = pd.DataFrame(rows).set_index("run").fillna("-")
    any_ev = next((e for e in evals.values() if len(e)), pd.DataFrame())
    base = ""
    if len(any_ev):
        last = any_ev.iloc[-1]
        base = (f"\nBaselines on the same held-out set (n={int(last.get('count', 0))}): copy-input exact "
                f"{last.get('baseline.copy_input.exact', float('nan')):.3f}, common-output exact "
                f"{last.get('baseline.common_output.exact', float('nan')):.3f}.\n")
    return ("## Efficiency (whole run, from the traces)\n\n" + markdown(eff) + "\n\n## Accuracy\n\n"
            + markdown(acc) + "\n" + base)


def summary_regime_table(frames: dict[str, pd.DataFrame]) -> str:
    """Coverage, reset fraction and mean halt step per phase of the run, for each run (ratios of sums)."""
    rows = []
    for name, df in frames.items():
        for lo, hi in PHASES:
            d = df.loc[lo:hi]
            if not len(d):
                continue
            rows.append({"run": name, "steps": f"{lo}..{min(hi, int(d.index.max()))}",
                         "coverage": f"{d['coverage_num'].sum() / d['coverage_den'].sum():.1%}",
                         "reset fraction": f"{d['resets'].sum() / d['slots'].sum():.1%}",
                         "mean halt step": (f"{d['halted_steps'].sum() / d['halted_count'].sum():.2f}"
                                            if d["halted_count"].sum() else "-"),
                         "halts before max": (f"{1 - d[_top_halt(d)].sum() / d['halted'].sum():.1%}"
                                              if d["halted"].sum() else "-")})
    return markdown(pd.DataFrame(rows).set_index("run"))


def _top_halt(df: pd.DataFrame) -> str:
    return max((c for c in df.columns if c.startswith("halt_at_") and c[8:].isdigit()), key=lambda c: int(c[8:]))


def summary_regime(args: argparse.Namespace) -> int:
    """`make reproduce-summary`: cached and reencode at the summary's regime; coverage figure and phase table."""
    runs: dict[str, Path] = {}
    for item in args.use:
        name, _, path = item.partition("=")
        runs[name] = Path(path)
    missing = [n for n in SUMMARY_RUNS if n not in runs]
    if missing:
        root = args.runs_dir or ROOT / "runs" / f"repro-summary-{time.strftime('%Y%m%d-%H%M%S')}"
        runs.update(train(missing, args.steps or SUMMARY_STEPS, args.jobs, root, args.extra, SUMMARY_RUNS,
                          cap_s=60 * args.minutes if args.minutes else None))
    frames = {n: load_run(runs[n]) for n in SUMMARY_RUNS}
    args.out.mkdir(parents=True, exist_ok=True)
    how = export_png(coverage_figure(frames), args.out / "summary-coverage.png")
    print(f"reproduce: wrote {args.out / 'summary-coverage.png'} ({how})")
    text = ("# The summary's regime (halt_max_steps 16, exploration 0.5, batch 256)\n\nRuns: "
            + ", ".join(f"{n} = {runs[n]}" for n in frames) + "\n\n" + summary_regime_table(frames) + "\n")
    (args.out / "summary-tables.md").write_text(text)
    print(f"reproduce: wrote {args.out / 'summary-tables.md'}\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=("demo", "summary"), default="demo",
                   help="demo: the four demo runs (default); summary: cached and reencode at the progress summary's "
                        "halt_max_steps 16, exploration 0.5, batch 256 (preset summary-regime)")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the same for every mode (default 1500; "
                                             f"summary regime {SUMMARY_STEPS})")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop each training after this many minutes of its own CPU time, the wall time of a one-thread "
                        "run on an idle core (Ctrl-C: it saves and exits 0); "
                        f"default: no cap, except {SUMMARY_CAP_MIN} for the summary regime (0: no cap)")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side (1 torch thread each)")
    p.add_argument("--runs-dir", type=Path, help="where new runs go (default runs/repro-<timestamp>)")
    p.add_argument("--use", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="take this mode's run from an existing traced run instead of training it")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("extra", nargs="*", metavar="key=value", help="extra etrm-train overrides for new runs")
    args = p.parse_intermixed_args(argv)
    if args.regime == "summary":
        args.minutes = SUMMARY_CAP_MIN if args.minutes is None else args.minutes
        return summary_regime(args)
    args.steps = args.steps or 1500
    names = ["reencode", "cached", "fct", "demo-trm"]
    runs: dict[str, Path] = {}
    for item in args.use:
        name, _, path = item.partition("=")
        if name not in names or not path:
            p.error(f"--use wants NAME=RUN_DIR with NAME one of {', '.join(names)}")
        runs[name] = Path(path)
    missing = [n for n in names if n not in runs]
    if missing:
        root = args.runs_dir or ROOT / "runs" / f"repro-{time.strftime('%Y%m%d-%H%M%S')}"
        runs.update(train(missing, args.steps, args.jobs, root, args.extra,
                          cap_s=60 * args.minutes if args.minutes else None))
    frames = {n: load_run(runs[n]) for n in names}
    evals = {n: load_evals(runs[n]) for n in names}
    args.out.mkdir(parents=True, exist_ok=True)
    for fname, fig in (("repro-coverage.png", coverage_figure(frames)),
                       ("repro-accuracy.png", accuracy_figure(frames, evals)),
                       ("repro-encoder-work.png", encoder_work_figure(frames))):
        how = export_png(fig, args.out / fname)
        print(f"reproduce: wrote {args.out / fname} ({how})")
    text = "# Reproduction tables\n\nRuns: " + ", ".join(f"{n} = {runs[n]}" for n in names) + "\n\n" + tables(frames,
                                                                                                               evals)
    (args.out / "repro-tables.md").write_text(text)
    print(f"reproduce: wrote {args.out / 'repro-tables.md'}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
