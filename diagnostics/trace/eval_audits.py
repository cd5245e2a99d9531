"""Evaluation audits: what one evaluation of one set of weights found at every ACT step (trace schema version 3).

An audit is one evaluation (a training step) of one set of weights (``ema`` or ``raw``): the would-halt step's
accuracy under the run's "Q says halt" rule (``halt_rule``, ``diagnostics.events.q_halt_rule``), the config hash it
ran under, and per ACT step k = 1..max the exact and token accuracy of the answer at step k and the share of samples
whose would-halt step is k. The trainer builds them (``etrm.train.evaluate``); the store writes them
(``TraceWriter.write_eval_audits``); ``diagnostics.trace.loading.load_eval_audits`` reads them back. Pure data: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

EMA, RAW = "ema", "raw"  # the weights an audit evaluated
EVALUATED_FROM = "evaluated_from"  # the meta key of an ``etrm-eval`` run (evaluations only): the source it read
WEIGHTS = (EMA, RAW)
# The per-ACT-step keys of ``etrm.train.evaluate.evaluate``'s result (means over samples, like every key there).
ACT_PREFIX = "act."
ACT_FIELDS = ("exact", "token", "halts")


def act_key(k: int, what: str) -> str:
    """``act.<k>.<what>``: the mean over samples of ``what`` at ACT step ``k`` (1-based)."""
    return f"{ACT_PREFIX}{int(k)}.{what}"


@dataclass(frozen=True)
class ActStep:
    """One ACT step of one audit: exact and token accuracy of the answer there, and the share of samples whose
    would-halt step it is."""

    act_step: int
    exact: float
    token: float
    halt_share: float


@dataclass(frozen=True)
class EvalAudit:
    """One evaluation of one set of weights (see the module docstring)."""

    step: int
    weights: str
    config_hash: str
    halt_rule: str
    count: float
    halt_exact: float
    halt_token: float
    halt_step: float
    act_steps: tuple[ActStep, ...] = field(default_factory=tuple)

    @classmethod
    def from_values(cls, step: int, weights: str, values: Mapping[str, float], config_hash: str,
                    halt_rule: str) -> "EvalAudit":
        """From an evaluation's result (``count``, ``halt.*`` and ``act.<k>.*`` keys)."""
        ks = sorted({int(key.split(".")[1]) for key in values if key.startswith(ACT_PREFIX)})
        steps = tuple(ActStep(k, float(values[act_key(k, "exact")]), float(values[act_key(k, "token")]),
                              float(values[act_key(k, "halts")])) for k in ks)
        return cls(int(step), weights, config_hash, halt_rule, float(values["count"]), float(values["halt.exact"]),
                   float(values["halt.token"]), float(values["halt.step"]), steps)

    @property
    def exact_at_max(self) -> float:
        """Exact accuracy at the maximum ACT step (what evaluation reports as ``exact``)."""
        return self.act_steps[-1].exact if self.act_steps else float("nan")


def without_act_steps(values: Mapping[str, float]) -> dict[str, float]:
    """An evaluation's result without its per-ACT-step keys (those go to the audit tables, not ``evals``)."""
    return {k: v for k, v in values.items() if not k.startswith(ACT_PREFIX)}


# The columns of ``load_eval_audits``: one row per (eval step, weights, ACT step).
COLUMNS = ("step", "weights", "act_step", "exact", "token", "halt_share", "halt_exact", "halt_token", "halt_step",
           "count", "config_hash", "halt_rule")
