"""Figure builders: pure functions from bucketed frames (``dashboards.runs``) to Plotly figures. No I/O, no Dash.

Figures are plain Plotly figure dicts (``{"data": [...], "layout": {...}}``), which Dash sends as they are: building
them skips Plotly's per-property validation, so a page of figures is ready in milliseconds (the tests check each one
against Plotly's schema). Every step chart draws the bucket mean as a line and, where a bucket holds more than one
step, the min/max of the per-step values as a light band, so spikes survive any zoom level. One palette and one
layout everywhere: coverage teal, the reset fraction orange and dashed, the starved zone (coverage below the
doctor's threshold) pale red.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.trace import figures as registry

Figure = dict[str, Any]

FONT = "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
INK, MUTED, GRID, AXIS = "#1f2937", "#6b7280", "#eef0f3", "#d1d5db"
C = {
    "coverage": "#0d9488", "reset": "#ea580c", "starved": "rgba(220, 38, 38, 0.07)", "threshold": "#dc2626",
    "loss": "#334155", "lm_loss": "#94a3b8", "inflight": "#2563eb", "halted": "#7c3aed", "eval": "#111827",
    "encoder": "#0d9488", "rest": "#64748b", "needed": "#94a3b8", "encoded": "#0d9488", "precision": "#2563eb",
    "recall": "#7c3aed", "base": "#9ca3af", "label": "#dc2626", "demo": "#d97706", "carry": "#7c3aed",
}
# Run identity colours avoid red and green, which mean unhealthy and healthy everywhere else.
RUN_COLORS = ("#2563eb", "#9333ea", "#d97706", "#0891b2", "#db2777", "#4b5563", "#65a30d", "#92400e")
PHASE_COLORS = {"data": "#cbd5e1", "h2d": "#94a3b8", "encoder": "#0d9488", "inner": "#2563eb", "loss": "#a78bfa",
                "trace": "#f59e0b", "backward": "#7c3aed", "optimizer": "#64748b"}
SEVERITY_COLORS = {"error": "#dc2626", "warning": "#d97706", "info": "#0284c7"}
HEIGHT = 250
SMOOTH_STEPS = 20     # rolling window (steps) of the smoothed readings at full detail
PER_STEP_MAX = 120    # at full detail, a faint per-step line is drawn under the smoothed one up to this many steps
X_TITLE = "step"      # every step chart's x-axis title (optimizer steps)
SIDE_CAPTION = "mean of<br>shown steps"  # under the coverage chart's side bars

# Metrics offered on the compare page: every registered figure, by name -> label (diagnostics.trace.figures).
METRICS: dict[str, str] = {name: fig.label for name, fig in registry.REGISTRY.items()}
PERCENT = {name for name, fig in registry.REGISTRY.items() if fig.percent}


# ------------------------------------------------------------------------------------------------------------------
# Shared layout

def _axis(**kw: Any) -> dict[str, Any]:
    a = {"gridcolor": GRID, "zeroline": False, "linecolor": AXIS, "showline": True, "ticks": "outside",
         "tickcolor": AXIS, "ticklen": 4, "automargin": True, "title": {"font": {"size": 11, "color": MUTED}}}
    for k, v in kw.items():
        if k == "title":
            a["title"] = {"text": v, "font": {"size": 11, "color": MUTED}}
        else:
            a[k] = v
    return a


def layout(title: str = "", height: int = HEIGHT, y_title: str = "", percent: bool = False,
           legend: bool = True, uirevision: Any = "keep") -> dict[str, Any]:
    """The house style: white, light grid, small left-aligned title, legend top right, unified hover."""
    y = _axis(title=y_title)
    if percent:
        y.update(tickformat=".0%", range=[-0.03, 1.05])
    return {
        "height": height, "uirevision": uirevision, "paper_bgcolor": "white", "plot_bgcolor": "white",
        "font": {"family": FONT, "size": 12, "color": INK},
        "title": {"text": title, "x": 0.01, "xanchor": "left", "y": 0.97, "yanchor": "top",
                  "font": {"size": 13, "color": INK}},
        "margin": {"l": 52, "r": 16, "t": 46 if title else 16, "b": 44},
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom",
                   "font": {"size": 11}, "bgcolor": "rgba(0,0,0,0)"},
        "showlegend": legend, "hovermode": "x unified",
        "hoverlabel": {"font": {"family": FONT, "size": 12}},
        "xaxis": _axis(title=X_TITLE), "yaxis": y, "shapes": [], "annotations": [],
    }


def figure(data: list[dict[str, Any]], lay: dict[str, Any]) -> Figure:
    return {"data": data, "layout": lay}


def empty_figure(message: str, title: str = "", height: int = HEIGHT) -> Figure:
    """A blank chart that says why it is blank."""
    lay = layout(title, height, legend=False)
    lay["xaxis"] = {"visible": False}
    lay["yaxis"] = {"visible": False}
    lay["annotations"] = [{"text": message, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                           "showarrow": False, "font": {"size": 13, "color": MUTED}}]
    return figure([], lay)


def _x(f: pd.DataFrame) -> np.ndarray:
    return f["step"].to_numpy(dtype=float)


def _y(s: pd.Series | np.ndarray) -> list:
    """Values as a JSON-ready list (NaN as None, which Plotly draws as a gap)."""
    a = np.asarray(s, dtype=float)
    return [None if not math.isfinite(v) else v for v in a.tolist()]


def _exact(f: pd.DataFrame) -> bool:
    if "exact" in f.attrs:
        return bool(f.attrs["exact"])
    return "n" not in f.columns or bool((f["n"] <= 1).all())


def _alpha(hex_color: str, a: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {a})"


def plain_tickformat(values: Sequence[float] | np.ndarray) -> str:
    """A d3 tick format that writes numbers as they are ("0.63", "1,250"), never with SI prefixes ("631m")."""
    a = np.asarray(values, dtype=float)
    a = np.abs(a[np.isfinite(a)])
    top = float(a.max()) if a.size else 1.0
    return ",.2~f" if top < 10 else ",.1~f" if top < 100 else ",.0f"


def linear_ticks(values: Sequence[float] | np.ndarray, n: int = 4) -> dict[str, Any]:
    """Evenly spaced round ticks from 0 (a step of 1, 2, 2.5 or 5 times a power of ten, about ``n`` of them) and
    the range they span: Plotly's own ticks on an overlaying axis can land on values such as 1.53 and 3.07."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    top = float(a.max()) if a.size else 0.0
    if top <= 0:
        return {}
    raw = top / n
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return {"tickmode": "linear", "tick0": 0, "dtick": step, "range": [0, top * 1.05]}


