"""The figure registry and its arithmetic: every derived figure of a run, computed in one place.

Each probe declares the figures it makes from its counters (``Probe.figures``, a ``Figure`` each: numerator and
denominator terms, scale, description, modes). ``REGISTRY`` gathers them by name. A figure over any step range is a
ratio of sums, ``sum(num) / sum(den)`` (per step when it has no denominator; its square root when ``sqrt``), NaN
where the denominator is 0 or an input is missing: the doctor, ``load_run``, TensorBoard, the exports, the
efficiency table and every dashboard card and chart read it from here, so they cannot disagree.

API (pure functions, no I/O):
- ``REGISTRY``: name -> ``Figure``, in declaration order. ``COUNTERS``: every counter a figure may read.
- ``of_rows(rows, mode)``: every figure's value over a list of flushed rows (dicts counter -> value).
- ``of_sums(sums, rows, mode)``: the same from sums already made (``rows``: number of steps summed).
- ``over(df, lo, hi, mode)``: over the steps [lo, hi] of a steps table indexed by step.
- ``columns(frame, n)``: per-row (per-bucket) values of every available figure, as Series.
- ``rolling(frame, figure, k)``: a ratio of rolling sums over ``k`` rows.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.probes import (AlignmentProbe, ContextDiversityProbe, CoverageProbe, EncoderWorkProbe,
                                GradNormProbe, HaltingProbe, LossProbe, ResetProbe)
from diagnostics.probes.base import Figure

# Every probe class whose figures are registered; a new probe adds itself here.
PROBE_CLASSES = (CoverageProbe, GradNormProbe, ResetProbe, EncoderWorkProbe, AlignmentProbe, HaltingProbe, LossProbe,
                 ContextDiversityProbe)


def _registry(classes: Iterable[type]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for cls in classes:
        for fig in cls.figures:
            if fig.name in out:
                raise ValueError(f"figure {fig.name!r} is declared twice")
            out[fig.name] = fig
    return out


REGISTRY: dict[str, Figure] = _registry(PROBE_CLASSES)
COUNTERS: tuple[str, ...] = tuple(dict.fromkeys(t for f in REGISTRY.values() for t in f.terms))


def applies(fig: Figure, mode: str | None) -> bool:
    """Whether ``fig`` applies to a run of ``mode`` (every figure when the mode is unknown)."""
    return mode is None or mode in fig.modes


def available(columns: Iterable[str], mode: str | None = None) -> list[Figure]:
    """The registered figures whose inputs are all among ``columns`` and which apply to ``mode``."""
    have = set(columns)
    return [f for f in REGISTRY.values() if applies(f, mode) and all(t in have for t in f.terms)]


def ratio(num: float, den: float, sqrt: bool = False) -> float:
    """``num / den`` (its root when ``sqrt``), NaN where the denominator is 0 or not finite."""
    if not den or not math.isfinite(den) or not math.isfinite(num):
        return math.nan
    v = num / den
    return math.sqrt(v) if sqrt and v >= 0 else (math.nan if sqrt else v)


def value(fig: Figure, sums: Mapping[str, float], rows: float | None = None) -> float:
    """The figure from sums of its terms (and the number of steps summed, for a per-step figure)."""
    if any(t not in sums for t in fig.terms):
        return math.nan
    num = float(sum(sums[t] for t in fig.num))
    den = float(sum(sums[t] for t in fig.den)) if fig.den else (math.nan if rows is None else float(rows))
    return ratio(num, den, fig.sqrt)


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def sums_of(rows: Sequence[Mapping[str, Any]], names: Iterable[str] | None = None) -> dict[str, float]:
    """Sums of counters over rows (missing or non-finite values count 0); only counters present in the rows."""
    if not rows:
        return {}
    keys = set().union(*(r.keys() for r in rows)) - {"step"}
    wanted = keys if names is None else keys & set(names)
    return {k: sum(_finite(r.get(k)) for r in rows) for k in wanted}


def of_sums(sums: Mapping[str, float], rows: float, mode: str | None = None) -> dict[str, float]:
    """Every applicable figure whose inputs are in ``sums``, in registry order (NaN where undefined)."""
    return {f.name: value(f, sums, rows) for f in available(sums, mode)}


def of_rows(rows: Sequence[Mapping[str, Any]], mode: str | None = None) -> dict[str, float]:
    """Every applicable figure over a list of flushed rows (the step range they cover)."""
    return of_sums(sums_of(rows, COUNTERS), len(rows), mode)


def frame_sums(df: pd.DataFrame) -> dict[str, float]:
    """Column sums of a steps table (NaN as 0) for the counters figures read."""
    return {c: float(np.nansum(df[c].to_numpy(dtype=float))) for c in COUNTERS if c in df.columns}


def over(df: pd.DataFrame, lo: int | None = None, hi: int | None = None, mode: str | None = None) -> dict[str, float]:
    """Every applicable figure over steps [lo, hi] (the whole table when None) of a steps table indexed by step."""
    part = df
    if lo is not None or hi is not None:
        idx = df.index.to_numpy()
        keep = np.ones(len(df), dtype=bool)
        if lo is not None:
            keep &= idx >= lo
        if hi is not None:
            keep &= idx <= hi
        part = df[keep]
    return of_sums(frame_sums(part), len(part), mode)


def _term(frame: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    return np.sum([np.nan_to_num(np.asarray(frame[c], dtype=float)) for c in names], axis=0)


def _values(frame: Mapping[str, Any], fig: Figure, n: np.ndarray | pd.Series | None, length: int) -> np.ndarray:
    num = _term(frame, fig.num)
    if fig.den:
        den = _term(frame, fig.den)
    else:
        den = np.ones(length) if n is None else np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
        if fig.sqrt:
            v = np.sqrt(np.where(v >= 0, v, np.nan))
    return v


def series(frame: pd.DataFrame, fig: Figure, n: np.ndarray | pd.Series | None = None) -> pd.Series:
    """Per-row values of ``fig`` on a frame of sums (a steps table: one step per row; a bucketed frame: ``n``
    steps per row). NaN where the denominator is 0."""
    return pd.Series(_values(frame, fig, n, len(frame)), index=frame.index, name=fig.name)


def columns(frame: pd.DataFrame, n: np.ndarray | pd.Series | None = None,
            mode: str | None = None) -> dict[str, pd.Series]:
    """Per-row values of every figure available on ``frame`` (see ``series``)."""
    arrays = {c: frame[c].to_numpy(dtype=float) for c in frame.columns}  # each column read once
    return {f.name: pd.Series(_values(arrays, f, n, len(frame)), index=frame.index, name=f.name)
            for f in available(frame.columns, mode)}


def rolling(frame: pd.DataFrame, fig: Figure, k: int, n: np.ndarray | pd.Series | None = None) -> pd.Series:
    """A ratio of sums over the last ``k`` rows at each row (exact: sums, not means of ratios)."""
    num = pd.Series(_term(frame, fig.num), index=frame.index).rolling(k, min_periods=1).sum()
    if fig.den:
        den = pd.Series(_term(frame, fig.den), index=frame.index)
    else:
        den = pd.Series(np.ones(len(frame)) if n is None else np.asarray(n, dtype=float), index=frame.index)
    den = den.rolling(k, min_periods=1).sum()
    v = num / den.where(den != 0)
    return np.sqrt(v.where(v >= 0)) if fig.sqrt else v


def per_step_sql(fig: Figure, quote: Any = lambda c: '"' + c + '"') -> str:
    """The figure's per-step value as an SQL expression over one ``steps`` row (NULL where the denominator is 0);
    used for the min/max envelopes of bucketed reads. ``sqrt`` figures give the ratio before the root."""
    num = " + ".join(f"COALESCE({quote(c)}, 0)" for c in fig.num)
    if not fig.den:
        return f"(1.0 * ({num}))"
    den = " + ".join(f"COALESCE({quote(c)}, 0)" for c in fig.den)
    return f"(1.0 * ({num}) / NULLIF({den}, 0))"


def format_value(fig: Figure, v: float | None, digits: int = 3) -> str:
    """A figure's value as people read it: % for fractions, else ``digits`` significant digits; '—' when undefined."""
    if v is None or not math.isfinite(v):
        return "—"
    if fig.percent:
        return f"{v:.0%}" if v in (0.0, 1.0) else f"{v:.1%}"
    return f"{v:.{digits}g}" if abs(v) >= 1000 or abs(v) < 0.01 and v != 0 else f"{v:.{digits}f}"


