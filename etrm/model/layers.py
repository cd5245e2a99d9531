"""Transformer building blocks as upstream TRM uses them: gainless RMS norm, RoPE, SwiGLU, post-norm blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMS normalisation without a learnable gain, computed in fp32."""
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


TRUNCATE_AT = 2.0  # the cut, in standard deviations of the untruncated normal (upstream's lower=-2, upper=2)


def truncated_std(cut: float = TRUNCATE_AT) -> float:
    """Standard deviation of a unit normal truncated to [-cut, cut]: sqrt(1 - 2 c phi(c) / (2 Phi(c) - 1))."""
    pdf = math.exp(-0.5 * cut * cut) / math.sqrt(2.0 * math.pi)
    mass = math.erf(cut / math.sqrt(2.0))  # Phi(c) - Phi(-c)
    return math.sqrt(1.0 - 2.0 * cut * pdf / mass)


def trunc_normal_init(tensor: torch.Tensor, std: float, cut: float = TRUNCATE_AT) -> torch.Tensor:
    """Truncated normal in place whose samples have standard deviation ``std``, as upstream corrects it.

    A unit normal cut at +-``cut`` has a smaller std (0.88 at 2): the draw is divided by that, so the samples lie
    within +-cut/0.88 * std and their std is ``std``. Sampled by inverting the normal CDF on [Phi(-c), Phi(c)].
    """
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        edge = math.erf(cut / math.sqrt(2.0))  # the uniform range in erf space: [-edge, edge]
        tensor.uniform_(-edge, edge).erfinv_().mul_(math.sqrt(2.0)).clamp_(-cut, cut)
        return tensor.mul_(std / truncated_std(cut))


class Linear(nn.Module):
    """Bias-free linear layer initialised with std 1/sqrt(fan_in)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_init(torch.empty(fan_out, fan_in), 1.0 / math.sqrt(fan_in)))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE cos/sin tables for a fixed maximum length."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:length], self.sin[:length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, L, head_dim] by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head non-causal attention; self-attention with RoPE, or cross-attention with a key mask."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.q_proj = Linear(hidden, hidden)
        self.kv_proj = Linear(hidden, 2 * hidden)
        self.o_proj = Linear(hidden, hidden)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        src = x if context is None else context
        b, lq, d = x.shape
        lk = src.shape[1]
        q = self.q_proj(x).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(src).view(b, lk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, d))


class SwiGLU(nn.Module):
    """Gated MLP; the inner width is upstream's round_up(expansion * hidden * 2/3, 256)."""

    def __init__(self, hidden: int, expansion: float) -> None:
        super().__init__()
        inter = -(-round(expansion * hidden * 2 / 3) // 256) * 256
        self.gate_up = Linear(hidden, 2 * inter)
        self.down = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, hidden: int, num_heads: int, expansion: float) -> None:
        super().__init__()
        self.attn = Attention(hidden, num_heads)
        self.mlp = SwiGLU(hidden, expansion)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = rms_norm(x + self.attn(x, rope=rope))
        return rms_norm(x + self.mlp(x))
