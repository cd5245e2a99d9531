"""An encoder-based TRM written the way a fork of upstream TRM writes it (our code, upstream's shapes).

- ``DemoEncoder.forward`` returns a dataclass (``EncoderOutput``), not a tensor, as ETRM's encoders do.
- ``initial_carry(batch)`` holds only the model's own keys (no sample ids); every slot starts halted; the optional
  ``cached_context`` is ``None`` there and a tensor once a step ran.
- ``forward(carry, batch)`` is one ACT step for every slot: reset halted slots, take the batch's data into them,
  build the task context, ``H_cycles - 1`` cycles without grad and one with, the Q-head decides halting (with
  exploration), the new carry is detached. The forward runs in ``forward_dtype`` (``bfloat16`` as upstream's
  default; ``float32`` on CPU), weights stay float32 and are cast at use.

``context_mode`` picks how the context is made, as ETRM's versions did: ``reencode`` (every slot, every step),
``cached`` (only reset slots are encoded, the others reuse a cached, detached context: ETRM's old code) and
``full-batch`` (cached, but every slot is encoded and all but the reset slots' rows are thrown away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
CONTEXT_MODES = ("reencode", "cached", "full-batch")


@dataclass(frozen=True)
class ForkConfig:
    vocab_size: int
    seq_len: int
    hidden_size: int = 32
    context_len: int = 2
    H_cycles: int = 2
    L_cycles: int = 1
    halt_max_steps: int = 4
    halt_exploration_prob: float = 0.1
    context_mode: str = "reencode"
    forward_dtype: str = "float32"


@dataclass
class EncoderOutput:
    context: Tensor          # [n, context_len, D]: the task context the decoder reads
    demo_vectors: Tensor     # [n, num_demos, D]: one pooled vector per demo pair (a diagnostic, as ETRM logs)


@dataclass
class InnerCarry:
    z_H: Tensor
    z_L: Tensor


@dataclass
class ACTCarry:
    inner_carry: InnerCarry
    steps: Tensor
    halted: Tensor
    current_data: Dict[str, Tensor]
    cached_context: Optional[Tensor] = None


def rms_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(dtype)


class CastedLinear(nn.Linear):
    """float32 master weights, cast to the input's dtype at use (upstream's ``CastedLinear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class CastedEmbedding(nn.Embedding):
    def __init__(self, num: int, dim: int, cast_to: torch.dtype) -> None:
        super().__init__(num, dim)
        self.cast_to = cast_to

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight.to(self.cast_to))


