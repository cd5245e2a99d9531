"""Findings from the evaluation audits (``diagnostics.trace.eval_audits``): whether evaluation would stop where training
learned to stop (``eval-halting-mismatch``), and whether the EMA weights are the ones that score (``ema-gap``).

The rules read one row per evaluation and weights (``per_eval``) and hold at the first evaluation that satisfies
them; the finding's ``first_step`` is that evaluation's training step. Offline (``diagnose_evals``, which
``etrm-doctor`` runs beside the step rules) and live (``LiveEvalDoctor``, fed each evaluation's audits by the
trainer) judge the same rows with the same rules, so they name the same step. Thresholds: ``DoctorConfig``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.doctor.eval_regression import eval_regression
from diagnostics.doctor.findings import Finding
from diagnostics.trace.eval_audits import COLUMNS, EMA, RAW, EvalAudit
from diagnostics.events import Mode
from diagnostics.trace.loading import as_json_value
from diagnostics.doctor.thresholds import DoctorConfig

PER_EVAL = ("step", "weights", "exact", "token", "halt_exact", "halt_token", "halt_step", "count", "best_step",
            "best_exact", "exact_curve", "halt_shares", "halt_rule", "config_hash")


def per_eval(audits: pd.DataFrame) -> pd.DataFrame:
    """One row per (eval step, weights) of ``load_eval_audits``' rows: ``exact``/``token`` at the maximum ACT step,
    the would-halt figures, the ACT step with the best exact accuracy, and the per-step curves as lists."""
    rows = []
    for (step, weights), g in audits.sort_values(["step", "weights", "act_step"]).groupby(["step", "weights"]):
        exact = g["exact"].to_numpy(dtype=float)
        best = int(np.nanargmax(exact)) if np.isfinite(exact).any() else len(exact) - 1
        first = g.iloc[0]
        rows.append({"step": int(step), "weights": weights, "exact": exact[-1], "token": float(g["token"].iloc[-1]),
                     "halt_exact": float(first["halt_exact"]), "halt_token": float(first["halt_token"]),
                     "halt_step": float(first["halt_step"]), "count": float(first["count"]),
                     "best_step": int(g["act_step"].iloc[best]), "best_exact": float(exact[best]),
                     "exact_curve": exact.tolist(), "halt_shares": g["halt_share"].astype(float).tolist(),
                     "halt_rule": first["halt_rule"], "config_hash": first["config_hash"]})
    return pd.DataFrame(rows, columns=list(PER_EVAL))


def audit_rows(audits: Iterable[EvalAudit]) -> pd.DataFrame:
    """``EvalAudit`` records as ``load_eval_audits`` returns them (what the live doctor judges)."""
    rows = [{"step": a.step, "weights": a.weights, "act_step": s.act_step, "exact": s.exact, "token": s.token,
             "halt_share": s.halt_share, "halt_exact": a.halt_exact, "halt_token": a.halt_token,
             "halt_step": a.halt_step, "count": a.count, "config_hash": a.config_hash, "halt_rule": a.halt_rule}
            for a in audits for s in a.act_steps]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _train_config(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((meta.get("config") or {}).get("train") or {}) if isinstance(meta, Mapping) else {}


class EvalRule:
    """One evaluation finding: ``judge`` one evaluation's rows (one per weights); ``first`` scans them in order."""

    code = "eval-rule"
    severity = "warning"

    def applies(self, meta: Mapping[str, Any]) -> bool:
        return True

    def judge(self, rows: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig) -> Finding | None:
        raise NotImplementedError

    def first(self, evals: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig) -> Finding | None:
        """The finding at the first evaluation where the rule holds (None when it never does, or does not apply)."""
        if not self.applies(meta) or evals.empty:
            return None
        for _, rows in evals.sort_values("step").groupby("step", sort=True):
            found = self.judge(rows.set_index("weights"), meta, cfg)
            if found is not None:
                return found
        return None

    def make(self, step: int, evidence: dict[str, Any], message: str, severity: str | None = None) -> Finding:
        return Finding(self.code, severity or self.severity, int(step), as_json_value(evidence), message)


class EvalHaltingMismatch(EvalRule):
    """Held-out exact accuracy at the would-halt step (the Q-head's halt under the training rule) far from exact at
    the maximum ACT step, on the evaluated weights: halting would lose answers later steps get right (``premature``),
    or answers degrade past the step the Q-head would stop at (``late``). Not for ``fct`` (its steps are fixed)."""

    code, severity = "eval-halting-mismatch", "warning"

    def applies(self, meta):
        mode = meta.get("mode")
        return mode not in tuple(Mode) or Mode(mode).halts_adaptively

    def judge(self, rows, meta, cfg):
        weights = EMA if EMA in rows.index else RAW
        if weights not in rows.index:
            return None
        r = rows.loc[weights]
        gap = float(r["exact"] - r["halt_exact"])
        if not (r["count"] >= cfg.eval_min_samples and abs(gap) >= cfg.eval_halt_gap):
            return None
        kind = "premature" if gap > 0 else "late"
        step = int(r["step"])
        ev = {"kind": kind, "eval_step": step, "weights": weights, "exact_at_max_step": r["exact"],
              "exact_at_would_halt": r["halt_exact"], "gap": gap, "threshold": cfg.eval_halt_gap,
              "mean_would_halt_step": r["halt_step"], "halt_rule": r["halt_rule"],
              "exact_per_act_step": r["exact_curve"], "would_halt_share_per_act_step": r["halt_shares"],
              "best_act_step": r["best_step"], "samples": int(r["count"]), "mode": meta.get("mode")}
        m = len(r["exact_curve"])
        if kind == "premature":
            msg = (f"held-out exact at the would-halt step ({r['halt_rule']}, mean step {r['halt_step']:.2f}) is "
                   f"{r['halt_exact']:.3f} against {r['exact']:.3f} at the maximum step {m} (eval at step {step}, "
                   f"{weights} weights): the Q-head stops answers that later steps would get right, so the figure "
                   "at max steps overstates what ACT halting delivers")
        else:
            msg = (f"held-out exact at the would-halt step ({r['halt_rule']}, mean step {r['halt_step']:.2f}) is "
                   f"{r['halt_exact']:.3f} against {r['exact']:.3f} at the maximum step {m} (eval at step {step}, "
                   f"{weights} weights): answers get worse after the step the Q-head would stop at (best at ACT "
                   f"step {r['best_step']}), so evaluating at max steps understates the model")
        return self.make(step, ev, msg)


