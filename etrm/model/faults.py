"""Injectable faults: each one a small override of one seam of ``ACTModel``, registered by its ``Fault``.

A fault breaks one rule of TRM/ETRM on purpose so that the diagnostics that watch that rule must fire (the bug zoo
and the acceptance tests). ``build_model(cfg, shape)`` makes the healthy model or the faulty one a run asks for.

    @register(Fault.NO_STEP_RESET)
    class NoStepReset(ACTModel):
        def reset(self, carry, batch):               # the seam it breaks
            return replace(super().reset(carry, batch), steps=carry.steps)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from etrm.config import Config, Fault
from etrm.model.act import ACTModel, Demos, ModelShape, Prefix
from etrm.model.carry import Carry, slot_where

Tensor = torch.Tensor

FAULTY: dict[Fault, type[ACTModel]] = {}


def register(fault: Fault) -> Callable[[type[ACTModel]], type[ACTModel]]:
    """Class decorator: the model ``fault=<fault>`` builds. A faulty step may skip any rule, so DDP is told to
    expect parameters without gradient."""
    def add(cls: type[ACTModel]) -> type[ACTModel]:
        cls.leaves_parameters_unused = True
        FAULTY[fault] = cls
        return cls
    return add


def build_model(cfg: Config, shape: ModelShape, seed: int | None = None) -> ACTModel:
    """The model of a run: healthy, or with the run's injected fault (``seed``: the exploration RNG's)."""
    cls = ACTModel if cfg.fault == Fault.NONE else FAULTY[cfg.fault]
    return cls(cfg.model_config(seed), shape)


@register(Fault.NO_STATE_RESET)
class NoStateReset(ACTModel):
    """Reset slots take the new sample and step 0 but keep the old sample's z_H, z_L."""

    def reset(self, carry: Carry, batch: dict[str, Tensor]) -> Carry:
        return replace(super().reset(carry, batch), z_H=carry.z_H, z_L=carry.z_L)


@register(Fault.NO_STEP_RESET)
class NoStepReset(ACTModel):
    """Reset slots keep counting steps from the old sample's."""

    def reset(self, carry: Carry, batch: dict[str, Tensor]) -> Carry:
        return replace(super().reset(carry, batch), steps=carry.steps)


@register(Fault.LABEL_FROM_BATCH)
class LabelFromBatch(ACTModel):
    """The loss reads the incoming batch's labels, whose sample differs from the carry's for in-flight slots."""

    def pick_labels(self, cur: Carry, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["labels"], batch["sample_id"]


@register(Fault.CARRY_KEEPS_GRAD)
class CarryKeepsGrad(ACTModel):
    """The carried z_H, z_L are not detached: gradient reaches back into earlier steps."""

    def carry_forward(self, cur: Carry, z_H: Tensor, z_L: Tensor, steps: Tensor, halted: Tensor,
                      pre: Prefix) -> Carry:
        return replace(super().carry_forward(cur, z_H, z_L, steps, halted, pre), z_H=z_H, z_L=z_L)


@register(Fault.STALE_DEMOS)
class StaleDemos(ACTModel):
    """ETRM: the context is built from the incoming batch's demos, not those of the sample in the slot."""

    def choose_demos(self, cur: Carry, batch: dict[str, Tensor]) -> Demos:
        return Demos((batch["demo_inputs"], batch["demo_outputs"], batch["demo_mask"]), batch["sample_id"])


@register(Fault.CONSTANT_CONTEXT)
class ConstantContext(ACTModel):
    """ETRM: every sample's demos are replaced by the same empty ones, so the context carries no task."""

    def choose_demos(self, cur: Carry, batch: dict[str, Tensor]) -> Demos:
        inputs, outputs, mask = super().choose_demos(cur, batch).tensors
        return Demos((torch.zeros_like(inputs), torch.zeros_like(outputs), torch.ones_like(mask)),
                     cur.data["sample_id"])


@register(Fault.ENCODE_FULL_BATCH)
class EncodeFullBatch(ACTModel):
    """ETRM cached mode: every slot is encoded, then only the reset slots' rows are kept (wasted encoder work)."""

    def encode_resets(self, cur: Carry, demos: Demos, reset: Tensor) -> Prefix:
        fresh = self.encoder(*demos.tensors)
        context = slot_where(reset, fresh, cur.context)
        ids = torch.where(reset, demos.sample_id, cur.context_sample_id)
        everyone = torch.ones_like(reset)
        return Prefix(context, fresh, everyone, reset, torch.arange(reset.shape[0], device=reset.device), context, ids)
