"""Loss head: stablemax/softmax cross-entropy against independent references, the ACT loss terms and its metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from etrm.config import LossConfig
from etrm.loss import IGNORE_LABEL, ACTLoss, softmax_cross_entropy, stablemax_cross_entropy, stablemax_log_probs
from etrm.model.act import StepOutput


def _stablemax_ce_reference(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-token stablemax cross-entropy in float64, one element at a time."""
    b, s, v = logits.shape
    out = np.zeros((b, s), dtype=np.float64)
    for i in range(b):
        for t in range(s):
            if labels[i, t] == IGNORE_LABEL:
                continue
            sv = [1.0 / (1.0 - float(x)) if x < 0 else float(x) + 1.0 for x in logits[i, t]]
            out[i, t] = -math.log(sv[labels[i, t]] / sum(sv))
    return out


def _random_logits_labels(seed: int, scale: float, b: int = 3, s: int = 5, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g) * scale
    labels = torch.randint(0, v, (b, s), generator=g)
    labels = torch.where(torch.rand(b, s, generator=g) < 0.3, IGNORE_LABEL, labels)
    return logits, labels


@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.01, 1.0, 10.0, 1e4]))
def test_stablemax_matches_float64_reference(seed, scale):
    logits, labels = _random_logits_labels(seed, scale)
    got = stablemax_cross_entropy(logits, labels)
    assert got.dtype == torch.float64
    ref = _stablemax_ce_reference(logits.numpy(), labels.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert (got[labels == IGNORE_LABEL] == 0).all()


@given(seed=st.integers(0, 10_000))
def test_stablemax_is_a_distribution(seed):
    logits, _ = _random_logits_labels(seed, 3.0)
    p = stablemax_log_probs(logits).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=torch.float64))
    # monotone in the logit, like softmax
    order_logits = logits.argsort(-1)
    order_p = p.argsort(-1)
    assert torch.equal(order_logits, order_p)


@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.1, 1.0, 20.0]))
def test_softmax_matches_torch_reference(seed, scale):
    logits, labels = _random_logits_labels(seed, scale)
    got = softmax_cross_entropy(logits, labels)
    logp = torch.log_softmax(logits.double(), -1)
    ref = -torch.gather(logp, -1, labels.clamp_min(0)[..., None])[..., 0]
    ref = torch.where(labels == IGNORE_LABEL, 0.0, ref)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_cross_entropy_gradient_skips_ignored_positions():
    for ce in (stablemax_cross_entropy, softmax_cross_entropy):
        logits, labels = _random_logits_labels(0, 2.0)
        logits.requires_grad_(True)
        ce(logits, labels).sum().backward()
        ignored = labels == IGNORE_LABEL
        assert not logits.grad[ignored].any()
        assert (logits.grad[~ignored].abs().sum(-1) > 0).all()


# --------------------------------------------------------------------------------------------------------------------
# ACTLoss


def _step_output(target: bool = False, v: int = 6) -> StepOutput:
    """Five slots: 0 and 1 exactly right, 2 one token wrong, 3 all wrong, 4 padding (every label ignored)."""
    labels = torch.tensor([
        [1, 2, 3, IGNORE_LABEL],
        [4, 4, IGNORE_LABEL, IGNORE_LABEL],
        [0, 1, 2, 3],
        [5, 5, 5, IGNORE_LABEL],
        [IGNORE_LABEL] * 4,
    ])
    preds = labels.clamp_min(0).clone()
    preds[2, 3] = 4
    preds[3] = 0
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, v, generator=g)
    logits.scatter_(-1, preds[..., None], 4.0)  # argmax == preds
    return StepOutput(
        logits=logits.requires_grad_(True), labels=labels,
        q_halt_logits=torch.tensor([0.5, -1.0, 2.0, -0.3, 1.5], requires_grad=True),
        q_continue_logits=torch.tensor([0.1, 0.2, -0.4, 1.0, 0.0], requires_grad=True),
        target_q_continue=torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7]) if target else None,
        steps=torch.tensor([1, 2, 3, 4, 2], dtype=torch.int32),
        halted=torch.tensor([True, False, True, True, True]),
    )


