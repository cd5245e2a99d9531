"""Halting rules: the Q-head collapsed (all halts at step 1, or none before the maximum step) or never learned
to halt. Never for ``fct``, whose slots all run a fixed number of steps."""

from __future__ import annotations

import numpy as np

from diagnostics.doctor.scan import Rule, figure_of, pct, safe_div
from diagnostics.events import Mode


class HaltingCollapse(Rule):
    """Once the Q-head has learned (a window with enough true Q-halts and precision above the base rate), all
    halts at step 1 while most halted answers are wrong (halting before thinking; an easy task solved at step 1 is
    not a collapse), or none before the maximum step although correct sequences were there to halt on.
    Never for ``fct``, whose slots all run a fixed number of steps."""

    code, severity = "halting-collapse", "warning"

    def applies(self, meta):
        return meta.get("mode") != Mode.FCT

    def max_steps(self, meta, columns) -> int | None:
        m = meta.get("max_steps_per_sample")
        if isinstance(m, (int, float)) and m >= 2:
            return int(m)
        ks = [int(c[len("halt_at_"):]) for c in columns if c.startswith("halt_at_") and c[len("halt_at_"):].isdigit()]
        return max(ks) if ks and max(ks) >= 2 else None

    def needs(self, meta, columns):
        m = self.max_steps(meta, columns)
        if m is None:
            return ("halt_at_1", "halt_at_2")  # absent or a one-step run: skipped
        return ("halted", "halt_at_1", f"halt_at_{m}", "q_tp", "q_fp", "q_correct", "real_slots",
                "halted_exact", "halted_count")

    def features(self, cols, meta):
        m = self.max_steps(meta, list(cols))
        out = {c: cols[c] for c in ("halted", "halt_at_1", "q_tp", "q_fp", "q_correct", "real_slots",
                                    "halted_exact", "halted_count")}
        out["halt_at_max"] = cols[f"halt_at_{m}"]
        return out

    def window(self, cfg):
        return cfg.halting_window

    def learned(self, w, cfg):
        said = w["q_tp"] + w["q_fp"]
        return (w["q_tp"] >= cfg.q_min_tp) & (w["q_tp"] * w["real_slots"] > w["q_correct"] * said)

    def holds(self, w, latch, cfg, meta):
        enough = w["halted"] >= cfg.halting_min_halts
        at_one = (w["halt_at_1"] >= cfg.early_halt_share * w["halted"]) & (
            w["halted_exact"] < cfg.premature_exact_share * w["halted_count"])
        never = (w["halt_at_max"] >= w["halted"]) & (w["q_correct"] >= cfg.q_min_tp)
        return enough & (at_one | never)

    def finding(self, at, cfg, meta, extra):
        s = at.sums
        at_one = (s["halt_at_1"] >= cfg.early_halt_share * s["halted"]) and (
            s["halted_exact"] < cfg.premature_exact_share * s["halted_count"])
        kind = "all-halt-at-step-1" if at_one else "none-before-max-steps"
        ev = {"kind": kind, "window": [at.start, at.end], "halts": int(s["halted"]),
              "halts_at_step_1": int(s["halt_at_1"]), "halts_at_max_steps": int(s["halt_at_max"]),
              "share_at_step_1": safe_div(s["halt_at_1"], s["halted"]), "q_precision": figure_of("q_precision", s),
              "halted_exact_share": figure_of("exact_halted", s), "q_base_rate": figure_of("q_base_rate", s),
              "q_learned_at": at.latch_step,
              "max_steps_per_sample": self.max_steps(meta, [])}
        if at_one:
            msg = (f"{ev['halts_at_step_1']} of {ev['halts']} halts at step 1 over steps {at.start}..{at.end} with "
                   f"only {pct(ev['halted_exact_share'])} of halted answers right, after the Q-head had learned "
                   f"(step {at.latch_step}): halting collapsed to one step")
        else:
            msg = (f"no slot halted before the maximum step over steps {at.start}..{at.end}, with "
                   f"{int(s['q_correct'])} correct sequences to halt on, after the Q-head had learned (step "
                   f"{at.latch_step}): halting collapsed to never")
        return self.make(ev, at.end, msg)