def log_ticks(lo: float, hi: float) -> dict[str, Any]:
    """Tick values and texts of a log axis over [lo, hi]: 1-2-5 per decade over a few decades, powers of ten over
    many, written plainly ("0.02", "5", "100") rather than Plotly's mixed "2, 5, 0.1" labels."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= 0:
        return {}
    lo, hi = min(lo, hi), max(lo, hi)
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = math.log10(hi / lo)
    mantissas = (1,) if decades > 4 else (1, 2, 5) if decades > 0.7 else (1, 1.5, 2, 3, 5, 7)
    vals = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mantissas]
    inside = [v for v in vals if lo / 1.05 <= v <= hi * 1.05]
    if len(inside) < 2:  # keep a tick on each side of a narrow range
        below = [v for v in vals if v < lo]
        above = [v for v in vals if v > hi]
        inside = below[-1:] + inside + above[:1]
    return {"tickmode": "array", "tickvals": inside, "ticktext": [f"{v:g}" for v in inside]}


PERCENT_TOPS = (0.1, 0.25, 0.5)


def percent_range(values: Sequence[float] | np.ndarray) -> tuple[list[float], str]:
    """The y range of a percent axis: 0-10%, 0-25% or 0-50% when every value lives there (so accuracy near 2%
    is not a flat line at the bottom of 0-100%), else 0-100%; with its tick format."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    top = float(a.max()) if a.size else 1.0
    span = next((t for t in PERCENT_TOPS if top <= t / 1.05), 1.0)
    return [-0.03 * span, 1.05 * span], (".0%" if span >= 0.25 else ".1~%")


def _shown(data: Sequence[Mapping[str, Any]], axis: str = "y") -> list[float]:
    """Every finite y value the traces on ``axis`` draw (lines, bands, markers)."""
    out: list[float] = []
    for t in data:
        if t.get("yaxis", "y") == axis and t.get("type", "scatter") == "scatter":
            out += [v for v in t.get("y", ()) if v is not None and math.isfinite(v)]
    return out