class DemoEncoder(nn.Module):
    """Demo pairs -> ``EncoderOutput``: embed each (input, output) token pair, pool over the non-PAD positions of each
    demo, then over the demos, add to learned query tokens, normalise."""

    def __init__(self, cfg: ForkConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.tok_in, self.tok_out = CastedEmbedding(cfg.vocab_size, d, dtype), CastedEmbedding(cfg.vocab_size, d, dtype)
        self.pair = CastedLinear(2 * d, d)
        self.pool_proj = CastedLinear(d, d)
        self.queries = nn.Parameter(torch.randn(cfg.context_len, d) * 0.02)

    def forward(self, demo_inputs: Tensor, demo_labels: Tensor) -> EncoderOutput:
        pairs = F.relu(self.pair(torch.cat([self.tok_in(demo_inputs), self.tok_out(demo_labels)], -1)))
        keep = (demo_inputs != 0).unsqueeze(-1).to(pairs.dtype)                      # [n, K, S, 1]
        per_demo = (pairs * keep).sum(2) / keep.sum(2).clamp_min(1)                 # [n, K, D]
        pooled = self.pool_proj(per_demo.mean(1))                                   # [n, D]
        context = rms_norm(self.queries.to(pooled.dtype)[None] + pooled[:, None, :])
        return EncoderOutput(context=context, demo_vectors=per_demo)


class ReasoningBlock(nn.Module):
    """TRM's ``L_level``: a post-norm MLP block whose positions see each other through a mean."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = CastedLinear(d, 2 * d), CastedLinear(2 * d, d)

    def forward(self, h: Tensor, injection: Tensor) -> Tensor:
        u = h + injection
        return rms_norm(h + self.down(F.silu(self.up(u + u.mean(1, keepdim=True)))))


class TRMWithEncoder(nn.Module):
    """The ACT wrapper and its inner model in one module (upstream splits them; the carry is the same)."""

    def __init__(self, config: ForkConfig) -> None:
        super().__init__()
        if config.context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {', '.join(CONTEXT_MODES)}, not {config.context_mode!r}")
        self.config = config
        self.forward_dtype = getattr(torch, config.forward_dtype)
        d = config.hidden_size
        self.embed_tokens = CastedEmbedding(config.vocab_size, d, self.forward_dtype)
        self.encoder = DemoEncoder(config, self.forward_dtype)
        self.L_level = ReasoningBlock(d)
        self.lm_head = CastedLinear(d, config.vocab_size, bias=False)
        self.q_head = CastedLinear(d, 2)
        with torch.no_grad():  # upstream: the Q-head starts at "never halt"
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("H_init", torch.randn(d))
        self.register_buffer("L_init", torch.randn(d))

    def initial_carry(self, batch: Dict[str, Tensor]) -> ACTCarry:
        b, c = batch["inputs"].shape[0], self.config
        device = batch["inputs"].device
        shape = (b, c.context_len + c.seq_len, c.hidden_size)
        return ACTCarry(
            inner_carry=InnerCarry(torch.empty(shape, dtype=self.forward_dtype, device=device),
                                   torch.empty(shape, dtype=self.forward_dtype, device=device)),
            steps=torch.zeros(b, dtype=torch.int32, device=device),
            halted=torch.ones(b, dtype=torch.bool, device=device),
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
        )

    def encode(self, demo_inputs: Tensor, demo_labels: Tensor) -> Tensor:
        """The context rows of the encoder's output."""
        return self.encoder(demo_inputs, demo_labels).context

    def task_context(self, carry: ACTCarry, data: Dict[str, Tensor], halted: Tensor) -> Tensor:
        demos = (data["demo_inputs"], data["demo_labels"])
        mode = self.config.context_mode
        if mode == "reencode":
            return self.encode(*demos)
        if mode == "full-batch":
            fresh = self.encode(*demos)
            if carry.cached_context is None:
                return fresh
            return torch.where(halted.view(-1, 1, 1), fresh, carry.cached_context)
        fresh = self.encode(*(x[halted] for x in demos))                # only the slots that took a new sample
        if carry.cached_context is None:
            context = torch.zeros(halted.shape[0], *fresh.shape[1:], dtype=fresh.dtype, device=fresh.device)
        else:
            context = carry.cached_context.clone()
        context[halted] = fresh
        return context

    def forward(self, carry: ACTCarry, batch: Dict[str, Tensor]) -> Tuple[ACTCarry, Dict[str, Tensor]]:
        c = self.config
        halted = carry.halted
        h3 = halted.view(-1, 1, 1)
        z_H = torch.where(h3, self.H_init.to(self.forward_dtype), carry.inner_carry.z_H)
        z_L = torch.where(h3, self.L_init.to(self.forward_dtype), carry.inner_carry.z_L)
        steps = torch.where(halted, 0, carry.steps)
        data = {k: torch.where(halted.view(-1, *([1] * (v.dim() - 1))), batch[k], v)
                for k, v in carry.current_data.items()}

        context = self.task_context(carry, data, halted)
        x = torch.cat([context, self.embed_tokens(data["inputs"])], 1) * math.sqrt(c.hidden_size)
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
        cached = context.detach() if c.context_mode != "reencode" else None
        new_carry = ACTCarry(InnerCarry(z_H.detach(), z_L.detach()), steps, halted, data, cached)
        return new_carry, {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
