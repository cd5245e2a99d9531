"""Timing findings over the trace's per-step phase timings (the ``timings`` table: step, rank, phase, seconds).

- ``step-time-regression``: the median step time of a window of ``slow_window`` steps is at least ``slow_factor``
  times the run's early median (the ``slow_window`` steps after ``slow_warmup_steps``), naming the phase whose
  median grew most;
- ``phase-dominates``: one phase takes more than ``phase_share_max`` of the step time summed over a window.

A step's time is the sum of its phases (mean over ranks). ``TimingDoctor`` scans steps in order and carries its
window across calls, so the live doctor (fed each flush's timings) and ``diagnose_timings`` (the stored table)
name the same code and step. Medians make one slow step (a checkpoint, a load spike) count for nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.loading import as_json_value

STEP_TIME, PHASE_DOMINATES = "step-time-regression", "phase-dominates"


def per_step(timings: pd.DataFrame | Iterable[tuple]) -> pd.DataFrame:
    """Seconds per step (index) and phase (columns), the mean over ranks; ``timings``: rows (step, rank, phase, s)."""
    df = timings if isinstance(timings, pd.DataFrame) else pd.DataFrame(
        list(timings), columns=["step", "rank", "phase", "seconds"])
    if df.empty:
        return pd.DataFrame(dtype=float)
    return df.groupby(["step", "phase"])["seconds"].mean().unstack("phase").fillna(0.0).sort_index()


class TimingDoctor:
    """Both timing findings, fed steps in order (``update``); each fires once."""

    def __init__(self, meta: Mapping[str, Any], cfg: DoctorConfig | None = None) -> None:
        self.meta, self.cfg = dict(meta), cfg or DoctorConfig()
        self.early: pd.DataFrame | None = None  # the baseline window's rows
        self.tail = pd.DataFrame(dtype=float)   # the last window - 1 judged rows (and the baseline while it fills)
        self.last_step: int | None = None
        self.findings: list[Finding] = []

    def update(self, timings: pd.DataFrame | Iterable[tuple]) -> list[Finding]:
        """Consume timing rows (steps after the last one seen); the findings that hold for the first time."""
        frame = per_step(timings)
        if frame.empty:
            return []
        if self.last_step is not None:
            frame = frame[frame.index > self.last_step]
        frame = frame[frame.index > self.cfg.slow_warmup_steps]
        if frame.empty:
            return []
        self.last_step = int(frame.index[-1])
        w = self.cfg.slow_window
        rows = pd.concat([self.tail, frame]).fillna(0.0)
        new: list[Finding] = []
        if self.early is None and len(rows) >= w:
            self.early = rows.iloc[:w]
        fired = {f.code for f in self.findings}
        values = rows.to_numpy(dtype=float)
        steps = rows.index.to_numpy(dtype=np.int64)
        phases = list(rows.columns)
        lo = max(len(rows) - len(frame), w - 1)
        if lo < len(rows):  # every full window ending in the new rows, vectorised (a large run is read at once)
            ends = np.arange(lo, len(rows))
            c = np.vstack([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
            sums = c[ends + 1] - c[ends + 1 - w]
            total = sums.sum(axis=1)
            share = np.divide(sums.max(axis=1), total, out=np.zeros_like(total), where=total > 0)
            if PHASE_DOMINATES not in fired and (hit := np.flatnonzero(share > self.cfg.phase_share_max)).size:
                i = int(ends[hit[0]])
                new.append(self._dominates(values[i - w + 1:i + 1], phases, steps, i))
            if STEP_TIME not in fired and self.early is not None:
                base = float(np.median(self.early.reindex(columns=phases, fill_value=0.0).to_numpy().sum(axis=1)))
                med = np.median(np.lib.stride_tricks.sliding_window_view(values.sum(axis=1), w)[lo - w + 1:], axis=1)
                ok = (med >= self.cfg.slow_factor * base) & (steps[ends] > int(self.early.index[-1])) & (base > 0)
                if (hit := np.flatnonzero(ok)).size:
                    i = int(ends[hit[0]])
                    new.append(self._regression(values[i - w + 1:i + 1], phases, steps, i))
        new = [f for f in new if f is not None]
        self.tail = rows.iloc[-(w - 1):] if w > 1 else rows.iloc[0:0]
        self.findings.extend(new)
        return new

    def _dominates(self, win: np.ndarray, phases: list[str], steps: np.ndarray, i: int) -> Finding | None:
        sums = win.sum(axis=0)
        total = float(sums.sum())
        if total <= 0:
            return None
        j = int(np.argmax(sums))
        share = float(sums[j] / total)
        if share <= self.cfg.phase_share_max:
            return None
        w = len(win)
        ev = {"phase": phases[j], "share": share, "threshold": self.cfg.phase_share_max,
              "window": [int(steps[i - w + 1]), int(steps[i])], "mean_step_seconds": total / w,
              "shares": {p: float(s / total) for p, s in zip(phases, sums)}}
        msg = (f"the {phases[j]} phase takes {share:.0%} of the step time over steps {ev['window'][0]}..{steps[i]} "
               f"({total / w:.3g} s per step): the rest of the step waits on it")
        return Finding(PHASE_DOMINATES, "warning", int(steps[i]), as_json_value(ev), msg)

    def _regression(self, win: np.ndarray, phases: list[str], steps: np.ndarray, i: int) -> Finding | None:
        early = self.early.reindex(columns=phases, fill_value=0.0).to_numpy(dtype=float)
        base = float(np.median(early.sum(axis=1)))
        now = float(np.median(win.sum(axis=1)))
        if base <= 0 or now < self.cfg.slow_factor * base:
            return None
        grew = np.median(win, axis=0) - np.median(early, axis=0)
        j = int(np.argmax(grew))
        w = len(win)
        ev = {"phase": phases[j], "factor": now / base, "threshold": self.cfg.slow_factor,
              "early_median_seconds": base, "window_median_seconds": now,
              "early_window": [int(self.early.index[0]), int(self.early.index[-1])],
              "window": [int(steps[i - w + 1]), int(steps[i])],
              "phase_growth_seconds": {p: float(g) for p, g in zip(phases, grew)}}
        msg = (f"steps {ev['window'][0]}..{steps[i]} take {now:.3g} s (median), {now / base:.1f}x the run's early "
               f"median {base:.3g} s (steps {ev['early_window'][0]}..{ev['early_window'][1]}); the {phases[j]} phase "
               f"grew most (+{grew[j]:.3g} s per step)")
        return Finding(STEP_TIME, "warning", int(steps[i]), as_json_value(ev), msg)


def diagnose_timings(timings: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig | None = None) -> list[Finding]:
    """The timing findings of a stored run (``load_timings``)."""
    return TimingDoctor(meta, cfg).update(timings)
