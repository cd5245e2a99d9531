"""Figure builders are pure functions of bucketed frames: checked here without a browser, each against Plotly's
schema (``go.Figure`` validates every property)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboards.figures.alignment import alignment_figure
from dashboards.figures.base import SIDE_CAPTION, empty_figure, linear_ticks, log_ticks, with_range
from dashboards.figures.compare import compare_figure, efficiency, efficiency_table, run_colors
from dashboards.figures.coverage import coverage_figure, encoder_work_figure, grad_norm_figure
from dashboards.figures.halting import halting_heatmap, halting_summary_figure, q_figure
from dashboards.figures.overview import accuracy_figure, loss_figure
from dashboards.figures.timing import _phase_table, timing_figure
from dashboards.runs import ALIGNMENT, COVERAGE, OVERVIEW, halting_spec
from diagnostics.trace.reader import aggregate_rows, finish, ratio_spec

B, M = 8, 4


def raw_steps(n: int = 80, mode: str = "cached", seed: int = 0) -> pd.DataFrame:
    """Per-step counters of a run whose slots all halt every M steps (as the tiny trainer runs do)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    resets = np.where((steps - 1) % M == 0, B, 0).astype(float)
    cov = resets if mode == "cached" else np.full(n, float(B))
    halted = np.roll(resets, -1)
    df = pd.DataFrame({
        "coverage_num": cov, "coverage_den": float(B), "resets": resets, "slots": float(B),
        "encoded": cov, "encode_needed": cov, "loss": 20 - steps * 0.1 + rng.random(n), "lm_loss": 18 - steps * 0.1,
        "inflight_exact": rng.integers(0, B, n).astype(float), "inflight_count": float(B),
        "halted_exact": np.minimum(halted, 2.0), "halted_count": halted, "halted_steps": halted * M,
        "halted": halted, "inflight_step_sum": ((steps - 1) % M + 1) * float(B), "real_slots": float(B),
        "q_tp": 1.0, "q_fp": 1.0, "q_fn": 0.0, "q_correct": 2.0, "q_says_halt": 2.0, "explore_vetoes": 0.0,
        "label_mismatch": 0.0, "demo_mismatch": 0.0, "carry_mismatch": 0.0, "aligned_den": float(B),
        "grad_norm_encoder": np.where(cov > 0, 0.5, 0.0), "grad_norm_rest": 1.0, "puzzle_ids_with_grad": 0.0,
        **{f"halt_at_{k}": np.where(k == M, halted, 0.0) for k in range(1, M + 1)},
    }, index=pd.Index(steps, name="step"))
    return df


def framed(raw: pd.DataFrame, spec, width: int = 1) -> pd.DataFrame:
    f = finish(aggregate_rows(raw, spec.resolve(raw.columns), width))
    f.attrs.update(width=width, exact=width == 1)
    return f


def valid(fig: dict) -> go.Figure:
    return go.Figure(fig)  # raises on any property Plotly does not know


def names(fig: dict) -> list[str]:
    return [t.get("name") for t in fig["data"]]


def test_coverage_figure_draws_coverage_beside_the_reset_fraction():
    fig = coverage_figure(framed(raw_steps(mode="cached"), COVERAGE), threshold=0.5)
    valid(fig)
    assert any(n and n.startswith("coverage (") for n in names(fig))
    assert any(n and n.startswith("reset fraction") for n in names(fig))
    bars = [t for t in fig["data"] if t["type"] == "bar"][0]
    assert bars["y"] == pytest.approx([0.25, 0.25])  # cached: run coverage equals the reset fraction
    shapes = fig["layout"]["shapes"]
    assert shapes[0]["type"] == "rect" and shapes[0]["y1"] == 0.5  # the starved zone
    smooth_cov = next(t for t in fig["data"] if t.get("name", "").startswith("coverage ("))
    smooth_res = next(t for t in fig["data"] if t.get("name", "").startswith("reset fraction"))
    assert smooth_cov["y"] == pytest.approx(smooth_res["y"])  # the two lines coincide