class HaltingNeverLearned(HaltingCollapse):
    """The case ``halting-collapse`` skips (it waits for the Q-head to have learned): after a warm-up (a share of the
    planned steps), over a window, slots halt only at the maximum step and the Q-head has never asked to halt in the
    whole run so far (its halt logit stayed below its threshold). Never for ``fct``."""

    code, severity = "halting-never-learned", "warning"

    def needs(self, meta, columns):
        m = self.max_steps(meta, columns)
        if m is None:
            return ("halt_at_1", "halt_at_2")  # absent or a one-step run: skipped
        return ("halted", f"halt_at_{m}", "q_says_halt", "q_correct", "real_slots")

    def warmup(self, meta, cfg) -> int:
        planned = meta.get("max_steps")
        share = cfg.never_halt_warmup_share * planned if isinstance(planned, (int, float)) else 0
        return max(int(cfg.never_halt_warmup_min), int(share))

    def scan(self, steps, cols, cfg, meta, state, extra=None):
        # "never asked" is over the whole run so far, "after warm-up" over training steps: both need the rows'
        # running state beside the counters (the Q-halt requests before this chunk are in state.totals)
        said = np.nan_to_num(np.asarray(cols["q_says_halt"], dtype=float))
        so_far = state.totals.get("said", 0.0) + np.cumsum(said)
        after = (np.asarray(steps) > self.warmup(meta, cfg)).astype(float)
        return super().scan(steps, {**cols, "_said_so_far": so_far, "_after_warmup": after}, cfg, meta, state, extra)

    def features(self, cols, meta):
        m = self.max_steps(meta, list(cols))
        out = {"halted": cols["halted"], "halt_at_max": cols[f"halt_at_{m}"], "said": cols["q_says_halt"],
               "said_so_far": cols["_said_so_far"], "after_warmup": cols["_after_warmup"],
               "q_correct": cols["q_correct"], "real_slots": cols["real_slots"]}
        if "q_halt_logit_sum" in cols:
            out["q_logit"] = cols["q_halt_logit_sum"]
        return out

    def learned(self, w, cfg):
        return None

    def holds(self, w, latch, cfg, meta):
        return ((w["after_warmup"] >= cfg.halting_window) & (w["halted"] >= cfg.halting_min_halts)
                & (w["halt_at_max"] >= w["halted"]) & (w["said_so_far"] == 0))

    def finding(self, at, cfg, meta, extra):
        s, t = at.sums, at.totals
        logit = safe_div(s["q_logit"], s["real_slots"]) if "q_logit" in s else None
        bias = ((meta.get("config") or {}).get("arch") or {}).get("q_init_bias")  # the run's config, when traced
        ev = {"window": [at.start, at.end], "warmup_steps": self.warmup(meta, cfg), "halts": int(s["halted"]),
              "halts_at_max_steps": int(s["halt_at_max"]), "q_halt_requests_in_run": int(t["said"]),
              "q_halt_logit_mean": logit, "run_q_halt_logit_mean": (safe_div(t["q_logit"], t["real_slots"])
                                                                   if "q_logit" in t else None),
              "q_bias_init": bias, "correct_to_halt_on": int(s["q_correct"]),
              "q_base_rate": safe_div(s["q_correct"], s["real_slots"]),
              "max_steps_per_sample": self.max_steps(meta, []), "mode": meta.get("mode")}
        causes = []
        if isinstance(bias, (int, float)) and bias < 0:
            causes.append(f"the Q-head's initialisation (halt bias {bias:g}: every slot starts at 'continue')")
        causes.append("exploration or a learning signal too weak to move it (loss.q_weight, "
                      "act.halt_exploration_prob)")
        causes.append("a task too hard for this budget" + (" (no answer in the window was right to halt on)"
                                                           if not s["q_correct"] else ""))
        msg = (f"no slot halted before the maximum step over steps {at.start}..{at.end}, and the Q-head has not "
               f"asked to halt once in the run (mean q-halt logit "
               f"{'n/a' if logit is None else f'{logit:.2f}'}, threshold 0): halting never learned, so every sample "
               f"pays the full {ev['max_steps_per_sample']} steps; likely causes: {'; '.join(causes)}")
        return self.make(ev, at.end, msg)
