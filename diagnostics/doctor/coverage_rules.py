"""Coverage rules: is the encoder trained (gradient starvation), is its work used (wasted compute), does its
context tell puzzles apart (encoder collapse); plus the single-step rules that date the first two."""

from __future__ import annotations

import numpy as np

from diagnostics.doctor.findings import SINGLE_STEP
from diagnostics.doctor.scan import Rule, figure_of, pct, safe_div
from diagnostics.events import Mode


class GradientStarvation(Rule):
    """Encoder coverage (slots whose fresh encoder output got gradient / B) below ``coverage_min`` over a window."""

    code, severity = "gradient-starvation", "error"

    def needs(self, meta, columns):
        return ("coverage_num", "coverage_den", "resets", "slots")

    def window(self, cfg):
        return cfg.window

    def holds(self, w, latch, cfg, meta):
        return (w["coverage_den"] > 0) & (w["coverage_num"] < cfg.coverage_min * w["coverage_den"])

    def finding(self, at, cfg, meta, extra):
        s, t = at.sums, at.totals
        cov, resets = figure_of("coverage", s), figure_of("reset_fraction", s)
        ev = {"window": [at.start, at.end], "coverage_mean": cov, "reset_fraction_mean": resets,
              "threshold": cfg.coverage_min, "run_coverage_mean": figure_of("coverage", t),
              "run_reset_fraction_mean": figure_of("reset_fraction", t), "mode": meta.get("mode")}
        msg = (f"encoder gradient coverage {pct(cov)} over steps {at.start}..{at.end} (threshold "
               f"{cfg.coverage_min}): most slots' encoder outputs get no gradient")
        if cov is not None and resets is not None and abs(cov - resets) < 1e-9:
            msg += (f"; it equals the reset fraction {pct(resets)}, so only freshly reset slots are trained "
                    "(the signature of a cached, detached context)")
        return self.make(ev, at.end, msg)


class WastedEncoderCompute(Rule):
    """Slots encoded well above slots needed, summed over a window."""

    code, severity = "wasted-encoder-compute", "warning"

    def needs(self, meta, columns):
        return ("encoded", "encode_needed")

    def window(self, cfg):
        return cfg.window

    def holds(self, w, latch, cfg, meta):
        return (w["encoded"] > 0) & (w["encoded"] > cfg.encode_ratio_max * w["encode_needed"])

    def finding(self, at, cfg, meta, extra):
        s, t = at.sums, at.totals
        r = figure_of("encode_ratio", s)
        ev = {"window": [at.start, at.end], "encoded": int(s["encoded"]), "encode_needed": int(s["encode_needed"]),
              "ratio": r, "threshold": cfg.encode_ratio_max, "run_ratio": figure_of("encode_ratio", t),
              "mode": meta.get("mode")}
        msg = (f"the encoder ran on {int(s['encoded'])} slots where {int(s['encode_needed'])} needed it over steps "
               f"{at.start}..{at.end} (ratio {'inf' if r is None else f'{r:.2f}'}, threshold "
               f"{cfg.encode_ratio_max}): encoder work is computed and discarded")
        return self.make(ev, at.end, msg)


