"""The ACT wrapper: one call is one ACT step for every slot of the batch (TRM and ETRM in its encoder modes).

``forward`` reads as the step's semantics; the places where a bug could hide are named seams (``reset``,
``choose_demos``, ``encode_resets``, ``pick_labels``, ``carry_forward``), each of which an injectable fault of
``etrm.model.faults`` overrides. A healthy model's forward holds no fault branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from diagnostics.events import Mode, PhaseClock, StepEvents
from etrm.config import ModelConfig
from etrm.model.carry import Carry, decide_halt, refresh_context, reset_slots
from etrm.model.encoder import DemoEncoder
from etrm.model.puzzle_emb import PuzzleEmbedding
from etrm.model.recursion import ReasoningCore

Tensor = torch.Tensor
DEMO_KEYS = ("demo_inputs", "demo_outputs", "demo_mask")


@dataclass
class StepOutput:
    """What the loss head needs from one step. ``labels`` are the carry's (unless a fault says otherwise)."""

    logits: Tensor
    labels: Tensor
    q_halt_logits: Tensor
    q_continue_logits: Tensor
    target_q_continue: Optional[Tensor]
    steps: Tensor
    halted: Tensor


@dataclass(frozen=True)
class ModelShape:
    """Data-dependent sizes the model is built for."""

    vocab_size: int
    seq_len: int
    num_puzzle_ids: int = 1


@dataclass
class Demos:
    """The demo tensors a step encodes (``DEMO_KEYS`` order) and, per slot, whose sample they are."""

    tensors: tuple[Tensor, Tensor, Tensor]
    sample_id: Tensor


@dataclass
class Prefix:
    """The task prefix of every slot and what the encoder (or the puzzle table) did to make it.

    ``fresh`` is the fresh conditioning output (the gradient-coverage hook point), one row per ``encoded_slots``
    entry; ``context``/``context_sample_id`` are what the carry keeps (ETRM; None for TRM)."""

    prefix: Tensor
    fresh: Optional[Tensor]
    encoded: Tensor
    needs_encode: Tensor
    encoded_slots: Tensor
    context: Optional[Tensor] = None
    context_sample_id: Optional[Tensor] = None


