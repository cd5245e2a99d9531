"""A faithful upstream-shaped ACT model, written here from the semantics in /work/shared/reference (own code), and
its adapter for the property suite (protocol v2). It imports nothing from ``etrm``.

Shaped as upstream TRM/ETRM writes it: a dataclass carry with an ``inner_carry`` and a ``current_data`` dict, a
``torch.empty`` initial carry, no forced-halt argument, full batches only, no sample id in the batch, labels read
from the carry by the loss head, halting metrics over halted slots, exploration that only delays a Q-halt, and the
bootstrapped Q-continue target when ``no_ACT_continue=False``. ``bug=`` breaks one rule on purpose (``BUGS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.properties.adapter import ACTAdapter, EvalStep, Supports, eval_steps
from diagnostics.properties.capture import ContentHooks
from diagnostics.properties.fingerprints import ContentSpec, SampleContent, stack_content

Tensor = torch.Tensor
IGNORE = -100

#: bug -> the invariant (or suite message) that must name it
BUGS = {
    "none": None,
    "eval-from-train-carry": ("eval-fresh-carry", "eval-returns-every-step"),
    "eval-last-only": "eval-returns-every-step",
    "eval-q-halts": ("eval-returns-every-step", "eval-runs-to-max"),
    "explore-causes-halt": "exploration-only-delays",
    "qc-target-no-last": "q-continue-target",
    "qc-crash": "model-raises-nothing",
    "padding-in-q-loss": "padding-adds-nothing",
    "metrics-all-slots": "halted-metrics-halted-only",
    "cached-encodes-all": "encoder-work-matches-mode",
    "context-from-batch": ("encoder-reads-own-demos", "encoder-work-matches-mode", "continuing-ignores-batch"),
    "demos-rolled": "encoder-reads-own-demos",
    "fct-uses-max-steps": "fct-runs-fct-steps",
    "inputs-from-batch": ("embeds-own-inputs", "continuing-ignores-batch"),
    "puzzle-from-batch": ("embeds-own-puzzle-row", "continuing-ignores-batch"),
    "labels-from-batch": ("loss-labels-aligned", "continuing-ignores-batch"),
    # the answer reads how many tokens the incoming row asks for: no hooked table sees it, the metamorphic check does
    "leak-batch-mask": "continuing-ignores-batch",
}


@dataclass
class UpstreamConfig:
    batch_size: int = 5
    seq_len: int = 8
    vocab: int = 8
    hidden: int = 16
    num_puzzles: int = 5
    num_demos: int = 2
    halt_max_steps: int = 4
    halt_exploration_prob: float = 0.0
    no_ACT_continue: bool = True
    encoder: Optional[str] = None  # None (puzzle table, TRM), "reencode" or "cached" (ETRM)
    fct_steps: Optional[int] = None  # fixed computation time: exactly this many steps, no Q decision


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
    context: Optional[Tensor] = None


class DemoEncoder(nn.Module):
    """Demo pairs to one context vector per sample: mean over valid demos of an MLP of the mean token embeddings."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))

    def forward(self, demo_inputs: Tensor, demo_outputs: Tensor, demo_mask: Tensor) -> Tensor:
        pair = torch.cat([self.tok(demo_inputs).mean(-2), self.tok(demo_outputs).mean(-2)], -1)
        w = demo_mask.to(pair.dtype)[..., None]
        return (self.mlp(pair) * w).sum(1) / w.sum(1).clamp_min(1.0)


