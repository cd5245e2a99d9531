"""The run view's "Samples" tab: what the per-sample ACT ledger says about each task and the Q-head.

Pure figure functions (frames in, Plotly dicts out) and the tab's layout: the per-task table (sortable), the
calibration diagram (q-halt probability at exit against the exact rate), the halting-step histogram, halt reasons
over time (the steps table's ``halted`` / ``halted_early`` counters, the registry's ``early_halt_share``), and the
evaluation's exact accuracy at each ACT step (from the evaluation audits: ``eval_act_step_figure``).
Every number comes from ``diagnostics.trace.ledger`` (through the reader) or the figure registry.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from dash import dash_table, html

from dashboards.figures.base import (C, FONT, HEIGHT, MUTED, RUN_COLORS, Figure, axis_style, empty_figure, figure,
                                     json_y, layout, rgba, step_x, with_range)
from diagnostics.trace import ledger
from diagnostics.trace.reader import ratio_spec

REASONS_SPEC = ratio_spec("early_halt_share", extra=("halted", "halted_early"))
TASK_COLUMNS = (("task", "task", None), ("samples", "samples seen", None), ("mean_halt_step", "mean halt step", ".2f"),
                ("exact_rate", "exact rate", ".1%"), ("q_halt_share", "Q-halt share", ".1%"),
                ("calibration_error", "calibration error", ".3f"), ("token_acc", "token acc", ".1%"))
PAGE_SIZE = 15


def calibration_figure(bins: pd.DataFrame, title: str = "Q-halt calibration at exit",
                       height: int = HEIGHT + 30) -> Figure:
    """The reliability diagram: per probability bin, the mean q-halt probability against the exact rate of the
    samples that left there (marker size: how many), and the diagonal a calibrated Q-head lies on."""
    curve = ledger.calibration_table(bins)
    seen = curve[curve["n"] > 0]
    if seen.empty:
        return empty_figure("no sample has left its slot yet (or the trace predates the ledger)", title, height)
    size = 6 + 18 * np.sqrt(seen["n"].to_numpy() / seen["n"].max())
    data = [{"type": "scatter", "mode": "lines", "x": [0, 1], "y": [0, 1], "name": "calibrated",
             "line": {"color": MUTED, "dash": "dot", "width": 1}, "hoverinfo": "skip"},
            {"type": "scatter", "mode": "lines+markers", "x": json_y(seen["predicted"]), "y": json_y(seen["exact_rate"]),
             "name": "exits", "marker": {"size": size.tolist(), "color": RUN_COLORS[0]},
             "line": {"color": RUN_COLORS[0], "width": 1.5}, "customdata": seen["n"].astype(int).tolist(),
             "hovertemplate": "q-halt p %{x:.2f}: exact %{y:.1%} of %{customdata} exits<extra></extra>"}]
    lay = layout(title, height, y_title="exact rate at exit", percent=True)
    lay["xaxis"].update(title={"text": "q-halt probability (sigmoid of the logit)", "font": {"size": 11}},
                        range=[-0.02, 1.02], tickformat=".0%")
    lay["hovermode"] = "closest"
    ece = ledger.calibration_error(curve["n"], curve["exact_rate"].fillna(0) * curve["n"],
                                   curve["predicted"].fillna(0) * curve["n"])
    lay["annotations"] = [{"text": f"calibration error {ece:.3f}", "x": 0.02, "y": 0.98, "xref": "paper",
                           "yref": "paper", "showarrow": False, "xanchor": "left", "font": {"size": 11}}]
    return figure(data, lay)


def halt_step_figure(bins: pd.DataFrame, title: str = "ACT steps used per sample",
                     height: int = HEIGHT) -> Figure:
    """How many samples left after k ACT steps, and how many of them exact."""
    h = ledger.halt_histogram(bins)
    if h.empty:
        return empty_figure("no sample has left its slot yet", title, height)
    x = h["step"].astype(int).tolist()
    data = [{"type": "bar", "x": x, "y": json_y(h["n"] - h["exact"]), "name": "wrong", "marker": {"color": "#cbd5e1"}},
            {"type": "bar", "x": x, "y": json_y(h["exact"]), "name": "exact", "marker": {"color": RUN_COLORS[0]}}]
    lay = layout(title, height, y_title="samples")
    lay["barmode"] = "stack"
    lay["xaxis"].update(dtick=1, title={"text": "ACT steps used", "font": {"size": 11}})
    return figure(data, lay)


def halt_reasons_figure(f: pd.DataFrame, title: str = "Why samples left, over training",
                        height: int = HEIGHT) -> Figure:
    """Per bucket: samples that left by a Q-halt (before the maximum step) and at the maximum step, per step."""
    if f.empty or "halted" not in f.columns:
        return empty_figure("no halting recorded", title, height)
    n = f["n"].to_numpy(dtype=float) if "n" in f.columns else np.ones(len(f))
    early = f["halted_early"].fillna(0).to_numpy(dtype=float) if "halted_early" in f.columns else np.zeros(len(f))
    total = f["halted"].fillna(0).to_numpy(dtype=float)
    x = step_x(f)
    data = [{"type": "scatter", "mode": "lines", "stackgroup": "r", "x": x, "y": json_y(early / n), "name": "Q-halt",
             "line": {"color": RUN_COLORS[0], "width": 1}},
            {"type": "scatter", "mode": "lines", "stackgroup": "r", "x": x, "y": json_y((total - early) / n),
             "name": "max step", "line": {"color": "#94a3b8", "width": 1}}]
    return figure(data, layout(title, height, y_title="samples leaving per step"))


def eval_act_step_figure(audits: pd.DataFrame, weights: str | None = None,
                         title: str = "Held-out exact accuracy at each ACT step", height: int = HEIGHT + 40) -> Figure:
    """Exact accuracy of the answer at every ACT step, one line per evaluation of ``weights`` (default: the
    evaluated ones, EMA when audited, else raw), older evaluations fainter; the last one's would-halt point (mean
    would-halt step, exact there) as a diamond, and its other weights dashed. ``audits``: ``load_eval_audits``."""
    if audits is None or audits.empty:
        return empty_figure("no evaluation audits in this trace (evaluations of schema-3 traces record them)", title,
                            height)
    present = set(audits["weights"])
    weights = weights or ("ema" if "ema" in present else "raw")
    if weights not in present:
        return empty_figure(f"no evaluation audits of the {weights} weights", title, height)
    mine = audits[audits["weights"] == weights]
    steps = sorted(int(s) for s in mine["step"].unique())
    data: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        rows = mine[mine["step"] == step].sort_values("act_step")
        newest = step == steps[-1]
        alpha = 1.0 if newest else 0.25 + 0.5 * (i + 1) / len(steps)
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"eval @ {step} ({weights})",
                     "x": rows["act_step"].to_numpy(dtype=float).tolist(), "y": json_y(rows["exact"]),
                     "line": {"color": rgba(C["eval"], alpha), "width": 2.5 if newest else 1.2},
                     "marker": {"size": 6 if newest else 4, "color": rgba(C["eval"], alpha)},
                     "showlegend": newest or len(steps) <= 4, "hovertemplate": "%{y:.1%}"})
    last = mine[mine["step"] == steps[-1]].iloc[0]
    data.append({"type": "scatter", "mode": "markers", "name": "would-halt (mean step)",
                 "x": [float(last["halt_step"])], "y": json_y([last["halt_exact"]]),
                 "marker": {"symbol": "diamond", "size": 11, "color": C["halted"]},
                 "hovertemplate": f"{last['halt_rule']}: %{{y:.1%}} at mean step %{{x:.2f}}"})
    other = audits[(audits["step"] == steps[-1]) & (audits["weights"] != weights)]
    for name, rows in other.groupby("weights"):
        rows = rows.sort_values("act_step")
        data.append({"type": "scatter", "mode": "lines", "name": f"eval @ {steps[-1]} ({name})",
                     "x": rows["act_step"].to_numpy(dtype=float).tolist(), "y": json_y(rows["exact"]),
                     "line": {"color": C["inflight"], "width": 1.5, "dash": "dash"}, "hovertemplate": "%{y:.1%}"})
    lay = layout(title, height, y_title="held-out exact", percent=True)
    lay["xaxis"] = axis_style(title="ACT step", dtick=1)
    lay["hovermode"] = "closest"
    return figure(data, lay)


def task_table(stats: pd.DataFrame) -> Any:
    """The per-task table, sortable by any column (samples seen, mean halt step, exact rate, calibration...)."""
    if stats.empty:
        return html.Div("No sample has left its slot yet (or the trace was written before the ledger).",
                        className="card none-found", id="samples-table-empty")
    cols = [c for c, _, _ in TASK_COLUMNS if c in stats.columns]
    data = stats[cols].astype(float).round(6)
    data["task"] = data["task"].astype(int)
    data["samples"] = data["samples"].astype(int)
    records = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
               for r in data.to_dict("records")]
    columns = [{"name": label, "id": c, "type": "numeric",
                **({"format": {"specifier": fmt}} if fmt else {})} for c, label, fmt in TASK_COLUMNS if c in cols]
    return dash_table.DataTable(
        id="samples-table", data=records, columns=columns, sort_action="native", sort_mode="single",
        sort_by=[{"column_id": "samples", "direction": "desc"}], page_action="native", page_size=PAGE_SIZE,
        style_as_list_view=True, style_cell={"fontFamily": FONT, "fontSize": 12.5, "padding": "6px 10px"},
        style_header={"fontWeight": 600, "textTransform": "uppercase", "fontSize": 11, "color": MUTED})


def sample_rate_note(stats: pd.DataFrame, records: int | None = None) -> str:
    rate = stats.attrs.get("sample_rate")
    seen = int(stats["samples"].sum()) if len(stats) else 0
    kept = "" if rate is None or rate != rate else f"; raw records kept for {rate:.0%} of them"
    return (f"{seen:,} samples left their slots across {len(stats):,} tasks (augmentations folded){kept}. "
            "Per-task figures are exact over every exit. Click a column header to sort.")


def samples_figures(cache: Any, xrange: Sequence[float] | None = None) -> dict[str, Any]:
    """The tab's figures by id: the ledger read through the reader, halt reasons from the steps table."""
    from diagnostics.trace.loading import load_eval_audits, load_ledger_bins

    bins = load_ledger_bins(cache.path)
    mode = cache.info.meta.get("mode")
    out = {"calibration": calibration_figure(bins), "halt-steps": halt_step_figure(bins),
           "halt-reasons": with_range(halt_reasons_figure(cache.frame(REASONS_SPEC, tuple(xrange) if xrange
                                                                        else None)), xrange),
           "eval-per-step": eval_act_step_figure(load_eval_audits(cache.path))}
    if mode == "fct":
        out["calibration"] = empty_figure("fct runs fixed steps: its Q-head decides no halt",
                                            "Q-halt calibration at exit", HEIGHT + 30)
    return out


STEP_AXIS = ("halt-reasons",)  # charts over training steps (they follow the run view's zoom); the others are not


def samples_layout(figs: Mapping[str, Any], stats: pd.DataFrame, step_graph: Any, graph: Any) -> list:
    """Arrange the tab: the table first (the question is usually "which tasks"), then the charts. ``step_graph``
    wraps a chart over steps (it joins the run view's shared zoom), ``graph(id, figure)`` any other chart."""
    def g(k: str) -> Any:
        if k not in figs:
            return None
        return step_graph(k, figs[k]) if k in STEP_AXIS else html.Div(graph(k, figs[k]), className="fig")
    return [html.H2("Tasks"), html.P(sample_rate_note(stats), className="hint", id="samples-note"),
            html.Div(task_table(stats), className="card", id="samples-tasks"),
            html.Div([g("calibration"), g("halt-steps"), g("halt-reasons"), g("eval-per-step")], className="grid2")]
