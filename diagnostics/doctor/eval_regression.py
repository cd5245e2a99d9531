"""``eval-regression``: the held-out score at an evaluation fell clearly below the run's best and stayed there.

Reads the evaluations table (``load_evals``: one row per evaluation step, one column per metric), so a run's own
evaluations and an ``etrm-eval`` series of kept checkpoints are judged alike: ``exact`` (and ARC's ``arc.pass@K``)
of the evaluated weights (EMA when ``train.ema``), and the raw weights' ``exact`` from the evaluation audits, each
series on its own. It holds at the first evaluation at least ``eval_drop_evals`` evaluations after a series' peak
whose score is at least ``eval_drop_min`` below it; the message says where the best checkpoint is.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from diagnostics.doctor.findings import Finding
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.eval_audits import EMA, RAW
from diagnostics.trace.loading import as_json_value

CODE = "eval-regression"
BEST_FILE = "checkpoint_best.pt"  # etrm.train.retention keeps it (train.keep_best); named here for the message


def _train(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((meta.get("config") or {}).get("train") or {}) if isinstance(meta, Mapping) else {}


def series(evals: pd.DataFrame, per_eval: pd.DataFrame, meta: Mapping[str, Any],
           cfg: DoctorConfig) -> dict[tuple[str, str], pd.Series]:
    """(weights, metric) -> score by evaluation step, over evaluations of at least ``eval_min_samples`` samples."""
    out: dict[tuple[str, str], pd.Series] = {}
    weights = EMA if _train(meta).get("ema", True) else RAW
    if evals is not None and len(evals):
        ev = evals.sort_index()
        if "count" in ev.columns:
            ev = ev[ev["count"].fillna(0) >= cfg.eval_min_samples]
        for metric in [c for c in ev.columns if c == "exact" or str(c).startswith("arc.pass@")]:
            out[(weights, metric)] = ev[metric].astype(float).dropna()
    if weights == EMA and per_eval is not None and len(per_eval):
        raw = per_eval[(per_eval["weights"] == RAW) & (per_eval["count"] >= cfg.eval_min_samples)]
        if len(raw):
            out[(RAW, "exact")] = raw.set_index("step")["exact"].astype(float).sort_index().dropna()
    return out


def first_drop(scores: pd.Series, cfg: DoctorConfig) -> dict[str, Any] | None:
    """The first evaluation ``eval_drop_evals`` or more after the peak so far, ``eval_drop_min`` or more below it."""
    best, best_step, since = -np.inf, None, 0
    for step, value in scores.items():
        if not np.isfinite(value):
            continue
        if value > best:
            best, best_step, since = float(value), int(step), 0
            continue
        since += 1
        if since >= cfg.eval_drop_evals and best - value >= cfg.eval_drop_min:
            return {"step": int(step), "value": float(value), "best_step": best_step, "best": best,
                    "drop": best - float(value), "evals_since_best": since}
    return None


def where_best(meta: Mapping[str, Any], best_step: int) -> str:
    """Where the run keeps the best checkpoint (the retention policy it was trained with)."""
    tc = _train(meta)
    if tc.get("keep_best"):
        return (f"the best checkpoint by {tc.get('best_metric', 'exact')} is {BEST_FILE} in the run directory "
                "(checkpoint.pt stays the resume point)")
    if tc.get("keep_checkpoints") == "every-eval":
        return f"its checkpoint is checkpoint_step_{best_step}.pt in the run directory"
    return ("only the latest checkpoint (checkpoint.pt) is kept, so the peak's weights are gone: train.keep_best=true "
            f"keeps {BEST_FILE}")


def eval_regression(evals: pd.DataFrame, per_eval: pd.DataFrame, meta: Mapping[str, Any],
                    cfg: DoctorConfig | None = None) -> Finding | None:
    """The finding at the earliest evaluation where any series dropped; evidence lists every series that did."""
    cfg = cfg or DoctorConfig()
    drops = {key: d for key, s in series(evals, per_eval, meta, cfg).items() if (d := first_drop(s, cfg))}
    if not drops:
        return None
    (weights, metric), d = min(drops.items(), key=lambda kv: (kv[1]["step"], kv[0][0] != EMA))
    ev = {**d, "weights": weights, "metric": metric, "threshold": cfg.eval_drop_min,
          "evals_threshold": cfg.eval_drop_evals,
          "series": [{"weights": w, "metric": m, **x} for (w, m), x in sorted(drops.items())]}
    msg = (f"held-out {metric} of the {weights} weights peaked at {d['best']:.3f} at step {d['best_step']} and is "
           f"{d['value']:.3f} at step {d['step']} ({100 * d['drop']:.1f} points lower, {d['evals_since_best']} "
           f"evaluations later); {where_best(meta, d['best_step'])}")
    return Finding(CODE, "warning", d["step"], as_json_value(ev), msg)