class UpstreamACT(nn.Module):
    """One call is one ACT step of every slot, as upstream's ``ACTModel.forward(carry, batch)``."""

    def __init__(self, cfg: UpstreamConfig, bug: str = "none") -> None:
        super().__init__()
        assert bug in BUGS, bug
        self.cfg, self.bug = cfg, bug
        d = cfg.hidden
        self.embed_tokens = nn.Embedding(cfg.vocab, d)
        if cfg.encoder is None:
            self.puzzle_emb = nn.Embedding(cfg.num_puzzles + 1, d)
        else:
            self.encoder = DemoEncoder(cfg.vocab, d)
        self.f_L = nn.Linear(2 * d, d)
        self.f_H = nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, cfg.vocab)
        self.q_head = nn.Linear(d, 2)
        self.register_buffer("H_init", torch.randn(d))
        self.register_buffer("L_init", torch.randn(d))
        self._train_carry: Optional[ACTCarry] = None

    @property
    def max_steps(self) -> int:
        if self.cfg.fct_steps is not None and self.bug != "fct-uses-max-steps":
            return self.cfg.fct_steps
        return self.cfg.halt_max_steps

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        b, s = batch["inputs"].shape
        d = self.cfg.hidden
        return ACTCarry(
            inner_carry=InnerCarry(torch.empty(b, s, d), torch.empty(b, s, d)),
            steps=torch.zeros(b, dtype=torch.int32), halted=torch.ones(b, dtype=torch.bool),
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
            context=None if self.cfg.encoder is None else torch.empty(b, d))

    # -- the inner model ---------------------------------------------------------------------------------------------
    def _cycle(self, z_H: Tensor, z_L: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        z_L = torch.tanh(self.f_L(torch.cat([z_L, z_H + x], -1)))
        ctx = z_L.mean(1, keepdim=True).expand_as(z_L)
        return torch.tanh(self.f_H(torch.cat([z_H, z_L + ctx], -1))), z_L

    def inner(self, carry: InnerCarry, data: dict[str, Tensor], task: Tensor, inputs: Tensor):
        x = self.embed_tokens(inputs) + task[:, None, :]
        z_H, z_L = carry.z_H, carry.z_L
        with torch.no_grad():
            z_H, z_L = self._cycle(z_H, z_L, x)
        z_H, z_L = self._cycle(z_H, z_L, x)
        q = self.q_head(z_H.mean(1))
        return InnerCarry(z_H.detach(), z_L.detach()), self.lm_head(z_H), (q[:, 0], q[:, 1])

    def _task(self, halted: Tensor, data: dict[str, Tensor], batch: dict[str, Tensor], old: Optional[Tensor]):
        """The task vector: the puzzle row (TRM) or the demo encoding (ETRM; cached: reset slots only)."""
        if self.cfg.encoder is None:
            ids = batch["puzzle_identifiers"] if self.bug == "puzzle-from-batch" else data["puzzle_identifiers"]
            return self.puzzle_emb(ids), None
        src = batch if self.bug == "context-from-batch" else data
        demos = [src["demo_inputs"], src["demo_outputs"], src["demo_mask"]]
        if self.bug == "demos-rolled":
            demos = [d.roll(1, dims=1) if d.dim() > 1 else d for d in demos[:2]] + [demos[2]]
        if self.cfg.encoder == "reencode" and self.training:
            fresh = self.encoder(*demos)
            return fresh, fresh
        if self.bug == "cached-encodes-all":
            fresh = self.encoder(*demos)
            context = torch.where(halted[:, None], fresh, old)
            return context, context
        if self.bug == "context-from-batch" and self.training:
            return self.encoder(*demos), None
        idx = halted.nonzero().squeeze(1)
        context = old.clone()
        if idx.numel():
            context[idx] = self.encoder(*(d[idx] for d in demos))
        return context, context

    # -- one ACT step --------------------------------------------------------------------------------------------------
    def forward(self, carry: ACTCarry, batch: dict[str, Tensor]) -> tuple[ACTCarry, dict[str, Tensor]]:
        if batch["inputs"].shape[0] != self.cfg.batch_size:
            raise ValueError(f"full batches only: got {batch['inputs'].shape[0]} rows, built for {self.cfg.batch_size}")
        halted = carry.halted
        h3 = halted.view(-1, 1, 1)
        inner = InnerCarry(torch.where(h3, self.H_init, carry.inner_carry.z_H),
                           torch.where(h3, self.L_init, carry.inner_carry.z_L))
        steps = torch.where(halted, 0, carry.steps)
        data = {k: torch.where(halted.view(-1, *([1] * (v.dim() - 1))), batch[k], v)
                for k, v in carry.current_data.items()}
        task, context = self._task(halted, data, batch, carry.context)
        inputs = batch["inputs"] if self.bug == "inputs-from-batch" else data["inputs"]
        inner, logits, (q_halt, q_cont) = self.inner(inner, data, task, inputs)
        if self.bug == "leak-batch-mask":
            logits = logits + (batch["labels"] != IGNORE).float().mean(-1)[:, None, None]
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}
        if self.bug == "labels-from-batch":  # ETRM's unsafe fallback path: the loss reads outputs' labels first
            outputs["labels"] = batch["labels"]

        with torch.no_grad():
            steps = steps + 1
            is_last = steps >= self.max_steps
            halted = is_last
            adaptive = self.cfg.fct_steps is None or self.bug == "fct-uses-max-steps"
            if (self.training or self.bug == "eval-q-halts") and self.max_steps > 1 and adaptive:
                if self.cfg.no_ACT_continue:
                    halted = halted | (q_halt > 0)
                else:
                    halted = halted | (q_halt > q_cont)
                explore = torch.rand(q_halt.shape) < self.cfg.halt_exploration_prob
                if self.bug == "explore-causes-halt":
                    halted = halted | explore
                else:
                    min_halt = explore * torch.randint(2, self.cfg.halt_max_steps + 1, steps.shape)
                    halted = halted & (steps >= min_halt)
                if not self.cfg.no_ACT_continue and self.training:
                    if self.bug == "qc-crash":  # upstream @e7b6871 unpacks five values from a 3-tuple
                        _, _, (next_halt, next_cont), _, _ = self.inner(inner, data, task, inputs)
                    _, _, (next_halt, next_cont) = self.inner(inner, data, task, inputs)
                    last = torch.zeros_like(is_last) if self.bug == "qc-target-no-last" else is_last
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(last, next_halt, torch.maximum(next_halt, next_cont)))
        new = ACTCarry(inner, steps, halted, data, None if context is None else context.detach())
        if self.training:
            self._train_carry = new
        return new, outputs

    # -- the loss head ---------------------------------------------------------------------------------------------
    def loss_and_metrics(self, carry: ACTCarry, outputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Upstream's ``ACTLossHead``: labels from the carry, metrics over halted slots with a valid target."""
        labels = outputs.get("labels", carry.current_data["labels"])
        logits = outputs["logits"]
        mask = labels != IGNORE
        counts = mask.sum(-1)
        divisor = counts.clamp_min(1)
        valid = counts > 0
        with torch.no_grad():
            correct = mask & (logits.argmax(-1) == labels)
            seq_correct = correct.sum(-1) == counts
            sel = valid if self.bug == "metrics-all-slots" else (carry.halted & valid)
            metrics = {"count": sel.sum(), "accuracy": torch.where(sel, correct.sum(-1) / divisor, 0).sum(),
                       "exact_accuracy": (sel & seq_correct).sum(),
                       "q_halt_accuracy": (sel & ((outputs["q_halt_logits"] >= 0) == seq_correct)).sum(),
                       "steps": torch.where(sel, carry.steps, 0).sum()}
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
        lm_loss = (ce.view(labels.shape).sum(-1) / divisor).sum()
        q_bce = F.binary_cross_entropy_with_logits(outputs["q_halt_logits"], seq_correct.float(), reduction="none")
        # upstream sums this over every slot; with padding in the feed that trains the Q-head on padding
        q_halt_loss = q_bce.sum() if self.bug == "padding-in-q-loss" else (q_bce * valid).sum()
        q_cont_loss = torch.zeros(())
        if "target_q_continue" in outputs:
            q_cont_loss = (F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="none") * valid).sum()
        loss = lm_loss + 0.5 * (q_halt_loss + q_cont_loss)
        metrics.update(lm_loss=lm_loss.detach(), q_halt_loss=q_halt_loss.detach(), q_continue_loss=q_cont_loss)
        return loss, metrics

    # -- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Upstream's eval loop: a fresh carry, step until every slot halted, every step's predictions."""
        was = self.training
        self.eval()
        try:
            carry = self.initial_carry(batch)
            if self.bug == "eval-from-train-carry" and self._train_carry is not None:
                carry = self._train_carry
            preds = []
            for _ in range(self.max_steps):
                carry, out = self(carry, batch)
                preds.append(out["logits"].argmax(-1))
                if bool(carry.halted.all()):
                    break
            if self.bug == "eval-last-only":
                preds = preds[-1:]
            return {"preds": torch.stack(preds)}
        finally:
            self.train(was)


