"""The property suite's adapter for the fork-shaped example (``examples/upstream_fork``), its model and loss head
untouched: an encoder returning a dataclass, upstream's ``ACTLossHead`` (Q-halt BCE summed over every row, padding
too), an ``initial_carry`` without sample ids, an optional ``cached_context`` (None at first), bf16 forward.

The fork's training loader drops partial batches (``drops_partial_batches``); the mode the fork means is re-encode
(``declare``), so its cached variants starve the encoder (``coverage-matches-mode``). Two variants the example does
not have are made here without touching its code: ``no-state-reset`` (the state of a slot that ran before is not
reset: the init buffers are swapped for the old state during the step) and ``sub-batch-encode`` (the cached context
mode declared as cached: only reset slots are encoded, a sub-batch whose float noise must pass reset-from-init).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from diagnostics.adapter import ACTAdapter, EvalStep, Supports, eval_steps  # noqa: E402
from diagnostics.capture import ContentHooks  # noqa: E402
from diagnostics.fingerprints import ContentSpec, SampleContent, stack_content  # noqa: E402
from upstream_fork.losses import ACTLossHead  # noqa: E402
from upstream_fork.model import ACTCarry, ForkConfig, TRMWithEncoder  # noqa: E402

Tensor = torch.Tensor

#: variant -> (the model's context_mode, labels from the batch, the encoder mode declared to the suite)
VARIANTS = {"healthy": ("reencode", False, "reencode"), "cached": ("cached", False, "reencode"),
            "full-batch-encode": ("full-batch", False, "reencode"), "labels-from-batch": ("reencode", True, "reencode"),
            "no-state-reset": ("reencode", False, "reencode"), "sub-batch-encode": ("cached", False, "cached")}


class _Replay(torch.nn.Module):
    """Stands in for the model inside the loss head: returns the step already taken (the loss head re-runs nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.result: tuple = ()

    def forward(self, carry, batch):
        return self.result


class ForkAdapter(ACTAdapter):
    """``TRMWithEncoder`` + ``ACTLossHead`` behind protocol v2 (no forced halt, no events, no sample ids)."""

    supports = Supports(events=False, loss=False, eval_run=True, checkpoint=True, force_halt=False,
                        loss_metrics=True, feed=True)
    protocol = 2
    halted_metrics = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
    halted_count_metric = "count"
    compared_outputs = ("logits", "q_halt_logits")
    drops_partial_batches = True

    def __init__(self, variant: str = "healthy", dtype: str = "float32", batch_size: int = 6,
                 drops_partial_batches: bool = True) -> None:
        mode, from_batch, declared = VARIANTS[variant]
        self.variant = variant
        self.cfg = ForkConfig(vocab_size=8, seq_len=8, hidden_size=32, context_mode=mode, forward_dtype=dtype)
        self.model = TRMWithEncoder(self.cfg)
        with torch.no_grad():  # a Q-head that halts some slots and not others
            self.model.q_head.weight.normal_(0.0, 0.5)
            self.model.q_head.bias.zero_()
        self.model.train()
        self.replay = _Replay()
        self.head = ACTLossHead(self.replay, labels_from_batch=from_batch)
        self.batch_size, self.max_steps = batch_size, self.cfg.halt_max_steps
        self.content_spec = ContentSpec(vocab=8, seq_len=8, num_demos=2, token_lo=1, num_puzzles=5)
        self.hooks = ContentHooks(inputs_table="embed_tokens", encoder="encoder")
        self.encoder_on_reset_only = declared == "cached"
        self.forward_dtype = self.model.forward_dtype
        self.drops_partial_batches = drops_partial_batches
        self._batch_of_step: Optional[dict] = None

    def make_batch(self, sample_ids: Sequence[int],
                   content: Optional[Sequence[Optional[SampleContent]]] = None) -> dict[str, Tensor]:
        t = stack_content(self.content_spec, content)
        return {"inputs": t["inputs"], "labels": t["labels"], "puzzle_identifiers": t["puzzle_id"],
                "demo_inputs": t["demo_inputs"], "demo_labels": t["demo_outputs"]}

    def batch_fields(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(batch)

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        return self.model.initial_carry(batch)

    def step(self, carry: ACTCarry, batch: dict[str, Tensor], force_halt: Optional[Tensor]):
        self._batch_of_step = batch
        if self.variant != "no-state-reset":
            return self._forward(carry, batch)
        m = self.model
        h_init, l_init = m.H_init, m.L_init
        ran = (carry.steps > 0).view(-1, 1, 1)
        m.H_init = torch.where(ran, carry.inner_carry.z_H.float(), h_init)   # a slot that ran keeps its old state
        m.L_init = torch.where(ran, carry.inner_carry.z_L.float(), l_init)
        try:
            return self._forward(carry, batch)
        finally:
            m.H_init, m.L_init = h_init, l_init

    def _forward(self, carry: ACTCarry, batch: dict[str, Tensor]):
        new, outputs = self.model(carry, batch)
        return new, None, outputs

    def loss_and_metrics(self, outputs, events, carry: ACTCarry):
        self.replay.result = (carry, dict(outputs))
        _, loss, metrics, _, _ = self.head(return_keys=[], carry=carry, batch=self._batch_of_step)
        return loss, metrics

    def eval_run(self, batch: dict[str, Tensor]) -> list[EvalStep]:
        def one(carry):
            return self._forward(carry, batch)
        return eval_steps(self.model, self.model.initial_carry(batch), one, self.view, self.max_steps)

    def feed(self, reset: Tensor, next_id: int) -> list[int]:
        """The fork's loader: a fresh sample in every position; those at continuing slots are dropped."""
        return list(range(next_id, next_id + self.batch_size))


def make_adapter(variant: str = "healthy", dtype: str = "float32") -> ForkAdapter:
    """``--etrm-model fork_adapter:make_adapter``: the healthy fork in float32."""
    return ForkAdapter(variant, dtype)


def make_bf16_adapter() -> ForkAdapter:
    return ForkAdapter("healthy", "bfloat16")


def make_no_state_reset_adapter() -> ForkAdapter:
    """A failing variant for the plugin (with shrinking): ``reset-from-init``."""
    return ForkAdapter("no-state-reset")