class ACTModel(nn.Module):
    """TRM (puzzle table) or ETRM (demo encoder) under adaptive computation time with a persistent carry."""

    leaves_parameters_unused = False  # DDP must be told when a step may not reach every parameter

    def __init__(self, cfg: ModelConfig, shape: ModelShape) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = shape
        self.mode = cfg.mode
        self.is_trm = cfg.is_trm
        self.max_steps = cfg.max_steps
        self.core = ReasoningCore(cfg.arch, shape.vocab_size, shape.seq_len)
        if self.is_trm:
            self.puzzle_emb = PuzzleEmbedding(shape.num_puzzle_ids, cfg.arch.hidden_size, cfg.arch.puzzle_emb_len)
        else:
            self.encoder = DemoEncoder(cfg.arch, cfg.encoder, shape.vocab_size, shape.seq_len)
        self.halt_generator: torch.Generator | None = None
        self.halt_seed = cfg.seed
        if self.mode == Mode.CACHED:  # a step without resets leaves the encoder unused
            self.leaves_parameters_unused = True

    # ----------------------------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The exploration RNG, on the model's device, seeded from the config (its state is checkpointed)."""
        if self.halt_generator is None or self.halt_generator.device != device:
            self.halt_generator = torch.Generator(device=device)
            self.halt_generator.manual_seed(self.halt_seed)
        return self.halt_generator

    def initial_carry(self, batch: dict[str, Tensor]) -> Carry:
        """Every slot halted and empty (sample id -1), so the first step loads the whole batch."""
        b = batch["inputs"].shape[0]
        device = batch["inputs"].device
        length = self.core.prefix_len + self.shape.seq_len
        z_H, z_L = self.core.init_state(b, length)
        data = {k: torch.zeros_like(v) for k, v in batch.items()}
        data["sample_id"] = torch.full_like(batch["sample_id"], -1)
        context = None
        if not self.is_trm:
            d = self.cfg.arch.hidden_size
            context = torch.zeros(b, self.core.prefix_len, d, device=device)
        return Carry(
            z_H=z_H, z_L=z_L,
            steps=torch.zeros(b, dtype=torch.int32, device=device),
            halted=torch.ones(b, dtype=torch.bool, device=device),
            data=data, context=context,
            context_sample_id=None if self.is_trm else torch.full_like(batch["sample_id"], -1),
        )

    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self, carry: Carry, batch: dict[str, Tensor], force_halt: Tensor | None = None,
        clock: PhaseClock | None = None,
    ) -> tuple[Carry, StepOutput, StepEvents]:
        """One ACT step: reset halted slots, build the prefix, recurse, decide halting, detach the carry."""
        reset = carry.halted
        cur = self.reset(carry, batch)
        data = cur.data

        if clock:
            clock.start("encoder")
        pre = self.build_prefix(cur, batch, reset)
        if clock:
            clock.stop("encoder")
            clock.start("inner")
        x = self.core.embed(data["inputs"], pre.prefix)
        z_H, z_L, logits, q_halt, q_cont = self.core(cur.z_H, cur.z_L, x)
        if clock:
            clock.stop("inner")

        act = self.cfg.act
        with torch.no_grad():
            steps = cur.steps + 1
            adaptive = self.training and self.max_steps > 1 and self.mode.halts_adaptively
            halted, q_says, veto, is_last = decide_halt(
                steps, self.max_steps, q_halt, q_cont,
                use_q_continue=act.q_continue, exploration_prob=act.halt_exploration_prob,
                adaptive=adaptive, generator=self.generator(steps.device) if adaptive else None, force=force_halt,
            )
            target = None
            if adaptive and act.q_continue:
                next_halt, next_cont = self.core.q_logits(z_H.detach(), z_L.detach(), x.detach())
                target = torch.sigmoid(torch.where(is_last, next_halt, torch.maximum(next_halt, next_cont)))

        labels, label_ids = self.pick_labels(cur, batch)
        new_carry = self.carry_forward(cur, z_H, z_L, steps, halted, pre)
        out = StepOutput(logits, labels, q_halt, q_cont, target, steps, halted)
        token_rms = None
        if not self.is_trm:  # one tiny reduction on the device: the token table's scale beside the context's
            with torch.no_grad():
                table = self.core.embed_tokens
                token_rms = torch.linalg.vector_norm(table.float()) / math.sqrt(table.numel())
        events = StepEvents(
            reset=reset, steps=steps, halted=halted,
            sample_id_before=carry.data["sample_id"], sample_id_after=data["sample_id"],
            puzzle_id_before=carry.data["puzzle_id"], puzzle_id_after=data["puzzle_id"],
            batch_sample_id=batch["sample_id"], label_sample_id=label_ids,
            demo_sample_id=data["sample_id"] if pre.context_sample_id is None else pre.context_sample_id,
            encoded=pre.encoded, needs_encode=pre.needs_encode, encoded_slots=pre.encoded_slots,
            encoder_out=pre.fresh,
            q_halt_logits=q_halt, q_continue_logits=q_cont if act.q_continue else None,
            q_says_halt=q_says, explore_veto=veto, is_last_step=is_last,
            token_embed_rms=token_rms, mode=self.mode, training=self.training, clock=clock,
            content_checksum=data.get("checksum"),  # the slot's own checksums, carried with its data
        )
        return new_carry, out, events

    # -- the seams -----------------------------------------------------------------------------------------------
    def reset(self, carry: Carry, batch: dict[str, Tensor]) -> Carry:
        """Seam: the carry update at the start of a step (halted slots take the incoming sample, init state, step 0)."""
        z_H0, z_L0 = self.core.init_state(carry.halted.shape[0], carry.z_H.shape[1])
        return reset_slots(carry, batch, z_H0, z_L0)

    def build_prefix(self, cur: Carry, batch: dict[str, Tensor], reset: Tensor) -> Prefix:
        """The task prefix: TRM's puzzle rows, or ETRM's context from the chosen demos (every slot re-encoded when
        the mode says so, else only the reset slots, the others reusing their carried context)."""
        b = reset.shape[0]
        everyone = torch.ones_like(reset)
        all_slots = torch.arange(b, device=reset.device)
        if self.is_trm:
            rows = self.puzzle_emb.rows(cur.data["puzzle_id"])
            return Prefix(self.puzzle_emb.prefix(rows), rows, everyone, everyone, all_slots)
        demos = self.choose_demos(cur, batch)
        if self.mode.conditions_every_slot(self.training):
            fresh = self.encoder(*demos.tensors)
            context, ids = refresh_context(cur, fresh, demos.sample_id)
            return Prefix(context, fresh, everyone, everyone, all_slots, context, ids)
        # cached mode, and every mode in eval (a deterministic encoder: encode once per sample, reuse after)
        return self.encode_resets(cur, demos, reset)

    def choose_demos(self, cur: Carry, batch: dict[str, Tensor]) -> Demos:
        """Seam (ETRM): whose demos condition each slot: the sample the slot is working on."""
        return Demos(tuple(cur.data[k] for k in DEMO_KEYS), cur.data["sample_id"])

    def encode_resets(self, cur: Carry, demos: Demos, reset: Tensor) -> Prefix:
        """Seam (ETRM, cached mode and eval): encode the reset slots only; the others keep their carried context."""
        slots = reset.nonzero().squeeze(1)  # the model's own sync: how many slots to encode
        if slots.numel() == 0:
            return Prefix(cur.context, None, torch.zeros_like(reset), reset, slots, cur.context, cur.context_sample_id)
        fresh = self.encoder(*(d[slots] for d in demos.tensors))
        context, ids = refresh_context(cur, fresh, demos.sample_id, slots)
        return Prefix(context, fresh, reset, reset, slots, context, ids)

    def pick_labels(self, cur: Carry, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Seam: the labels the loss compares against, and whose they are: the carry's sample's."""
        return cur.data["labels"], cur.data["sample_id"]

    def carry_forward(self, cur: Carry, z_H: Tensor, z_L: Tensor, steps: Tensor, halted: Tensor,
                      pre: Prefix) -> Carry:
        """Seam: the carry the next step starts from, detached (no gradient path into an earlier step)."""
        return Carry(
            z_H=z_H.detach(), z_L=z_L.detach(), steps=steps, halted=halted, data=cur.data,
            context=None if pre.context is None else pre.context.detach(),
            context_sample_id=pre.context_sample_id,
        )

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run a fresh carry to max steps (never the training carry). Per step: predictions and q_halt logits."""
        was_training = self.training
        self.eval()
        try:
            carry = self.initial_carry(batch)
            preds, q_halts, q_conts = [], [], []
            for _ in range(self.max_steps):
                carry, out, _ = self(carry, batch)
                preds.append(out.logits.argmax(-1))
                q_halts.append(out.q_halt_logits)
                q_conts.append(out.q_continue_logits)
            res = {"preds": torch.stack(preds), "q_halt_logits": torch.stack(q_halts), "labels": carry.data["labels"]}
            if self.cfg.act.q_continue:  # "Q says halt" is then q_halt > q_continue (diagnostics.events.q_says_halt)
                res["q_continue_logits"] = torch.stack(q_conts)
            return res
        finally:
            self.train(was_training)

    def num_trainable_parameters(self) -> int:
        """Trainable parameters (the puzzle table is a buffer and is not counted, as upstream)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