def series(f: pd.DataFrame, col: str, name: str, color: str, *, dash: str | None = None, width: float = 2.0,
           band: bool = True, hover: str = ".3f", shape: str = "linear", axes: tuple[str, str] = ("x", "y"),
           showlegend: bool = True, opacity: float = 1.0, values: pd.Series | None = None) -> list[dict[str, Any]]:
    """Traces for one series: the bucket-mean line, after its per-step min/max band when buckets hold several
    steps. Empty when the column is absent or all missing."""
    y = values if values is not None else (f[col] if col in f.columns else None)
    if y is None or len(f) == 0 or pd.isna(y).all():
        return []
    x = _x(f)
    xa, ya = axes
    out: list[dict[str, Any]] = []
    lo, hi = f"{col}_min", f"{col}_max"
    if band and values is None and not _exact(f) and lo in f.columns and hi in f.columns:
        common = {"type": "scatter", "mode": "lines", "x": x, "xaxis": xa, "yaxis": ya, "hoverinfo": "skip",
                  "showlegend": False, "legendgroup": name, "line": {"width": 0, "color": color}}
        out.append({**common, "y": _y(f[hi]), "name": f"{name} max"})
        out.append({**common, "y": _y(f[lo]), "name": f"{name} min", "fill": "tonexty",
                    "fillcolor": _alpha(color, 0.14)})
    line = {"color": color, "width": width, "shape": shape}
    if dash:
        line["dash"] = dash
    out.append({"type": "scatter", "mode": "lines", "x": x, "y": _y(y), "name": name, "xaxis": xa, "yaxis": ya,
                "line": line, "opacity": opacity, "legendgroup": name, "showlegend": showlegend,
                "hovertemplate": f"%{{y:{hover}}}"})
    return out


def markers(findings: Sequence[Mapping[str, Any]], focus: int | None = None, xref: str = "x",
            yref: str = "y domain") -> list[dict[str, Any]]:
    """Dotted vertical lines at each finding's first step, and a solid one at a focused step."""
    out = []
    for fd in findings:
        step = fd.get("first_step")
        if step is None:
            continue
        out.append({"type": "line", "x0": step, "x1": step, "y0": 0, "y1": 1, "xref": xref, "yref": yref,
                    "line": {"color": SEVERITY_COLORS.get(fd.get("severity", ""), MUTED), "width": 1, "dash": "dot"},
                    "opacity": 0.8})
    if focus is not None:
        out.append({"type": "line", "x0": focus, "x1": focus, "y0": 0, "y1": 1, "xref": xref, "yref": yref,
                    "line": {"color": INK, "width": 1.5}})
    return out


def rolling_figure(f: pd.DataFrame, name: str, steps: int) -> pd.Series | None:
    """A registered figure over the last ``steps`` steps at each bucket (a ratio of rolling sums); None when the
    frame lacks its inputs."""
    fig = registry.REGISTRY.get(name)
    if fig is None or not all(c in f.columns for c in fig.terms):
        return None
    width = max(int(f.attrs.get("width", 1)), 1)
    n = f["n"] if "n" in f.columns else None
    return registry.rolling(f, fig, max(1, int(round(steps / width))), n)


def reading(f: pd.DataFrame, col: str, name: str, color: str, *, dash: str | None = None, width: float = 2.0,
            band: bool = True, hover: str = ".3f", values: pd.Series | None = None) -> list[dict[str, Any]]:
    """A series as the dashboard reads it. Bucketed: the bucket means with their min/max band. At full detail over
    many steps: a ``SMOOTH_STEPS`` rolling reading (a ratio of rolling sums for derived ratios), over a faint
    per-step line while there are few enough steps to read it."""
    raw = values if values is not None else (f[col] if col in f.columns else None)
    if raw is None or not _exact(f) or len(f) <= 2 * SMOOTH_STEPS:
        return series(f, col, name, color, dash=dash, width=width, band=band, hover=hover, values=values)
    smooth = rolling_figure(f, col, SMOOTH_STEPS)
    if smooth is None:
        smooth = raw.rolling(SMOOTH_STEPS, min_periods=1).mean()
    out: list[dict[str, Any]] = []
    if len(f) <= PER_STEP_MAX:
        out += series(f, col, f"{name} per step", color, width=1, band=False, opacity=0.3, hover=hover,
                      showlegend=False, values=raw)
    return out + series(f, col, name, color, dash=dash, width=width, band=False, hover=hover, values=smooth)


