"""The house style every figure builder shares: palette, layout, axes, and the traces of a step series.

Figures are plain Plotly figure dicts (``{"data": [...], "layout": {...}}``), which Dash sends as they are: building
them skips Plotly's per-property validation, so a page of figures is ready in milliseconds (the tests check each one
against Plotly's schema). Every step chart draws the bucket mean as a line and, where a bucket holds more than one
step, the min/max of the per-step values as a light band, so spikes survive any zoom level. One palette and one
layout everywhere: coverage teal, the reset fraction orange and dashed, the starved zone (coverage below the
doctor's threshold) pale red.
"""

from __future__ import annotations

import math
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


def axis_style(**kw: Any) -> dict[str, Any]:
    """An axis in the house style; ``title`` is the axis title's text, other keys go in as they are."""
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
    y = axis_style(title=y_title)
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
        "xaxis": axis_style(title=X_TITLE), "yaxis": y, "shapes": [], "annotations": [],
    }


def figure(data: list[dict[str, Any]], lay: dict[str, Any]) -> Figure:
    """A figure dict from its traces and layout."""
    return {"data": data, "layout": lay}


def empty_figure(message: str, title: str = "", height: int = HEIGHT) -> Figure:
    """A blank chart that says why it is blank."""
    lay = layout(title, height, legend=False)
    lay["xaxis"] = {"visible": False}
    lay["yaxis"] = {"visible": False}
    lay["annotations"] = [{"text": message, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                           "showarrow": False, "font": {"size": 13, "color": MUTED}}]
    return figure([], lay)


def step_x(f: pd.DataFrame) -> np.ndarray:
    """The frame's steps, as the x values of a step chart."""
    return f["step"].to_numpy(dtype=float)


def json_y(s: pd.Series | np.ndarray) -> list:
    """Values as a JSON-ready list (NaN as None, which Plotly draws as a gap)."""
    a = np.asarray(s, dtype=float)
    return [None if not math.isfinite(v) else v for v in a.tolist()]


def is_exact(f: pd.DataFrame) -> bool:
    """Whether each row of the frame is one step (full detail), not a bucket of several."""
    if "exact" in f.attrs:
        return bool(f.attrs["exact"])
    return "n" not in f.columns or bool((f["n"] <= 1).all())


def rgba(hex_color: str, a: float) -> str:
    """A ``#rrggbb`` colour at opacity ``a``."""
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


def shown_values(data: Sequence[Mapping[str, Any]], axis: str = "y") -> list[float]:
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
    x = step_x(f)
    xa, ya = axes
    out: list[dict[str, Any]] = []
    lo, hi = f"{col}_min", f"{col}_max"
    if band and values is None and not is_exact(f) and lo in f.columns and hi in f.columns:
        common = {"type": "scatter", "mode": "lines", "x": x, "xaxis": xa, "yaxis": ya, "hoverinfo": "skip",
                  "showlegend": False, "legendgroup": name, "line": {"width": 0, "color": color}}
        out.append({**common, "y": json_y(f[hi]), "name": f"{name} max"})
        out.append({**common, "y": json_y(f[lo]), "name": f"{name} min", "fill": "tonexty",
                    "fillcolor": rgba(color, 0.14)})
    line = {"color": color, "width": width, "shape": shape}
    if dash:
        line["dash"] = dash
    out.append({"type": "scatter", "mode": "lines", "x": x, "y": json_y(y), "name": name, "xaxis": xa, "yaxis": ya,
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
    if raw is None or not is_exact(f) or len(f) <= 2 * SMOOTH_STEPS:
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