def test_coverage_figure_of_a_healthy_run_sits_at_one():
    fig = coverage_figure(framed(raw_steps(mode="reencode"), COVERAGE))
    bars = [t for t in fig["data"] if t["type"] == "bar"][0]
    assert bars["y"] == pytest.approx([1.0, 0.25])
    smooth = next(t for t in fig["data"] if t.get("name", "").startswith("coverage ("))
    assert min(smooth["y"]) == 1.0


def test_bucketed_frames_get_min_max_bands_and_exact_ones_do_not():
    raw = raw_steps(200)
    exact = coverage_figure(framed(raw, COVERAGE, 1), side=False)
    bucketed = coverage_figure(framed(raw, COVERAGE, 8), side=False)
    valid(exact), valid(bucketed)
    assert not any(t.get("fill") == "tonexty" for t in exact["data"])
    band = [t for t in bucketed["data"] if t.get("fill") == "tonexty"]
    assert band and max(band[0]["y"]) == 0.0 and max(bucketed["data"][0]["y"]) == 1.0  # min 0, max 1 per bucket
    mean = next(t for t in bucketed["data"] if t.get("name") == "coverage")
    assert mean["y"] == pytest.approx([0.25] * 25)  # ratio of sums: exact at any width


def test_every_overview_figure_is_valid_plotly():
    f = framed(raw_steps(), OVERVIEW)
    evals = pd.DataFrame({"exact": [0.1, 0.2], "halt.exact": [0.0, 0.1]}, index=[20, 40])
    findings = [{"code": "gradient-starvation", "severity": "error", "first_step": 10}]
    for fig in (loss_figure(f, findings, focus=12), accuracy_figure(f, evals, findings),
                halting_summary_figure(f, "cached", findings), coverage_figure(f, 0.5, findings, focus=12)):
        valid(fig)
        assert fig["data"]
    acc = accuracy_figure(f, evals)
    assert {"in-flight (ETRM)", "at halt (TRM)", "held-out"} <= set(names(acc))
    lines = [s for s in loss_figure(f, findings, focus=12)["layout"]["shapes"] if s["type"] == "line"]
    assert [s["x0"] for s in lines] == [10, 12]  # the finding's first step, and the focused step


def test_halting_is_not_shown_for_fct():
    f = framed(raw_steps(), OVERVIEW)
    fig = halting_summary_figure(f, "fct")
    valid(fig)
    assert not fig["data"] and "fct" in fig["layout"]["annotations"][0]["text"]


def test_halting_heatmap_shares_sum_to_one_per_bucket():
    raw = raw_steps(80)
    fig = halting_heatmap(framed(raw, halting_spec(raw.columns), 8))
    valid(fig)
    z = np.array(fig["data"][0]["z"], dtype=float)
    assert z.shape == (M, 10)
    assert np.nansum(z, axis=0) == pytest.approx(np.ones(10))
    assert np.nanmax(z[M - 1]) == 1.0  # everything halts at the maximum step here


def test_q_alignment_grad_norm_encoder_work_and_timing_figures():
    raw = raw_steps()
    valid(q_figure(framed(raw, halting_spec(raw.columns))))
    al = alignment_figure(framed(raw, ALIGNMENT))
    valid(al)
    assert "no mismatches" in al["layout"]["annotations"][0]["text"]
    gn = grad_norm_figure(framed(raw, COVERAGE))
    valid(gn)
    assert {"encoder", "rest"} <= set(names(gn))
    valid(encoder_work_figure(framed(raw, COVERAGE)))
    t = pd.DataFrame({"step": [1, 1, 2, 2], "phase": ["inner", "backward", "inner", "backward"],
                      "seconds": [0.01, 0.02, 0.01, 0.03]})
    tf = timing_figure(t)
    valid(tf)
    steps_s = next(tr for tr in tf["data"] if tr["name"] == "steps/s")
    assert steps_s["y"] == pytest.approx([1 / 0.03, 1 / 0.04])
    assert [tr["name"] for tr in tf["data"] if tr.get("stackgroup")] == ["inner", "backward"]


def test_empty_inputs_give_figures_that_say_why():
    empty = framed(raw_steps().iloc[:0], OVERVIEW)
    for fig in (loss_figure(empty), accuracy_figure(empty), coverage_figure(empty),
                timing_figure(pd.DataFrame()), compare_figure({}, "coverage")):
        valid(fig)
        assert fig["layout"]["annotations"][0]["text"]