def dynamic_halting(values: Mapping[str, float], mode: str | None) -> str:
    """Whether halting was dynamic, from what happened: the share of halts before the maximum step."""
    if mode == "fct":
        return "no (fct: fixed steps)"
    share = values.get("early_halt_share", math.nan)
    if share is None or not math.isfinite(share):
        return "n/a"
    if share == 0:
        return "no (no halt before the maximum step)"
    return f"yes ({share:.1%} of halts before the maximum step)"


def markdown_table() -> str:
    """The registry as a Markdown table (docs/diagnostics.md holds it; a test checks it is up to date)."""
    lines = ["| figure | label | numerator | denominator | scale | modes | description |",
             "|---|---|---|---|---|---|---|"]
    for f in REGISTRY.values():
        den = " + ".join(f"`{t}`" for t in f.den) or "steps"
        num = " + ".join(f"`{t}`" for t in f.num)
        root = "sqrt of " if f.sqrt else ""
        modes = "all" if set(f.modes) >= {"reencode", "cached", "fct", "trm"} else ", ".join(f.modes)
        lines.append(f"| `{f.name}` | {f.label} | {root}{num} | {den} | {f.scale} | {modes} | {f.description} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- figures:begin (generated by: python -m diagnostics.trace.figures docs/diagnostics.md) -->", \
    "<!-- figures:end -->"


def update_doc(text: str) -> str:
    """``text`` with the block between the figure markers replaced by ``markdown_table()``."""
    if BEGIN not in text or END not in text:
        raise ValueError("the document has no figures block (its begin and end markers)")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


__all__ = ["COUNTERS", "Figure", "PROBE_CLASSES", "REGISTRY", "applies", "available", "columns", "dynamic_halting",
           "format_value", "frame_sums", "markdown_table", "of_rows", "of_sums", "over", "per_step_sql", "ratio",
           "rolling", "series", "sums_of", "update_doc", "value"]


if __name__ == "__main__":  # python -m diagnostics.trace.figures docs/diagnostics.md: regenerate the figure list
    import sys
    from pathlib import Path

    doc = Path(sys.argv[1])
    doc.write_text(update_doc(doc.read_text()))
