"""The compare page's figures: a stable colour per run, one metric overlaid for several runs (coinciding lines
made visible), and the efficiency table of the progress summary."""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dashboards.figures.base import (Figure, MUTED, RUN_COLORS, HEIGHT, SMOOTH_STEPS, PER_STEP_MAX, layout, figure,
                                     empty_figure, is_exact, percent_range, shown_values, series, rolling_figure)
from diagnostics.trace import figures as registry


# Metrics offered on the compare page: every registered figure, by name -> label (diagnostics.trace.figures).
METRICS: dict[str, str] = {name: fig.label for name, fig in registry.REGISTRY.items()}
PERCENT = {name for name, fig in registry.REGISTRY.items() if fig.percent}


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
        if is_exact(f) and len(f) > 2 * smooth_steps:
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
    shown = shown_values(data)
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
