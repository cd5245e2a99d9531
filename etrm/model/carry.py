"""The ACT carry: what each batch slot holds between ACT steps, and the two rules that move it forward."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from diagnostics.events import CarryView, q_says_halt

Tensor = torch.Tensor


@dataclass
class Carry:
    """Per-slot state between ACT steps. Every tensor is detached: no gradient path into an earlier step.

    ``data`` is the sample each slot is actually working on (``inputs``, ``labels``, ``puzzle_id``, ``sample_id`` and,
    for ETRM, the demos). ``context`` is the last context of each slot and ``context_sample_id`` whose demos built it.
    """

    z_H: Tensor
    z_L: Tensor
    steps: Tensor
    halted: Tensor
    data: dict[str, Tensor]
    context: Optional[Tensor] = None
    context_sample_id: Optional[Tensor] = None

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the carry by a flat name (``data.labels``, ``z_H``, ...), for checks and checkpoints."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "data"}
        out.update({f"data.{k}": v for k, v in self.data.items()})
        return {k: v for k, v in out.items() if v is not None}

    def view(self) -> CarryView:
        """The model-agnostic reading that invariant checks use."""
        fields = {k: v for k, v in self.data.items() if k not in ("sample_id", "puzzle_id")}
        state = {"z_H": self.z_H, "z_L": self.z_L}
        if self.context is not None:
            state["context"] = self.context
        return CarryView(steps=self.steps, halted=self.halted, sample_id=self.data["sample_id"],
                         puzzle_id=self.data["puzzle_id"], fields=fields, state=state)

    def to(self, device: torch.device | str) -> "Carry":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return Carry.from_tensors(moved)

    @staticmethod
    def from_tensors(flat: dict[str, Tensor]) -> "Carry":
        """Inverse of ``tensors()``."""
        data = {k[5:]: v for k, v in flat.items() if k.startswith("data.")}
        rest = {k: v for k, v in flat.items() if not k.startswith("data.")}
        return Carry(data=data, **rest)


def slot_where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per slot: ``new`` where ``mask`` [B] holds, else ``old`` (mask broadcast over trailing dims)."""
    return torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old)


def reset_slots(carry: Carry, batch: dict[str, Tensor], z_H_init: Tensor, z_L_init: Tensor) -> Carry:
    """The ACT carry update: halted slots take the incoming sample, the init state and step 0; others keep theirs."""
    reset = carry.halted
    return replace(
        carry,
        z_H=slot_where(reset, z_H_init, carry.z_H),
        z_L=slot_where(reset, z_L_init, carry.z_L),
        steps=torch.where(reset, 0, carry.steps),
        data={k: slot_where(reset, batch[k], v) for k, v in carry.data.items()},
    )


def refresh_context(carry: Carry, fresh: Tensor, demo_sample_id: Tensor,
                    slots: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The context half of the carry update (ETRM): the ``slots`` listed (None: every slot) take the freshly encoded
    context (``fresh``: one row per listed slot) and the id of the sample whose demos built it; others keep theirs.
    Returns (context, context_sample_id)."""
    if slots is None:
        return fresh, demo_sample_id
    assert carry.context is not None and carry.context_sample_id is not None
    context = carry.context.index_put((slots,), fresh.to(carry.context.dtype))
    return context, carry.context_sample_id.index_put((slots,), demo_sample_id[slots])


def decide_halt(
    steps: Tensor,
    max_steps: int,
    q_halt: Tensor,
    q_continue: Tensor,
    *,
    use_q_continue: bool,
    exploration_prob: float,
    adaptive: bool,
    generator: torch.Generator | None,
    force: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Halting rule for slots that just took step ``steps`` (1-based). Returns (halted, q_says, veto, is_last).

    Max steps always halts. When ``adaptive`` (training, max > 1, not fct) the Q-head may halt earlier: q_halt > 0,
    or q_halt > q_continue with the Q-continue target. Exploration, redrawn every step, can only veto (delay) a
    Q-halt: with probability p a slot draws a minimum halting step in [2, max]. ``force`` replaces the Q decision
    (a test hook), still halting at max steps and not subject to exploration.
    """
    is_last = steps >= max_steps
    no = torch.zeros_like(is_last)
    if not adaptive:
        return is_last, no, no, is_last
    if force is not None:
        q_says = force.to(torch.bool)
        return is_last | q_says, q_says, no, is_last
    q_says = q_says_halt(q_halt, q_continue if use_q_continue else None)
    veto = no
    if exploration_prob > 0 and max_steps > 1:
        explore = torch.rand(steps.shape, device=steps.device, generator=generator) < exploration_prob
        min_halt = torch.randint(2, max_steps + 1, steps.shape, device=steps.device, generator=generator)
        veto = q_says & explore & (steps < min_halt) & ~is_last
    return is_last | (q_says & ~veto), q_says, veto, is_last
