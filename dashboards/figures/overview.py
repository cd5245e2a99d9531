"""The Overview tab's own charts: loss and exact accuracy (both semantics, with the held-out evaluations)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from dashboards.figures.base import (Figure, MUTED, C, layout, figure, empty_figure, json_y, percent_range,
                                     shown_values, markers, reading)


def loss_figure(f: pd.DataFrame, findings: Sequence[Mapping[str, Any]] = (), focus: int | None = None,
                title: str = "Loss per slot") -> Figure:
    if f.empty or "loss_per_slot" not in f.columns:
        return empty_figure("no loss recorded yet", title)
    data = reading(f, "loss_per_slot", "loss", C["loss"])
    data += reading(f, "lm_loss_per_slot", "LM loss", C["lm_loss"], dash="dot", band=False, width=1.5)
    lay = layout(title, y_title="per slot")
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)


MAZE_VALID_PATH = "maze.valid_path"  # etrm.data.maze.VALID_PATH_KEY (not imported: the dashboard loads no torch)


def accuracy_figure(f: pd.DataFrame, evals: pd.DataFrame | None = None, findings: Sequence[Mapping[str, Any]] = (),
                    focus: int | None = None, title: str = "Exact accuracy (both semantics)") -> Figure:
    """Training exact accuracy of in-flight slots (ETRM's reading) and of slots at their halt (TRM's), with the
    held-out evaluation as points."""
    if f.empty:
        return empty_figure("no steps yet", title)
    data = reading(f, "exact_inflight", "in-flight (ETRM)", C["inflight"], hover=".1%")
    data += reading(f, "exact_halted", "at halt (TRM)", C["halted"], hover=".1%", dash="dash")
    if evals is not None and len(evals):
        for col, name, symbol in (("exact", "held-out", "circle"), ("halt.exact", "held-out at halt", "diamond"),
                                  (MAZE_VALID_PATH, "held-out valid shortest path (maze)", "square")):
            if col in evals.columns and evals[col].notna().any():
                data.append({"type": "scatter", "mode": "markers+lines", "name": name,
                             "x": evals.index.to_numpy(dtype=float), "y": json_y(evals[col]),
                             "line": {"color": C["eval"], "width": 1, "dash": "dot"},
                             "marker": {"symbol": symbol, "size": 7, "color": C["eval"]},
                             "hovertemplate": "%{y:.1%}"})
    lay = layout(title, percent=True)
    span, fmt = percent_range(shown_values(data))
    lay["yaxis"].update(range=span, tickformat=fmt)
    if span[1] < 1:
        lay["annotations"].append({"text": f"axis 0-{span[1] / 1.05:.0%}: every value shown lies below it",
                                   "x": 0.01, "y": 0.98, "xref": "paper", "yref": "paper", "xanchor": "left",
                                   "yanchor": "top", "showarrow": False, "font": {"size": 10, "color": MUTED}})
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)
