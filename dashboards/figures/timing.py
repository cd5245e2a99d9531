"""The Timing tab's chart (also on the Overview): time per step stacked by phase, with steps/s."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboards.figures.base import (Figure, INK, MUTED, PHASE_COLORS, HEIGHT, axis_style, layout, figure, empty_figure,
                                     json_y, plain_tickformat, linear_ticks)


def _phase_table(t: pd.DataFrame) -> pd.DataFrame:
    """Seconds by step (rows, sorted) and phase (columns, sorted): the mean of each (step, phase)'s rows, NaN where
    it has none; what ``pivot_table(aggfunc="mean")`` gives, in a few numpy passes (it ran on every redraw)."""
    si, steps = pd.factorize(t["step"], sort=True)
    pi, phases = pd.factorize(t["phase"], sort=True)
    v = t["seconds"].to_numpy(dtype=float)
    ok = np.isfinite(v)
    total, count = np.zeros((len(steps), len(phases))), np.zeros((len(steps), len(phases)))
    np.add.at(total, (si[ok], pi[ok]), v[ok])
    np.add.at(count, (si[ok], pi[ok]), 1.0)
    mean = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
    return pd.DataFrame(mean, index=pd.Index(steps, name="step"), columns=pd.Index(list(phases), name="phase"))


def timing_figure(t: pd.DataFrame, title: str = "Time per step by phase", height: int = HEIGHT) -> Figure:
    """Phases stacked (milliseconds per step, mean over ranks) with steps/s on the right axis."""
    if t is None or t.empty:
        return empty_figure("no phase timings recorded", title, height)
    wide = _phase_table(t)
    k = max(1, len(wide) // 60)  # phase times are noisy: a rolling mean keeps about 60 independent readings
    if k > 1:
        wide = wide.rolling(k, min_periods=1).mean()
        title += f" ({k}-point rolling mean)"
    order = [p for p in PHASE_COLORS if p in wide.columns] + [p for p in wide.columns if p not in PHASE_COLORS]
    x = wide.index.to_numpy(dtype=float)
    data = [{"type": "scatter", "mode": "lines", "x": x, "y": json_y(wide[p] * 1000), "name": p, "stackgroup": "phases",
             "line": {"width": 0.5, "color": PHASE_COLORS.get(p, MUTED)}, "hovertemplate": "%{y:.1f} ms"}
            for p in order]
    total = wide[order].sum(axis=1)
    rate = 1.0 / total.where(total > 0)
    data.append({"type": "scatter", "mode": "lines", "x": x, "y": json_y(rate),
                 "name": "steps/s", "yaxis": "y2", "line": {"color": INK, "width": 1.5, "dash": "dot"},
                 "hovertemplate": "%{y:.2f} steps/s"})
    sampled = " (sampled steps)" if t.attrs.get("sampled") else ""
    lay = layout(title + sampled, height, y_title="ms per step")
    lay["yaxis"]["rangemode"] = "tozero"
    rates = rate.to_numpy(dtype=float)
    lay["yaxis2"] = axis_style(title="steps/s", overlaying="y", side="right", showgrid=False, rangemode="tozero",
                          tickformat=plain_tickformat(rates), **linear_ticks(rates))
    lay["margin"].update(r=52, b=96)
    below = 46 / (height - lay["margin"]["t"] - lay["margin"]["b"])  # under the tick labels and the step title
    lay["legend"].update(x=0, xanchor="left", y=-below, yanchor="top", traceorder="normal")
    return figure(data, lay)
