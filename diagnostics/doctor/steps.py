"""The doctor: rules that turn per-step counters into findings (design.md, "Findings").

Every rule is a window rule: it sums a few per-step features over a window of consecutive steps (1 for per-step
rules) and holds on the first full window whose sums satisfy its predicate; the finding's ``first_step`` is the last
step of that window (the step at which a live reader first knows). One scan function serves both the offline doctor
(``diagnose``: the whole steps table at once) and ``LiveDoctor`` (the rows of each flush, with a carried tail of the
last window and running totals), so both report the same code and first step.

Rules know the mode (``meta["mode"]``): halting rules never apply to ``fct``. Thresholds live in ``DoctorConfig``.
Adding a rule: subclass ``Rule`` and append an instance to ``RULES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.trace import figures
from diagnostics.events import Mode
from diagnostics.trace.loading import as_json_value
from diagnostics.doctor.thresholds import DoctorConfig

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """A named problem: stable code, severity, the first step where it held, its evidence (numbers) and a message."""

    code: str
    severity: str
    first_step: int | None
    evidence: dict[str, Any]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return as_json_value(asdict(self))

    def store(self, writer: Any) -> None:
        """Write into a run's findings table (a ``TraceWriter``; e.g. ``tracer.submit(finding.store)``)."""
        writer.write_finding(self.code, self.severity, self.first_step, as_json_value(self.evidence), self.message)


# ------------------------------------------------------------------------------------------------------------------
# The scan shared by offline and live use

@dataclass
class _State:
    """What a rule carries between chunks: the last window-1 rows of its features, totals, latches."""

    tail: dict[str, np.ndarray] | None = None
    tail_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    steps_with: dict[str, int] = field(default_factory=dict)
    latch: bool = False
    latch_step: int | None = None


@dataclass
class _Window:
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

    def finding(self, at: _Window, cfg: DoctorConfig, meta: Mapping[str, Any], extra: Mapping[str, Any]) -> Finding:
        raise NotImplementedError

    def make(self, evidence: dict[str, Any], first_step: int, message: str) -> Finding:
        return Finding(self.code, self.severity, int(first_step), as_json_value(evidence), message)

    # -- the scan ------------------------------------------------------------------------------------------------
    def scan(self, steps: np.ndarray, cols: Mapping[str, np.ndarray], cfg: DoctorConfig, meta: Mapping[str, Any],
             state: _State, extra: Mapping[str, Any] | None = None) -> Finding | None:
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
        sums = {name: _rolling_sum(v, w)[k:] for name, v in joined.items()}
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
        at = _Window(start=start, end=int(steps[i]), sums={name: float(v[i]) for name, v in sums.items()},
                     totals=dict(state.totals), steps_with=dict(state.steps_with), latch_step=state.latch_step)
        return self.finding(at, cfg, meta, extra or {})


