"""A user's own ACT model, shaped like upstream TRM (dict carry, ``inner_carry``/``current_data``, no sample id), and
the adapter that lets the etrm property suite test it. It imports nothing from ``etrm``: only ``diagnostics``.

Run the suite on it:  ``pytest -p diagnostics.pytest_plugin --etrm-model example_user_model:make_adapter``
(with this directory on ``PYTHONPATH``). ``make_broken_adapter`` is the same model with a classic bug: the inner
state of halted slots is not reset, which only the reset-from-init equivalence can see (the carry holds no init).
``ToyACT(bug=...)`` has a few more bugs that the bug-zoo tests show caught.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from diagnostics.properties.adapter import ACTAdapter, EvalStep, Supports, eval_steps, flatten_tensors, unflatten_tensors
from diagnostics.events import CarryView

Tensor = torch.Tensor
BUGS = ("none", "no-inner-reset", "slot-mixing", "eval-early-halt", "inputs-from-batch")


class ToyACT(nn.Module):
    """A two-state recurrent model under ACT: ``z_L`` reads the tokens, ``z_H`` reads ``z_L``; Q-head halting.

    One call is one ACT step: halted slots get ``H_init``/``L_init``, step 0 and the batch's data; then one cycle
    without grad and one with; the carry is returned detached. ``bug`` breaks one rule on purpose (see ``BUGS``).
    """

    def __init__(self, vocab: int = 8, num_puzzles: int = 5, hidden: int = 16, max_steps: int = 3,
                 bug: str = "none") -> None:
        super().__init__()
        assert bug in BUGS, bug
        self.max_steps, self.bug = max_steps, bug
        self.tok = nn.Embedding(vocab, hidden)
        self.puzzle = nn.Embedding(num_puzzles + 1, hidden)
        self.f_L = nn.Linear(2 * hidden, hidden)
        self.f_H = nn.Linear(2 * hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab)
        self.q_head = nn.Linear(hidden, 2)
        self.register_buffer("H_init", torch.randn(hidden))
        self.register_buffer("L_init", torch.randn(hidden))

    def initial_carry(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        b, s = batch["inputs"].shape
        d = self.H_init.shape[0]
        return {
            "inner_carry": {"z_H": torch.zeros(b, s, d), "z_L": torch.zeros(b, s, d)},
            "steps": torch.zeros(b, dtype=torch.int32),
            "halted": torch.ones(b, dtype=torch.bool),
            "current_data": {k: torch.zeros_like(v) for k, v in batch.items()},
        }

    def _cycle(self, z_H: Tensor, z_L: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        z_L = torch.tanh(self.f_L(torch.cat([z_L, z_H + x], -1)))
        ctx = z_L.mean(1, keepdim=True).expand_as(z_L)  # positions talk to each other (within one sample)
        if self.bug == "slot-mixing":  # a reshape that mixes batch and sequence dims
            ctx = ctx.transpose(0, 1).reshape(ctx.shape)
        z_H = torch.tanh(self.f_H(torch.cat([z_H, z_L + ctx], -1)))
        return z_H, z_L

    def forward(self, carry: dict[str, Any], batch: dict[str, Tensor],
                force_halt: Optional[Tensor] = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
        halted = carry["halted"]
        inner = carry["inner_carry"]
        h3 = halted.view(-1, 1, 1)
        if self.bug == "no-inner-reset":
            z_H, z_L = inner["z_H"], inner["z_L"]
        else:
            z_H = torch.where(h3, self.H_init.expand_as(inner["z_H"]), inner["z_H"])
            z_L = torch.where(h3, self.L_init.expand_as(inner["z_L"]), inner["z_L"])
        steps = torch.where(halted, 0, carry["steps"])
        data = {}
        for key, old in carry["current_data"].items():
            if self.bug == "inputs-from-batch" and key == "inputs":  # a refactor that forgot one key
                data[key] = batch[key]
                continue
            data[key] = torch.where(halted.view(-1, *([1] * (old.dim() - 1))), batch[key], old)

        x = self.tok(data["inputs"]) + self.puzzle(data["puzzle_identifiers"])[:, None, :]
        with torch.no_grad():
            z_H, z_L = self._cycle(z_H, z_L, x)
        z_H, z_L = self._cycle(z_H, z_L, x)
        logits = self.lm_head(z_H)
        q = self.q_head(z_H.mean(1))
        q_halt, q_cont = q[:, 0], q[:, 1]

        with torch.no_grad():
            steps = steps + 1
            halted = steps >= self.max_steps
            if self.training or self.bug == "eval-early-halt":
                halted = halted | (force_halt.to(torch.bool) if force_halt is not None else q_halt > 0)
        new_carry = {"inner_carry": {"z_H": z_H.detach(), "z_L": z_L.detach()},
                     "steps": steps, "halted": halted, "current_data": data}
        return new_carry, {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}


class ToyAdapter(ACTAdapter):
    """``ToyACT`` behind the property suite's adapter protocol (no ``StepEvents``: the carry-only checks run)."""

    compared_outputs = ("logits", "q_halt_logits", "q_continue_logits")
    supports = Supports(events=False, loss=False, eval_run=True, checkpoint=True)

    def __init__(self, bug: str = "none", batch_size: int = 5, seq_len: int = 6, vocab: int = 8) -> None:
        self.model = ToyACT(vocab=vocab, bug=bug)
        self.model.train()
        self.batch_size, self.max_steps = batch_size, self.model.max_steps
        self.seq_len, self.vocab = seq_len, vocab

    def make_batch(self, sample_ids: Sequence[int]) -> dict[str, Tensor]:
        rows = []
        for sid in sample_ids:
            if sid < 0:
                rows.append((torch.zeros(self.seq_len, dtype=torch.long), torch.full((self.seq_len,), -100), 0))
                continue
            g = torch.Generator().manual_seed(7919 * int(sid) + 1)
            inputs = torch.randint(1, self.vocab, (self.seq_len,), generator=g)
            labels = torch.where(torch.rand(self.seq_len, generator=g) < 0.2, -100, (inputs + 1) % self.vocab)
            rows.append((inputs, labels, 1 + int(sid) % 5))
        return {"inputs": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows]),
                "puzzle_identifiers": torch.tensor([r[2] for r in rows])}

    def batch_fields(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(batch)

    def initial_carry(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        return self.model.initial_carry(batch)

    def step(self, carry, batch, force_halt):
        new_carry, outputs = self.model(carry, batch, force_halt)
        return new_carry, None, outputs

    def view(self, carry: dict[str, Any]) -> CarryView:
        return CarryView(steps=carry["steps"], halted=carry["halted"], fields=dict(carry["current_data"]),
                         state=dict(carry["inner_carry"]))

    def carry_state(self, carry: dict[str, Any]) -> dict[str, Tensor]:
        return flatten_tensors(carry)

    def carry_from_state(self, state: dict[str, Tensor]) -> dict[str, Any]:
        return unflatten_tensors(state)

    def eval_run(self, batch: dict[str, Tensor]) -> list[EvalStep]:
        def one(carry):
            carry, out = self.model(carry, batch)
            return carry, None, out
        return eval_steps(self.model, self.model.initial_carry(batch), one, self.view, self.max_steps)


def make_adapter() -> ToyAdapter:
    """The factory the plugin calls (``--etrm-model example_user_model:make_adapter``)."""
    return ToyAdapter()


def make_broken_adapter() -> ToyAdapter:
    """The same model with a bug: halted slots keep their old inner state."""
    return ToyAdapter(bug="no-inner-reset")