@pytest.mark.parametrize("kind,q_weight", [("stablemax", 0.5), ("softmax", 0.25)])
@pytest.mark.parametrize("target", [False, True])
def test_act_loss_terms(kind, q_weight, target):
    out = _step_output(target)
    loss_fn = ACTLoss(LossConfig(kind=kind, q_weight=q_weight))
    events = SimpleNamespace()
    loss, m = loss_fn(out, events)
    ce = stablemax_cross_entropy if kind == "stablemax" else softmax_cross_entropy
    per_tok = ce(out.logits.detach(), out.labels).double()
    counts = (out.labels != IGNORE_LABEL).sum(-1)
    lm = sum(per_tok[i].sum() / counts[i] for i in range(4))  # slot 4 has no target and adds nothing
    torch.testing.assert_close(m["lm_loss"].double(), lm.double())
    seq_correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    qh = F.binary_cross_entropy_with_logits(out.q_halt_logits[:4].detach(), seq_correct, reduction="sum")
    torch.testing.assert_close(m["q_halt_loss"].float(), qh)
    if target:
        qc = F.binary_cross_entropy_with_logits(out.q_continue_logits[:4].detach(), out.target_q_continue[:4],
                                                reduction="sum")
    else:
        qc = torch.tensor(0.0)
    torch.testing.assert_close(m["q_continue_loss"].float(), qc)
    torch.testing.assert_close(loss.double(), (lm + q_weight * (qh + qc)).double(), atol=1e-5, rtol=1e-5)
    assert torch.equal(m["loss"], loss.detach())
    # gradients: padding slot 4 gets none from any term; q_continue only when there is a target
    loss.backward()
    assert not out.logits.grad[4].any() and out.q_halt_logits.grad[4] == 0
    assert (out.q_halt_logits.grad[:4] != 0).all()
    assert bool(out.q_continue_logits.grad is not None and out.q_continue_logits.grad[:4].ne(0).all()) == target
    # events carry the per-slot facts
    assert torch.equal(events.seq_correct, torch.tensor([True, True, False, False, False]))
    assert torch.equal(events.token_correct, torch.tensor([3, 2, 3, 0, 0]))
    assert torch.equal(events.token_count, torch.tensor([3, 2, 4, 3, 0]))
    assert set(events.losses) == {"lm_loss", "q_halt_loss", "q_continue_loss"}
    assert not events.non_finite


def test_act_loss_metrics_count_over_their_slots():
    out = _step_output()
    _, m = ACTLoss(LossConfig())(out)
    # valid = slots 0..3; halted = slots 0, 2, 3 (and 4, which has no target)
    assert m["inflight.count"] == 4 and m["halted.count"] == 3
    assert m["inflight.exact"] == 2 and m["halted.exact"] == 1
    torch.testing.assert_close(m["inflight.token_acc"].float(), torch.tensor(1 + 1 + 0.75 + 0.0))
    torch.testing.assert_close(m["halted.token_acc"].float(), torch.tensor(1 + 0.75 + 0.0))
    assert m["inflight.steps"] == 1 + 2 + 3 + 4 and m["halted.steps"] == 1 + 3 + 4
    # q_halt >= 0 predicts correctness: slot 0 right (0.5, correct), 1 wrong (-1, correct), 2 wrong (2, not), 3 right
    assert m["inflight.q_halt_acc"] == 2 and m["halted.q_halt_acc"] == 2


def test_act_loss_flags_non_finite():
    out = _step_output()
    with torch.no_grad():
        out.logits[1, 0, 0] = float("nan")
    events = SimpleNamespace()
    loss, _ = ACTLoss(LossConfig())(out, events)
    assert not torch.isfinite(loss) and bool(events.non_finite)


def test_act_loss_on_a_model_step(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("reencode"))
    batch = make_batch(4, seed=0)
    batch["labels"][3] = IGNORE_LABEL  # a padding slot
    _, out, events = model(model.initial_carry(batch), batch)
    loss, m = ACTLoss(LossConfig())(out, events)
    assert torch.isfinite(loss) and m["inflight.count"] == 3
    assert events.seq_correct.shape == (4,) and not events.seq_correct[3]
    assert torch.equal(events.token_count, (batch["labels"] != IGNORE_LABEL).sum(-1))
