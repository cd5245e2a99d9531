"""The Halting tab's charts: when slots halt (heatmap), Q-halt precision and recall, mean in-flight and halting step
(the last also on the Overview)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dashboards.figures.base import Figure, MUTED, C, HEIGHT, layout, figure, empty_figure, step_x, markers, reading


def halting_summary_figure(f: pd.DataFrame, mode: str | None, findings: Sequence[Mapping[str, Any]] = (),
                           focus: int | None = None, title: str = "Halting") -> Figure:
    """Mean in-flight step and mean halting step (not for ``fct``: every slot runs a fixed number of steps)."""
    if mode == "fct":
        return empty_figure("fct runs a fixed number of steps: no halting to show", title)
    if f.empty or "mean_inflight_step" not in f.columns:
        return empty_figure("no halting recorded yet", title)
    data = reading(f, "mean_inflight_step", "mean in-flight step", C["inflight"], hover=".2f", band=False)
    data += reading(f, "mean_halt_step", "mean halting step", C["halted"], hover=".2f", band=False, dash="dash")
    lay = layout(title, y_title="ACT step")
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)



def halting_heatmap(f: pd.DataFrame, title: str = "Halting step over training (share of halts)",
                    height: int = HEIGHT + 30, max_cols: int = 120) -> Figure:
    """Share of each bucket's halts that happened at each ACT step k (columns ``halt_at_k``)."""
    ks = sorted(int(c[8:]) for c in f.columns if c.startswith("halt_at_") and c[8:].isdigit())
    if f.empty or not ks:
        return empty_figure("no halting histogram recorded", title, height)
    counts = np.stack([f[f"halt_at_{k}"].fillna(0).to_numpy(dtype=float) for k in ks])
    x = step_x(f)
    per = counts.sum(0)
    if counts.shape[1] > 1 and per.sum() > 0:
        # merge neighbouring buckets (counts add exactly) into at most max_cols columns of about equal halts, so
        # that no column is empty where slots halt only every few steps
        target = max(per.sum() / max_cols, per[per > 0].min())
        before = np.concatenate([[0.0], np.cumsum(per)[:-1]])
        group = np.floor(before / target + 1e-9).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        counts = np.add.reduceat(counts, starts, axis=1)
        x = np.maximum.reduceat(x, starts)
    total = counts.sum(0)
    share = np.divide(counts, total, out=np.full_like(counts, np.nan), where=total > 0)
    z = [[None if not math.isfinite(v) else v for v in row] for row in share.tolist()]
    scale = [[0.0, "#f8fafc"], [0.15, "#dbeafe"], [0.5, "#60a5fa"], [1.0, "#1e3a8a"]]
    data = [{"type": "heatmap", "x": x, "y": ks, "z": z, "colorscale": scale, "zmin": 0, "zmax": 1,
             "colorbar": {"title": {"text": "share", "side": "right"}, "thickness": 10, "tickformat": ".0%"},
             "hovertemplate": "step %{x}<br>halted at ACT step %{y}: %{z:.0%}<extra></extra>"}]
    lay = layout(title, height, y_title="ACT step at halt", legend=False)
    lay["hovermode"] = "closest"
    if len(ks) <= 16:
        lay["yaxis"]["dtick"] = 1
    return figure(data, lay)


def q_figure(f: pd.DataFrame, findings: Sequence[Mapping[str, Any]] = (), focus: int | None = None,
             title: str = "Q-halt precision and recall (base rate dashed)") -> Figure:
    """Precision where it is defined (the Q-head said halt at least once in the bucket), recall and the base rate.
    Where precision is undefined over the shown steps, the chart says so instead of silently leaving it out."""
    if f.empty or "q_base_rate" not in f.columns:
        return empty_figure("no q-halt counts recorded", title)
    precision = f["q_precision"] if "q_precision" in f.columns else pd.Series(np.nan, index=f.index)
    defined = precision.notna()
    data = reading(f, "q_precision", "precision", C["precision"], band=False, hover=".1%")
    if defined.any() and defined.mean() < 0.5:  # sparse: isolated points would vanish from a line
        for t in data:
            t["mode"] = "lines+markers"
            t["marker"] = {"size": 5, "color": C["precision"]}
    data += reading(f, "q_recall", "recall", C["recall"], band=False, hover=".1%")
    data += reading(f, "q_base_rate", "base rate", C["base"], band=False, hover=".1%", dash="dash")
    lay = layout(title, percent=True)
    if not defined.any():
        lay["annotations"].append({"text": "precision undefined: the Q-head never said halt in these steps",
                                   "x": 0.5, "y": 0.92, "xref": "paper", "yref": "paper", "showarrow": False,
                                   "font": {"size": 11, "color": C["precision"]}})
    elif not defined.all():
        lay["annotations"].append({"text": f"precision drawn where defined ({defined.mean():.0%} of the points: "
                                           "elsewhere the Q-head never said halt)",
                                   "x": 0.01, "y": 0.02, "xref": "paper", "yref": "paper", "xanchor": "left",
                                   "yanchor": "bottom", "showarrow": False,
                                   "font": {"size": 10, "color": MUTED}})
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)