def figure_total(f: pd.DataFrame, name: str) -> float | None:
    """A registered figure over the whole frame (its sums; None when undefined or its inputs are missing)."""
    fig = registry.REGISTRY[name]
    if not all(c in f.columns for c in fig.terms):
        return None
    rows = float(f["n"].sum()) if "n" in f.columns else float(len(f))
    v = registry.value(fig, {c: float(np.nansum(f[c].to_numpy(dtype=float))) for c in fig.terms}, rows)
    return None if not math.isfinite(v) else v


def with_range(fig: Figure, xrange: Sequence[float] | None) -> Figure:
    """The figure with its step axis fixed to ``xrange`` (after a zoom)."""
    if xrange and "xaxis" in fig["layout"] and fig["layout"]["xaxis"].get("visible", True):
        fig["layout"]["xaxis"]["range"] = [float(xrange[0]), float(xrange[1])]
        fig["layout"]["xaxis"]["autorange"] = False
    return fig


# ------------------------------------------------------------------------------------------------------------------
# Overview

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
    if f.empty and (evals is None or not len(evals)):
        return empty_figure("no steps yet", title)
    data = []  # an etrm-eval run has evaluations only: its curve is the held-out one
    if not f.empty:
        data += reading(f, "exact_inflight", "in-flight (ETRM)", C["inflight"], hover=".1%")
        data += reading(f, "exact_halted", "at halt (TRM)", C["halted"], hover=".1%", dash="dash")
    if evals is not None and len(evals):
        for col, name, symbol in (("exact", "held-out", "circle"), ("halt.exact", "held-out at halt", "diamond"),
                                  (MAZE_VALID_PATH, "held-out valid shortest path (maze)", "square")):
            if col in evals.columns and evals[col].notna().any():
                data.append({"type": "scatter", "mode": "markers+lines", "name": name,
                             "x": evals.index.to_numpy(dtype=float), "y": _y(evals[col]),
                             "line": {"color": C["eval"], "width": 1, "dash": "dot"},
                             "marker": {"symbol": symbol, "size": 7, "color": C["eval"]},
                             "hovertemplate": "%{y:.1%}"})
    lay = layout(title, percent=True)
    span, fmt = percent_range(_shown(data))
    lay["yaxis"].update(range=span, tickformat=fmt)
    if span[1] < 1:
        lay["annotations"].append({"text": f"axis 0-{span[1] / 1.05:.0%}: every value shown lies below it",
                                   "x": 0.01, "y": 0.98, "xref": "paper", "yref": "paper", "xanchor": "left",
                                   "yanchor": "top", "showarrow": False, "font": {"size": 10, "color": MUTED}})
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)


def coverage_figure(f: pd.DataFrame, threshold: float = 0.5, findings: Sequence[Mapping[str, Any]] = (),
                    focus: int | None = None, title: str = "Encoder gradient coverage vs reset fraction",
                    smooth_steps: int = SMOOTH_STEPS, height: int = HEIGHT + 30, side: bool = True) -> Figure:
    """Coverage per step with the reset fraction drawn beside it: in ``cached`` mode the two coincide (only reset
    slots are trained), in ``reencode`` coverage sits at 1. The zone under the doctor's threshold is shaded red;
    a side panel puts the run means of both next to each other."""
    if f.empty or "coverage" not in f.columns:
        return empty_figure("no coverage recorded (untraced, or no encoder)", title, height)
    data: list[dict[str, Any]] = []
    if _exact(f) and len(f) > smooth_steps:
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
        lay["xaxis2"] = _axis(domain=[0.85, 1.0], anchor="y2", ticks="", showgrid=False, fixedrange=True,
                              tickangle=0, tickfont={"size": 10}, title=SIDE_CAPTION)
        lay["yaxis2"] = _axis(anchor="x2", range=[-0.03, 1.18], showticklabels=False, fixedrange=True, ticks="")
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
    data = [{"type": "scatter", "mode": "lines", "x": x, "y": _y(wide[p] * 1000), "name": p, "stackgroup": "phases",
             "line": {"width": 0.5, "color": PHASE_COLORS.get(p, MUTED)}, "hovertemplate": "%{y:.1f} ms"}
            for p in order]
    total = wide[order].sum(axis=1)
    rate = 1.0 / total.where(total > 0)
    data.append({"type": "scatter", "mode": "lines", "x": x, "y": _y(rate),
                 "name": "steps/s", "yaxis": "y2", "line": {"color": INK, "width": 1.5, "dash": "dot"},
                 "hovertemplate": "%{y:.2f} steps/s"})
    sampled = " (sampled steps)" if t.attrs.get("sampled") else ""
    lay = layout(title + sampled, height, y_title="ms per step")
    lay["yaxis"]["rangemode"] = "tozero"
    rates = rate.to_numpy(dtype=float)
    lay["yaxis2"] = _axis(title="steps/s", overlaying="y", side="right", showgrid=False, rangemode="tozero",
                          tickformat=plain_tickformat(rates), **linear_ticks(rates))
    lay["margin"].update(r=52, b=96)
    below = 46 / (height - lay["margin"]["t"] - lay["margin"]["b"])  # under the tick labels and the step title
    lay["legend"].update(x=0, xanchor="left", y=-below, yanchor="top", traceorder="normal")
    return figure(data, lay)


