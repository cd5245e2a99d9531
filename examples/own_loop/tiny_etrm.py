"""A tiny encoder-based TRM written the way upstream writes its ACT wrapper (our code, upstream's shape).

``initial_carry(batch)`` makes a carry whose every slot is halted; ``forward(carry, batch)`` is one ACT step for
every slot: halted slots are reset to ``H_init``/``L_init`` and step 0 and take the batch's data into
``current_data``, the task context is built from the demos, ``H_cycles - 1`` cycles run without grad and one with,
the Q-head decides halting (with exploration), and the new carry is detached. Nothing here knows about etrm.

``encoder`` chooses how the context is made, the way ETRM's variants did:
- ``reencode``: every slot's demos are encoded every step (ETRM's current code: every context gets gradient);
- ``cached``: only reset slots are encoded, the others reuse a cached, detached context (ETRM's old code);
- ``full-batch``: cached, but every slot is encoded and all but the reset slots' rows are thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
ENCODERS = ("reencode", "cached", "full-batch")


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    seq_len: int
    hidden: int = 32
    context_len: int = 2
    H_cycles: int = 2
    L_cycles: int = 1
    halt_max_steps: int = 4
    halt_exploration_prob: float = 0.1
    encoder: str = "reencode"


@dataclass
class InnerCarry:
    z_H: Tensor
    z_L: Tensor


@dataclass
class ACTCarry:
    inner_carry: InnerCarry
    steps: Tensor
    halted: Tensor
    current_data: dict[str, Tensor]
    cached_context: Optional[Tensor] = None


def rms_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class DemoEncoder(nn.Module):
    """Demo pairs -> ``context_len`` context tokens: embed each (input, output) token pair, pool over positions and
    demos, add to learned query tokens, normalise."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.tok_in, self.tok_out = nn.Embedding(cfg.vocab, d), nn.Embedding(cfg.vocab, d)
        self.pair = nn.Linear(2 * d, d)
        self.proj = nn.Linear(d, d)
        self.queries = nn.Parameter(torch.randn(cfg.context_len, d) * 0.02)

    def forward(self, demo_inputs: Tensor, demo_labels: Tensor) -> Tensor:
        pairs = F.relu(self.pair(torch.cat([self.tok_in(demo_inputs), self.tok_out(demo_labels)], -1)))
        pooled = pairs.mean(dim=(1, 2))                                        # [n, D]
        return rms_norm(self.queries[None] + self.proj(pooled)[:, None, :])   # [n, context_len, D]


class Reasoner(nn.Module):
    """TRM's single ``L_level``: a post-norm MLP block whose positions see each other through a mean."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

    def forward(self, h: Tensor, injection: Tensor) -> Tensor:
        u = h + injection
        return rms_norm(h + self.mlp(u + u.mean(1, keepdim=True)))


class TinyETRM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.encoder in ENCODERS, config.encoder
        self.config = config
        d = config.hidden
        self.embed_tokens = nn.Embedding(config.vocab, d)
        self.encoder = DemoEncoder(config)
        self.L_level = Reasoner(d)
        self.lm_head = nn.Linear(d, config.vocab)
        self.q_head = nn.Linear(d, 2)
        with torch.no_grad():  # upstream: the Q-head starts at "never halt"
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("H_init", torch.randn(d))
        self.register_buffer("L_init", torch.randn(d))

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        b = batch["inputs"].shape[0]
        c = self.config
        device = batch["inputs"].device
        shape = (b, c.context_len + c.seq_len, c.hidden)
        return ACTCarry(
            inner_carry=InnerCarry(torch.zeros(shape, device=device), torch.zeros(shape, device=device)),
            steps=torch.zeros(b, dtype=torch.int32, device=device),
            halted=torch.ones(b, dtype=torch.bool, device=device),
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
            cached_context=torch.zeros(b, c.context_len, c.hidden, device=device),
        )

    def task_context(self, carry: ACTCarry, data: dict[str, Tensor], halted: Tensor) -> Tensor:
        demos = (data["demo_inputs"], data["demo_labels"])
        if self.config.encoder == "reencode":
            return self.encoder(*demos)
        if self.config.encoder == "full-batch":
            fresh = self.encoder(*demos)
            return torch.where(halted.view(-1, 1, 1), fresh, carry.cached_context)
        fresh = self.encoder(*(d[halted] for d in demos))   # only the slots that took a new sample
        context = carry.cached_context.clone()
        context[halted] = fresh
        return context

    def forward(self, carry: ACTCarry, batch: dict[str, Tensor]) -> tuple[ACTCarry, dict[str, Tensor]]:
        c = self.config
        halted = carry.halted
        h3 = halted.view(-1, 1, 1)
        z_H = torch.where(h3, self.H_init.expand_as(carry.inner_carry.z_H), carry.inner_carry.z_H)
        z_L = torch.where(h3, self.L_init.expand_as(carry.inner_carry.z_L), carry.inner_carry.z_L)
        steps = torch.where(halted, 0, carry.steps)
        data = {k: torch.where(halted.view(-1, *([1] * (v.dim() - 1))), batch[k], v)
                for k, v in carry.current_data.items()}

        context = self.task_context(carry, data, halted)
        x = torch.cat([context, self.embed_tokens(data["inputs"])], 1) * math.sqrt(c.hidden)
        with torch.no_grad():
            for _ in range(c.H_cycles - 1):
                for _ in range(c.L_cycles):
                    z_L = self.L_level(z_L, z_H + x)
                z_H = self.L_level(z_H, z_L)
        for _ in range(c.L_cycles):
            z_L = self.L_level(z_L, z_H + x)
        z_H = self.L_level(z_H, z_L)
        logits = self.lm_head(z_H[:, c.context_len:])
        q_halt, q_continue = self.q_head(z_H[:, 0]).float().unbind(-1)

        with torch.no_grad():
            steps = steps + 1
            halted = steps >= c.halt_max_steps
            if self.training and c.halt_max_steps > 1:
                halted = halted | (q_halt > 0)
                explore = torch.rand_like(q_halt) < c.halt_exploration_prob
                min_halt = explore * torch.randint_like(steps, low=2, high=c.halt_max_steps + 1)
                halted = halted & (steps >= min_halt)
        new_carry = ACTCarry(InnerCarry(z_H.detach(), z_L.detach()), steps, halted, data, context.detach())
        return new_carry, {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
