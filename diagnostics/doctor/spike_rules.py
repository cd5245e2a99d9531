"""Spike rules: a step's loss or gradient norm far above its recent robust statistics, before anything is non-finite.

A value spikes when it is above ``median + spike_mads * 1.4826 * MAD`` of the previous ``spike_window`` finite values
and at least ``spike_min_ratio`` (``grad_spike_min_ratio`` for gradient norms) times that median (a nearly flat
curve has a tiny MAD; healthy gradient norms are heavy-tailed). Not a window sum, so these
rules replace ``Rule.scan``: the state carries the last ``spike_window`` values, and live and offline scans agree.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.scan import Rule, ScanState
from diagnostics.doctor.thresholds import DoctorConfig

SPIKES = ("loss-spike", "grad-norm-spike")
MAD_SCALE = 1.4826  # a MAD times this estimates the standard deviation of normal noise


def spike_at(history: np.ndarray, value: float, cfg: DoctorConfig, min_ratio: float) -> tuple[float, float] | None:
    """(median, scaled MAD) of ``history`` when ``value`` spikes above them (and is at least ``min_ratio`` times
    the median), else None (also with too little history)."""
    past = history[np.isfinite(history)]
    if len(past) < cfg.spike_window or not np.isfinite(value):
        return None
    med = float(np.median(past))
    mad = MAD_SCALE * float(np.median(np.abs(past - med)))
    if value > med + cfg.spike_mads * mad and value >= min_ratio * med and value > med:
        return med, mad
    return None


class Spike(Rule):
    """One per-step series judged against the previous ``spike_window`` steps of itself."""

    what = "value"

    def min_ratio(self, cfg: DoctorConfig) -> float:
        return cfg.spike_min_ratio

    def series(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def scan(self, steps: np.ndarray, cols: Mapping[str, np.ndarray], cfg: DoctorConfig, meta: Mapping[str, Any],
             state: ScanState, extra: Mapping[str, Any] | None = None) -> Finding | None:
        new = np.asarray(self.series(cols), dtype=float)
        if not len(new):
            return None
        old = (state.tail or {}).get("v", np.zeros(0))
        joined = np.concatenate([old, new])
        all_steps = np.concatenate([state.tail_steps, np.asarray(steps, dtype=np.int64)])
        w, k = cfg.spike_window, len(old)
        state.tail, state.tail_steps = {"v": joined[-w:]}, all_steps[-w:]
        state.rows += len(new)
        for i in range(k, len(joined)):
            hit = spike_at(joined[max(0, i - w):i], float(joined[i]), cfg, self.min_ratio(cfg))
            if hit is not None:
                med, mad = hit
                step, value = int(all_steps[i]), float(joined[i])
                ev = {"value": value, "median": med, "scaled_mad": mad, "ratio": value / med if med else None,
                      "window": [int(all_steps[max(0, i - w)]), int(all_steps[i - 1])], "spike_mads": cfg.spike_mads}
                msg = (f"{self.what} {value:.4g} at step {step} is {value / med if med else float('inf'):.1f}x the "
                       f"median {med:.4g} of the previous {w} steps (MAD-scaled {mad:.3g}): a sudden jump before "
                       "anything is non-finite (learning rate, a bad batch, an unstable step)")
                return self.make(ev, step, msg)
        return None


class LossSpike(Spike):
    """The per-step loss (``loss``) far above its recent median."""

    code, severity, what = "loss-spike", "warning", "loss"

    def needs(self, meta, columns):
        return ("loss",)

    def series(self, cols):
        return cols["loss"]


class GradNormSpike(Spike):
    """The per-step total gradient norm (encoder and rest, before clipping) far above its recent median."""

    code, severity, what = "grad-norm-spike", "warning", "gradient norm"

    def min_ratio(self, cfg):
        return cfg.grad_spike_min_ratio

    def needs(self, meta, columns):
        return ("grad_norm_encoder", "grad_norm_rest")

    def series(self, cols):
        enc = np.nan_to_num(np.asarray(cols["grad_norm_encoder"], dtype=float), nan=0.0)
        rest = np.asarray(cols["grad_norm_rest"], dtype=float)  # NaN stays NaN: a non-finite step is not judged
        return np.sqrt(enc ** 2 + rest ** 2)