# ------------------------------------------------------------------------------------------------------------------
# Coverage tab

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
    vals = np.asarray(_shown(data), dtype=float)
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
        data.append({"type": "scatter", "mode": "lines", "x": _x(f), "y": _y(f["slots_per_step"]),
                     "name": "batch (B)", "line": {"color": "#e5e7eb", "width": 6}, "hoverinfo": "skip"})
    data += reading(f, "encoded_per_step", "looked up" if trm else "encoded", C["encoded"], band=False,
                    hover=".1f")
    if "encode_needed_per_step" in f.columns:
        data += reading(f, "encode_needed_per_step", "needed", C["needed"], band=False, hover=".1f", dash="dash")
    lay = layout(title, y_title="slots per step")
    lay["yaxis"]["rangemode"] = "tozero"
    return figure(data, lay)


# ------------------------------------------------------------------------------------------------------------------
# Halting tab

def halting_heatmap(f: pd.DataFrame, title: str = "Halting step over training (share of halts)",
                    height: int = HEIGHT + 30, max_cols: int = 120) -> Figure:
    """Share of each bucket's halts that happened at each ACT step k (columns ``halt_at_k``)."""
    ks = sorted(int(c[8:]) for c in f.columns if c.startswith("halt_at_") and c[8:].isdigit())
    if f.empty or not ks:
        return empty_figure("no halting histogram recorded", title, height)
    counts = np.stack([f[f"halt_at_{k}"].fillna(0).to_numpy(dtype=float) for k in ks])
    x = _x(f)
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


# ------------------------------------------------------------------------------------------------------------------
# Alignment tab

ALIGN_SERIES = (("label_mismatch_per_step", "labels", C["label"]), ("demo_mismatch_per_step", "demos", C["demo"]),
                ("carry_mismatch_per_step", "carry", C["carry"]))


def alignment_figure(f: pd.DataFrame, findings: Sequence[Mapping[str, Any]] = (), focus: int | None = None,
                     title: str = "Alignment mismatches per step") -> Figure:
    if f.empty or not any(c in f.columns for c, _, _ in ALIGN_SERIES):
        return empty_figure("no alignment counts recorded", title)
    data: list[dict[str, Any]] = []
    for c, name, color in ALIGN_SERIES:
        if c in f.columns:
            data += series(f, c, name, color, hover=".2f")
    lay = layout(title, y_title="slots per step")
    lay["yaxis"]["rangemode"] = "tozero"
    total = sum(float(f[c.removesuffix("_per_step")].fillna(0).sum()) for c, _, _ in ALIGN_SERIES
                if c.removesuffix("_per_step") in f.columns)
    if total == 0:
        lay["annotations"].append({"text": "no mismatches: every slot's labels and demos are its own", "x": 0.5,
                                   "y": 0.6, "xref": "paper", "yref": "paper", "showarrow": False,
                                   "font": {"size": 12, "color": C["coverage"]}})
        lay["yaxis"]["range"] = [0, 1]
    lay["shapes"] = markers(findings, focus)
    return figure(data, lay)


# ------------------------------------------------------------------------------------------------------------------
# Compare

