"""Bucketed frames: which sums and envelopes a view needs (``Spec``), and bucketing per-step rows in memory.

A bucketed frame has one row per bucket: ``step`` (last step in it), ``step_lo``, ``n`` (rows), the sum of each
stored column asked for, and ``<name>_min``/``<name>_max`` envelopes of per-step values; the figures are exact at
any bucket width because numerators and denominators are summed apart. ``finish`` adds the registered figures
(``diagnostics.trace.figures``). ``diagnostics.trace.reader`` fills such frames from a trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

from diagnostics.trace import figures
from diagnostics.trace.schema import sql_name

MAX_BUCKETS = 800            # points per series over any visible range


@dataclass(frozen=True)
class Spec:
    """Columns to sum per bucket and per-step values whose min/max envelope to keep (derived ratio names or stored
    column names)."""

    sums: tuple[str, ...]
    envelopes: tuple[str, ...] = ()

    def resolve(self, columns: Iterable[str]) -> "Spec":
        """Only what this trace has: sums of present columns (plus figure inputs), envelopes whose inputs exist
        (a figure's root, ``sqrt``, has no envelope: its per-step value is not a plain ratio in SQL)."""
        have = set(columns)
        sums = list(dict.fromkeys(c for c in self.sums if c in have))
        envs = []
        for e in self.envelopes:
            fig = figures.REGISTRY.get(e)
            if fig is not None:
                if all(c in have for c in fig.terms) and not fig.sqrt:
                    envs.append(e)
                    sums.extend(c for c in fig.terms if c not in sums)
            elif e in have:
                envs.append(e)
                if e not in sums:
                    sums.append(e)
        return Spec(tuple(sums), tuple(envs))


def ratio_spec(*names: str, extra: Iterable[str] = ()) -> Spec:
    """A spec with the ratio terms of ``names`` summed and their envelopes kept."""
    sums: list[str] = list(extra)
    for n in names:
        if n in figures.REGISTRY:
            sums.extend(figures.REGISTRY[n].terms)
        else:
            sums.append(n)
    return Spec(tuple(dict.fromkeys(sums)), tuple(names))


def halt_columns(columns: Iterable[str]) -> list[str]:
    """``halt_at_k`` columns in k order."""
    ks = sorted(int(c[8:]) for c in columns if c.startswith("halt_at_") and c[8:].isdigit())
    return [f"halt_at_{k}" for k in ks]


def envelope_sql(name: str) -> str:
    """The per-step value of an envelope as SQL: a figure's (``diagnostics.trace.figures.per_step_sql``) or a column."""
    fig = figures.REGISTRY.get(name)
    return figures.per_step_sql(fig, sql_name) if fig is not None else sql_name(name)


def envelope_values(raw: pd.DataFrame, name: str) -> pd.Series:
    """The same per-step values in pandas."""
    fig = figures.REGISTRY.get(name)
    return figures.series(raw, fig) if fig is not None else raw[name].astype(float)


def bucket_width(lo: int, hi: int, max_buckets: int = MAX_BUCKETS) -> int:
    """Steps per bucket so that [lo, hi] makes at most ``max_buckets`` buckets (1 = full detail)."""
    return max(1, math.ceil((hi - lo + 1) / max_buckets))


def aggregate_rows(raw: pd.DataFrame, spec: Spec, width: int, origin: int = 1) -> pd.DataFrame:
    """Bucket raw per-step rows (indexed by step) into the bucketed-frame layout (sums, ``_min``/``_max``)."""
    cols = frame_columns(spec)
    if raw.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    steps = raw.index.to_numpy(dtype=np.int64)
    data = {"step": steps.astype(float), "step_lo": steps.astype(float), "n": np.ones(len(raw))}
    for c in spec.sums:
        data[c] = raw[c].to_numpy(dtype=float) if c in raw.columns else np.full(len(raw), np.nan)
    for e in spec.envelopes:
        v = envelope_values(raw, e).to_numpy(dtype=float)
        data[f"{e}_min"], data[f"{e}_max"] = v, v
    frame = pd.DataFrame(data, columns=cols)
    if width == 1:
        return frame
    return group_buckets(frame, (steps - origin) // width, spec)


def merge_frames(a: pd.DataFrame, b: pd.DataFrame, spec: Spec, width: int, origin: int = 1) -> pd.DataFrame:
    """Fold bucketed frame ``b`` (later steps) into ``a``, re-bucketing both at ``width`` (exact: sums, min, max)."""
    parts = [x for x in (a, b) if len(x)]
    if not parts:
        return a
    both = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    key = (both["step_lo"].to_numpy(dtype=np.int64) - origin) // width
    return group_buckets(both[frame_columns(spec)], key, spec)


def frame_columns(spec: Spec) -> list[str]:
    return ["step", "step_lo", "n", *spec.sums, *(f"{e}_{m}" for e in spec.envelopes for m in ("min", "max"))]


def group_buckets(frame: pd.DataFrame, key: np.ndarray, spec: Spec) -> pd.DataFrame:
    """Rows with equal ``key`` merged: sums added (NaN only where all are NaN), ``_min``/``_max`` and the step
    bounds reduced; vectorised with ``reduceat`` over the (sorted) keys."""
    if len(key) > 1 and (np.diff(key) < 0).any():
        order = np.argsort(key, kind="stable")
        frame, key = frame.iloc[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    mins = {"step_lo", *(f"{e}_min" for e in spec.envelopes)}
    maxs = {"step", *(f"{e}_max" for e in spec.envelopes)}
    out: dict[str, np.ndarray] = {}
    for c in frame.columns:
        v = frame[c].to_numpy(dtype=float)
        if c in mins:
            out[c] = np.fmin.reduceat(v, starts)
        elif c in maxs:
            out[c] = np.fmax.reduceat(v, starts)
        else:
            nan = np.isnan(v)
            total = np.add.reduceat(np.where(nan, 0.0, v), starts)
            total[np.add.reduceat(~nan, starts) == 0] = np.nan
            out[c] = total
    return pd.DataFrame(out, columns=list(frame.columns))


def finish(frame: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """A bucketed frame with every available registered figure added per bucket (``diagnostics.trace.figures``: a ratio
    of the bucket's sums, per step over its ``n`` steps for figures without a denominator)."""
    n = frame["n"].to_numpy(dtype=float) if "n" in frame.columns else None
    cols = figures.columns(frame, n=n, mode=mode)
    keep = frame.drop(columns=[c for c in cols if c in frame.columns])
    out = pd.concat([keep, pd.DataFrame(cols, index=frame.index)], axis=1) if cols else frame.copy()
    out.attrs.update(frame.attrs)
    return out
