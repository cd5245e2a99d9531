"""The ACT wrapper: one call is one ACT step for every slot of the batch (TRM and ETRM in its encoder modes)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from diagnostics.events import PhaseClock, StepEvents
from etrm.config import Config
from etrm.model.carry import Carry, decide_halt, reset_slots, slot_where
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


class ACTModel(nn.Module):
    """TRM (puzzle table) or ETRM (demo encoder) under adaptive computation time with a persistent carry."""

    def __init__(self, cfg: Config, shape: ModelShape) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = shape
        self.is_trm = cfg.model == "trm"
        self.mode = "trm" if self.is_trm else cfg.encoder.mode
        self.fault = cfg.fault
        self.max_steps = cfg.max_steps_per_sample
        self.core = ReasoningCore(cfg.arch, shape.vocab_size, shape.seq_len)
        if self.is_trm:
            self.puzzle_emb = PuzzleEmbedding(shape.num_puzzle_ids, cfg.arch.hidden_size, cfg.arch.puzzle_emb_len)
        else:
            self.encoder = DemoEncoder(cfg.arch, cfg.encoder, shape.vocab_size, shape.seq_len)
        self.halt_generator: torch.Generator | None = None
        self.halt_seed = cfg.train.seed

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
        b = reset.shape[0]
        z_H0, z_L0 = self.core.init_state(b, carry.z_H.shape[1])
        cur = reset_slots(carry, batch, z_H0, z_L0,
                          reset_state=self.fault != "no-state-reset", reset_steps=self.fault != "no-step-reset")
        data = cur.data

        if clock:
            clock.start("encoder")
        prefix, fresh, encoded, needs, slots, context, ctx_ids = self._prefix(cur, batch, reset)
        if clock:
            clock.stop("encoder")
            clock.start("inner")
        x = self.core.embed(data["inputs"], prefix)
        z_H, z_L, logits, q_halt, q_cont = self.core(cur.z_H, cur.z_L, x)
        if clock:
            clock.stop("inner")

        with torch.no_grad():
            steps = cur.steps + 1
            adaptive = self.training and self.max_steps > 1 and self.mode != "fct"
            halted, q_says, veto, is_last = decide_halt(
                steps, self.max_steps, q_halt, q_cont,
                use_q_continue=self.cfg.act.q_continue, exploration_prob=self.cfg.act.halt_exploration_prob,
                adaptive=adaptive, generator=self.generator(steps.device) if adaptive else None, force=force_halt,
            )
            target = None
            if adaptive and self.cfg.act.q_continue:
                next_halt, next_cont = self.core.q_logits(z_H.detach(), z_L.detach(), x.detach())
                target = torch.sigmoid(torch.where(is_last, next_halt, torch.maximum(next_halt, next_cont)))

        from_batch = self.fault == "label-from-batch"
        labels = batch["labels"] if from_batch else data["labels"]
        keep_grad = self.fault == "carry-keeps-grad"
        new_carry = Carry(
            z_H=z_H if keep_grad else z_H.detach(),
            z_L=z_L if keep_grad else z_L.detach(),
            steps=steps, halted=halted, data=data,
            context=None if context is None else context.detach(),
            context_sample_id=ctx_ids,
        )
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
            batch_sample_id=batch["sample_id"],
            label_sample_id=batch["sample_id"] if from_batch else data["sample_id"],
            demo_sample_id=data["sample_id"] if ctx_ids is None else ctx_ids,
            encoded=encoded, needs_encode=needs, encoded_slots=slots, encoder_out=fresh,
            q_halt_logits=q_halt, q_continue_logits=q_cont if self.cfg.act.q_continue else None,
            q_says_halt=q_says, explore_veto=veto, is_last_step=is_last,
            token_embed_rms=token_rms, mode=self.mode, training=self.training, clock=clock,
            content_checksum=data.get("checksum"),  # the slot's own checksums, carried with its data
        )
        return new_carry, out, events

    # ----------------------------------------------------------------------------------------------------------
    def _prefix(self, cur: Carry, batch: dict[str, Tensor], reset: Tensor):
        """The task prefix of every slot, plus what the encoder (or table) did to make it.

        Returns (prefix, fresh output, encoded mask, needed mask, encoded slot index, context to carry, context ids).
        """
        b = reset.shape[0]
        device = reset.device
        everyone = torch.ones_like(reset)
        all_slots = torch.arange(b, device=device)
        if self.is_trm:
            rows = self.puzzle_emb.rows(cur.data["puzzle_id"])
            return self.puzzle_emb.prefix(rows), rows, everyone, everyone, all_slots, None, None

        demo_src = batch if self.fault == "stale-demos" else cur.data
        demo_ids = batch["sample_id"] if self.fault == "stale-demos" else cur.data["sample_id"]
        demos = [demo_src[k] for k in DEMO_KEYS]
        if self.fault == "constant-context":
            demos = [torch.zeros_like(demos[0]), torch.zeros_like(demos[1]), torch.ones_like(demos[2])]

        refresh_all = self.training and self.mode in ("reencode", "fct")
        if refresh_all:
            fresh = self.encoder(*demos)
            return fresh, fresh, everyone, everyone, all_slots, fresh, demo_ids

        # cached mode, and every mode in eval (a deterministic encoder: encode once per sample, reuse after)
        if self.fault == "encode-full-batch":
            fresh = self.encoder(*demos)
            context = slot_where(reset, fresh, cur.context)
            ctx_ids = torch.where(reset, demo_ids, cur.context_sample_id)
            return context, fresh, everyone, reset, all_slots, context, ctx_ids
        slots = reset.nonzero().squeeze(1)  # the model's own sync: how many slots to encode
        if slots.numel() == 0:
            return cur.context, None, torch.zeros_like(reset), reset, slots, cur.context, cur.context_sample_id
        fresh = self.encoder(*(d[slots] for d in demos))
        context = cur.context.index_put((slots,), fresh.to(cur.context.dtype))
        ctx_ids = cur.context_sample_id.index_put((slots,), demo_ids[slots])
        return context, fresh, reset, reset, slots, context, ctx_ids

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run a fresh carry to max steps (never the training carry). Per step: predictions and q_halt logits."""
        was_training = self.training
        self.eval()
        try:
            carry = self.initial_carry(batch)
            preds, q_halts = [], []
            for _ in range(self.max_steps):
                carry, out, _ = self(carry, batch)
                preds.append(out.logits.argmax(-1))
                q_halts.append(out.q_halt_logits)
            return {"preds": torch.stack(preds), "q_halt_logits": torch.stack(q_halts), "labels": carry.data["labels"]}
        finally:
            self.train(was_training)

    def num_trainable_parameters(self) -> int:
        """Trainable parameters (the puzzle table is a buffer and is not counted, as upstream)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