def run_colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per run that does not depend on which runs are picked: each name (the runs list under the root, in
    any order) takes the palette slot its hash names, or the next free one when an earlier name (in sorted order)
    holds it; distinct up to ``len(RUN_COLORS)`` runs. Pass every run of the root, then index by the picked ones."""
    out: dict[str, str] = {}
    taken: set[int] = set()
    for name in sorted(set(names)):
        slot = zlib.crc32(name.encode()) % len(RUN_COLORS)
        if len(taken) < len(RUN_COLORS):
            while slot in taken:
                slot = (slot + 1) % len(RUN_COLORS)
        taken.add(slot)
        out[name] = RUN_COLORS[slot]
    return out


COINCIDE = 0.003  # two runs' lines coincide when they differ by at most this share of the axis span everywhere
DUPLICATE_DASHES = ("dash", "dot", "dashdot", "longdash")


def coinciding(lines: Mapping[str, tuple[np.ndarray, np.ndarray]], span: float) -> dict[str, str]:
    """Runs whose line (x, y) lies on an earlier run's line (same steps, values within ``COINCIDE * span``):
    each such run -> the earlier run it hides behind."""
    out: dict[str, str] = {}
    names = list(lines)
    for j, b in enumerate(names):
        xb, yb = lines[b]
        for a in names[:j]:
            xa, ya = lines[a]
            if a in out or len(xa) != len(xb) or not len(xa) or not np.array_equal(xa, xb):
                continue
            both = np.isfinite(ya) & np.isfinite(yb)
            if np.array_equal(np.isfinite(ya), np.isfinite(yb)) and (
                    not both.any() or np.max(np.abs(ya[both] - yb[both])) <= COINCIDE * max(span, 1e-12)):
                out[b] = a
                break
    return out


def compare_figure(frames: Mapping[str, pd.DataFrame], metric: str, title: str | None = None,
                   height: int = HEIGHT + 40, smooth_steps: int = SMOOTH_STEPS,
                   colors: Mapping[str, str] | None = None) -> Figure:
    """One registered figure overlaid for several runs, each in its own colour (``colors``, by default
    ``run_colors`` of the frames). At full detail a faint per-step line sits behind a ``smooth_steps`` rolling
    reading (a ratio of rolling sums). A run whose line coincides with an earlier one's is drawn dashed on top of
    it, with markers, and a note under the chart names them, so no run disappears behind another."""
    label = METRICS.get(metric, metric)
    if not frames:
        return empty_figure("pick runs to compare", title or label, height)
    colors = dict(colors) if colors is not None else run_colors(list(frames))
    data: list[dict[str, Any]] = []
    smoothed = False
    hover = ".1%" if metric in PERCENT else ".3g"
    mains: dict[str, dict[str, Any]] = {}
    for name, f in frames.items():
        if f.empty or metric not in f.columns:
            continue
        color = colors.get(name) or run_colors([name])[name]
        if _exact(f) and len(f) > 2 * smooth_steps:
            smoothed = True
            smooth = rolling_figure(f, metric, smooth_steps)
            if len(f) <= PER_STEP_MAX:
                data += series(f, metric, f"{name} per step", color, width=1, band=False, opacity=0.25,
                               hover=hover, showlegend=False)
            traces = series(f, metric, name, color, width=2.5, hover=hover, values=smooth)
        else:
            traces = series(f, metric, name, color, hover=hover)
        if traces:
            mains[name] = traces[-1]
        data += traces
    title = title or (label + (f" ({smooth_steps}-step rolling)" if smoothed else ""))
    if not data:
        return empty_figure(f"no picked run records {label}", title, height)
    lay = layout(title, height, percent=metric in PERCENT)
    shown = _shown(data)
    span = (max(shown) - min(shown)) if shown else 1.0  # the axis span "identical" is judged against
    if metric in PERCENT:
        rng, fmt = percent_range(shown)
        lay["yaxis"].update(range=rng, tickformat=fmt)
        span = rng[1] - rng[0]
    lines = {n: (np.asarray(t["x"], dtype=float), np.array([np.nan if v is None else v for v in t["y"]], dtype=float))
             for n, t in mains.items()}
    hidden = coinciding(lines, span)
    groups: dict[str, list[str]] = {}
    for b, a in hidden.items():
        groups.setdefault(a, []).append(b)
    for followers in groups.values():
        for i, b in enumerate(followers):
            t = mains[b]
            t["line"] = {**t["line"], "dash": DUPLICATE_DASHES[i % len(DUPLICATE_DASHES)]}
            # about 24 markers per line, staggered between the runs that share it so that each one's show
            every = max(1, len(t["x"]) // 24)
            at = (i + 1) * every // (len(followers) + 1)
            t["mode"] = "lines+markers"
            t["marker"] = {"symbol": ("circle-open", "square-open", "diamond-open", "triangle-up-open")[i % 4],
                           "color": t["line"]["color"], "line": {"width": 1.5},
                           "size": [7 if j % every == at else 0 for j in range(len(t["x"]))]}
    if groups:
        said = "; ".join(" = ".join([a, *bs]) for a, bs in groups.items())
        lay["margin"]["b"] = 70
        lay["annotations"].append({"text": f"identical lines: {said} (the later ones dashed, with markers, on top)",
                                   "x": 0, "xanchor": "left", "y": 0, "yanchor": "top", "yshift": -44,
                                   "xref": "paper", "yref": "paper", "showarrow": False,
                                   "font": {"size": 11, "color": MUTED}, "name": "coinciding"})
    return figure(data, lay)


EFFICIENCY_ROWS = ("encoder forwards per step", "encoder forwards per sample", "encoder gradient coverage",
                   "dynamic halting", "steps per sample", "encoded / needed", "samples consumed", "steps")


# Efficiency table rows: label -> registered figure (the rest are plain totals).
EFFICIENCY_FIGURES = {"encoder forwards per step": "encoded_per_step", "encoder forwards per sample":
                      "encoded_per_sample", "encoder gradient coverage": "coverage",
                      "steps per sample": "steps_per_sample", "encoded / needed": "encode_ratio"}


def efficiency(meta: Mapping[str, Any], totals: Mapping[str, float]) -> dict[str, Any]:
    """The progress summary's efficiency numbers for one run, from whole-run sums of its trace (``totals``, with
    ``steps``): registered figures, and whether halting was dynamic (the share of halts before the maximum step)."""
    mode = meta.get("mode")
    values = registry.of_sums(totals, totals.get("steps", 0.0), mode)
    out: dict[str, Any] = {row: values.get(name) for row, name in EFFICIENCY_FIGURES.items()}
    out["dynamic halting"] = registry.dynamic_halting(values, mode)
    out["samples consumed"] = totals.get("samples_consumed")
    out["steps"] = totals.get("steps")
    return {row: out[row] for row in EFFICIENCY_ROWS}


def efficiency_table(runs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, float]]]) -> pd.DataFrame:
    """Rows: the efficiency metrics; one column per run (formatted strings), as in the progress summary."""
    data = {}
    for name, (meta, totals) in runs.items():
        e = efficiency(meta, totals)
        data[name] = [_fmt(row, e[row]) for row in EFFICIENCY_ROWS]
    return pd.DataFrame(data, index=pd.Index(EFFICIENCY_ROWS, name="metric"))


def _fmt(row: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    if row == "encoder gradient coverage":
        return f"{v:.1%}"
    if row in ("samples consumed", "steps"):
        return f"{int(v):,}"
    return f"{v:.2f}"


# ------------------------------------------------------------------------------------------------------------------
# Evaluation audits (diagnostics.trace.eval_audits; the Samples tab)

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
                     "x": rows["act_step"].to_numpy(dtype=float).tolist(), "y": _y(rows["exact"]),
                     "line": {"color": _alpha(C["eval"], alpha), "width": 2.5 if newest else 1.2},
                     "marker": {"size": 6 if newest else 4, "color": _alpha(C["eval"], alpha)},
                     "showlegend": newest or len(steps) <= 4, "hovertemplate": "%{y:.1%}"})
    last = mine[mine["step"] == steps[-1]].iloc[0]
    data.append({"type": "scatter", "mode": "markers", "name": "would-halt (mean step)",
                 "x": [float(last["halt_step"])], "y": _y([last["halt_exact"]]),
                 "marker": {"symbol": "diamond", "size": 11, "color": C["halted"]},
                 "hovertemplate": f"{last['halt_rule']}: %{{y:.1%}} at mean step %{{x:.2f}}"})
    other = audits[(audits["step"] == steps[-1]) & (audits["weights"] != weights)]
    for name, rows in other.groupby("weights"):
        rows = rows.sort_values("act_step")
        data.append({"type": "scatter", "mode": "lines", "name": f"eval @ {steps[-1]} ({name})",
                     "x": rows["act_step"].to_numpy(dtype=float).tolist(), "y": _y(rows["exact"]),
                     "line": {"color": C["inflight"], "width": 1.5, "dash": "dash"}, "hovertemplate": "%{y:.1%}"})
    lay = layout(title, height, y_title="held-out exact", percent=True)
    lay["xaxis"] = _axis(title="ACT step", dtick=1)
    lay["hovermode"] = "closest"
    return figure(data, lay)
