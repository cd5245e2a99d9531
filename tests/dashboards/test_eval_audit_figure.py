"""The eval-per-ACT-step figure (``dashboards.samples.eval_act_step_figure``): a pure function of
``load_eval_audits``' rows, checked against Plotly's schema and for what it draws."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboards.samples import eval_act_step_figure
from diagnostics.trace.eval_audits import COLUMNS, ActStep, EvalAudit
from diagnostics.doctor.eval_findings import audit_rows


def audit(step: int, curve: list[float], weights: str = "ema", halt_step: float = 2.5) -> EvalAudit:
    steps = tuple(ActStep(k + 1, e, e, 1.0 / len(curve)) for k, e in enumerate(curve))
    return EvalAudit(step, weights, "abc123", "q_halt > 0", 64.0, curve[1], curve[1], halt_step, steps)


def test_one_line_per_evaluation_the_last_bold_with_its_would_halt_point_and_raw_dashed() -> None:
    rows = audit_rows([audit(100, [0.0, 0.1, 0.2]), audit(200, [0.1, 0.3, 0.5]), audit(200, [0.2, 0.4, 0.6], "raw"),
                       audit(300, [0.2, 0.5, 0.7]), audit(300, [0.3, 0.5, 0.9], "raw")])
    fig = eval_act_step_figure(rows)
    go.Figure(fig)  # valid against Plotly's schema
    names = [t["name"] for t in fig["data"]]
    assert names == ["eval @ 100 (ema)", "eval @ 200 (ema)", "eval @ 300 (ema)", "would-halt (mean step)",
                     "eval @ 300 (raw)"]
    last = fig["data"][2]
    assert last["x"] == [1.0, 2.0, 3.0] and last["y"] == [0.2, 0.5, 0.7]
    assert last["line"]["width"] > fig["data"][0]["line"]["width"]  # the newest evaluation stands out
    halt = fig["data"][3]
    assert halt["x"] == [2.5] and halt["y"] == [0.5] and halt["marker"]["symbol"] == "diamond"
    assert fig["data"][4]["y"] == [0.3, 0.5, 0.9] and fig["data"][4]["line"]["dash"] == "dash"
    assert fig["layout"]["xaxis"]["title"]["text"] == "ACT step"


def test_raw_weights_when_asked_or_when_there_is_no_ema() -> None:
    rows = audit_rows([audit(100, [0.1, 0.2], "raw")])
    assert eval_act_step_figure(rows)["data"][0]["name"] == "eval @ 100 (raw)"
    both = audit_rows([audit(100, [0.1, 0.2]), audit(100, [0.3, 0.4], "raw")])
    fig = eval_act_step_figure(both, weights="raw")
    assert fig["data"][0]["y"] == [0.3, 0.4] and fig["data"][-1]["name"] == "eval @ 100 (ema)"


def test_no_audits_says_why() -> None:
    fig = eval_act_step_figure(pd.DataFrame(columns=list(COLUMNS)))
    go.Figure(fig)
    assert fig["data"] == [] and "no evaluation audits" in fig["layout"]["annotations"][0]["text"]
    fig = eval_act_step_figure(audit_rows([audit(100, [0.1, 0.2], "raw")]), weights="ema")
    assert "no evaluation audits of the ema weights" in fig["layout"]["annotations"][0]["text"]
