"""The doctor's thresholds: one dataclass, part of a run's config (``[doctor]`` in ``config.toml``) and of its trace
meta (``meta["doctor"]``). The live doctor judges with them, the dashboard draws them (the starvation band, the run
card's colours), and ``etrm-doctor --set`` re-judges a stored run with other values as a read-only what-if.

Light on purpose (no pandas, no torch): ``etrm.config`` imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Mapping

from diagnostics.doctor.bounds import Bound, check_fields

_SHARE, _COUNT, _WINDOW = Bound(0.0, 1.0), Bound(0, 10 ** 9), Bound(1, 10 ** 9)
# The bounds of every threshold (type, finite, range), for [doctor] in a config and for etrm-doctor --set alike.
DOCTOR_BOUNDS: dict[str, Bound] = {
    "window": _WINDOW, "coverage_min": _SHARE, "encode_ratio_max": Bound(0.0, 1e6), "mode_mismatch_share": _SHARE,
    "halting_window": _WINDOW,
    "halting_min_halts": _COUNT, "q_min_tp": _COUNT, "early_halt_share": _SHARE, "premature_exact_share": _SHARE,
    "first_samples": Bound(0, 10 ** 4), "collapse_warmup": _COUNT, "collapse_window": _WINDOW,
    "collapse_share_min": _SHARE, "never_halt_warmup_share": _SHARE, "never_halt_warmup_min": _COUNT,
    "eval_min_samples": _COUNT, "eval_halt_gap": _SHARE, "ema_gap": _SHARE, "ema_warmup_time_constants": Bound(0.0, 1e6),
    "ledger_late_share": Bound(0.0, 1.0, lo_open=True), "calibration_min_records": _COUNT,
    "calibration_error_max": _SHARE, "never_halt_min_samples": _COUNT, "never_halt_others_share": _SHARE,
    "never_solved_min_samples": _COUNT, "never_solved_min_share": _SHARE, "never_solved_others_share": _SHARE,
    "eval_drop_min": _SHARE, "eval_drop_evals": _WINDOW, "slow_warmup_steps": Bound(0, 10 ** 9),
    "slow_window": _WINDOW, "slow_factor": Bound(1.0, 1e6), "phase_share_max": _SHARE, "spike_window": _WINDOW,
    "spike_mads": Bound(0.0, 1e6), "spike_min_ratio": Bound(1.0, 1e6), "grad_spike_min_ratio": Bound(1.0, 1e6),
}


@dataclass(frozen=True)
class DoctorConfig:
    """Thresholds of the rules; every field can be overridden (``etrm-doctor --set window=20``)."""

    window: int = 10                 # steps per window for gradient-starvation and wasted-encoder-compute
    coverage_min: float = 0.5        # gradient-starvation: window coverage below this
    encode_ratio_max: float = 1.5    # wasted-encoder-compute: rows encoded / rows that reached the loss above this
    mode_mismatch_share: float = 0.5  # mode-mismatch: share of a window's mode-showing steps that show the other mode
    halting_window: int = 20         # steps per window for halting-collapse
    halting_min_halts: int = 8       # halting-collapse: judge a window only with at least this many halts
    q_min_tp: int = 5                # Q-head has learned: at least this many true Q-halts in a window ...
    #                                  ... with precision above the base rate (and, for "never halts", this many
    #                                  correct sequences in the window it could have halted on)
    early_halt_share: float = 0.85   # halting-collapse: share of halts at step 1 (exploration vetoes some)
    premature_exact_share: float = 0.5  # halting-collapse at step 1 only while fewer halted answers are right
    first_samples: int = 5           # label-misalignment: offending slots listed in the evidence
    collapse_warmup: int = 20        # encoder-collapse: steps before the rule judges (a fresh encoder may be flat)
    collapse_window: int = 10        # encoder-collapse: steps per window
    collapse_share_min: float = 1e-5  # encoder-collapse: cross-puzzle variance / mean squared context norm below
    #                                  this (healthy demo dips to 2.5e-4 early on; constant-context reads 0)
    never_halt_warmup_share: float = 0.5  # halting-never-learned: judge only after this share of the planned
    #                                  steps (meta max_steps) ...
    never_halt_warmup_min: int = 50  # ... and at least this many steps
    # evaluation findings (diagnostics.doctor.eval_findings, over the evaluation audits)
    eval_min_samples: int = 32       # judge an evaluation only over at least this many samples
    eval_halt_gap: float = 0.1       # eval-halting-mismatch: |exact at max step - exact at would-halt step| above
    ema_gap: float = 0.1             # ema-gap: |exact of the EMA weights - exact of the raw weights| above this ...
    ema_warmup_time_constants: float = 3.0  # ... at an evaluation at least this many EMA time constants
    #                                  (1 / (1 - train.ema_rate) steps) into the run, or at the run's last step
    # the ledger findings (diagnostics.doctor.ledger_doctor), run-level over the per-sample ACT ledger
    ledger_late_share: float = 0.5   # q-halt-miscalibrated: judge the exits of the last this share of the steps ...
    calibration_min_records: int = 200  # ... with at least this many raw records there ...
    calibration_error_max: float = 0.2  # ... and fire when the calibration error (ECE, 10 bins) is above this
    never_halt_min_samples: int = 16  # tasks-never-halt: judge a task with at least this many exits ...
    never_halt_others_share: float = 0.5  # ... none a Q-halt, while the other tasks' exits are Q-halts this often
    never_solved_min_samples: int = 16  # tasks-never-solved: tasks with this many exits, none exact ...
    never_solved_min_share: float = 0.01  # ... listed when they are at least this share of the tasks judged (the
    #                                  healthy demo re-encode run has 1 of 2048, 15 of 16 tokens right: not listed)
    never_solved_others_share: float = 0.5  # ... and at least this share of them was solved (training has got
    #                                  past the point where unsolved is the norm)
    # eval-regression (diagnostics.doctor.eval_regression, over the evaluations table)
    eval_drop_min: float = 0.05      # held-out score below the run's best by at least this (5 points of exact)
    eval_drop_evals: int = 2         # ... at an evaluation at least this many evaluations after the peak
    # timing findings (diagnostics.doctor.timing_rules, over the trace's per-step phase timings)
    slow_warmup_steps: int = 20      # step-time-regression: steps not judged (compilation, warm-up) ...
    slow_window: int = 30            # ... then the early median is over this many steps; windows of this size
    slow_factor: float = 3.0         # step-time-regression: a window's median step time this many times the early
    phase_share_max: float = 0.8     # phase-dominates: one phase above this share of the step time over a window
    # spike findings (diagnostics.doctor.spike_rules): a step far above the median of the previous steps
    spike_window: int = 30           # loss-spike / grad-norm-spike: the previous steps the median and MAD are over
    spike_mads: float = 10.0         # ... and the step's value above median + this many (scaled) MADs
    spike_min_ratio: float = 2.0     # loss-spike: ... and at least this many times the median (flat curves have
    #                                  tiny MADs; healthy demo runs' loss peaks at 1.24x)
    grad_spike_min_ratio: float = 20.0  # grad-norm-spike: the same for the gradient norm, heavy-tailed when healthy
    #                                  (the healthy demo copies of tests/test_demo_halting.py reach 5.9x)

    def __post_init__(self) -> None:
        check_fields(self, DOCTOR_BOUNDS)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "DoctorConfig":
        """The thresholds a run was traced with (``meta["doctor"]``, from its config's ``[doctor]``); the defaults
        for traces written before thresholds were stored, and for any key this version does not know."""
        stored = meta.get("doctor") if isinstance(meta, Mapping) else None
        if not isinstance(stored, Mapping):
            return cls()
        known = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        kept = {}
        for k, v in stored.items():
            if k in known and isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    kept[k] = known[k](v)
                except (ValueError, OverflowError):  # inf or NaN stored for an int threshold: the default
                    continue
        try:
            return cls(**kept)
        except ValueError:
            return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, items: Iterable[str]) -> "DoctorConfig":
        """A copy with ``key=value`` overrides applied (values parsed as the field's type)."""
        kinds = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"unknown doctor setting {item!r}; known: {', '.join(kinds)}")
            try:
                changes[key] = kinds[key](value)
            except ValueError:
                raise ValueError(f"doctor setting {key} needs a {kinds[key].__name__}, got {value!r}") from None
        return replace(self, **changes)  # __post_init__ checks each value against DOCTOR_BOUNDS
