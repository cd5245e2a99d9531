"""ETRM's demo encoder: each demo pair to a vector, then learned queries read the set of demo vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from etrm.config import ArchConfig, EncoderConfig
from etrm.model.layers import Attention, Block, Linear, RotaryEmbedding, SwiGLU, rms_norm, trunc_normal_init


class DemoEncoder(nn.Module):
    """Demo pairs [N, K, S] (inputs, outputs, mask) to a context prefix [N, prefix_len, D].

    Per pair: a transformer over [input; output] tokens, mean-pooled over non-PAD tokens and projected. Then
    ``prefix_len`` learned queries cross-attend over the K pair vectors (missing demos masked), and an RMS norm.
    """

    def __init__(self, arch: ArchConfig, enc: EncoderConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        d = arch.hidden_size
        self.scale = math.sqrt(d)
        self.embed_in = nn.Parameter(trunc_normal_init(torch.empty(vocab_size, d), 1.0 / self.scale))
        self.embed_out = nn.Parameter(trunc_normal_init(torch.empty(vocab_size, d), 1.0 / self.scale))
        self.grid_blocks = nn.ModuleList(Block(d, arch.num_heads, arch.expansion) for _ in range(enc.num_layers))
        self.rope = RotaryEmbedding(d // arch.num_heads, 2 * seq_len, arch.rope_theta)
        self.pool_proj = Linear(d, d)
        self.queries = nn.Parameter(trunc_normal_init(torch.empty(arch.puzzle_emb_len, d), 0.02))
        self.cross = nn.ModuleList(Attention(d, arch.num_heads) for _ in range(enc.set_layers))
        self.mlps = nn.ModuleList(SwiGLU(d, arch.expansion) for _ in range(enc.set_layers))

    def pair_vectors(self, demo_inputs: torch.Tensor, demo_outputs: torch.Tensor) -> torch.Tensor:
        """One vector per demo pair: [N, K, D]."""
        n, k, s = demo_inputs.shape
        tokens = torch.cat([demo_inputs, demo_outputs], dim=-1).reshape(n * k, 2 * s)
        x = torch.cat([self.embed_in[demo_inputs], self.embed_out[demo_outputs]], dim=2).reshape(n * k, 2 * s, -1)
        x = x * self.scale
        rope = self.rope(2 * s)
        for block in self.grid_blocks:
            x = block(x, rope)
        keep = (tokens != 0).to(x.dtype)[..., None]
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.pool_proj(pooled).reshape(n, k, -1)

    def forward(self, demo_inputs: torch.Tensor, demo_outputs: torch.Tensor, demo_mask: torch.Tensor) -> torch.Tensor:
        vectors = self.pair_vectors(demo_inputs, demo_outputs) * demo_mask[..., None].to(self.queries.dtype)
        # A row with no valid demo (padding) attends over its zero vectors rather than producing NaNs.
        key_mask = demo_mask | ~demo_mask.any(-1, keepdim=True)
        q = self.queries.expand(demo_inputs.shape[0], -1, -1).to(vectors.dtype)
        for attn, mlp in zip(self.cross, self.mlps):
            q = rms_norm(q + attn(q, context=vectors, key_mask=key_mask))
            q = rms_norm(q + mlp(q))
        return rms_norm(q)
