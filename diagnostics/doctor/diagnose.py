"""The offline doctor: the registry of step rules (``RULES``), ``diagnose`` over a steps table and ``summary``.

Rules know the mode (``meta["mode"]``): halting rules never apply to ``fct``. Thresholds live in ``DoctorConfig``
(``diagnostics/doctor/thresholds.py``).

Adding a rule:
1. Subclass ``Rule`` (``diagnostics/doctor/scan.py``) in the module of its family (``coverage_rules``,
   ``halting_rules``, ``integrity_rules``; a new family gets its own ``*_rules.py``): set ``code``/``severity``,
   name the stored columns it ``needs``, its ``window`` (a ``DoctorConfig`` field), ``holds`` (the predicate over
   the window's sums, vectorised) and ``finding`` (evidence and a one-line message).
2. Append an instance to ``RULES`` below (report order); ``diagnose``, ``LiveDoctor`` and ``etrm-doctor`` pick it up.
3. A new threshold goes into ``DoctorConfig``; the rule's code and meaning get a `### code` section under
   docs/diagnostics.md's "The findings".
4. A test in tests/diagnostics/test_doctor.py: the rule fires on its signature at the right first step and stays
   quiet on the healthy runs (``HEALTHY``); the live doctor agrees with ``diagnose`` there.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.doctor.coverage_rules import EncoderCollapse, GradientStarvation, GradientStarvationAtStep
from diagnostics.doctor.encoder_mode import (MeasuredWastedEncoderCompute, MeasuredWastedEncoderComputeAtStep,
                                             ModeMismatch)
from diagnostics.doctor.findings import Finding, earliest_per_code, ordered
from diagnostics.doctor.halting_rules import HaltingCollapse, HaltingNeverLearned
from diagnostics.doctor.integrity_rules import ALIGNMENT_COLUMNS, DroppedSamples, LabelMisalignment, NonFiniteLoss
from diagnostics.doctor.scan import Rule, check
from diagnostics.doctor.spike_rules import GradNormSpike, LossSpike
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace import figures
from diagnostics.trace.loading import as_json_value

# The rules, in report order. A code may have two rules (single-step evidence and its window): the window decides
# whether the finding holds, the single step names where it started. wasted-encoder-compute is measured (rows
# computed vs rows that reached the loss, diagnostics.doctor.encoder_mode), whatever mode the run declares;
# mode-mismatch compares the declared mode with the observed one.
RULES: list[Rule] = [GradientStarvation(), LabelMisalignment(), NonFiniteLoss(), MeasuredWastedEncoderCompute(),
                     HaltingCollapse(), DroppedSamples(), EncoderCollapse(), HaltingNeverLearned(),
                     GradientStarvationAtStep(), MeasuredWastedEncoderComputeAtStep(), ModeMismatch(), LossSpike(),
                     GradNormSpike()]


def gradient_starvation(df, meta=None, cfg=None):
    return check(RULES[0], df, meta, cfg)


def label_misalignment(df, meta=None, cfg=None, alignment=None):
    return check(RULES[1], df, meta, cfg, alignment)


def non_finite_loss(df, meta=None, cfg=None):
    return check(RULES[2], df, meta, cfg)


def wasted_encoder_compute(df, meta=None, cfg=None):
    return check(RULES[3], df, meta, cfg)


def halting_collapse(df, meta=None, cfg=None):
    return check(RULES[4], df, meta, cfg)


def dropped_samples(df, meta=None, cfg=None):
    return check(RULES[5], df, meta, cfg)


def encoder_collapse(df, meta=None, cfg=None):
    return check(RULES[6], df, meta, cfg)


def halting_never_learned(df, meta=None, cfg=None):
    return check(RULES[7], df, meta, cfg)


def diagnose(df: pd.DataFrame, meta: Mapping[str, Any] | None = None, cfg: DoctorConfig | None = None,
             alignment: Sequence[Mapping[str, Any]] | None = None,
             rules: Sequence[Rule] | None = None) -> list[Finding]:
    """Every finding that holds on the steps table, errors first, then by first step."""
    found = earliest_per_code(f for rule in (RULES if rules is None else rules)
                              if (f := check(rule, df, meta, cfg, alignment)) is not None)
    return ordered(found)


def summary(df: pd.DataFrame, meta: Mapping[str, Any] | None = None, status: str | None = None,
            cfg: DoctorConfig | None = None) -> dict[str, Any]:
    """The run in numbers: size, status, counts, and every registered figure (``diagnostics.trace.figures``).

    ``figures``: each figure over every step (a ratio of sums); ``final``: over the last ``cfg.window`` steps
    (``final["window"]`` names them); ``dynamic_halting`` says whether any slot halted before the maximum step.
    """
    meta = df.attrs.get("meta", {}) if meta is None else meta
    cfg = cfg or DoctorConfig()
    mode = meta.get("mode")
    status = status if status is not None else df.attrs.get("status")
    df = df.sort_index()
    last = df.tail(cfg.window)

    def count(*names: str) -> int | None:
        have = [n for n in names if n in df.columns]
        return int(sum(np.nansum(df[n].to_numpy(dtype=float)) for n in have)) if have else None

    run = figures.over(df, mode=mode)
    final = figures.over(last, mode=mode)
    out: dict[str, Any] = {
        "model": meta.get("model"), "mode": mode, "preset": meta.get("preset"),
        "sampler": meta.get("sampler"), "fault": meta.get("fault"), "batch_size": meta.get("batch_size"),
        "max_steps_per_sample": meta.get("max_steps_per_sample"), "status": status,
        "steps": int(len(df)), "first_step": int(df.index.min()) if len(df) else None,
        "last_step": int(df.index.max()) if len(df) else None, "max_steps": meta.get("max_steps"),
        "samples_consumed": count("samples_consumed"), "samples_dropped": count("samples_dropped"),
        "alignment_mismatches": count(*ALIGNMENT_COLUMNS),
        "non_finite_steps": int((df["non_finite"].fillna(0) > 0).sum()) if "non_finite" in df.columns else None,
        "coverage_min": (float(df["coverage"].min()) if "coverage" in df.columns
                         and df["coverage"].notna().any() else None),
        "dynamic_halting": figures.dynamic_halting(run, mode),
        "figures": run,
        "final": {"window": [int(last.index.min()), int(last.index.max())] if len(last) else None, **final},
        "thresholds": cfg.to_dict(),
    }
    return as_json_value(out)
