"""Integrity rules: is each slot trained on its own sample (label misalignment), are loss and gradients finite,
were fed samples dropped."""

from __future__ import annotations

import numpy as np

from diagnostics.doctor.scan import Rule, figure_of


ALIGNMENT_COLUMNS = ("label_mismatch", "demo_mismatch", "carry_mismatch", "label_content_mismatch")


class LabelMisalignment(Rule):
    """Any slot whose loss labels, demos or carried identity belong to another sample."""

    code, severity = "label-misalignment", "error"

    def needs(self, meta, columns):
        return tuple(c for c in ALIGNMENT_COLUMNS if c in columns) or ALIGNMENT_COLUMNS

    def features(self, cols, meta):
        present = self.needs(meta, list(cols))
        out = {c: np.nan_to_num(np.asarray(cols[c], dtype=float)) for c in present}
        out["any"] = sum(out.values())
        return out

    def holds(self, w, latch, cfg, meta):
        return w["any"] > 0

    def finding(self, at, cfg, meta, extra):
        t = at.totals
        ev = {c: int(t[c]) for c in ALIGNMENT_COLUMNS if c in t}
        ev.update(total=int(t["any"]), steps_affected=at.steps_with["any"])
        samples = list(extra.get("alignment_samples") or [])[: cfg.first_samples]
        ev["first_samples"] = [{k: (None if v is None or v != v else int(v)) for k, v in dict(r).items()}
                               for r in samples]
        parts = [f"{ev[c]} {c.split('_')[0]}" for c in ALIGNMENT_COLUMNS if ev.get(c)]
        msg = (f"{ev['total']} slot mismatches ({', '.join(parts)}) over {ev['steps_affected']} steps, from step "
               f"{at.end}: the loss or context of some slots belongs to another sample")
        return self.make(ev, at.end, msg)


LOSS_COLUMNS = ("loss", "lm_loss", "q_halt_loss", "q_continue_loss")
GRAD_COLUMNS = ("grad_norm_encoder", "grad_norm_rest")


class NonFiniteLoss(Rule):
    """A non-finite loss (the step's flag, or an infinite loss term) or gradient norm on any step.

    A NaN is stored as NULL, so a NULL gradient norm counts as non-finite on rows that carry the loss probe's flag
    (a row from a segment without the gradient-norm probe would have no flag for it either way).
    """

    code, severity = "non-finite-loss", "error"

    def needs(self, meta, columns):
        return ("non_finite",)

    def features(self, cols, meta):
        flag = np.asarray(cols["non_finite"], dtype=float)
        bad = np.nan_to_num(flag) > 0
        out: dict[str, np.ndarray] = {}
        for c in LOSS_COLUMNS + GRAD_COLUMNS:
            if c in cols:
                v = np.asarray(cols[c], dtype=float)
                col_bad = np.isinf(v)
                if c in GRAD_COLUMNS:
                    col_bad |= np.isnan(v) & ~np.isnan(flag)
                out[c] = col_bad.astype(float)
                bad |= col_bad
        out["flag"] = (np.nan_to_num(flag) > 0).astype(float)
        out["any"] = bad.astype(float)
        return out

    def holds(self, w, latch, cfg, meta):
        return w["any"] > 0

    def finding(self, at, cfg, meta, extra):
        cols = [c for c in LOSS_COLUMNS + GRAD_COLUMNS if at.sums.get(c, 0) > 0]
        ev = {"steps_affected": at.steps_with["any"], "flagged_steps": at.steps_with["flag"],
              "columns": (["non_finite"] if at.sums.get("flag", 0) > 0 else []) + cols}
        msg = (f"non-finite loss or gradient at step {at.end} ({', '.join(ev['columns'])}); "
               f"{ev['steps_affected']} steps affected")
        return self.make(ev, at.end, msg)


class DroppedSamples(Rule):
    """Fresh samples fed to slots that did not take them (the ``trm`` sampler's feed): a fact, not a defect."""

    code, severity = "dropped-samples", "info"

    def needs(self, meta, columns):
        return ("samples_dropped", "samples_consumed")

    def holds(self, w, latch, cfg, meta):
        return w["samples_dropped"] > 0

    def finding(self, at, cfg, meta, extra):
        t = at.totals
        dropped, consumed = int(t["samples_dropped"]), int(t["samples_consumed"])
        ev = {"samples_dropped": dropped, "samples_consumed": consumed,
              "drop_fraction": figure_of("drop_fraction", t), "steps_affected": at.steps_with["samples_dropped"]}
        msg = (f"{dropped} fresh samples were fed to continuing slots and dropped ({consumed} consumed), from step "
               f"{at.end}: upstream TRM's feed; each sample is seen fewer times than the data loader suggests")
        return self.make(ev, at.end, msg)
