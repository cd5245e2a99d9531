"""The Samples tab's figures from the ledger's bins and the steps table (pure functions, no browser)."""

from __future__ import annotations

import pandas as pd
import pytest

from dashboards import samples
from diagnostics.trace import ledger


def bins_of(records: list[tuple[float, int]]) -> pd.DataFrame:
    """q_prob and halt_step bins of (q-halt logit, exact) records, all in task 1, halting at step 2."""
    rows = [(i, 1, 1, 0, 0, 1, 2, 2, ledger.Q_HALT, 0, e, 1, 1, logit, None, 0) for i, (logit, e) in enumerate(records)]
    inc = ledger.increments(rows)
    return pd.DataFrame([(t, k, b, *v) for (t, k, b), v in inc.bins.items()],
                        columns=["task", "kind", "bin", *ledger.BIN_SUMS])


def test_calibration_figure_puts_each_bin_at_its_mean_probability_and_exact_rate():
    # three exits at p = 0.5 (one exact), two at p ~ 0.88 (both exact)
    bins = bins_of([(0.0, 1), (0.0, 0), (0.0, 0), (2.0, 1), (2.0, 1)])
    fig = samples.calibration_figure(bins)
    pts = fig["data"][1]
    assert pts["x"] == pytest.approx([0.5, 0.8807970779778823])
    assert pts["y"] == pytest.approx([1 / 3, 1.0])
    assert pts["customdata"] == [3, 2]
    ece = (abs(1.5 - 1) + abs(2 * 0.8807970779778823 - 2)) / 5
    assert f"{ece:.3f}" in fig["layout"]["annotations"][0]["text"]
    hist = samples.halt_step_figure(bins)
    assert hist["data"][1]["y"] == [3.0] and hist["data"][0]["y"] == [2.0]  # exact, wrong at ACT step 2


def test_halt_reasons_are_per_step_counts_of_q_halts_and_max_steps():
    f = pd.DataFrame({"step": [10.0, 20.0], "n": [10.0, 10.0], "halted": [50.0, 30.0], "halted_early": [20.0, 30.0]})
    fig = samples.halt_reasons_figure(f)
    assert fig["data"][0]["y"] == [2.0, 3.0] and fig["data"][1]["y"] == [3.0, 0.0]


def test_an_empty_ledger_says_so():
    empty = pd.DataFrame(columns=["task", "kind", "bin", *ledger.BIN_SUMS])
    assert "no sample" in samples.calibration_figure(empty)["layout"]["annotations"][0]["text"]