def _rolling_sum(v: np.ndarray, w: int) -> np.ndarray:
    """Sum of the last ``w`` values at each position (fewer at the start); exact for integer-valued counts."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    return c[idx] - c[np.maximum(idx - w, 0)]


def _fig(name: str, sums: Mapping[str, float]) -> float | None:
    """A registered figure (``diagnostics.trace.figures``) from window or run sums; None where it is undefined."""
    v = figures.value(figures.REGISTRY[name], sums)
    return None if v != v else v


def _div(num: float, den: float) -> float | None:
    return num / den if den else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------------------------------------------
# The rules (design.md's table)

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
        cov, resets = _fig("coverage", s), _fig("reset_fraction", s)
        ev = {"window": [at.start, at.end], "coverage_mean": cov, "reset_fraction_mean": resets,
              "threshold": cfg.coverage_min, "run_coverage_mean": _fig("coverage", t),
              "run_reset_fraction_mean": _fig("reset_fraction", t), "mode": meta.get("mode")}
        msg = (f"encoder gradient coverage {_pct(cov)} over steps {at.start}..{at.end} (threshold "
               f"{cfg.coverage_min}): most slots' encoder outputs get no gradient")
        if cov is not None and resets is not None and abs(cov - resets) < 1e-9:
            msg += (f"; it equals the reset fraction {_pct(resets)}, so only freshly reset slots are trained "
                    "(the signature of a cached, detached context)")
        return self.make(ev, at.end, msg)


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
        r = _fig("encode_ratio", s)
        ev = {"window": [at.start, at.end], "encoded": int(s["encoded"]), "encode_needed": int(s["encode_needed"]),
              "ratio": r, "threshold": cfg.encode_ratio_max, "run_ratio": _fig("encode_ratio", t),
              "mode": meta.get("mode")}
        msg = (f"the encoder ran on {int(s['encoded'])} slots where {int(s['encode_needed'])} needed it over steps "
               f"{at.start}..{at.end} (ratio {'inf' if r is None else f'{r:.2f}'}, threshold "
               f"{cfg.encode_ratio_max}): encoder work is computed and discarded")
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
              "share_at_step_1": _div(s["halt_at_1"], s["halted"]), "q_precision": _fig("q_precision", s),
              "halted_exact_share": _fig("exact_halted", s), "q_base_rate": _fig("q_base_rate", s), "q_learned_at": at.latch_step,
              "max_steps_per_sample": self.max_steps(meta, [])}
        if at_one:
            msg = (f"{ev['halts_at_step_1']} of {ev['halts']} halts at step 1 over steps {at.start}..{at.end} with "
                   f"only {_pct(ev['halted_exact_share'])} of halted answers right, after the Q-head had learned "
                   f"(step {at.latch_step}): halting collapsed to one step")
        else:
            msg = (f"no slot halted before the maximum step over steps {at.start}..{at.end}, with "
                   f"{int(s['q_correct'])} correct sequences to halt on, after the Q-head had learned (step "
                   f"{at.latch_step}): halting collapsed to never")
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
              "drop_fraction": _fig("drop_fraction", t), "steps_affected": at.steps_with["samples_dropped"]}
        msg = (f"{dropped} fresh samples were fed to continuing slots and dropped ({consumed} consumed), from step "
               f"{at.end}: upstream TRM's feed; each sample is seen fewer times than the data loader suggests")
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
        share = _fig("context_cross_share", s)
        ev = {"window": [at.start, at.end], "cross_puzzle_share": share, "threshold": cfg.collapse_share_min,
              "warmup_steps": cfg.collapse_warmup, "judged_steps": int(s["judged"]),
              "puzzles_per_step": _div(s["context_puzzles"], s["judged"]),
              "rows_per_step": _div(s["context_rows"], s["judged"]),
              "within_puzzle_share": _fig("context_within_share", s),
              "context_to_token_rms": _fig("context_to_token_rms", s),
              "run_cross_puzzle_share": _fig("context_cross_share", t), "mode": meta.get("mode")}
        msg = (f"the encoder context is nearly identical across puzzles over steps {at.start}..{at.end}: the "
               f"cross-puzzle share of its spread is {share:.2e} (threshold {cfg.collapse_share_min:g}, after "
               f"{cfg.collapse_warmup} warm-up steps, {s['context_puzzles'] / s['judged']:.1f} puzzles per step); the "
               "context ignores the demos, so the model cannot tell tasks apart")
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
        logit = _div(s["q_logit"], s["real_slots"]) if "q_logit" in s else None
        bias = ((meta.get("config") or {}).get("arch") or {}).get("q_init_bias")  # the run's config, when traced
        ev = {"window": [at.start, at.end], "warmup_steps": self.warmup(meta, cfg), "halts": int(s["halted"]),
              "halts_at_max_steps": int(s["halt_at_max"]), "q_halt_requests_in_run": int(t["said"]),
              "q_halt_logit_mean": logit, "run_q_halt_logit_mean": (_div(t["q_logit"], t["real_slots"])
                                                                   if "q_logit" in t else None),
              "q_bias_init": bias, "correct_to_halt_on": int(s["q_correct"]),
              "q_base_rate": _div(s["q_correct"], s["real_slots"]),
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


SINGLE_STEP = "single step"  # the evidence marker of a single-step rule's finding


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


# The rules, in report order. A code may have two rules (single-step evidence and its window): the window decides
# whether the finding holds, the single step names where it started.
RULES: list[Rule] = [GradientStarvation(), LabelMisalignment(), NonFiniteLoss(), WastedEncoderCompute(),
                     HaltingCollapse(), DroppedSamples(), EncoderCollapse(), HaltingNeverLearned(),
                     GradientStarvationAtStep(), WastedEncoderComputeAtStep()]


def _register_encoder_mode() -> None:
    """The measured encoder-work rules (diagnostics.doctor.encoder_mode) replace the declared ones; mode-mismatch."""
    from diagnostics.doctor import encoder_mode as em

    RULES[3], RULES[9] = em.MeasuredWastedEncoderCompute(), em.MeasuredWastedEncoderComputeAtStep()
    RULES.append(em.ModeMismatch())


_register_encoder_mode()


def earliest_per_code(findings: Iterable[Finding], pending: dict[str, Finding] | None = None) -> list[Finding]:
    """One finding per code, the earliest. A single-step finding (``"evidence": "single step"``) only dates a
    finding: it is reported when its code's windowed rule holds too (the thresholds decide whether a finding
    holds; the exact signature names the step it started), with that window in ``evidence["confirmed_window"]``.
    Unconfirmed ones wait in ``pending`` (the live doctor keeps them across flushes) or are dropped (offline)."""
    pending = {} if pending is None else pending
    best: dict[str, Finding] = {}
    for f in findings:
        if f.evidence.get("evidence") == SINGLE_STEP:
            if f.code not in pending or (f.first_step or 0) < (pending[f.code].first_step or 0):
                pending[f.code] = f
        elif f.code not in best or (f.first_step or 0) < (best[f.code].first_step or 0):
            best[f.code] = f
    out = []
    for code, f in best.items():
        early = pending.pop(code, None)
        if early is not None and (early.first_step or 0) <= (f.first_step or 0):
            early.evidence["confirmed_window"] = f.evidence.get("window")
            f = early
        out.append(f)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Offline

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
    return rule.scan(df_steps[order], cols, cfg, meta, _State(), {"alignment_samples": alignment})


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


def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Findings in report order: errors first, then by first step."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.first_step or 0))


def has_error(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


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


# ------------------------------------------------------------------------------------------------------------------
# Live

class LiveDoctor:
    """The doctor inside a trainer: feed it each flush's rows; it returns the findings that hold for the first time.

    Cheap: per rule it keeps only the last window of its features, running totals and a latch, so memory and time
    per flush do not grow with the run. Its findings have the same code and first step as ``diagnose`` on the stored
    steps table; their evidence is over the steps seen so far.

        doctor = LiveDoctor(meta)                 # the meta written to the trace (model, mode, max_steps_per_sample)
        for f in doctor.update(tracer.flush()):   # rows: dicts of counter -> value, with "step"
            reporter.warn(f"{f.code}: {f.message}")
            tracer.submit(f.store)
    """

    def __init__(self, meta: Mapping[str, Any], cfg: DoctorConfig | None = None,
                 rules: Sequence[Rule] | None = None) -> None:
        self.meta = dict(meta)
        self.cfg = cfg or DoctorConfig()
        self.rules = [r for r in (RULES if rules is None else rules) if r.applies(self.meta)]
        self.states = {id(r): _State() for r in self.rules}
        self.findings: list[Finding] = []
        self.pending: dict[str, Finding] = {}  # single-step findings their windowed rule has not confirmed yet
        self.alignment: list[dict[str, Any]] = []
        self.last_step: int | None = None

    def update(self, rows: Sequence[Mapping[str, float]],
               alignment: Sequence[Sequence[int] | Mapping[str, Any]] | None = None) -> list[Finding]:
        """Consume rows (ascending steps; steps at or before the last one seen are ignored); new findings only."""
        if alignment:
            keys = ("step", "slot", "sample_id", "label_sample_id", "demo_sample_id")
            room = self.cfg.first_samples - len(self.alignment)
            for r in list(alignment)[:max(room, 0)]:
                self.alignment.append(dict(r) if isinstance(r, Mapping) else dict(zip(keys, r)))
        rows = sorted((r for r in rows if self.last_step is None or r["step"] > self.last_step),
                      key=lambda r: r["step"])
        if not rows:
            return []
        self.last_step = int(rows[-1]["step"])
        steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
        names = set().union(*(r.keys() for r in rows)) - {"step"}
        cols = {c: np.array([_float(r.get(c)) for r in rows]) for c in names}
        fired = {f.code for f in self.findings}
        new: list[Finding] = []
        for rule in self.rules:
            if rule.code in fired or any(c not in cols for c in rule.needs(self.meta, list(cols))):
                continue
            f = rule.scan(steps, cols, self.cfg, self.meta, self.states[id(rule)],
                          {"alignment_samples": self.alignment})
            if f is not None:
                new.append(f)
        new = earliest_per_code(new, self.pending)
        self.findings.extend(new)
        return new

    def replay(self, df: pd.DataFrame) -> list[Finding]:
        """Feed a stored steps table (``load_run`` of the run being resumed) so windows and latches continue across
        the resume; returns the findings that held in it (already reported, not to be warned about again)."""
        if not len(df):
            return []
        stored = [c for c in df.columns if c not in figures.REGISTRY and c != "step"]
        frame = df[stored].sort_index()
        rows = [{"step": int(s), **dict(zip(stored, vals))}
                for s, vals in zip(frame.index, frame.itertuples(index=False, name=None))]
        align = df.attrs.get("alignment_samples") or None
        return self.update(rows, alignment=align)


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")