class EncoderCollapse(Rule):
    """After a warm-up, the encoder's context is nearly the same for every puzzle: the cross-puzzle share of its
    token-pooled spread (cross-puzzle sum of squares / sum of squared norms, ``ContextDiversityProbe``) stays below
    ``collapse_share_min`` over a window. Only steps whose fresh context covers at least two puzzles are judged
    (cached mode encodes only reset slots). ETRM only: TRM's per-puzzle rows are distinct by construction."""

    code, severity = "encoder-collapse", "warning"

    def applies(self, meta):
        return meta.get("model") != Mode.TRM and meta.get("mode") != Mode.TRM

    def needs(self, meta, columns):
        return ("context_rows", "context_puzzles", "context_cross_ss", "context_sq_norm")

    def window(self, cfg):
        return cfg.collapse_window

    def scan(self, steps, cols, cfg, meta, state, extra=None):
        # the warm-up counts training steps, so the features need the step numbers beside the counters
        after = (np.asarray(steps) > cfg.collapse_warmup).astype(float)
        return super().scan(steps, {**cols, "_after_warmup": after}, cfg, meta, state, extra)

    def features(self, cols, meta):
        judged = ((np.nan_to_num(cols["context_puzzles"]) >= 2)
                  & (np.nan_to_num(cols["context_sq_norm"]) > 0)).astype(float)
        # the counters, kept on judged steps only, under their own names (the registry's figures read them)
        out = {"after_warmup": cols["_after_warmup"], "judged": judged}
        for c in ("context_cross_ss", "context_sq_norm", "context_puzzles", "context_rows", "context_within_ss",
                  "context_ms", "token_ms"):
            if c in cols:
                out[c] = np.nan_to_num(cols[c]) * judged
        return out

    def holds(self, w, latch, cfg, meta):
        return ((w["after_warmup"] >= cfg.collapse_window) & (w["judged"] > 0) & (w["context_sq_norm"] > 0)
                & (w["context_cross_ss"] < cfg.collapse_share_min * w["context_sq_norm"]))

    def finding(self, at, cfg, meta, extra):
        s, t = at.sums, at.totals
        share = figure_of("context_cross_share", s)
        ev = {"window": [at.start, at.end], "cross_puzzle_share": share, "threshold": cfg.collapse_share_min,
              "warmup_steps": cfg.collapse_warmup, "judged_steps": int(s["judged"]),
              "puzzles_per_step": safe_div(s["context_puzzles"], s["judged"]),
              "rows_per_step": safe_div(s["context_rows"], s["judged"]),
              "within_puzzle_share": figure_of("context_within_share", s),
              "context_to_token_rms": figure_of("context_to_token_rms", s),
              "run_cross_puzzle_share": figure_of("context_cross_share", t), "mode": meta.get("mode")}
        msg = (f"the encoder context is nearly identical across puzzles over steps {at.start}..{at.end}: the "
               f"cross-puzzle share of its spread is {share:.2e} (threshold {cfg.collapse_share_min:g}, after "
               f"{cfg.collapse_warmup} warm-up steps, {s['context_puzzles'] / s['judged']:.1f} puzzles per step); the "
               "context ignores the demos, so the model cannot tell tasks apart")
        return self.make(ev, at.end, msg)


class GradientStarvationAtStep(GradientStarvation):
    """``gradient-starvation`` named on the single step where its exact signature first shows: coverage exactly equal
    to the reset fraction, below the threshold, with continuing (not reset) slots present. It dates the finding of
    the windowed rule (which decides, with the run's thresholds, whether it holds): see ``earliest_per_code``."""

    def window(self, cfg):
        return 1

    def holds(self, w, latch, cfg, meta):
        return (super().holds(w, latch, cfg, meta) & (w["resets"] < w["slots"])
                & (w["coverage_num"] * w["slots"] == w["resets"] * w["coverage_den"]))

    def finding(self, at, cfg, meta, extra):
        f = super().finding(at, cfg, meta, extra)
        f.evidence["evidence"] = SINGLE_STEP
        f.message = f.message.replace(f"over steps {at.start}..{at.end}", f"on step {at.end}")
        return f


class WastedEncoderComputeAtStep(WastedEncoderCompute):
    """``wasted-encoder-compute`` on the first step that encodes more slots than it needs (a count, not a
    statistic). It dates the windowed rule's finding, which decides whether it holds (``earliest_per_code``)."""

    def window(self, cfg):
        return 1

    def holds(self, w, latch, cfg, meta):
        return (w["encoded"] > 0) & (w["encoded"] > w["encode_needed"])

    def finding(self, at, cfg, meta, extra):
        f = super().finding(at, cfg, meta, extra)
        f.evidence["evidence"] = SINGLE_STEP
        f.message = f.message.replace(f"over steps {at.start}..{at.end}", f"on step {at.end}")
        return f


