"""The ACT wrapper: encoder work and gradient coverage per mode, label alignment, eval isolation, slot independence,
the Q-continue branch, TRM's puzzle table and its sign-SGD, and the paper-size parameter count."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etrm.config import Config, LossConfig
from etrm.loss import ACTLoss
from etrm.model import ACTModel, ModelShape
from etrm.model.puzzle_emb import PuzzleEmbedding, SignSGD

B = 6
NO_HALT = torch.zeros(B, dtype=torch.bool)
LOSS = ACTLoss(LossConfig())


def _mask(bits) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def _hook_rows(events) -> dict[str, torch.Tensor]:
    """Register a gradient hook on the fresh encoder output; the dict gets the per-row gradient norm."""
    seen: dict[str, torch.Tensor] = {}

    def hook(grad: torch.Tensor) -> None:
        seen["rows"] = grad.detach().flatten(1).abs().sum(1)

    events.encoder_out.register_hook(hook)
    return seen


class EncoderCalls:
    """Counts the rows the demo encoder is called with (a forward hook on ``model.encoder``)."""

    def __init__(self, model: ACTModel) -> None:
        self.rows: list[int] = []
        self.handle = model.encoder.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[0]))

    def take(self) -> list[int]:
        rows, self.rows = self.rows, []
        return rows


# --------------------------------------------------------------------------------------------------------------------
# Encoder gradient coverage and encoder work


@pytest.mark.parametrize("mode", ["trm", "reencode", "fct"])
def test_every_row_gets_gradient_every_step(mode, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config(mode))
    g = torch.Generator().manual_seed(5)
    carry = model.initial_carry(make_batch(B, seed=0))
    calls = None if mode == "trm" else EncoderCalls(model)
    for step in range(6):
        batch = make_batch(B, seed=100 + step, first_sample_id=100 * step)
        force = torch.rand(B, generator=g) < 0.4
        model.zero_grad(set_to_none=True)
        carry, out, events = model(carry, batch, force_halt=force)
        assert events.encoded.all() and events.needs_encode.all()
        assert torch.equal(events.encoded_slots, torch.arange(B))
        if calls is not None:
            assert calls.take() == [B]
        assert events.encoder_out.shape[0] == B
        seen = _hook_rows(events)
        loss, _ = LOSS(out, events)
        loss.backward()
        assert (seen["rows"] > 0).all(), f"step {step}: rows without gradient {seen['rows']}"


def test_cached_encodes_and_trains_exactly_the_reset_slots(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("cached"))
    calls = EncoderCalls(model)
    forces = [[0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1],
              [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    carry = model.initial_carry(make_batch(B, seed=0))
    seen_counts = set()
    for step, force in enumerate(forces):
        batch = make_batch(B, seed=200 + step, first_sample_id=100 * step)
        reset = carry.halted.clone()
        model.zero_grad(set_to_none=True)
        carry, out, events = model(carry, batch, force_halt=_mask(force))
        n = int(reset.sum())
        seen_counts.add(n)
        assert torch.equal(events.reset, reset)
        assert torch.equal(events.needs_encode, reset) and torch.equal(events.encoded, reset)
        assert torch.equal(events.encoded_slots, reset.nonzero().squeeze(1))
        loss, _ = LOSS(out, events)
        if n == 0:
            assert calls.take() == [] and events.encoder_out is None
            loss.backward()
            assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
            continue
        assert calls.take() == [n]
        assert events.encoder_out.shape[0] == n
        seen = _hook_rows(events)
        loss.backward()
        assert (seen["rows"] > 0).all()
        # the context of every slot was built from its own sample's demos
        assert torch.equal(carry.context_sample_id, carry.data["sample_id"])
    assert 0 in seen_counts and len(seen_counts) > 2, seen_counts  # the pattern did exercise partial and zero resets


def test_cached_with_zero_resets_does_not_call_the_encoder(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("cached"))
    batch = make_batch(B, seed=0)
    carry, _, _ = model(model.initial_carry(batch), batch, force_halt=NO_HALT)
    calls = EncoderCalls(model)
    model.zero_grad(set_to_none=True)
    after, out, events = model(carry, batch, force_halt=NO_HALT)
    assert calls.take() == []
    assert events.encoder_out is None and not events.encoded.any() and not events.needs_encode.any()
    assert events.encoded_slots.numel() == 0
    assert torch.equal(after.context, carry.context)
    loss, _ = LOSS(out, events)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_encode_full_batch_fault_encodes_all_but_trains_only_resets(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("cached", fault="encode-full-batch"))
    batch = make_batch(B, seed=0)
    carry, _, _ = model(model.initial_carry(batch), batch, force_halt=NO_HALT)
    reset = _mask([False, True, False, False, True, False])
    calls = EncoderCalls(model)
    after, out, events = model(replace(carry, halted=reset), make_batch(B, seed=1, first_sample_id=50),
                               force_halt=NO_HALT)
    assert calls.take() == [B]
    assert events.encoded.all() and torch.equal(events.needs_encode, reset)
    assert events.encoder_out.shape[0] == B
    seen = _hook_rows(events)
    loss, _ = LOSS(out, events)
    loss.backward()
    assert torch.equal(seen["rows"] > 0, reset)


def test_eval_encodes_each_sample_once(make_mode_config, make_model, make_batch):
    """In eval every ETRM mode reuses the context: one encode of the whole batch, then none."""
    for mode in ("reencode", "cached", "fct"):
        model = make_model(make_mode_config(mode))
        calls = EncoderCalls(model)
        model.evaluate_batch(make_batch(B, seed=0))
        assert calls.take() == [B], mode


# --------------------------------------------------------------------------------------------------------------------
# Label alignment


@pytest.mark.parametrize("fault", ["none", "label-from-batch"])
def test_loss_labels_follow_the_carry(mode, fault, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config(mode, fault=fault))
    first = make_batch(B, seed=0, first_sample_id=0)
    carry, out, events = model(model.initial_carry(first), first, force_halt=NO_HALT)
    assert torch.equal(out.labels, first["labels"])  # first step: everyone reset, the two coincide
    second = make_batch(B, seed=1, first_sample_id=100)
    reset = _mask([True, False, True, False, False, True])
    after, out, events = model(replace(carry, halted=reset), second, force_halt=NO_HALT)
    assert torch.equal(out.labels[reset], second["labels"][reset])
    assert torch.equal(out.labels[reset], after.data["labels"][reset])
    if fault == "none":
        assert torch.equal(out.labels, after.data["labels"])
        assert torch.equal(events.label_sample_id, after.data["sample_id"])
    else:
        cont = ~reset
        assert torch.equal(out.labels, second["labels"])
        for i in cont.nonzero().squeeze(1).tolist():
            assert not torch.equal(out.labels[i], after.data["labels"][i])
        assert torch.equal(events.label_sample_id, second["sample_id"])
        assert (events.label_sample_id[cont] != after.data["sample_id"][cont]).all()


# --------------------------------------------------------------------------------------------------------------------
# Eval isolation and slot independence


def test_evaluate_batch_runs_max_steps_and_leaves_training_state_alone(mode, make_mode_config, make_model,
                                                                        make_batch):
    model = make_model(make_mode_config(mode, act={"halt_exploration_prob": 0.5}))
    batch = make_batch(B, seed=0)
    carry = model.initial_carry(batch)
    for _ in range(2):
        carry, _, _ = model(carry, batch)
    gen_state = model.generator(torch.device("cpu")).get_state().clone()
    snapshot = {k: v.clone() for k, v in carry.tensors().items()}
    core_calls: list[int] = []
    handle = model.core.register_forward_hook(lambda m, a, o: core_calls.append(1))
    eval_batch = make_batch(B, seed=1, first_sample_id=500)
    res = model.evaluate_batch(eval_batch)
    handle.remove()
    max_steps = model.max_steps
    assert max_steps == (3 if mode == "fct" else 4)
    assert len(core_calls) == max_steps
    assert res["preds"].shape == (max_steps, B, eval_batch["inputs"].shape[1])
    assert res["q_halt_logits"].shape == (max_steps, B)
    assert torch.equal(res["labels"], eval_batch["labels"])
    assert model.training
    assert torch.equal(model.generator(torch.device("cpu")).get_state(), gen_state)
    assert all(torch.equal(carry.tensors()[k], v) for k, v in snapshot.items())
    # The same as stepping a fresh carry in eval mode by hand, which halts everyone exactly at max steps.
    model.eval()
    with torch.no_grad():
        c = model.initial_carry(eval_batch)
        for s in range(max_steps):
            c, out, _ = model(c, eval_batch)
            last = s == max_steps - 1
            assert bool(c.halted.all()) == last and bool(c.halted.any()) == last
            assert torch.equal(out.logits.argmax(-1), res["preds"][s])
    # Training continues from the untouched carry, with the generator where it was.
    model.train()
    model(carry, batch)


@given(perm=st.permutations(list(range(B))))
@settings(max_examples=4)
def test_permuting_the_batch_permutes_the_outputs(perm, mode, make_mode_config, make_model, make_batch, take_rows):
    model = make_model(make_mode_config(mode))
    model.eval()
    batch = make_batch(B, seed=3)
    pb = take_rows(batch, perm)
    idx = torch.tensor(perm)
    with torch.no_grad():
        c1, c2 = model.initial_carry(batch), model.initial_carry(pb)
        for _ in range(model.max_steps):
            c1, o1, _ = model(c1, batch)
            c2, o2, _ = model(c2, pb)
            torch.testing.assert_close(o2.logits, o1.logits[idx], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(o2.q_halt_logits, o1.q_halt_logits[idx], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c2.z_H, c1.z_H[idx], atol=1e-5, rtol=1e-5)


def test_eval_never_halts_early_even_with_confident_q(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("reencode"))
    with torch.no_grad():
        model.core.q_head.bias.fill_(10.0)  # the Q-head says "halt" everywhere
    batch = make_batch(B, seed=0)
    c, _, _ = model(model.initial_carry(batch), batch)
    assert c.halted.all()  # training: adaptive, halts at step 1
    model.eval()
    c = model.initial_carry(batch)
    for s in range(model.max_steps):
        c, _, events = model(c, batch)
        assert c.halted.all() == (s == model.max_steps - 1)
        assert not events.q_says_halt.any()


def test_fct_halts_only_after_its_own_step_count(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("fct", fct={"steps": 3}, act={"halt_max_steps": 8}))
    with torch.no_grad():
        model.core.q_head.bias.fill_(10.0)
    batch = make_batch(B, seed=0)
    c = model.initial_carry(batch)
    for s in range(1, 7):
        c, _, _ = model(c, batch, force_halt=torch.ones(B, dtype=torch.bool))
        assert c.halted.all() == (s % 3 == 0) and (c.halted.any() == c.halted.all())
        assert (c.steps == (s - 1) % 3 + 1).all()


# --------------------------------------------------------------------------------------------------------------------
# The Q-continue branch


def _perturb_q_head(model: ACTModel, seed: int = 0) -> None:
    # At init the head outputs its bias (-5, -5) for every state, so the bootstrapped target equals the prediction and
    # the Q-continue gradient is exactly zero; a small random head makes the branch's learning signal visible.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.core.q_head.weight.copy_(0.3 * torch.randn(model.core.q_head.weight.shape, generator=g))
        model.core.q_head.bias.copy_(torch.tensor([-1.0, 0.5]))


def test_q_continue_target_is_the_bootstrapped_next_step_value(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("reencode", act={"q_continue": True, "halt_exploration_prob": 0.0}))
    _perturb_q_head(model)
    batch = make_batch(B, seed=0)
    carry = model.initial_carry(batch)
    for _ in range(model.max_steps):
        carry, out, _ = model(carry, batch, force_halt=NO_HALT)
        assert out.target_q_continue is not None and out.target_q_continue.shape == (B,)
        assert not out.target_q_continue.requires_grad
        with torch.no_grad():
            d = carry.data
            prefix = model.encoder(d["demo_inputs"], d["demo_outputs"], d["demo_mask"])
            x = model.core.embed(d["inputs"], prefix)
            _, _, _, nh, nc = model.core(carry.z_H, carry.z_L, x)
            last = carry.steps >= model.max_steps
            expected = torch.sigmoid(torch.where(last, nh, torch.maximum(nh, nc)))
        torch.testing.assert_close(out.target_q_continue, expected, atol=1e-6, rtol=1e-5)
    assert last.all()  # the last iteration exercised the is-last branch


@pytest.mark.parametrize("q_continue", [False, True])
def test_q_continue_loss_reaches_its_head_row(q_continue, make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("reencode", act={"q_continue": q_continue}))
    _perturb_q_head(model)
    batch = make_batch(B, seed=0)
    carry, out, events = model(model.initial_carry(batch), batch, force_halt=NO_HALT)
    loss, metrics = LOSS(out, events)
    loss.backward()
    grad = model.core.q_head.weight.grad
    assert grad[0].abs().sum() > 0  # q_halt always trains
    if q_continue:
        assert out.target_q_continue is not None and events.q_continue_logits is not None
        assert metrics["q_continue_loss"] > 0
        assert grad[1].abs().sum() > 0 and model.core.q_head.bias.grad[1] != 0
    else:
        assert out.target_q_continue is None and events.q_continue_logits is None
        assert metrics["q_continue_loss"] == 0
        assert not grad[1].any()


def test_q_continue_loss_decreases_with_training(make_mode_config, make_model, make_batch):
    """A few SGD steps on the Q-continue row reduce the Q-continue loss on a fixed batch and carry.

    Every slot is at its last step, so the target is sigmoid(next q_halt): fixed while only the continue row (which
    nothing but the Q-continue loss reaches) is trained, which makes the decrease monotone.
    """
    model = make_model(make_mode_config("reencode", act={"q_continue": True}))
    _perturb_q_head(model, seed=1)
    n = 8
    no_halt = torch.zeros(n, dtype=torch.bool)
    batch = make_batch(n, seed=0)
    carry, _, _ = model(model.initial_carry(batch), batch, force_halt=no_halt)
    carry = replace(carry, steps=torch.full((n,), model.max_steps - 1, dtype=torch.int32))
    head = model.core.q_head
    opt = torch.optim.SGD(head.parameters(), lr=0.005)
    history = []
    for _ in range(10):
        opt.zero_grad()
        _, out, events = model(carry, batch, force_halt=no_halt)
        loss, metrics = LOSS(out, events)
        loss.backward()
        assert head.weight.grad[1].any()
        head.weight.grad[0] = 0.0  # keep the target fixed: do not train the q_halt row
        head.bias.grad[0] = 0.0
        opt.step()
        history.append(metrics["q_continue_loss"].item())
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.85 * history[0], history


# --------------------------------------------------------------------------------------------------------------------
# TRM's puzzle table and SignSGD


def test_puzzle_rows_are_leaves_in_training_only(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("trm"))
    assert "puzzle_emb.weights" in dict(model.named_buffers())
    assert all("puzzle_emb" not in n for n, _ in model.named_parameters())
    ids = torch.tensor([1, 4, 4])
    rows = model.puzzle_emb.rows(ids)
    assert rows.is_leaf and rows.requires_grad and torch.equal(rows, model.puzzle_emb.weights[ids])
    prefix = model.puzzle_emb.prefix(rows)
    assert prefix.shape == (3, model.core.prefix_len, model.cfg.arch.hidden_size)
    assert torch.equal(prefix[:, 0], rows) and not prefix[:, 1:].any()
    model.eval()
    assert not model.puzzle_emb.rows(ids).requires_grad


def test_sign_sgd_sums_duplicates_and_touches_only_looked_up_rows():
    emb = PuzzleEmbedding(num_ids=8, dim=3, prefix_len=2)
    with torch.no_grad():
        emb.weights.copy_(torch.arange(24, dtype=torch.float32).view(8, 3) / 10)
    before = emb.weights.clone()
    rows = emb.rows(torch.tensor([2, 2, 5, 6]))
    # id 2: +1 and -3 sum to -2 (a last-write-wins update would take the sign of one of them); id 6: zero gradient.
    rows.backward(torch.tensor([[1.0, 2.0, -1.0], [-3.0, -1.0, -1.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    lr, wd = 0.1, 0.5
    opt = SignSGD(emb, lr=lr, weight_decay=wd)
    opt.step()
    decay = 1.0 - lr * wd
    expected = before.clone()
    expected[2] = before[2] * decay - lr * torch.tensor([-1.0, 1.0, -1.0])
    expected[5] = before[5] * decay - lr * torch.tensor([1.0, -1.0, 0.0])
    expected[6] = before[6] * decay
    torch.testing.assert_close(emb.weights, expected, atol=1e-7, rtol=0)
    untouched = [0, 1, 3, 4, 7]
    assert torch.equal(emb.weights[untouched], before[untouched])
    # zero_grad forgets the lookup: a second step changes nothing
    opt.zero_grad()
    after = emb.weights.clone()
    opt.step()
    assert torch.equal(emb.weights, after)


def test_sign_sgd_after_a_model_step(make_mode_config, make_model, make_batch):
    model = make_model(make_mode_config("trm"))
    batch = make_batch(B, seed=0)
    batch["puzzle_id"] = torch.tensor([3, 3, 0, 7, 3, 0])
    before = model.puzzle_emb.weights.clone()
    _, out, events = model(model.initial_carry(batch), batch)
    loss, _ = LOSS(out, events)
    loss.backward()
    rows = model.puzzle_emb.last_rows
    assert rows is events.encoder_out and rows.grad is not None
    lr, wd = 0.01, 0.1
    SignSGD(model.puzzle_emb, lr=lr, weight_decay=wd).step()
    w = model.puzzle_emb.weights
    for pid in range(w.shape[0]):
        sel = batch["puzzle_id"] == pid
        if not sel.any():
            assert torch.equal(w[pid], before[pid])
            continue
        g = rows.grad[sel].sum(0)
        assert g.any()
        exp = before[pid] * (1 - lr * wd) - lr * torch.sign(g)
        torch.testing.assert_close(w[pid], exp, atol=1e-7, rtol=0)
        # every coordinate with a gradient moved by lr (net of decay)
        assert torch.allclose((before[pid] * (1 - lr * wd) - w[pid]).abs()[g != 0], torch.tensor(lr))


# --------------------------------------------------------------------------------------------------------------------
# Size


def test_paper_size_trm_has_upstream_parameter_count():
    cfg = Config.from_dict({
        "model": "trm",
        "arch": {"hidden_size": 512, "num_heads": 8, "expansion": 4, "L_layers": 2, "H_cycles": 3, "L_cycles": 4,
                 "puzzle_emb_len": 16},
    })
    model = ACTModel(cfg, ModelShape(vocab_size=12, seq_len=900, num_puzzle_ids=4))
    assert model.num_trainable_parameters() == 6_829_058
    assert model.num_trainable_parameters() == sum(p.numel() for p in model.parameters())
    assert model.puzzle_emb.weights.numel() == 4 * 512  # the table is a buffer, not counted