def test_compare_figure_overlays_one_series_per_run():
    frames = {"a": framed(raw_steps(mode="cached"), ratio_spec("coverage")),
              "b": framed(raw_steps(mode="reencode"), ratio_spec("coverage"))}
    fig = compare_figure(frames, "coverage")
    valid(fig)
    shown = [t for t in fig["data"] if t.get("showlegend", True)]
    assert [t["name"] for t in shown] == ["a", "b"]
    assert shown[0]["line"]["color"] != shown[1]["line"]["color"]


def test_efficiency_table_from_trace_totals():
    cached = {"steps": 40, "encoded": 80, "samples_consumed": 80, "coverage_num": 80, "coverage_den": 320,
              "real_slots": 320, "halted_steps": 320, "halted_count": 80, "encode_needed": 80, "halted": 80,
              "halted_early": 20}
    reencode = {**cached, "encoded": 320, "coverage_num": 320, "encode_needed": 320, "halted_early": 0}
    table = efficiency_table({"cached": ({"mode": "cached"}, cached), "reencode": ({"mode": "reencode"}, reencode),
                                "fct": ({"mode": "fct"}, reencode)})
    assert list(table.columns) == ["cached", "reencode", "fct"]
    # from what happened: no slot halted before the maximum step is "no", whatever the mode (it used to say "yes")
    assert table.loc["dynamic halting", "reencode"].startswith("no (no halt before")
    assert table.loc["dynamic halting", "cached"] == "yes (25.0% of halts before the maximum step)"
    assert table.loc["encoder forwards per step"].tolist() == ["2.00", "8.00", "8.00"]
    assert table.loc["encoder gradient coverage"].tolist() == ["25.0%", "100.0%", "100.0%"]
    assert table.loc["steps per sample", "cached"] == "4.00"
    assert table.loc["dynamic halting", "cached"].startswith("yes")
    assert table.loc["dynamic halting", "fct"].startswith("no")
    assert efficiency({}, {})["encoder gradient coverage"] is None


def test_with_range_fixes_the_step_axis():
    fig = with_range(loss_figure(framed(raw_steps(), OVERVIEW)), (5, 25))
    assert fig["layout"]["xaxis"]["range"] == [5.0, 25.0]
    blank = with_range(empty_figure("nothing"), (5, 25))
    assert "range" not in blank["layout"]["xaxis"]


def test_q_chart_draws_precision_where_defined_and_says_when_it_is_not():
    raw = raw_steps()
    never = raw.assign(q_tp=0.0, q_fp=0.0)  # the Q-head never said halt: precision is undefined everywhere
    fig = q_figure(framed(never, halting_spec(never.columns)))
    assert not [t for t in fig["data"] if t["name"] == "precision"]
    assert any("precision undefined" in a["text"] for a in fig["layout"]["annotations"])
    sparse = raw.assign(q_tp=0.0, q_fp=0.0)
    sparse.loc[sparse.index[::10], ["q_tp", "q_fp"]] = [1.0, 1.0]  # said halt on one step in ten
    fig = q_figure(framed(sparse, halting_spec(sparse.columns)))
    prec = [t for t in fig["data"] if t["name"].startswith("precision")]
    assert prec and all("markers" in t["mode"] for t in prec)
    assert any("where defined" in a["text"] for a in fig["layout"]["annotations"])


# ------------------------------------------------------------------------------------------------------------------
# Charts that read well

def step_charts() -> dict[str, dict]:
    """Every step chart the run view and the compare page draw, on the same synthetic run."""
    raw = raw_steps()
    f = framed(raw, OVERVIEW)
    t = pd.DataFrame({"step": [1, 1, 2, 2], "phase": ["inner", "backward", "inner", "backward"],
                      "seconds": [0.6, 1.0, 0.6, 1.0]})
    return {"loss": loss_figure(f), "accuracy": accuracy_figure(f), "coverage": coverage_figure(f),
            "halting": halting_summary_figure(f, "cached"), "timing": timing_figure(t),
            "grad-norm": grad_norm_figure(framed(raw, COVERAGE)),
            "encoder-work": encoder_work_figure(framed(raw, COVERAGE)),
            "heatmap": halting_heatmap(framed(raw, halting_spec(raw.columns), 8)),
            "q-halt": q_figure(framed(raw, halting_spec(raw.columns))),
            "alignment": alignment_figure(framed(raw, ALIGNMENT)),
            "compare": compare_figure({"a": framed(raw, ratio_spec("coverage"))}, "coverage")}


