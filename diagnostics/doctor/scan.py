"""The scan every step rule shares, offline and live (design.md, "Findings").

Every rule is a window rule: it sums a few per-step features over a window of consecutive steps (1 for per-step
rules) and holds on the first full window whose sums satisfy its predicate; the finding's ``first_step`` is the last
step of that window (the step at which a live reader first knows). ``Rule.scan`` serves both the offline doctor
(``check``: the whole steps table at once) and ``LiveDoctor`` (the rows of each flush, with a carried tail of the
last window and running totals in a ``ScanState``), so both report the same code and first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace import figures
from diagnostics.trace.loading import as_json_value


@dataclass
class ScanState:
    """What a rule carries between chunks: the last window-1 rows of its features, totals, latches."""

    tail: dict[str, np.ndarray] | None = None
    tail_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    steps_with: dict[str, int] = field(default_factory=dict)
    latch: bool = False
    latch_step: int | None = None


@dataclass
class Window:
    """Sums of features over the window that ends at one step, plus run totals (whole run offline, so far live)."""

    start: int
    end: int
    sums: dict[str, float]
    totals: dict[str, float]
    steps_with: dict[str, int]
    latch_step: int | None = None


class Rule:
    """One finding. Subclasses set ``code``/``severity`` and implement ``features``, ``holds`` and ``finding``."""

    code = "rule"
    severity = "warning"

    def applies(self, meta: Mapping[str, Any]) -> bool:
        return True

    def needs(self, meta: Mapping[str, Any], columns: Sequence[str]) -> tuple[str, ...]:
        """Stored columns required; the rule is skipped when one is missing."""
        return ()

    def window(self, cfg: DoctorConfig) -> int:
        return 1

    def features(self, cols: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Per-step values to sum over the window (NaN counts as 0)."""
        return {name: cols[name] for name in self.needs(meta, list(cols))}

    def learned(self, w: dict[str, np.ndarray], cfg: DoctorConfig) -> np.ndarray | None:
        """An optional latch: once it held on a full window, it stays (e.g. the Q-head has learned)."""
        return None

    def holds(self, w: dict[str, np.ndarray], latch: np.ndarray, cfg: DoctorConfig,
              meta: Mapping[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def finding(self, at: Window, cfg: DoctorConfig, meta: Mapping[str, Any], extra: Mapping[str, Any]) -> Finding:
        raise NotImplementedError

    def make(self, evidence: dict[str, Any], first_step: int, message: str) -> Finding:
        return Finding(self.code, self.severity, int(first_step), as_json_value(evidence), message)

    # -- the scan ------------------------------------------------------------------------------------------------
    def scan(self, steps: np.ndarray, cols: Mapping[str, np.ndarray], cfg: DoctorConfig, meta: Mapping[str, Any],
             state: ScanState, extra: Mapping[str, Any] | None = None) -> Finding | None:
        """Consume new rows (``steps`` ascending); return the finding if it holds for the first time in them."""
        n = len(steps)
        if n == 0:
            return None
        feats = {k: np.nan_to_num(np.asarray(v, dtype=float), nan=0.0, posinf=np.inf, neginf=-np.inf)
                 for k, v in self.features(cols, meta).items()}
        w = self.window(cfg)
        tail = state.tail or {}
        k = len(state.tail_steps)
        joined = {name: np.concatenate([tail.get(name, np.zeros(k)), v]) for name, v in feats.items()}
        all_steps = np.concatenate([state.tail_steps, np.asarray(steps, dtype=np.int64)])
        sums = {name: rolling_sum(v, w)[k:] for name, v in joined.items()}
        # a window is full once w rows were seen in total
        valid = (state.rows + np.arange(1, n + 1)) >= w
        prefix = {name: np.cumsum(v) + state.totals.get(name, 0.0) for name, v in feats.items()}
        hits = {name: np.cumsum(v > 0) + state.steps_with.get(name, 0) for name, v in feats.items()}
        learned = self.learned(sums, cfg)
        if learned is None:
            latch = np.ones(n, dtype=bool)
        else:
            latch = np.logical_or.accumulate((learned & valid) | state.latch)
        held = self.holds(sums, latch, cfg, meta) & valid & latch
        # carry the state past this chunk
        if learned is not None and state.latch_step is None and latch.any():
            state.latch_step = int(steps[int(np.argmax(latch))])
        state.latch = bool(latch[-1])
        state.rows += n
        state.totals = {name: float(v[-1]) for name, v in prefix.items()}
        state.steps_with = {name: int(v[-1]) for name, v in hits.items()}
        cut = max(len(all_steps) - (w - 1), 0)  # keep the last w-1 rows
        state.tail = {name: v[cut:] for name, v in joined.items()}
        state.tail_steps = all_steps[cut:]
        if not held.any():
            return None
        i = int(np.argmax(held))
        start_index = k + i - (w - 1)
        start = int(all_steps[start_index]) if start_index >= 0 else int(steps[0])
        at = Window(start=start, end=int(steps[i]), sums={name: float(v[i]) for name, v in sums.items()},
                     totals=dict(state.totals), steps_with=dict(state.steps_with), latch_step=state.latch_step)
        return self.finding(at, cfg, meta, extra or {})


def rolling_sum(v: np.ndarray, w: int) -> np.ndarray:
    """Sum of the last ``w`` values at each position (fewer at the start); exact for integer-valued counts."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    return c[idx] - c[np.maximum(idx - w, 0)]


def figure_of(name: str, sums: Mapping[str, float]) -> float | None:
    """A registered figure (``diagnostics.trace.figures``) from window or run sums; None where it is undefined."""
    v = figures.value(figures.REGISTRY[name], sums)
    return None if v != v else v


def safe_div(num: float, den: float) -> float | None:
    return num / den if den else None


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"



def _columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: df[c].to_numpy(dtype=float) for c in df.columns if pd.api.types.is_numeric_dtype(df[c])}


def check(rule: Rule, df: pd.DataFrame, meta: Mapping[str, Any] | None = None, cfg: DoctorConfig | None = None,
          alignment: Sequence[Mapping[str, Any]] | None = None) -> Finding | None:
    """Run one rule over a steps table (indexed by step); None when it does not apply, lacks columns or never holds."""
    meta = df.attrs.get("meta", {}) if meta is None else meta
    cfg = cfg or DoctorConfig()
    cols = _columns(df)
    if not rule.applies(meta) or any(c not in cols for c in rule.needs(meta, list(cols))):
        return None
    df_steps = df.index.to_numpy(dtype=np.int64)
    order = np.argsort(df_steps, kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    if alignment is None:
        alignment = df.attrs.get("alignment_samples", [])
    return rule.scan(df_steps[order], cols, cfg, meta, ScanState(), {"alignment_samples": alignment})
