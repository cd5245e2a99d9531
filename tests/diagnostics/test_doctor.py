"""The doctor's rules on synthetic traces: each fires on its signature with the right first step and evidence, none
fires on a healthy run, thresholds are configurable, and the live doctor agrees with the offline one."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diagnostics.doctor.diagnose import (RULES, diagnose, dropped_samples, gradient_starvation, halting_collapse,
                                         halting_never_learned, label_misalignment, non_finite_loss, summary,
                                         wasted_encoder_compute)
from diagnostics.doctor.findings import Finding, has_error
from diagnostics.doctor.live import LiveDoctor
from diagnostics.doctor.scan import Rule
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace.loading import load_findings, load_run
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter


def first_window_end(df: pd.DataFrame, num: str, den: str, w: int, below: float | None = None,
                     above: float | None = None) -> tuple[int, float]:
    """Oracle: the last step of the first full window whose sum(num)/sum(den) crosses the threshold."""
    r = df[num].rolling(w).sum() / df[den].rolling(w).sum()
    hit = r < below if below is not None else r > above
    step = int(hit[hit].index[0])
    return step, float(r.loc[step])


HEALTHY = {
    "reencode": dict(mode="reencode"),
    "reencode-early": dict(mode="reencode", halting="max", q="none"),
    "fct": dict(mode="fct", halting="max"),
    "trm": dict(mode="trm"),
}


@pytest.mark.parametrize("sampler", ["refill", "trm"])
@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_have_no_warning_or_error(name, sampler, sim, meta, make_run):
    kw = HEALTHY[name]
    run = make_run(f"{name}-{sampler}", sim(sampler=sampler, **kw), meta(kw["mode"]))
    df = load_run(run)
    findings = diagnose(df)
    assert [f for f in findings if f.severity != "info"] == []
    assert {f.code for f in findings} == ({"dropped-samples"} if sampler == "trm" else set())
    assert summary(df)["figures"]["coverage"] == 1.0
    assert not has_error(findings)


@pytest.mark.parametrize("sampler", ["refill", "trm"])
def test_gradient_starvation_in_cached_mode_shows_coverage_equal_to_reset_fraction(sampler, sim, meta, make_run):
    run = make_run("cached", sim(mode="cached", M=8, sampler=sampler), meta("cached", M=8))
    df = load_run(run)
    f = gradient_starvation(df)
    step, cov = first_window_end(df, "coverage_num", "coverage_den", 10, below=0.5)
    assert f is not None and f.severity == "error"
    assert f.first_step == step
    assert f.evidence["window"] == [step - 9, step]
    assert f.evidence["coverage_mean"] == pytest.approx(cov)
    assert f.evidence["coverage_mean"] == f.evidence["reset_fraction_mean"]
    assert f.evidence["run_coverage_mean"] == summary(df)["figures"]["coverage"] == summary(df)["figures"]["reset_fraction"]
    assert "reset fraction" in f.message


def test_starvation_threshold_and_window_are_configurable(sim, meta, make_run):
    df = load_run(make_run("cached", sim(mode="cached", M=8), meta("cached", M=8)))
    assert gradient_starvation(df, cfg=DoctorConfig(coverage_min=0.05)) is None
    f = gradient_starvation(df, cfg=DoctorConfig(window=30))
    assert f.first_step == first_window_end(df, "coverage_num", "coverage_den", 30, below=0.5)[0]
    assert DoctorConfig().with_overrides(["window=30", "coverage_min=0.2"]) == DoctorConfig(window=30, coverage_min=0.2)
    with pytest.raises(ValueError):
        DoctorConfig().with_overrides(["nope=1"])
    with pytest.raises(ValueError):
        DoctorConfig().with_overrides(["window=abc"])


@pytest.mark.parametrize("sampler", ["refill", "trm"])
def test_label_misalignment_counts_and_first_samples(sampler, sim, meta, make_run):
    rows = sim(fault="label-from-batch", sampler=sampler)
    alignment = [(2, slot, 100 + slot, -1, 100 + slot) for slot in range(8)]
    df = load_run(make_run("label", rows, meta(), alignment=alignment))
    f = label_misalignment(df)
    assert f.code == "label-misalignment" and f.severity == "error"
    assert f.first_step == 2  # step 1 resets every slot, so nothing can be misaligned yet
    assert f.evidence["label_mismatch"] == f.evidence["total"] == int(df["label_mismatch"].sum())
    assert f.evidence["steps_affected"] == int((df["label_mismatch"] > 0).sum())
    assert f.evidence["demo_mismatch"] == f.evidence["carry_mismatch"] == 0
    assert len(f.evidence["first_samples"]) == DoctorConfig().first_samples
    assert f.evidence["first_samples"][0] == {"step": 2, "slot": 0, "sample_id": 100, "label_sample_id": -1,
                                              "demo_sample_id": 100}


def test_label_misalignment_from_demos_or_carry(sim, meta, make_run):
    rows = sim()
    rows[14]["demo_mismatch"] = 2.0
    rows[20]["carry_mismatch"] = 1.0
    f = label_misalignment(load_run(make_run("demo", rows, meta())))
    assert f.first_step == 15
    assert (f.evidence["demo_mismatch"], f.evidence["carry_mismatch"], f.evidence["total"]) == (2, 1, 3)
    assert f.evidence["steps_affected"] == 2


@pytest.mark.parametrize("sampler", ["refill", "trm"])
def test_wasted_encoder_compute(sampler, sim, meta, make_run):
    df = load_run(make_run("wasted", sim(mode="cached", M=8, sampler=sampler, fault="encode-full-batch"),
                           meta("cached", M=8)))
    f = wasted_encoder_compute(df)
    step, ratio = first_window_end(df, "encoded", "encode_needed", 10, above=1.5)
    assert f.severity == "warning" and f.first_step == step
    assert f.evidence["ratio"] == pytest.approx(ratio) and f.evidence["ratio"] > 1.5
    assert f.evidence["encoded"] == int(df["encoded"].loc[step - 9:step].sum())
    assert {x.code for x in diagnose(df)} >= {"gradient-starvation", "wasted-encoder-compute"}
    # healthy cached mode encodes exactly what it needs
    healthy = load_run(make_run("cached", sim(mode="cached", M=8), meta("cached", M=8)))
    assert wasted_encoder_compute(healthy) is None


def test_wasted_encoder_compute_with_nothing_needed(sim, meta, make_run):
    rows = sim(mode="cached", M=8)
    for r in rows:
        r["encoded"], r["encode_needed"], r["coverage_num"] = 16.0, 0.0, 0.0
    f = wasted_encoder_compute(load_run(make_run("zero", rows, meta("cached", M=8))))
    assert f.first_step == 10 and f.evidence["ratio"] is None  # infinite: no row reached the loss (issue 26)


def test_non_finite_loss(sim, meta, make_run):
    df = load_run(make_run("nan", sim(nan_at=37), meta()))
    assert math.isnan(df.loc[37, "loss"])
    f = non_finite_loss(df)
    assert f.severity == "error" and f.first_step == 37
    assert f.evidence["steps_affected"] == 24 and "non_finite" in f.evidence["columns"]


def test_infinite_gradient_norm_without_the_flag(sim, meta, make_run):
    rows = sim()
    rows[4]["grad_norm_encoder"] = math.inf
    f = non_finite_loss(load_run(make_run("inf", rows, meta())))
    assert f.first_step == 5 and f.evidence["columns"] == ["grad_norm_encoder"]


def test_halting_collapse_to_step_one_after_learning(sim, meta, make_run):
    df = load_run(make_run("one", sim(halting=[(1, "mixed"), (30, "one")]), meta()))
    f = halting_collapse(df)
    assert f.severity == "warning" and f.evidence["kind"] == "all-halt-at-step-1"
    share = df["halt_at_1"].rolling(20).sum() / df["halted"].rolling(20).sum()
    assert f.first_step == int(share[share >= 0.85].index[0])
    assert f.evidence["share_at_step_1"] >= 0.85
    assert f.evidence["q_learned_at"] == 20  # the first full window, where precision beat the base rate
    assert f.evidence["q_precision"] > f.evidence["q_base_rate"]


def test_halting_at_step_one_with_right_answers_is_not_a_collapse(sim, meta, make_run):
    """An easy task that the model solves at step 1 halts there, correctly: no warning (seen on the demo preset)."""
    rows = sim(halting=[(1, "mixed"), (30, "one")], base_rate=0.9)
    df = load_run(make_run("easy", rows, meta()))
    assert (df["halted_exact"] >= 0.5 * df["halted_count"]).iloc[30:].all()
    assert halting_collapse(df) is None


def test_halting_collapse_to_never_halting_after_learning(sim, meta, make_run):
    df = load_run(make_run("never", sim(halting=[(1, "mixed"), (30, "max")]), meta()))
    f = halting_collapse(df)
    assert f.evidence["kind"] == "none-before-max-steps"
    early = (df["halted"] - df["halt_at_4"]).rolling(20).sum()
    assert f.first_step == int(early[early == 0].index[0])
    assert f.evidence["halts_at_max_steps"] == f.evidence["halts"]


def test_halting_rules_wait_for_a_learned_q_head_and_skip_fct(sim, meta, make_run):
    # untrained Q (never says halt): every slot runs to max steps, the normal start of training
    assert halting_collapse(load_run(make_run("early", sim(halting="max", q="none"), meta()))) is None
    # a Q that says halt everywhere never beats the base rate: not "learned"
    assert halting_collapse(load_run(make_run("all", sim(halting="one", q="all"), meta()))) is None
    # the same collapse rows in fct mode: halting rules do not apply
    rows = sim(halting=[(1, "mixed"), (30, "max")])
    assert halting_collapse(load_run(make_run("fct", rows, meta("fct")))) is None
    assert halting_collapse(load_run(make_run("re", rows, meta("reencode")))) is not None


def test_dropped_samples_is_info(sim, meta, make_run):
    df = load_run(make_run("trm", sim(mode="trm", sampler="trm"), meta("trm")))
    f = dropped_samples(df)
    assert f.severity == "info" and f.first_step == 2
    assert f.evidence["samples_dropped"] == int(df["samples_dropped"].sum())
    assert f.evidence["samples_consumed"] == int(df["samples_consumed"].sum())
    assert 0 < f.evidence["drop_fraction"] < 1


def test_rules_skip_missing_columns_and_empty_runs(meta, make_run):
    df = load_run(make_run("empty", [], meta()))
    assert diagnose(df) == []
    assert summary(df)["steps"] == 0
    few = pd.DataFrame({"loss": [1.0, 2.0]}, index=pd.Index([1, 2], name="step"))
    assert diagnose(few, meta()) == []


def test_rules_are_an_extensible_list(sim, meta, make_run):
    # a code has one rule, or two where single-step evidence names the step its window rule would report later
    repeated = sorted(r.code for r in RULES if sum(q.code == r.code for q in RULES) > 1)
    assert repeated == ["gradient-starvation"] * 2 + ["wasted-encoder-compute"] * 2
    cached = load_run(make_run("c", sim(mode="cached", M=8), meta("cached", M=8)))
    codes = [f.code for f in diagnose(cached)]
    assert len(codes) == len(set(codes))

    class Always(Rule):
        code, severity = "always", "info"

        def needs(self, meta, columns):
            return ("loss",)

        def holds(self, w, latch, cfg, meta):
            return w["loss"] > 0

        def finding(self, at, cfg, meta, extra):
            return self.make({"loss": at.sums["loss"]}, at.end, "always")

    df = load_run(make_run("x", sim(steps=5), meta()))
    assert [f.code for f in diagnose(df, rules=[Always()])] == ["always"]


SCENARIOS = {
    "cached": (dict(mode="cached", M=8), "cached", 8),
    "wasted": (dict(mode="cached", M=8, fault="encode-full-batch"), "cached", 8),
    "label": (dict(fault="label-from-batch", sampler="trm"), "reencode", 4),
    "nan": (dict(nan_at=37), "reencode", 4),
    "one": (dict(halting=[(1, "mixed"), (30, "one")]), "reencode", 4),
    "never": (dict(halting=[(1, "mixed"), (30, "max")]), "reencode", 4),
    "never-learned": (dict(steps=120, halting="max", q="none"), "reencode", 4),
    "healthy": (dict(), "reencode", 4),
}


@pytest.mark.parametrize("chunk", [1, 7, 20])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_live_doctor_agrees_with_offline(name, chunk, sim, meta, make_run):
    kw, mode, M = SCENARIOS[name]
    rows = sim(**kw)
    m = meta(mode, M=M)
    offline = diagnose(load_run(make_run(name, rows, m)))
    live = LiveDoctor(m)
    seen: list[Finding] = []
    for i in range(0, len(rows), chunk):
        new = live.update(rows[i:i + chunk])
        assert not {f.code for f in new} & {f.code for f in seen}  # each finding is reported once
        seen += new
    assert sorted((f.code, f.first_step) for f in seen) == sorted((f.code, f.first_step) for f in offline)
    assert live.update(rows) == []  # steps already seen are ignored
    d = DoctorConfig()  # window rules keep window - 1 rows; the spike rules their spike_window previous values
    longest = max(max(d.window, d.halting_window) - 1, d.spike_window, 0)
    assert all(len(s.tail_steps) <= longest for s in live.states.values())  # memory does not grow with the run


def test_live_doctor_keeps_alignment_samples_and_stores_findings(sim, meta, tmp_path):
    rows = sim(fault="label-from-batch")
    live = LiveDoctor(meta())
    new = live.update(rows[:5], alignment=[(2, 0, 7, -1, 7), (2, 1, 8, -1, 8)])
    assert [f.code for f in new] == ["label-misalignment"]
    assert new[0].evidence["first_samples"][1] == {"step": 2, "slot": 1, "sample_id": 8, "label_sample_id": -1,
                                                   "demo_sample_id": 8}
    (tmp_path / "run").mkdir()
    w = TraceWriter(tmp_path / "run" / TRACE_NAME, meta())
    new[0].store(w)
    w.close()
    stored = load_findings(tmp_path / "run")
    assert stored.loc[0, "code"] == "label-misalignment" and stored.loc[0, "first_step"] == 2
    assert stored.loc[0, "evidence"]["label_mismatch"] == new[0].evidence["label_mismatch"]


def test_live_doctor_with_missing_counters_and_nan_rows(meta):
    live = LiveDoctor(meta())
    assert live.update([{"step": 1, "loss": 1.0}]) == []
    new = live.update([{"step": 2, "loss": float("nan"), "non_finite": 1.0}])
    assert [(f.code, f.first_step) for f in new] == [("non-finite-loss", 2)]


def test_summary_fields(sim, meta, make_run):
    df = load_run(make_run("s", sim(mode="cached", M=8), meta("cached", M=8)))
    s = summary(df)
    for key in ("steps", "status", "figures", "final", "dynamic_halting", "thresholds", "samples_consumed"):
        assert key in s
    for name in ("coverage", "reset_fraction", "encode_ratio", "q_precision", "q_recall", "q_base_rate",
                 "mean_inflight_step", "loss_per_slot", "exact_inflight", "early_halt_share"):
        assert name in s["figures"] and name in s["final"]
    assert s["steps"] == 60 and s["status"] == "finished" and s["mode"] == "cached"
    assert s["figures"]["coverage"] == pytest.approx(df["coverage_num"].sum() / df["coverage_den"].sum())
    last = df.tail(10)
    assert s["final"]["window"] == [51, 60]
    assert s["final"]["exact_inflight"] == pytest.approx(last["inflight_exact"].sum() / last["inflight_count"].sum())
    assert s["final"]["loss_per_slot"] == pytest.approx(last["loss"].sum() / last["slots"].sum())
    assert all(not isinstance(v, float) or np.isfinite(v) for v in s.values())


def test_summary_says_dynamic_halting_from_what_happened(sim, meta, make_run):
    """Every slot runs to the maximum step: halting is not dynamic, whatever the mode (it used to say "yes")."""
    never = summary(load_run(make_run("max", sim(mode="reencode", halting="max", M=4), meta("reencode", M=4))))
    assert never["figures"]["early_halt_share"] == 0.0
    assert never["dynamic_halting"].startswith("no")
    mixed = summary(load_run(make_run("mix", sim(mode="reencode", halting="mixed", M=4), meta("reencode", M=4))))
    assert 0 < mixed["figures"]["early_halt_share"] < 1 and mixed["dynamic_halting"].startswith("yes")
    fct = summary(load_run(make_run("fct", sim(mode="fct", M=4), meta("fct", M=4))))
    assert "early_halt_share" not in fct["figures"] and fct["dynamic_halting"].startswith("no (fct")


@pytest.mark.parametrize("name", ["one", "cached", "label"])
def test_live_doctor_replays_the_stored_steps_on_resume(name, sim, meta, make_run):
    kw, mode, M = SCENARIOS[name]
    rows = sim(**kw)
    m = meta(mode, M=M)
    offline = {(f.code, f.first_step) for f in diagnose(load_run(make_run("all", rows, m)))}
    live = LiveDoctor(m)
    held = live.replay(load_run(make_run("before", rows[:25], m)))  # the checkpoint was at step 25
    assert all(f.first_step <= 25 for f in held)
    after = [f for i in range(25, 60, 20) for f in live.update(rows[i:i + 20])]
    assert {(f.code, f.first_step) for f in held + after} == offline


# ---------------------------------------------------------------------------------------------------------------
# Single-step evidence: an exact signature is named on the step where it starts

def test_cached_starvation_is_named_on_the_first_step_with_continuing_slots(sim, meta, make_run):
    df = load_run(make_run("cached", sim(mode="cached", M=8), meta("cached", M=8)))
    [f] = [f for f in diagnose(df) if f.code == "gradient-starvation"]
    assert f.first_step == 2  # step 1 resets every slot (coverage 1.0); step 2 has only continuing slots
    assert f.evidence["evidence"] == "single step"
    assert f.evidence["coverage_mean"] == f.evidence["reset_fraction_mean"] < 0.5
    assert "on step 2" in f.message and "reset fraction" in f.message
    assert gradient_starvation(df).first_step == 10  # the windowed rule alone, as before


def test_coverage_below_threshold_but_not_the_reset_fraction_waits_for_the_window(sim, meta, make_run):
    rows = sim(mode="cached", M=8)
    for r in rows:  # noisy coverage: not exactly the reset fraction, still low
        r["coverage_num"] = r["resets"] + 1.0 if r["resets"] < r["slots"] else r["coverage_num"]
    [f] = [f for f in diagnose(load_run(make_run("noisy", rows, meta("cached", M=8))))
           if f.code == "gradient-starvation"]
    assert f.first_step == 10 and "evidence" not in f.evidence


def test_wasted_encoder_compute_is_named_on_the_first_step_that_encodes_more_than_needed(sim, meta, make_run):
    df = load_run(make_run("w", sim(mode="cached", M=8, fault="encode-full-batch"), meta("cached", M=8)))
    [f] = [f for f in diagnose(df) if f.code == "wasted-encoder-compute"]
    assert f.first_step == 2 and f.evidence["evidence"] == "single step"
    assert f.evidence["encoded"] == 16 and f.evidence["encode_needed"] < 16
    assert wasted_encoder_compute(df).first_step == 10


def test_label_misalignment_is_named_on_the_first_step_with_a_continuing_slot(sim, meta, make_run):
    df = load_run(make_run("l", sim(fault="label-from-batch", M=4), meta()))
    first_continuing = int(df.index[(df["resets"] < df["slots"]).to_numpy()][0])
    assert label_misalignment(df).first_step == first_continuing


# ---------------------------------------------------------------------------------------------------------------
# halting-never-learned

def never_rows(sim, steps=120, bias=-5.0, B=16):
    rows = sim(steps=steps, B=B, halting="max", q="none")
    for r in rows:
        r["q_halt_logit_sum"] = bias * B  # zero weights, no learning signal: every logit is the bias
    return rows


def test_halting_never_learned_fires_after_warmup_with_its_evidence(sim, meta, make_run):
    m = meta(config={"arch": {"q_init_bias": -5.0}})
    df = load_run(make_run("never", never_rows(sim), m))
    f = halting_never_learned(df)
    cfg = DoctorConfig()
    warm = max(cfg.never_halt_warmup_min, int(cfg.never_halt_warmup_share * m["max_steps"]))
    assert f is not None and f.severity == "warning"
    assert f.first_step == warm + cfg.halting_window
    assert f.evidence["q_bias_init"] == -5.0 and f.evidence["q_halt_logit_mean"] == pytest.approx(-5.0)
    assert f.evidence["q_halt_requests_in_run"] == 0 and f.evidence["halts"] > 0
    assert f.evidence["halts_at_max_steps"] == f.evidence["halts"]
    assert "initialisation" in f.message and "too hard" in f.message
    assert halting_collapse(df) is None  # the Q-head never learned: halting-collapse stays silent
    assert "halting-never-learned" in {x.code for x in diagnose(df)}


def test_halting_never_learned_not_for_fct_nor_a_q_head_that_asked(sim, meta, make_run):
    rows = never_rows(sim)
    assert halting_never_learned(load_run(make_run("fct", rows, meta("fct")))) is None
    rows[5]["q_says_halt"] = 1.0  # one request early in the run (vetoed or not): it learned something
    assert halting_never_learned(load_run(make_run("asked", rows, meta()))) is None
    short = never_rows(sim, steps=60)  # judged only after the warm-up
    assert halting_never_learned(load_run(make_run("short", short, meta()))) is None


@pytest.mark.parametrize("chunk", [1, 7])
def test_field_code_mode_mismatch_compares_the_declared_mode_with_the_measured_one(chunk, sim, meta, make_run):
    """Issue 26: which rows reach the loss (coverage) against the reset slots shows the mode the code has."""
    for code_mode, declared, observed in (("cached", "reencode", "cached"), ("reencode", "cached", "reencode")):
        rows, m = sim(mode=code_mode, M=8), meta(declared, M=8)
        df = load_run(make_run(f"{code_mode}-as-{declared}", rows, m))
        [f] = [f for f in diagnose(df) if f.code == "mode-mismatch"]
        assert f.severity == "warning" and f.first_step == 10  # the first full window
        assert (f.evidence["declared"], f.evidence["observed"]) == (declared, observed)
        assert repr(declared) in f.message and repr(observed) in f.message
        live = LiveDoctor(m)
        seen = [g for i in range(0, len(rows), chunk) for g in live.update(rows[i:i + chunk])]
        assert [(g.code, g.first_step) for g in seen if g.code == "mode-mismatch"] == [("mode-mismatch", 10)]
    for mode in ("cached", "reencode", "trm", "fct"):  # declared as the code does: nothing
        df = load_run(make_run(f"{mode}-ok", sim(mode=mode, M=8, halting="max" if mode == "fct" else "mixed"),
                               meta(mode, M=8)))
        assert "mode-mismatch" not in {f.code for f in diagnose(df)}