def test_every_step_chart_titles_its_x_axis_step():
    for name, fig in step_charts().items():
        valid(fig)
        assert fig["layout"]["xaxis"]["title"]["text"] == "step", name


def test_the_steps_per_second_axis_has_plain_round_ticks():
    """0.625 steps/s reads "0.63" on the axis, never "625m" (it used SI prefixes), on ticks that start at 0 and
    step by a round amount."""
    y2 = step_charts()["timing"]["layout"]["yaxis2"]
    assert not y2["tickformat"].endswith("s") and "~f" in y2["tickformat"]
    assert y2["tick0"] == 0 and y2["dtick"] in (0.1, 0.2, 0.25, 0.5) and y2["range"][1] >= 0.625
    assert linear_ticks([0.0, 4.6])["dtick"] == 2 and linear_ticks([120.0])["dtick"] == 50
    assert linear_ticks([float("nan")]) == {}


def test_log_axes_get_1_2_5_ticks_written_plainly():
    t = log_ticks(0.03, 4.0)
    assert t["tickvals"] == pytest.approx([0.05, 0.1, 0.2, 0.5, 1, 2])  # within the values shown
    assert t["ticktext"] == ["0.05", "0.1", "0.2", "0.5", "1", "2"]
    wide = log_ticks(1e-6, 10.0)  # many decades: the powers of ten only
    assert wide["tickvals"] == pytest.approx([10.0 ** e for e in range(-6, 2)])
    narrow = log_ticks(0.8, 1.3)  # less than a decade: still a tick on each side of the values
    assert min(narrow["tickvals"]) <= 0.8 and max(narrow["tickvals"]) >= 1.3 and len(narrow["tickvals"]) >= 2
    assert log_ticks(0.0, 1.0) == {}
    gn = grad_norm_figure(framed(raw_steps(), COVERAGE))
    assert gn["layout"]["yaxis"]["type"] == "log" and gn["layout"]["yaxis"]["ticktext"]


def test_accuracy_uses_the_percent_range_its_values_live_in():
    raw = raw_steps()
    low = raw.assign(inflight_exact=np.linspace(0, 0.6, len(raw)), halted_exact=0.0)  # at most 7.5% exact
    f = framed(low, OVERVIEW)
    fig = accuracy_figure(f, pd.DataFrame({"exact": [0.05]}, index=[40]))
    top = fig["layout"]["yaxis"]["range"][1]
    assert top == pytest.approx(0.105)  # 0-10%, not 0-100%
    assert any("axis 0-10%" in a["text"] for a in fig["layout"]["annotations"])
    high = accuracy_figure(framed(raw, OVERVIEW))  # up to 7 of 8 slots exact: the whole 0-100%
    assert high["layout"]["yaxis"]["range"][1] == pytest.approx(1.05)
    assert not high["layout"]["annotations"]
    # a held-out point above the training line widens the axis to hold it
    wide = accuracy_figure(f, pd.DataFrame({"exact": [0.3]}, index=[40]))
    assert wide["layout"]["yaxis"]["range"][1] >= 0.3


def test_the_coverage_bars_caption_is_their_axis_title():
    """The caption under the side bars is laid out by Plotly (an axis title, margins made for it): it was an
    annotation pushed below the plot and clipped by the figure's bottom edge."""
    fig = coverage_figure(framed(raw_steps(), COVERAGE))
    assert fig["layout"]["xaxis2"]["title"]["text"] == SIDE_CAPTION
    assert not any("shown steps" in a["text"] for a in fig["layout"]["annotations"])