class EMAGap(EvalRule):
    """The EMA weights score clearly worse (warning) or better (info) than the raw weights on the held-out set, at
    an evaluation past the EMA's warm-up (``ema_warmup_time_constants`` time constants of ``train.ema_rate``) or at
    the run's last step. Needs both audits at one evaluation (``train.eval_raw_every``)."""

    code, severity = "ema-gap", "warning"

    def warmup(self, meta: Mapping[str, Any], cfg: DoctorConfig) -> float | None:
        rate = _train_config(meta).get("ema_rate")
        if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            return None
        return cfg.ema_warmup_time_constants / (1.0 - float(rate))

    def judge(self, rows, meta, cfg):
        if EMA not in rows.index or RAW not in rows.index:
            return None
        ema, raw = rows.loc[EMA], rows.loc[RAW]
        step = int(ema["step"])
        warm, last = self.warmup(meta, cfg), meta.get("max_steps")
        judged = (warm is not None and step >= warm) or (isinstance(last, (int, float)) and step >= last)
        gap = float(ema["exact"] - raw["exact"])
        if not (judged and min(ema["count"], raw["count"]) >= cfg.eval_min_samples and abs(gap) >= cfg.ema_gap):
            return None
        worse = gap < 0
        rate = _train_config(meta).get("ema_rate")
        ev = {"direction": "ema-worse" if worse else "ema-better", "eval_step": step, "ema_exact": ema["exact"],
              "raw_exact": raw["exact"], "gap": gap, "threshold": cfg.ema_gap, "ema_halt_exact": ema["halt_exact"],
              "raw_halt_exact": raw["halt_exact"], "ema_rate": rate, "warmup_steps": warm,
              "samples": int(ema["count"]), "mode": meta.get("mode")}
        if worse:
            msg = (f"the EMA weights (rate {rate}) score held-out exact {ema['exact']:.3f} against {raw['exact']:.3f} "
                   f"for the raw weights at step {step}: evaluation and checkpoints use the weaker weights (the "
                   "average still holds weights from earlier in training)")
        else:
            msg = (f"the EMA weights (rate {rate}) score held-out exact {ema['exact']:.3f} against {raw['exact']:.3f} "
                   f"for the raw weights at step {step}: the raw weights are noisy, the average is what scores")
        return self.make(step, ev, msg, severity="warning" if worse else "info")


EVAL_RULES: list[EvalRule] = [EvalHaltingMismatch(), EMAGap()]


def diagnose_evals(audits: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig | None = None,
                   rules: Sequence[EvalRule] | None = None, evals: pd.DataFrame | None = None) -> list[Finding]:
    """The evaluation findings that hold on a run's audits (``load_eval_audits``), one per code (the first); with
    ``evals`` (``load_evals``) also ``eval-regression`` (``diagnostics.doctor.eval_regression``)."""
    cfg = cfg or DoctorConfig()
    rows = per_eval(audits) if len(audits) else pd.DataFrame(columns=list(PER_EVAL))
    found = [f for rule in (EVAL_RULES if rules is None else rules) if (f := rule.first(rows, meta, cfg)) is not None]
    if evals is not None and (f := eval_regression(evals, rows, meta, cfg)) is not None:
        found.append(f)
    return found


class LiveEvalDoctor:
    """The evaluation rules inside a trainer: feed it each evaluation's audits; it returns the findings that hold
    for the first time (evaluations are few, so it re-judges all it has seen)."""

    def __init__(self, meta: Mapping[str, Any], cfg: DoctorConfig | None = None) -> None:
        self.meta, self.cfg = dict(meta), cfg or DoctorConfig()
        self.rows = pd.DataFrame(columns=list(COLUMNS))
        self.evals: pd.DataFrame | None = None  # the evaluations table so far (eval-regression), once one came
        self.findings: list[Finding] = []

    def add_values(self, step: int, values: Mapping[str, float]) -> None:
        """One evaluation's values (``on_eval``), as a row of the evaluations table."""
        row = pd.DataFrame([{k: float(v) for k, v in values.items()}], index=pd.Index([int(step)], name="step"))
        self.evals = row if self.evals is None else pd.concat([self.evals[self.evals.index != int(step)], row])

    def update(self, audits: Iterable[EvalAudit] | pd.DataFrame) -> list[Finding]:
        new = audits if isinstance(audits, pd.DataFrame) else audit_rows(audits)
        if len(new):
            self.rows = new if self.rows.empty else pd.concat([self.rows, new], ignore_index=True)
        reported = {f.code for f in self.findings}
        found = [f for f in diagnose_evals(self.rows, self.meta, self.cfg, evals=self.evals)
                 if f.code not in reported]
        self.findings.extend(found)
        return found

    def replay(self, audits: pd.DataFrame, evals: pd.DataFrame | None = None) -> list[Finding]:
        """Feed a resumed run's stored audits (``load_eval_audits``) and evaluations (``load_evals``): what held
        there is not reported again."""
        if evals is not None and len(evals):
            self.evals = evals.astype(float)
        return self.update(audits)
