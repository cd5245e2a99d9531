"""Building blocks (RMS norm, RoPE, attention, SwiGLU, blocks), the reasoning core's recursion, and the demo encoder."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from etrm.config import ArchConfig, EncoderConfig
from etrm.model.encoder import DemoEncoder
from etrm.model.layers import (Attention, Block, Linear, RotaryEmbedding, SwiGLU, apply_rope, rms_norm,
                               trunc_normal_init, truncated_std)
from etrm.model.recursion import ReasoningCore


@given(seed=st.integers(0, 1000), scale=st.floats(1e-2, 1e3))
def test_rms_norm_matches_float64_formula(seed, scale):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed)) * scale
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert rms_norm(x.bfloat16()).dtype == torch.bfloat16


def test_linear_init_is_truncated_with_std_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    lin = Linear(256, 512)
    w = lin.weight.detach()
    std = 1 / math.sqrt(256)
    # upstream's correction: the draw is cut at 2 sigma of a normal widened so that the samples' std is ``std``
    bound = 2 * std / truncated_std()
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.95 * bound
    assert abs(w.std().item() / std - 1) < 0.01
    assert lin.bias is None and Linear(4, 3, bias=True).bias.eq(0).all()


def test_truncated_std_matches_the_closed_form_at_two_sigma():
    # phi(2) = 0.053991, Phi(2) - Phi(-2) = 0.954500: sqrt(1 - 4 * 0.053991 / 0.954500) = 0.879626
    assert truncated_std(2.0) == pytest.approx(0.879626, abs=1e-6)
    assert truncated_std(50.0) == pytest.approx(1.0)


@pytest.mark.parametrize("std", [1.0, 0.02, 1 / math.sqrt(512)])
def test_trunc_normal_init_has_the_asked_std_on_large_tensors(std):
    torch.manual_seed(1)
    w = trunc_normal_init(torch.empty(1_000_000), std)
    # 1e6 samples: the relative standard error of the sample std is ~0.07%; 1% leaves room and rejects 0.88
    assert abs(w.std().item() / std - 1) < 0.01
    assert abs(w.mean().item()) < 0.01 * std
    assert w.abs().max().item() <= 2 * std / truncated_std() * (1 + 1e-6)
    # symmetric and bell-shaped: fewer samples near the cut than near zero
    near0 = (w.abs() < 0.25 * std).float().mean()
    near_cut = ((w.abs() > 2.0 * std) & (w.abs() < 2.25 * std)).float().mean()
    assert near_cut < 0.5 * near0 and near_cut > 0
    assert trunc_normal_init(torch.ones(5), 0.0).eq(0).all()


@given(seed=st.integers(0, 1000), shift=st.integers(0, 8))
def test_rope_preserves_norm_and_depends_on_relative_position(seed, shift):
    g = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(head_dim=8, max_len=32, theta=10000.0)
    cos, sin = rope(32)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    xs = torch.stack([q] * 32)[None, None]
    ks = torch.stack([k] * 32)[None, None]
    rq, rk = apply_rope(xs, cos, sin)[0, 0], apply_rope(ks, cos, sin)[0, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(32), atol=1e-5, rtol=1e-5)
    # <R_m q, R_n k> depends only on m - n
    d1 = rq[3 + shift] @ rk[3]
    d2 = rq[10 + shift] @ rk[10]
    torch.testing.assert_close(d1, d2, atol=1e-4, rtol=1e-4)
    assert torch.allclose(rq[0], q)  # position 0 is the identity


def test_attention_is_non_causal_and_respects_key_mask():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 6, 32)
    y = attn(x)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(x2)[:, 0], y[:, 0])  # the first position sees the last
    # cross-attention: masked keys do not matter
    q, ctx = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    out = attn(q, context=ctx, key_mask=mask)
    ctx2 = ctx.clone()
    ctx2[~mask] = torch.randn(int((~mask).sum()), 32) * 10
    torch.testing.assert_close(attn(q, context=ctx2, key_mask=mask), out)
    ctx3 = ctx.clone()
    ctx3[0, 0] += 5.0
    assert not torch.allclose(attn(q, context=ctx3, key_mask=mask)[0], out[0])


def test_attention_without_rope_is_permutation_equivariant():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    perm = torch.randperm(7)
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], atol=1e-5, rtol=1e-5)
    rope = RotaryEmbedding(8, 7, 10000.0)(7)
    assert not torch.allclose(attn(x[:, perm], rope=rope), attn(x, rope=rope)[:, perm], atol=1e-3)


@pytest.mark.parametrize("hidden,expansion,inter", [(512, 4.0, 1536), (64, 2.0, 256), (64, 4.0, 256), (768, 4.0, 2048)])
def test_swiglu_width_is_upstream_rounding(hidden, expansion, inter):
    mlp = SwiGLU(hidden, expansion)
    assert mlp.gate_up.weight.shape == (2 * inter, hidden)
    assert mlp.down.weight.shape == (hidden, inter)


def test_block_is_post_norm():
    torch.manual_seed(0)
    block = Block(32, 4, 2.0)
    x = torch.randn(2, 5, 32) * 7
    y = block(x, RotaryEmbedding(8, 5, 10000.0)(5))
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# ReasoningCore


def _core(h_cycles: int = 2, l_cycles: int = 2, prefix: int = 3) -> ReasoningCore:
    torch.manual_seed(0)
    arch = ArchConfig(hidden_size=32, num_heads=4, expansion=2.0, L_layers=1, H_cycles=h_cycles, L_cycles=l_cycles,
                      puzzle_emb_len=prefix)
    return ReasoningCore(arch, vocab_size=12, seq_len=10)


def test_core_shapes_heads_and_init():
    core = _core(prefix=3)
    assert {n for n, _ in core.named_buffers()} >= {"H_init", "L_init"}
    assert not any(n.endswith(("H_init", "L_init")) for n, _ in core.named_parameters())
    assert not core.q_head.weight.any() and torch.equal(core.q_head.bias.detach(), torch.tensor([-5.0, -5.0]))
    inputs = torch.randint(0, 12, (2, 10))
    prefix = torch.randn(2, 3, 32)
    x = core.embed(inputs, prefix)
    assert x.shape == (2, 13, 32)
    torch.testing.assert_close(x[:, :3], prefix * math.sqrt(32))
    torch.testing.assert_close(x[:, 3:], core.embed_tokens[inputs] * math.sqrt(32))
    z_H, z_L = core.init_state(2, 13)
    assert torch.equal(z_H[1, 7], core.H_init) and torch.equal(z_L[0, 0], core.L_init)
    nz_H, nz_L, logits, q_halt, q_cont = core(z_H, z_L, x)
    assert logits.shape == (2, 10, 12) and q_halt.shape == (2,) and q_cont.shape == (2,)
    torch.testing.assert_close(logits, core.lm_head(nz_H)[:, 3:])  # the prefix positions are not predicted
    torch.testing.assert_close(q_halt, torch.full((2,), -5.0))  # zero weight, bias -5: never halts early


@pytest.mark.parametrize("h_cycles", [1, 2, 3])
def test_core_backpropagates_through_the_last_cycle_only(h_cycles):
    """With H_cycles > 1 the earlier cycles run without gradient, so the incoming state gets none."""
    core = _core(h_cycles=h_cycles)
    z_H, z_L = core.init_state(2, 13)
    z_H, z_L = z_H.requires_grad_(True), z_L.requires_grad_(True)
    x = core.embed(torch.randint(0, 12, (2, 10)), torch.zeros(2, 3, 32))
    _, _, logits, _, _ = core(z_H, z_L, x)
    logits.sum().backward()
    if h_cycles == 1:
        assert z_H.grad is not None and z_H.grad.abs().sum() > 0
    else:
        assert z_H.grad is None and z_L.grad is None
    assert core.embed_tokens.grad.abs().sum() > 0  # the injection x still trains


def test_core_forward_depth_is_h_times_l_plus_one_levels():
    core = _core(h_cycles=3, l_cycles=2)
    calls = []
    core.blocks[0].register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    z_H, z_L = core.init_state(1, 13)
    core(z_H, z_L, core.embed(torch.randint(0, 12, (1, 10)), torch.zeros(1, 3, 32)))
    assert len(calls) == 3 * (2 + 1)
    assert calls == [False] * 6 + [True] * 3


# --------------------------------------------------------------------------------------------------------------------
# DemoEncoder


def _encoder(prefix: int = 3) -> DemoEncoder:
    torch.manual_seed(0)
    arch = ArchConfig(hidden_size=32, num_heads=4, expansion=2.0, L_layers=1, puzzle_emb_len=prefix)
    return DemoEncoder(arch, EncoderConfig(), vocab_size=12, seq_len=10)


def test_encoder_output_shape_and_mask():
    enc = _encoder(prefix=3)
    g = torch.Generator().manual_seed(0)
    di, do = torch.randint(0, 12, (4, 3, 10), generator=g), torch.randint(0, 12, (4, 3, 10), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, False, False]])
    out = enc(di, do, mask)
    assert out.shape == (4, 3, 32) and torch.isfinite(out).all()
    # masked-out demos do not influence the context
    di2, do2 = di.clone(), do.clone()
    di2[~mask] = torch.randint(0, 12, (int((~mask).sum()), 10), generator=g)
    do2[~mask] = torch.randint(0, 12, (int((~mask).sum()), 10), generator=g)
    # (row 3 has no valid demo at all: its context is the same whatever its padding demos hold)
    torch.testing.assert_close(enc(di2, do2, mask), out, atol=1e-5, rtol=1e-5)
    # a valid demo does, and rows are independent of each other
    di3 = di.clone()
    di3[0, 0] = (di3[0, 0] + 1) % 12
    out3 = enc(di3, do, mask)
    assert not torch.allclose(out3[0], out[0], atol=1e-4)
    torch.testing.assert_close(out3[1:], out[1:], atol=1e-5, rtol=1e-5)


def test_encoder_is_invariant_to_demo_order():
    enc = _encoder()
    g = torch.Generator().manual_seed(1)
    di, do = torch.randint(0, 12, (2, 3, 10), generator=g), torch.randint(0, 12, (2, 3, 10), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(enc(di[:, perm], do[:, perm], mask), enc(di, do, mask), atol=1e-5, rtol=1e-5)