def test_identical_overlay_lines_stay_visible_with_a_note():
    same = framed(raw_steps(mode="reencode"), ratio_spec("coverage"))
    frames = {"a": framed(raw_steps(mode="cached"), ratio_spec("coverage")), "b": same, "c": same.copy(),
              "d": same.copy()}
    fig = compare_figure(frames, "coverage")
    valid(fig)
    main = {t["name"]: t for t in fig["data"] if t.get("showlegend", True)}
    assert "dash" not in main["a"]["line"] and "dash" not in main["b"]["line"]  # the first of each line: solid
    assert main["c"]["line"]["dash"] != main["d"]["line"]["dash"]  # each duplicate its own dash, on top
    assert "markers" in main["c"]["mode"] and "markers" in main["d"]["mode"]
    shown = lambda t: {j for j, s in enumerate(t["marker"]["size"]) if s}  # noqa: E731
    assert shown(main["c"]) and shown(main["d"]) and not shown(main["c"]) & shown(main["d"])  # staggered
    notes = [a["text"] for a in fig["layout"]["annotations"]]
    assert any("b = c = d" in n for n in notes)
    # distinct lines: no note, no dashes
    apart = compare_figure({"a": frames["a"], "b": same}, "coverage")
    assert not apart["layout"]["annotations"]
    assert all("dash" not in t["line"] for t in apart["data"] if t.get("showlegend", True))


def test_a_run_keeps_its_colour_whichever_runs_are_picked():
    every = ["cached", "reencode", "fct", "demo-trm", "trm-long", "x/1", "x/2", "x/3"]
    colors = run_colors(every)
    assert len(set(colors.values())) == len(every)  # distinct up to the palette's size
    assert run_colors(list(reversed(every))) == colors  # whatever order the root lists them in
    f = framed(raw_steps(), ratio_spec("coverage"))
    for picked in (["fct", "cached"], ["reencode", "fct", "demo-trm"], ["fct"]):
        fig = compare_figure({n: f.copy() for n in picked}, "coverage", colors=colors)
        drawn = {t["name"]: t["line"]["color"] for t in fig["data"] if t.get("showlegend", True)}
        assert drawn == {n: colors[n] for n in picked}
    # without the root's list, the colours still follow the names, not the order they are given in
    assert run_colors(["fct", "cached"]) == run_colors(["cached", "fct"])


def test_trm_gradient_norms_say_puzzle_table_rows():
    f = framed(raw_steps(), COVERAGE)
    trm, etrm = grad_norm_figure(f, mode="trm"), grad_norm_figure(f, mode="reencode")
    assert "puzzle-table rows" in names(trm) and "encoder" not in names(trm)
    assert "puzzle-table rows" in trm["layout"]["title"]["text"]
    assert "encoder" in names(etrm) and "encoder" in etrm["layout"]["title"]["text"]
    work = encoder_work_figure(f, mode="trm")
    assert "Puzzle-table rows" in work["layout"]["title"]["text"] and "looked up" in names(work)
    assert "Encoder" in encoder_work_figure(f, mode="cached")["layout"]["title"]["text"]


def test_a_gradient_norm_at_zero_throughout_is_named_not_silently_missing():
    """On a log axis a series at 0 cannot be drawn: the chart says which one it is."""
    f = framed(raw_steps(mode="reencode").assign(grad_norm_encoder=0.0), COVERAGE)
    fig = grad_norm_figure(f, mode="trm")
    assert any("puzzle-table rows: 0 on every step" in a["text"] for a in fig["layout"]["annotations"])
    assert not grad_norm_figure(framed(raw_steps(), COVERAGE))["layout"]["annotations"]


def test_phase_table_is_the_mean_pivot_of_the_timings():
    """The timing chart's step x phase table: the mean of each (step, phase)'s rows (ranks), NaN where none, steps
    and phases sorted; the same as pandas' mean pivot it replaced."""
    t = pd.DataFrame({"step": [20.0, 10.0, 10.0, 10.0, 20.0, 30.0], "phase": ["fwd", "fwd", "fwd", "bwd", "bwd", "fwd"],
                      "seconds": [0.5, 0.1, 0.3, 0.2, np.nan, 0.7]})
    got = _phase_table(t)
    want = t.pivot_table(index="step", columns="phase", values="seconds", aggfunc="mean").sort_index()
    assert list(got.index) == [10.0, 20.0, 30.0] and list(got.columns) == ["bwd", "fwd"]
    np.testing.assert_allclose(got.to_numpy(), want.reindex(got.index).to_numpy(), equal_nan=True)
    assert got.loc[10.0, "fwd"] == pytest.approx(0.2) and np.isnan(got.loc[20.0, "bwd"])
