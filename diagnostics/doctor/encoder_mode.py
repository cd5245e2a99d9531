"""Encoder work measured, not declared: what the encoder computed against what reached the loss.

Per step the trace holds the rows the encoder computed (``encoded``), the rows whose output got a non-zero gradient,
i.e. reached the loss (``coverage_num``, the coverage hook's count), the reset slots (``resets``) and the slots
(``slots``). Two rules read them, for the bundled trainer and an own loop alike:

- ``wasted-encoder-compute`` (measured): rows computed well above rows that reached the loss, whatever the mode the
  run declares (``encode_needed``, the declared mode's need, stays in the evidence);
- ``mode-mismatch``: the mode observed from which rows reach the loss (only the reset slots: ``cached``; every slot:
  re-encoding) differs from the declared one.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from diagnostics.doctor.coverage_rules import WastedEncoderCompute, WastedEncoderComputeAtStep
from diagnostics.doctor.scan import Rule, safe_div as _div

EVERY_SLOT_MODES = ("reencode", "fct", "trm")  # modes whose every slot's context must reach the loss each step


def observed_mode(declared: str, every: bool) -> str:
    """The mode a step's reach shows: ``cached`` when only reset slots reached the loss, else the every-slot mode
    (the declared one when it is an every-slot mode, else ``reencode``)."""
    if not every:
        return "cached"
    return declared if declared in EVERY_SLOT_MODES else "reencode"


class MeasuredWastedEncoderCompute(WastedEncoderCompute):
    """Rows the encoder computed above ``encode_ratio_max`` x rows that reached the loss, summed over a window."""

    def needs(self, meta, columns):
        return ("encoded", "coverage_num", "encode_needed")

    def holds(self, w, latch, cfg, meta):
        return (w["encoded"] > 0) & (w["encoded"] > cfg.encode_ratio_max * w["coverage_num"])

    def finding(self, at, cfg, meta, extra):
        s, t = at.sums, at.totals
        ratio, reached = _div(s["encoded"], s["coverage_num"]), int(s["coverage_num"])
        ev = {"window": [at.start, at.end], "encoded": int(s["encoded"]), "reached_loss": reached,
              "wasted": int(s["encoded"]) - reached, "encode_needed": int(s["encode_needed"]), "ratio": ratio,
              "threshold": cfg.encode_ratio_max, "run_ratio": _div(t["encoded"], t["coverage_num"]),
              "mode": meta.get("mode")}
        msg = (f"the encoder computed {int(s['encoded'])} rows and {reached} of them reached the loss over steps "
               f"{at.start}..{at.end} (ratio {'inf' if ratio is None else f'{ratio:.2f}'}, threshold "
               f"{cfg.encode_ratio_max}; the declared mode {meta.get('mode')!r} needs {int(s['encode_needed'])}): "
               "encoder work is computed and discarded")
        return self.make(ev, at.end, msg)


class MeasuredWastedEncoderComputeAtStep(WastedEncoderComputeAtStep, MeasuredWastedEncoderCompute):
    """The measured rule on the first step that computes a row that does not reach the loss; it dates the windowed
    rule's finding (``earliest_per_code``). Its window and single-step marking are the declared rule's
    (``WastedEncoderComputeAtStep``), its message the measured one (next in the MRO)."""

    def holds(self, w, latch, cfg, meta):
        return (w["encoded"] > 0) & (w["encoded"] > w["coverage_num"])


class ModeMismatch(Rule):
    """The declared encoder mode against the one observed. A step where some slots continue shows a mode: rows that
    reached the loss = the reset slots (none when none reset and the encoder did not run) shows ``cached``, = every
    slot shows re-encoding. It holds over a window in which the encoder ran and at least ``mode_mismatch_share`` of
    the steps that show a mode show the other one."""

    code, severity = "mode-mismatch", "warning"

    def needs(self, meta, columns):
        return ("encoded", "coverage_num", "resets", "slots")

    def window(self, cfg):
        return cfg.window

    def features(self, cols: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        shows = cols["resets"] < cols["slots"]
        reset_only = shows & (cols["coverage_num"] == cols["resets"])
        every = shows & (cols["coverage_num"] == cols["slots"])
        cached = meta.get("mode") == "cached"
        other, same = (every, reset_only) if cached else (reset_only, every)
        return {"encoded": cols["encoded"], "steps_other": other.astype(float), "steps_same": same.astype(float),
                "steps_reset_only": reset_only.astype(float), "steps_every": every.astype(float)}

    def holds(self, w, latch, cfg, meta):
        shown = w["steps_other"] + w["steps_same"]
        return ((w["encoded"] > 0) & (w["steps_other"] > 0)
                & (w["steps_other"] >= cfg.mode_mismatch_share * shown))

    def finding(self, at, cfg, meta, extra):
        s = at.sums
        declared = str(meta.get("mode"))
        observed = observed_mode(declared, every=declared == "cached")
        ev = {"window": [at.start, at.end], "declared": declared, "observed": observed,
              "steps_reset_only": int(s["steps_reset_only"]), "steps_every_slot": int(s["steps_every"]),
              "threshold": cfg.mode_mismatch_share}
        what = "only the reset slots'" if observed == "cached" else "every slot's"
        msg = (f"the run declares encoder mode {declared!r} but behaves as {observed!r}: on "
               f"{int(s['steps_other'])} of {int(s['steps_other'] + s['steps_same'])} steps in "
               f"{at.start}..{at.end} {what} encoder output reached the loss; the mode-based rules judge by the "
               "declared mode")
        return self.make(ev, at.end, msg)


__all__ = ["EVERY_SLOT_MODES", "MeasuredWastedEncoderCompute", "MeasuredWastedEncoderComputeAtStep", "ModeMismatch",
           "observed_mode"]