class UpstreamAdapter(ACTAdapter):
    """``UpstreamACT`` behind protocol v2, with the documented defaults doing the work: ``generic_view`` reads the
    dataclass carry, ``carry_state`` flattens it, ``set_halted`` forces halting (no forced-halt argument)."""

    compared_outputs = ("logits", "q_halt_logits", "q_continue_logits")
    supports = Supports(events=False, loss=False, eval_run=True, checkpoint=True, force_halt=False, evaluate=True,
                        loss_metrics=True, feed=True)
    protocol = 2
    halted_metrics = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
    halted_count_metric = "count"

    def __init__(self, bug: str = "none", **cfg) -> None:
        self.cfg = UpstreamConfig(**cfg)
        self.model = UpstreamACT(self.cfg, bug)
        with torch.no_grad():  # a Q-head that halts some slots and not others
            self.model.q_head.weight.normal_(0.0, 0.5)
        self.model.train()
        self.batch_size, self.max_steps = self.cfg.batch_size, self.model.max_steps
        has_enc = self.cfg.encoder is not None
        self.content_spec = ContentSpec(vocab=self.cfg.vocab, seq_len=self.cfg.seq_len,
                                        num_demos=self.cfg.num_demos if has_enc else 0, token_lo=1,
                                        num_puzzles=self.cfg.num_puzzles)
        self.hooks = ContentHooks(inputs_table="embed_tokens", puzzle_table=None if has_enc else "puzzle_emb",
                                  encoder="encoder" if has_enc else None)
        self.halt_rule = "q_halt>0" if self.cfg.no_ACT_continue else "q_halt>q_continue"
        self.fixed_steps = self.cfg.fct_steps
        self.encoder_on_reset_only = None if not has_enc else self.cfg.encoder == "cached"

    def make_batch(self, sample_ids: Sequence[int],
                   content: Optional[Sequence[Optional[SampleContent]]] = None) -> dict[str, Tensor]:
        t = stack_content(self.content_spec, content)
        batch = {"inputs": t["inputs"], "labels": t["labels"], "puzzle_identifiers": t["puzzle_id"]}
        if self.cfg.encoder is not None:
            batch.update(demo_inputs=t["demo_inputs"], demo_outputs=t["demo_outputs"], demo_mask=t["demo_mask"])
        return batch

    def batch_fields(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(batch)

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        return self.model.initial_carry(batch)

    def step(self, carry: ACTCarry, batch: dict[str, Tensor], force_halt: Optional[Tensor]):
        new, outputs = self.model(carry, batch)
        return new, None, outputs

    def loss_and_metrics(self, outputs, events, carry: ACTCarry):
        return self.model.loss_and_metrics(carry, outputs)

    def evaluate(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.evaluate(batch)

    def eval_run(self, batch: dict[str, Tensor]) -> list[EvalStep]:
        def one(carry):
            carry, out = self.model(carry, batch)
            return carry, None, out
        return eval_steps(self.model, self.model.initial_carry(batch), one, self.view, self.max_steps)

    def feed(self, reset: Tensor, next_id: int) -> list[int]:
        """Upstream's feed: a fresh sample in every position; those at continuing slots are dropped."""
        return list(range(next_id, next_id + self.batch_size))


#: The configurations the faithful model passes in: TRM, TRM with the Q-continue target and exploration, ETRM
#: re-encode, ETRM cached with exploration, and fct with fct_steps (3) != halt_max_steps (4).
CONFIGS = {
    "trm": {},
    "trm-q-continue": {"no_ACT_continue": False, "halt_exploration_prob": 0.5},
    "etrm-reencode": {"encoder": "reencode"},
    "etrm-cached": {"encoder": "cached", "halt_exploration_prob": 0.5},
    "fct": {"encoder": "reencode", "fct_steps": 3},
}


def make_adapter(config: str = "trm", bug: str = "none") -> UpstreamAdapter:
    """The factory the plugin calls (``--etrm-model upstream_shaped:make_adapter``)."""
    return UpstreamAdapter(bug, **CONFIGS[config])
