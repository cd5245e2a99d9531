"""The property-suite adapter for the bundled models: a tiny ``ACTModel`` per model/mode/fault and its data.

``bundled_adapter("etrm", "cached")`` is what ``tests/properties`` runs; ``--etrm-model etrm.testing:bundled_adapter``
points the pytest plugin at it (defaults: ETRM, re-encode, no fault).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from diagnostics.properties.adapter import ACTAdapter, EvalStep, Supports, eval_steps
from diagnostics.properties.capture import ContentHooks
from diagnostics.events import CarryView, StepEvents
from diagnostics.properties.fingerprints import ContentSpec, SampleContent, stack_content
from etrm.config import Config, LossConfig
from etrm.loss import ACTLoss
from etrm.model import Carry, ModelShape, StepOutput, build_model

Tensor = torch.Tensor
VOCAB = 10
NUM_PUZZLES = 7
IGNORE = -100
ID_KEYS = ("sample_id", "puzzle_id")


def tiny_config(model: str = "etrm", mode: str = "reencode", fault: str = "none", *, max_steps: int = 4,
                fct_steps: int = 3, exploration: float = 0.0, q_continue: bool = False, seed: int = 0) -> Config:
    """A config small enough for hundreds of steps a second on one CPU core."""
    return Config.from_dict({
        "model": model, "fault": fault,
        "arch": {"hidden_size": 32, "num_heads": 2, "expansion": 2.0, "L_layers": 1, "H_cycles": 2, "L_cycles": 1,
                 "puzzle_emb_len": 2},
        "encoder": {"mode": mode if model == "etrm" else "reencode", "num_layers": 1, "set_layers": 1},
        "act": {"halt_max_steps": max_steps, "halt_exploration_prob": exploration, "q_continue": q_continue},
        "fct": {"steps": fct_steps},
        "train": {"seed": seed},
    })


HALTED_METRICS = ("halted.count", "halted.exact", "halted.token_acc", "halted.steps", "halted.q_halt_acc")


class BundledAdapter(ACTAdapter):
    """Our ``ACTModel`` behind the adapter protocol v2: it emits ``StepEvents``, has a loss with metrics, the model's
    own ``evaluate_batch`` and an eval path, and takes the suite's content."""

    compared_outputs = ("logits", "q_halt_logits", "q_continue_logits")
    # fp32 rounding of a batch of B against a batch of 1 reaches 2e-5 on logits of ~2.5 at upstream's initialisation
    # (std exactly 1/sqrt(fan_in)); a slot that was not reset, or reset wrongly, differs by O(1)
    atol = 1e-4
    supports = Supports(events=True, loss=True, eval_run=True, checkpoint=True, evaluate=True, loss_metrics=True)
    protocol = 2
    halted_metrics = HALTED_METRICS
    halted_count_metric = "halted.count"

    def __init__(self, cfg: Config, *, batch_size: int = 6, seq_len: int = 9, num_demos: int = 2,
                 data_seed: int = 0, q_scale: float = 0.2) -> None:
        self.cfg = cfg
        self.batch_size, self.seq_len, self.num_demos, self.data_seed = batch_size, seq_len, num_demos, data_seed
        self.model = build_model(cfg, ModelShape(vocab_size=VOCAB, seq_len=seq_len, num_puzzle_ids=NUM_PUZZLES + 1))
        g = torch.Generator().manual_seed(data_seed)
        with torch.no_grad():
            if self.model.is_trm:  # the table starts at zero; random rows make a wrong row visible
                self.model.puzzle_emb.weights.normal_(0.0, 1.0, generator=g)
            if q_scale > 0:  # upstream's Q-head starts far from halting; a random one makes the model's own
                q = self.model.core.q_head  # decisions halt some slots and not others, in training and eval
                q.weight.normal_(0.0, q_scale, generator=g)
                q.bias.zero_()
        self.model.train()
        self.max_steps = self.model.max_steps
        self.loss_fn = ACTLoss(LossConfig())
        self.content_spec = ContentSpec(vocab=VOCAB, seq_len=seq_len, num_demos=0 if self.model.is_trm else num_demos,
                                        token_lo=1, num_puzzles=NUM_PUZZLES)
        self.hooks = ContentHooks(inputs_table="core.embed_tokens",
                                  puzzle_table="puzzle_emb.weights" if self.model.is_trm else None,
                                  encoder=None if self.model.is_trm else "encoder")
        self.halt_rule = "q_halt>q_continue" if cfg.act.q_continue else "q_halt>0"
        self.fixed_steps = cfg.fct.steps if self.model.mode == "fct" else None
        self.encoder_on_reset_only = None if self.model.is_trm else self.model.mode == "cached"

    # -- data -------------------------------------------------------------------------------------------------------
    def _row(self, sid: int) -> dict[str, Tensor]:
        s, k = self.seq_len, self.num_demos
        if sid < 0:
            return {"inputs": torch.zeros(s, dtype=torch.long), "labels": torch.full((s,), IGNORE),
                    "puzzle_id": torch.tensor(0), "sample_id": torch.tensor(-1),
                    "demo_inputs": torch.zeros(k, s, dtype=torch.long),
                    "demo_outputs": torch.zeros(k, s, dtype=torch.long),
                    "demo_mask": torch.zeros(k, dtype=torch.bool)}
        g = torch.Generator().manual_seed(self.data_seed * 1_000_003 + sid)
        labels = torch.randint(1, VOCAB, (s,), generator=g)
        labels = torch.where(torch.rand(s, generator=g) < 0.3, IGNORE, labels)
        labels[0] = int(torch.randint(1, VOCAB, (), generator=g))
        demo_mask = torch.rand(k, generator=g) < 0.6
        demo_mask[0] = True
        return {"inputs": torch.randint(1, VOCAB, (s,), generator=g), "labels": labels,
                "puzzle_id": torch.tensor(1 + sid % NUM_PUZZLES), "sample_id": torch.tensor(sid),
                "demo_inputs": torch.randint(1, VOCAB, (k, s), generator=g),
                "demo_outputs": torch.randint(1, VOCAB, (k, s), generator=g), "demo_mask": demo_mask}

    def make_batch(self, sample_ids: Sequence[int],
                   content: Optional[Sequence[Optional[SampleContent]]] = None) -> dict[str, Tensor]:
        if content is None:
            rows = [self._row(int(i)) for i in sample_ids]
            batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
        else:
            batch = stack_content(self.content_spec, content)
        if self.model.is_trm:
            for key in ("demo_inputs", "demo_outputs", "demo_mask"):
                del batch[key]
        return batch

    def batch_fields(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in batch.items() if k not in ID_KEYS}

    # -- stepping ---------------------------------------------------------------------------------------------------
    def initial_carry(self, batch: dict[str, Tensor]) -> Carry:
        return self.model.initial_carry(batch)

    def step(self, carry: Carry, batch: dict[str, Tensor], force_halt: Optional[Tensor]):
        new_carry, out, events = self.model(carry, batch, force_halt=force_halt)
        outputs = {k: v for k, v in vars(out).items() if v is not None}
        return new_carry, events, outputs

    def view(self, carry: Carry) -> CarryView:
        return carry.view()

    def loss(self, outputs: dict[str, Tensor], events: Optional[StepEvents]) -> Tensor:
        return self.loss_and_metrics(outputs, events, None)[0]

    def loss_and_metrics(self, outputs: dict[str, Tensor], events: Optional[StepEvents], carry) -> tuple:
        out = StepOutput(**{k: outputs.get(k) for k in StepOutput.__dataclass_fields__})
        return self.loss_fn(out, events)

    def evaluate(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.evaluate_batch(batch)

    def carry_state(self, carry: Carry) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in carry.tensors().items()}

    def carry_from_state(self, state: dict[str, Tensor]) -> Carry:
        return Carry.from_tensors({k: v.clone() for k, v in state.items()})

    def eval_run(self, batch: dict[str, Tensor]) -> list[EvalStep]:
        """A fresh carry in eval mode until all slots halted, as ``ACTModel.evaluate_batch`` runs it."""
        def one(carry):
            carry, out, events = self.model(carry, batch)
            return carry, events, {"logits": out.logits}
        return eval_steps(self.model, self.model.initial_carry(batch), one, Carry.view, self.max_steps)


