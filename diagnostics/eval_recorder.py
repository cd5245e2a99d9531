"""Evaluation audits from an own loop (``TracedRun.evaluation``): one evaluation of the user's model, recorded as the
bundled trainer records its own (``diagnostics.trace.eval_audits``), so that the evaluation findings fire there too.

While an evaluation is open, a forward hook on the ACT model catches each eval-mode call (the carry in, the new carry,
the outputs). A call whose carry starts with every slot halted begins a batch (upstream's ``evaluate`` makes a fresh
carry per batch and steps it until all slots halt). Per batch: the answer at each ACT step (argmax of the logits)
against the new carry's labels, and each sample's would-halt step (the first step whose Q-logits say halt, by the
run's rule; the last step when none). Rows without a valid label (a padded batch's tail) are not counted. Sums stay
on the device until the evaluation closes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from diagnostics.events import q_halt_rule, q_says_halt
from diagnostics.forks import carry_and_batch
from diagnostics.trace.eval_audits import ACT_FIELDS, RAW, WEIGHTS, EvalAudit, act_key

Tensor = torch.Tensor


class Evaluation:
    """One evaluation of one set of weights (``weights``: ``raw`` or ``ema``) at training step ``step``; ``close``
    (or the end of a ``with`` block) builds the ``EvalAudit`` and hands it to ``done``."""

    def __init__(self, model: nn.Module, step: int, weights: str, q_continue: bool, field: Callable[..., Any],
                 done: Callable[[EvalAudit, dict[str, float]], None], ignore_label: int = -100) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"run.evaluation(weights=...) must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        self.step, self.weights, self.q_continue = step, weights, q_continue
        self.field, self.done, self.ignore = field, done, ignore_label
        self.calls: list[tuple[Tensor, Tensor, Optional[Tensor], Tensor]] = []
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.audit: Optional[EvalAudit] = None
        self.pick = carry_and_batch(model)
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if mod.training:
            return
        before = self.pick(args, kwargs)[0]
        after, outputs = output[0], output[1]
        if before is not None and self.calls and bool(self.field(before, "halted").all()):
            self._end_batch()
        q_cont = outputs.get("q_continue_logits") if self.q_continue else None
        self.calls.append((outputs["logits"].argmax(-1), outputs["q_halt_logits"], q_cont,
                           self.field(self.field(after, "data"), "labels")))

    def add(self, logits: Tensor, q_halt_logits: Tensor, labels: Tensor, new_batch: bool = False,
            q_continue_logits: Optional[Tensor] = None) -> None:
        """Hand over one ACT step by hand (a model the hook cannot read): ``new_batch`` on a batch's first step."""
        if new_batch and self.calls:
            self._end_batch()
        self.calls.append((logits.argmax(-1), q_halt_logits, q_continue_logits if self.q_continue else None, labels))

    def _end_batch(self) -> None:
        calls, self.calls = self.calls, []
        preds = torch.stack([c[0] for c in calls])                        # [T, B, L]
        q_halt = torch.stack([c[1] for c in calls]).float()               # [T, B]
        q_cont = torch.stack([c[2] for c in calls]).float() if calls[0][2] is not None else None
        labels = calls[-1][3]
        valid = labels != self.ignore
        real = valid.any(-1)
        counts = valid.sum(-1).clamp_min(1)
        right = (valid & (preds == labels)).sum(-1)                       # [T, B]
        exact = (right == valid.sum(-1)) & real
        token = right / counts
        says = q_says_halt(q_halt, q_cont)
        t = preds.shape[0]
        halt = torch.where(says.any(0), says.int().argmax(0), t - 1)      # [B], 0-based
        at = torch.arange(t, device=halt.device)[:, None] == halt[None]  # [T, B]
        r = real.double()
        add = {"halt.exact": (exact.double() * at).sum(0), "halt.token": (token.double() * at).sum(0),
               "halt.step": (halt + 1).double()}
        for k in range(t):
            add[act_key(k + 1, "exact")] = exact[k].double()
            add[act_key(k + 1, "token")] = token[k].double()
            add[act_key(k + 1, "halts")] = at[k].double()
        for key, v in add.items():
            self.sums[key] = self.sums.get(key, 0) + (v * r).sum()
        self.count += int(real.sum())

    def close(self) -> Optional[EvalAudit]:
        """End the evaluation: the audit (None when no ACT step was seen), stored and judged by the session."""
        if self.handle is None:
            return self.audit
        self.handle.remove()
        self.handle = None
        if self.calls:
            self._end_batch()
        if not self.sums:
            return None
        n = max(self.count, 1)
        values = {k: float(v) / n for k, v in self.sums.items()}
        values["count"] = float(self.count)
        ks = sorted({int(k.split(".")[1]) for k in values if k.startswith("act.")})
        values["exact"], values["token"] = values[act_key(ks[-1], "exact")], values[act_key(ks[-1], "token")]
        self.audit = EvalAudit.from_values(self.step, self.weights, values, "", q_halt_rule(self.q_continue))
        self.done(self.audit, values)
        return self.audit

    def __enter__(self) -> "Evaluation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.handle is not None:
            self.handle.remove()
            self.handle = None


__all__ = ["ACT_FIELDS", "Evaluation", "RAW"]
