"""The figure registry (``diagnostics.trace.figures``): one definition per figure, ratio-of-sums arithmetic, one Q rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diagnostics.trace import figures
from diagnostics.events import q_says_halt
from diagnostics.probes import default_probes
from etrm.config import LossConfig
from etrm.loss import ACTLoss
from etrm.model.act import StepOutput
from etrm.train.evaluate import would_halt_step


def test_every_figure_reads_declared_counters_and_no_name_is_a_counter():
    counters = {name for p in default_probes(4, {"encoder": [], "rest": []}) for name, _ in p.counters}
    for fig in figures.REGISTRY.values():
        assert set(fig.terms) <= counters, (fig.name, set(fig.terms) - counters)
        assert fig.name not in counters  # a figure never shadows a stored column
        assert fig.scale in ("fraction", "per slot", "per step", "per sample", "step", "ratio")
        assert fig.description and fig.label


def test_ratio_of_sums_over_any_range_and_nan_for_a_zero_denominator():
    rows = [{"step": 1, "q_tp": 1.0, "q_fp": 1.0, "q_fn": 0.0, "loss": 64.0, "slots": 64.0},
            {"step": 2, "q_tp": 0.0, "q_fp": 0.0, "q_fn": 2.0, "loss": 32.0, "slots": 64.0}]
    v = figures.of_rows(rows)
    assert v["q_precision"] == 0.5 and v["q_recall"] == pytest.approx(1 / 3) and v["loss_per_slot"] == 0.75
    assert math.isnan(figures.of_rows(rows[1:])["q_precision"])  # Q never said halt: undefined, not 0
    df = pd.DataFrame(rows).set_index("step", drop=False)
    assert figures.over(df, 2, 2)["loss_per_slot"] == 0.5
    per_row = figures.columns(df)
    assert per_row["loss_per_slot"].tolist() == [1.0, 0.5]
    assert np.isnan(per_row["q_precision"].iloc[1])
    bucket = pd.DataFrame({"loss": [96.0], "slots": [128.0], "grad_norm_encoder": [3.0]})
    assert figures.columns(bucket, n=np.array([2]))["grad_norm_encoder_mean"].tolist() == [1.5]  # per step


def test_figures_respect_modes():
    rows = [{"step": 1, "context_cross_ss": 1.0, "context_sq_norm": 4.0, "halted_early": 1.0, "halted": 2.0}]
    assert "context_cross_share" not in figures.of_rows(rows, "trm")
    assert "early_halt_share" not in figures.of_rows(rows, "fct")
    assert figures.of_rows(rows, "reencode")["early_halt_share"] == 0.5


def test_q_says_halt_is_one_rule():
    q = torch.tensor([0.0, 0.5, -0.5, 1.0])
    assert q_says_halt(q).tolist() == [False, True, False, True]  # strictly above 0
    cont = torch.tensor([-1.0, 1.0, -1.0, 0.5])
    assert q_says_halt(q, cont).tolist() == [True, False, True, True]  # the Q-continue variant


def _out(q_halt: list[float], q_cont: list[float], target: bool) -> StepOutput:
    labels = torch.tensor([[1, 2], [1, 2], [1, 2]])
    logits = torch.nn.functional.one_hot(labels, 4).float() * 5.0  # every sequence is right
    return StepOutput(logits=logits, labels=labels, q_halt_logits=torch.tensor(q_halt),
                      q_continue_logits=torch.tensor(q_cont),
                      target_q_continue=torch.full((3,), 0.5) if target else None,
                      steps=torch.ones(3, dtype=torch.int32), halted=torch.ones(3, dtype=torch.bool))


def test_the_loss_uses_the_q_rule():
    """Q-halt accuracy: a logit of exactly 0 is "continue" (the loss used to read it as halt, the probe not)."""
    _, m = ACTLoss(LossConfig())(_out([0.0, 1.0, -1.0], [0.0, 0.0, 0.0], target=False))
    assert m["inflight.q_halt_acc"].item() == 1  # only the 1.0 logit says halt on these correct sequences
    # with the Q-continue variant on, halt means q_halt > q_continue
    _, m = ACTLoss(LossConfig())(_out([0.5, 1.0, -1.0], [1.0, 2.0, -2.0], target=True))
    assert m["inflight.q_halt_acc"].item() == 1  # only the last slot (-1 > -2)


def test_evaluation_uses_the_q_rule():
    q_halt = torch.tensor([[0.0, 0.5], [1.0, 0.6]])
    assert would_halt_step(q_halt).tolist() == [1, 0]
    q_cont = torch.tensor([[-1.0, 1.0], [2.0, 0.0]])
    assert would_halt_step(q_halt, q_cont).tolist() == [0, 1]


def test_the_docs_figure_list_is_generated_from_the_registry():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md").read_text()
    assert figures.update_doc(doc) == doc, "run: python -m diagnostics.trace.figures docs/diagnostics.md"
    for name in figures.REGISTRY:
        assert f"| `{name}` |" in doc
