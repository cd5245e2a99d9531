"""The field's findings on constructed rows: loss-spike and grad-norm-spike (median/MAD of the previous steps),
step-time-regression and phase-dominates on stored timing rows with added jitter, eval-regression on an evaluations
table; each live (fed in chunks) equal to offline; and the live console line of the own-loop session labelled
with the finding's own severity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diagnostics.doctor.diagnose import diagnose
from diagnostics.doctor.eval_findings import LiveEvalDoctor, diagnose_evals
from diagnostics.doctor.eval_regression import eval_regression
from diagnostics.doctor.findings import Finding
from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.doctor.timing_rules import TimingDoctor, diagnose_timings
from diagnostics.session import print_finding

META = {"model": "etrm", "mode": "reencode", "max_steps_per_sample": 4}


def step_rows(n: int, seed: int, spike: dict[int, float] | None = None, grad_spike: dict[int, float] | None = None,
              nan_from: int | None = None) -> list[dict[str, float]]:
    """Loss falling with noise, gradient norms noisy around 1; ``spike``: step -> factor on the loss."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, n + 1):
        loss = 40.0 * np.exp(-s / 200) * (1 + 0.1 * rng.standard_normal())
        grad = float(np.exp(0.3 * rng.standard_normal()))
        loss *= (spike or {}).get(s, 1.0)
        grad *= (grad_spike or {}).get(s, 1.0)
        if nan_from is not None and s >= nan_from:
            loss, grad = float("inf"), float("nan")
        rows.append({"step": s, "loss": loss, "grad_norm_encoder": 0.5 * grad, "grad_norm_rest": grad,
                     "non_finite": float(nan_from is not None and s >= nan_from)})
    return rows


def offline(rows: list[dict[str, float]]) -> list[Finding]:
    return diagnose(pd.DataFrame(rows).set_index("step"), META)


def live(rows: list[dict[str, float]], chunk: int) -> list[Finding]:
    doctor = LiveDoctor(META)
    return [f for i in range(0, len(rows), chunk) for f in doctor.update(rows[i:i + chunk])]


def codes(found: list[Finding]) -> dict[str, int]:
    return {f.code: f.first_step for f in found}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_field_findings_no_spike_on_noisy_healthy_curves(seed) -> None:
    found = codes(offline(step_rows(300, seed)))
    assert "loss-spike" not in found and "grad-norm-spike" not in found


def test_field_findings_a_healthy_gradient_transient_is_no_spike() -> None:
    """Healthy gradient norms are heavy-tailed: the demo copies' reach 6x their recent median."""
    rows = step_rows(200, 4, grad_spike={150: 6.0})
    assert "grad-norm-spike" not in codes(offline(rows))
    assert codes(offline(step_rows(200, 4, grad_spike={150: 60.0})))["grad-norm-spike"] == 150


@pytest.mark.parametrize("chunk", [1, 7, 20])
def test_field_findings_spikes_before_the_non_finite_step_live_equals_offline(chunk) -> None:
    rows = step_rows(120, 3, spike={90: 4.0}, grad_spike={92: 30.0}, nan_from=95)
    found = codes(offline(rows))
    assert found["loss-spike"] == 90 and found["grad-norm-spike"] == 92 and found["non-finite-loss"] == 95
    assert {k: v for k, v in codes(live(rows, chunk)).items()} == found
    spike = next(f for f in offline(rows) if f.code == "loss-spike")
    assert spike.severity == "warning" and spike.evidence["ratio"] > 3 and "step 90" in spike.message


def test_field_findings_spike_thresholds_are_the_doctors() -> None:
    rows = step_rows(120, 3, spike={90: 4.0})
    df = pd.DataFrame(rows).set_index("step")
    assert "loss-spike" not in codes(diagnose(df, META, DoctorConfig(spike_min_ratio=5.0)))
    assert codes(diagnose(df, META, DoctorConfig(spike_window=10)))["loss-spike"] == 90


PHASES = {"data": 0.002, "h2d": 0.001, "encoder": 0.01, "inner": 0.03, "loss": 0.002, "trace": 0.002,
          "backward": 0.04, "optimizer": 0.005}


