"""TRM's inner recursion: latent z_L and answer z_H refined by one shared block stack, with the LM and Q heads."""

from __future__ import annotations

import math

import torch
from torch import nn

from etrm.config import ArchConfig
from etrm.model.layers import Block, Linear, RotaryEmbedding, trunc_normal_init


class ReasoningCore(nn.Module):
    """One ACT step of reasoning: ``H_cycles-1`` cycles without gradient, then one cycle with gradient.

    Each cycle runs ``L_cycles`` latent updates ``z_L = f(z_L, z_H + x)`` then one answer update ``z_H = f(z_H, z_L)``.
    The prefix (puzzle embedding or encoder context) occupies the first ``prefix_len`` positions.
    """

    def __init__(self, arch: ArchConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        d = arch.hidden_size
        self.arch = arch
        self.prefix_len = arch.puzzle_emb_len
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Parameter(trunc_normal_init(torch.empty(vocab_size, d), 1.0 / self.embed_scale))
        self.blocks = nn.ModuleList(Block(d, arch.num_heads, arch.expansion) for _ in range(arch.L_layers))
        self.rope = RotaryEmbedding(d // arch.num_heads, self.prefix_len + seq_len, arch.rope_theta)
        self.lm_head = Linear(d, vocab_size)
        self.q_head = Linear(d, 2, bias=True)
        with torch.no_grad():  # upstream (-5): start far from halting so early training runs to max steps
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(float(arch.q_init_bias))
        self.register_buffer("H_init", trunc_normal_init(torch.empty(d), 1.0))
        self.register_buffer("L_init", trunc_normal_init(torch.empty(d), 1.0))

    def embed(self, inputs: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Token embeddings behind the [B, prefix_len, D] prefix, all scaled by sqrt(hidden) as upstream."""
        tokens = self.embed_tokens[inputs].to(prefix.dtype)
        return torch.cat([prefix, tokens], dim=1) * self.embed_scale

    def init_state(self, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (z_H, z_L): the init vectors broadcast over slots and positions."""
        shape = (batch_size, length, self.H_init.shape[0])
        return self.H_init.expand(shape).clone(), self.L_init.expand(shape).clone()

    def _level(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        rope = self.rope(z.shape[1])
        z = z + injection
        for block in self.blocks:
            z = block(z, rope)
        return z

    def _cycle(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.arch.L_cycles):
            z_L = self._level(z_L, z_H + x)
        return self._level(z_H, z_L), z_L

    def forward(
        self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return new (z_H, z_L) (not yet detached), logits [B, S, V], q_halt [B], q_continue [B] (fp32)."""
        with torch.no_grad():
            for _ in range(self.arch.H_cycles - 1):
                z_H, z_L = self._cycle(z_H, z_L, x)
        z_H, z_L = self._cycle(z_H, z_L, x)
        logits = self.lm_head(z_H)[:, self.prefix_len:]
        q = self.q_head(z_H[:, 0]).float()
        return z_H, z_L, logits, q[:, 0], q[:, 1]

    def q_logits(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q logits of one more step from (z_H, z_L), without gradient: the bootstrapped Q-continue target."""
        with torch.no_grad():
            _, _, _, q_halt, q_cont = self.forward(z_H, z_L, x)
        return q_halt, q_cont