def bundled_adapter(model: str = "etrm", mode: str = "reencode", fault: str = "none", *, seed: int | None = None,
                    batch_size: int = 6, seq_len: int = 9, num_demos: int = 2, max_steps: int = 4,
                    fct_steps: int = 3, q_continue: bool = False, exploration: float = 0.0,
                    q_scale: float = 0.2) -> BundledAdapter:
    """A tiny bundled model behind the adapter protocol. ``mode="trm"`` is the same as ``model="trm"``.

    Exploration is off by default (forced masks decide alone either way; the slot-permutation check only runs on
    forced steps, and a model-decided step with exploration on draws per slot position). The Q-head is random
    (``q_scale``), so the model's own decisions halt some slots and not others. Weights
    and data come from ``seed``, or, when it is None, from torch's global RNG (the suite seeds it per example).
    """
    if mode == "trm":
        model = "trm"
    if seed is not None:
        torch.manual_seed(seed)
    data_seed = int(torch.randint(0, 2**31 - 1, ()))
    cfg = tiny_config(model, mode, fault, max_steps=max_steps, fct_steps=fct_steps, q_continue=q_continue,
                      exploration=exploration, seed=data_seed)
    return BundledAdapter(cfg, batch_size=batch_size, seq_len=seq_len, num_demos=num_demos, data_seed=data_seed,
                          q_scale=q_scale)