def timing_rows(n: int, seed: int, slow: tuple[str, int, float] | None = None, jitter: float = 0.3,
                outliers: float = 0.02) -> pd.DataFrame:
    """Stored timing rows (step, rank, phase, seconds): each phase log-normal jitter, some steps 5x slow (load
    spikes, a checkpoint), and ``slow`` = (phase, from step, factor) switched on mid-run."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, n + 1):
        hiccup = 5.0 if rng.random() < outliers else 1.0
        for phase, base in PHASES.items():
            sec = base * float(np.exp(jitter * rng.standard_normal())) * hiccup
            if slow and phase == slow[0] and s >= slow[1]:
                sec *= slow[2]
            rows.append((s, 0, phase, sec))
    return pd.DataFrame(rows, columns=["step", "rank", "phase", "seconds"])


def live_timings(df: pd.DataFrame, chunk: int) -> list[Finding]:
    doctor, steps = TimingDoctor(META), sorted(df["step"].unique())
    out = []
    for i in range(0, len(steps), chunk):
        part = df[df["step"].isin(steps[i:i + chunk])]
        out += doctor.update(list(part.itertuples(index=False, name=None)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_field_findings_timing_rules_quiet_on_jittery_healthy_timings(seed) -> None:
    assert diagnose_timings(timing_rows(400, seed, jitter=0.4, outliers=0.05), META) == []


@pytest.mark.parametrize("chunk", [1, 20, 1000])
def test_field_findings_step_time_regression_names_the_phase_that_grew(chunk) -> None:
    df = timing_rows(300, 5, slow=("data", 150, 200.0))  # data 2 ms -> 0.4 s: the step ~4x slower
    found = diagnose_timings(df, META)
    f = next(f for f in found if f.code == "step-time-regression")
    assert f.evidence["phase"] == "data" and 150 <= f.first_step < 150 + DoctorConfig().slow_window
    assert f.evidence["factor"] >= DoctorConfig().slow_factor
    d = next(f for f in found if f.code == "phase-dominates")
    assert d.evidence["phase"] == "data" and d.first_step >= 150
    assert codes(live_timings(df, chunk)) == codes(found)


def test_field_findings_phase_dominates_from_the_start_and_backward_at_half_is_not() -> None:
    df = timing_rows(100, 6, slow=("encoder", 1, 100.0))  # the encoder 1 s of a 1.1 s step from step 1
    found = codes(diagnose_timings(df, META))
    cfg = DoctorConfig()
    assert found == {"phase-dominates": cfg.slow_warmup_steps + cfg.slow_window}
    # the demo's shape: backward about half the step, the encoder an eighth (measured on the demo runs)
    assert diagnose_timings(timing_rows(200, 7, slow=("backward", 1, 2.0)), META) == []


def test_field_findings_eval_regression_on_an_evaluations_table_live_equals_offline() -> None:
    meta = {**META, "config": {"train": {"ema": True, "keep_best": True, "best_metric": "exact"}}}
    scores = {100: 0.10, 200: 0.30, 300: 0.50, 400: 0.47, 500: 0.41, 600: 0.30}
    evals = pd.DataFrame({"exact": list(scores.values()), "count": 64.0},
                         index=pd.Index(list(scores), name="step"))
    f = eval_regression(evals, None, meta)
    # the peak (0.50 at 300); at 400 only 3 points down; at 500 two evaluations on and 9 points down
    assert (f.first_step, f.evidence["best_step"], f.evidence["weights"]) == (500, 300, "ema")
    assert f.evidence["drop"] == pytest.approx(0.09) and "checkpoint_best.pt" in f.message
    doctor = LiveEvalDoctor(meta)
    seen = []
    for step, value in scores.items():
        doctor.add_values(step, {"exact": value, "count": 64.0})
        seen += [(g.code, g.first_step) for g in doctor.update([])]
    assert seen == [("eval-regression", 500)]
    assert [(g.code, g.first_step) for g in diagnose_evals(pd.DataFrame(), meta, evals=evals)] == seen
    without = {**META, "config": {"train": {"ema": True}}}
    assert "train.keep_best=true" in eval_regression(evals, None, without).message
    assert eval_regression(evals, None, meta, DoctorConfig(eval_drop_min=0.19)).first_step == 600  # 0.50 -> 0.30
    assert eval_regression(evals, None, meta, DoctorConfig(eval_drop_min=0.21)) is None


def test_field_findings_eval_regression_judges_raw_weights_apart() -> None:
    meta = {**META, "config": {"train": {"ema": True}}}
    evals = pd.DataFrame({"exact": [0.2, 0.3, 0.4, 0.5], "count": 64.0}, index=pd.Index([1, 2, 3, 4], name="step"))
    raw = pd.DataFrame({"step": [1, 2, 3, 4], "weights": "raw", "exact": [0.4, 0.2, 0.1, 0.1], "count": 64.0})
    f = eval_regression(evals, raw, meta)
    assert (f.first_step, f.evidence["weights"], f.evidence["best_step"]) == (3, "raw", 1)
    assert eval_regression(evals, raw.assign(count=8.0), meta) is None  # too few samples to judge


def test_field_findings_own_loop_console_prints_the_real_severity(capsys) -> None:
    print_finding(Finding("label-misalignment", "error", 3, {}, "m"))
    print_finding(Finding("loss-spike", "warning", 4, {}, "m"))
    print_finding(Finding("dropped-samples", "info", 5, {}, "m"))
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in err] == ["error", "warning", "info"]
