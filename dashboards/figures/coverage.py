"""The Coverage tab's charts (coverage against the reset fraction also leads the Overview and each compare card):
encoder or puzzle-table gradient coverage, gradient norms, encoder work."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dashboards.figures.base import (Figure, C, HEIGHT, SMOOTH_STEPS, PER_STEP_MAX, SIDE_CAPTION, axis_style, layout,
                                     figure, empty_figure, step_x, json_y, is_exact, log_ticks, shown_values, series,
                                     markers, rolling_figure, reading, figure_total)


def coverage_figure(f: pd.DataFrame, threshold: float = 0.5, findings: Sequence[Mapping[str, Any]] = (),
                    focus: int | None = None, title: str = "Encoder gradient coverage vs reset fraction",
                    smooth_steps: int = SMOOTH_STEPS, height: int = HEIGHT + 30, side: bool = True) -> Figure:
    """Coverage per step with the reset fraction drawn beside it: in ``cached`` mode the two coincide (only reset
    slots are trained), in ``reencode`` coverage sits at 1. The zone under the doctor's threshold is shaded red;
    a side panel puts the run means of both next to each other."""
    if f.empty or "coverage" not in f.columns:
        return empty_figure("no coverage recorded (untraced, or no encoder)", title, height)
    data: list[dict[str, Any]] = []
    if is_exact(f) and len(f) > smooth_steps:
        # every step (thin, faint; only while few enough to read), then the smoothed reading beside the smoothed
        # reset fraction
        if len(f) <= PER_STEP_MAX:
            data += series(f, "coverage", "coverage per step", C["coverage"], width=1, band=False, shape="hv",
                           opacity=0.35, hover=".0%")
        data += series(f, "coverage", f"coverage ({smooth_steps}-step)", C["coverage"], width=3, hover=".1%",
                       values=rolling_figure(f, "coverage", smooth_steps))
        resets = rolling_figure(f, "reset_fraction", smooth_steps)
        if resets is not None:
            data += series(f, "reset_fraction", f"reset fraction ({smooth_steps}-step)", C["reset"], width=2,
                           dash="dash", hover=".1%", values=resets)
    else:
        data += series(f, "coverage", "coverage", C["coverage"], width=3, hover=".1%")
        data += series(f, "reset_fraction", "reset fraction", C["reset"], dash="dash", band=False, hover=".1%")
    lay = layout(title, height)
    lay["yaxis"].update(tickformat=".0%", range=[-0.03, 1.05])
    xref = "x"
    if side:
        lay["xaxis"]["domain"] = [0.0, 0.8]
        lay["legend"]["x"] = 0.8
        lay["margin"]["b"] = 62  # room for the bars' labels and the two-line caption under them
        # the caption is the side axis's own title (laid out by Plotly's automargin, so never clipped), on two
        # lines to fit the narrow panel
        lay["xaxis2"] = axis_style(domain=[0.85, 1.0], anchor="y2", ticks="", showgrid=False, fixedrange=True,
                              tickangle=0, tickfont={"size": 10}, title=SIDE_CAPTION)
        lay["yaxis2"] = axis_style(anchor="x2", range=[-0.03, 1.18], showticklabels=False, fixedrange=True, ticks="")
        names, vals, cols = [], [], []
        for n, v, c in (("cover.", figure_total(f, "coverage"), C["coverage"]),
                        ("resets", figure_total(f, "reset_fraction"), C["reset"])):
            if v is not None:
                names.append(n), vals.append(v), cols.append(c)
        data.append({"type": "bar", "x": names, "y": vals, "xaxis": "x2", "yaxis": "y2", "showlegend": False,
                     "marker": {"color": cols}, "text": [f"{v:.0%}" for v in vals], "textposition": "outside",
                     "textfont": {"size": 10}, "cliponaxis": False, "width": 0.7,
                     "hovertemplate": "%{x}: %{y:.1%}<extra>mean</extra>", "name": "mean of shown steps"})
    x_dom = "x domain"
    lay["shapes"] = [
        {"type": "rect", "xref": x_dom, "x0": 0, "x1": 1, "yref": "y", "y0": -0.03, "y1": threshold,
         "fillcolor": C["starved"], "line": {"width": 0}, "layer": "below"},
        {"type": "line", "xref": x_dom, "x0": 0, "x1": 1, "yref": "y", "y0": threshold, "y1": threshold,
         "line": {"color": C["threshold"], "width": 1, "dash": "dot"}, "opacity": 0.6},
        *markers(findings, focus, xref=xref),
    ]
    lay["annotations"].append({"text": f"starved: coverage < {threshold:g}", "xref": x_dom, "x": 0.995,
                               "xanchor": "right", "yref": "y", "y": threshold, "yshift": -10, "showarrow": False,
                               "font": {"size": 10, "color": C["threshold"]}})
    return figure(data, lay)



def conditioning(mode: str | None) -> str:
    """What trains the task conditioning: TRM's puzzle-table rows, ETRM's encoder (titles and legends say which)."""
    return "puzzle-table rows" if mode == "trm" else "encoder"


def grad_norm_figure(f: pd.DataFrame, findings: Sequence[Mapping[str, Any]] = (), focus: int | None = None,
                     title: str | None = None, mode: str | None = None) -> Figure:
    """Per-step gradient norms (bucket means with min/max band); log scale, with plain 1-2-5 ticks, when the values
    shown are positive."""
    subject = conditioning(mode)
    title = title or f"Gradient norm: {subject} vs rest of the model"
    if f.empty or "grad_norm_encoder_mean" not in f.columns:
        return empty_figure("no gradient norms recorded", title)
    data = reading(f, "grad_norm_encoder_mean", subject, C["encoder"], hover=".3g")
    data += reading(f, "grad_norm_rest_mean", "rest", C["rest"], hover=".3g", dash="dash")
    lay = layout(title, y_title="L2 norm")
    vals = np.asarray(shown_values(data), dtype=float)
    vals = vals[vals > 0]
    if vals.size:
        lay["yaxis"].update(type="log", **log_ticks(float(vals.min()), float(vals.max())))
        # a series at 0 throughout has no place on a log axis: say so rather than leave it out silently
        zero = [name for col, name in (("grad_norm_encoder_mean", subject), ("grad_norm_rest_mean", "rest"))
                if col in f.columns and f[col].notna().any() and not (f[col].fillna(0) > 0).any()]
        if zero:
            lay["annotations"].append({"text": f"{' and '.join(zero)}: 0 on every step shown (not drawn on the log "
                                               "axis)", "x": 0.01, "y": 0.02, "xref": "paper", "yref": "paper",
                                       "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                                       "font": {"size": 11, "color": C["encoder"]}})
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)


def encoder_work_figure(f: pd.DataFrame, title: str | None = None, mode: str | None = None) -> Figure:
    """Slots whose conditioning was computed this step (ETRM: encoded; TRM: puzzle-table rows looked up) against
    the slots the mode needed, beside the batch size."""
    trm = mode == "trm"
    title = title or ("Puzzle-table rows: looked up vs needed" if trm else "Encoder work: slots encoded vs needed")
    if f.empty or "encoded_per_step" not in f.columns:
        return empty_figure("no encoder work recorded", title)
    data = []
    if "slots_per_step" in f.columns:
        data.append({"type": "scatter", "mode": "lines", "x": step_x(f), "y": json_y(f["slots_per_step"]),
                     "name": "batch (B)", "line": {"color": "#e5e7eb", "width": 6}, "hoverinfo": "skip"})
    data += reading(f, "encoded_per_step", "looked up" if trm else "encoded", C["encoded"], band=False,
                    hover=".1f")
    if "encode_needed_per_step" in f.columns:
        data += reading(f, "encode_needed_per_step", "needed", C["needed"], band=False, hover=".1f", dash="dash")
    lay = layout(title, y_title="slots per step")
    lay["yaxis"]["rangemode"] = "tozero"
    return figure(data, lay)
