"""The per-sample ledger probe: what happened to every sample in its slot, kept on the device until a flush.

Per slot it carries on the device the optimizer step its sample entered, the Q-halts exploration vetoed and the steps
on which the encoder output row (TRM: the puzzle-table row) got a non-zero gradient from it. Each step it packs, for
every slot, the record the slot's sample would leave with and the mask of slots whose real sample halted this step
(they leave at the next reset). ``flush`` selects the halted rows of every step since the last flush (the flush's
read-back) and returns one record per sample that left, in ``diagnostics.trace.ledger.RECORD_COLUMNS`` order. Samples
still in flight when the run ends have no record.
"""

from __future__ import annotations

import numpy as np
import torch

from diagnostics.events import StepEvents
from diagnostics.trace.ledger import MAX_STEP, Q_HALT, UNKNOWN_ENTER, fold_tasks
from diagnostics.probes.base import Probe, Row, Tensor

TABLE = "ledger"  # the extra table name ``flush`` returns its records under
# the packed device record of one step: ints then floats
_INTS = ("sample_id", "puzzle_id", "enter_step", "steps_used", "reason", "vetoes", "exact", "token_correct",
         "token_count", "encoder_grad_steps")
_FLOATS = ("q_halt_logit", "q_continue_logit")


class LedgerProbe(Probe):
    """One record per sample leaving its slot (``flush``); ``task_of_puzzle`` folds puzzle ids into tasks
    (augmented variants into their base task; None: each puzzle id is its own task)."""

    name = "ledger"

    def __init__(self, task_of_puzzle: np.ndarray | None = None, rank: int = 0) -> None:
        self.task_of_puzzle = None if task_of_puzzle is None else np.asarray(task_of_puzzle, dtype=np.int64)
        self.rank = rank
        self.enter: Tensor | None = None      # [B] int64: optimizer step the slot's sample entered
        self.vetoes: Tensor | None = None     # [B] int64: its Q-halts exploration vetoed so far
        self.grad: Tensor | None = None       # [B] int64: its steps before the last one whose row got gradient
        self.last_grad: Tensor | None = None  # [B] int64: whether the last step's row got gradient (hook-filled)
        self.pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = []

    SLOT_STATE = ("enter", "vetoes", "grad", "last_grad")

    def state_dict(self) -> dict[str, Tensor]:
        """The per-slot state of the samples in flight (read at a checkpoint only: one copy to the host)."""
        return {} if self.enter is None else {k: getattr(self, k).detach().cpu() for k in self.SLOT_STATE}

    def resume(self, step: int, state: dict[str, Tensor] | None = None) -> None:
        if state and all(isinstance(state.get(k), Tensor) for k in self.SLOT_STATE):
            for k in self.SLOT_STATE:
                setattr(self, k, state[k].to(torch.int64))

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        step = getattr(row, "step")
        b, dev = events.batch_size, events.reset.device
        if self.enter is not None and self.enter.device != dev and self.enter.shape[0] == b:  # restored on the host
            for k in self.SLOT_STATE:
                setattr(self, k, getattr(self, k).to(dev))
        if self.enter is None or self.enter.shape[0] != b:
            self.enter = torch.full((b,), UNKNOWN_ENTER, dtype=torch.int64, device=dev)
            self.vetoes = torch.zeros(b, dtype=torch.int64, device=dev)
            self.grad = torch.zeros(b, dtype=torch.int64, device=dev)
            self.last_grad = torch.zeros(b, dtype=torch.int64, device=dev)
        reset = events.reset
        # the previous step's gradient has arrived (its backward ran): fold it in, then restart reset slots
        self.grad = torch.where(reset, 0, self.grad + self.last_grad)
        self.enter = torch.where(reset, step, self.enter)
        self.vetoes = torch.where(reset, 0, self.vetoes) + events.explore_veto.to(torch.int64)
        this_grad = torch.zeros(b, dtype=torch.int64, device=dev)
        self.last_grad = this_grad
        self._hook(events, this_grad)
        sid = events.sample_id_after
        leaving = events.halted & (sid >= 0)
        zeros = torch.zeros(b, dtype=torch.int64, device=dev)
        correct = events.seq_correct.to(torch.int64) if events.seq_correct is not None else zeros
        tok = events.token_correct.to(torch.int64) if events.token_correct is not None else zeros
        cnt = events.token_count.to(torch.int64) if events.token_count is not None else zeros
        reason = torch.where(events.is_last_step, MAX_STEP, Q_HALT).to(torch.int64)
        ints = torch.stack([sid.to(torch.int64), events.puzzle_id_after.to(torch.int64), self.enter,
                            events.steps.to(torch.int64), reason, self.vetoes, correct, tok, cnt, self.grad], 1)
        q_cont = events.q_continue_logits
        floats = torch.stack([events.q_halt_logits.detach().float(),
                              q_cont.detach().float() if q_cont is not None
                              else torch.full((b,), float("nan"), device=dev)], 1)
        self.pending.append((step, leaving, ints, floats, this_grad))

    @staticmethod
    def _hook(events: StepEvents, target: Tensor) -> None:
        """Mark the slots whose fresh conditioning row gets a non-zero gradient (as the coverage probe counts)."""
        out = events.encoder_out
        if out is None or not out.requires_grad or not events.training:
            return
        slots = events.encoded_slots

        def hook(grad: Tensor) -> None:
            got = grad.reshape(grad.shape[0], -1).ne(0).any(1)
            target.index_put_((slots,), got.to(torch.int64))

        out.register_hook(hook)

    def flush(self, steps: list[int]) -> dict[str, list[tuple]]:
        """The records of every sample that left since the last flush (the one read-back, at the flush)."""
        if not self.pending:
            return {TABLE: []}
        pending, self.pending = self.pending, []
        leaving = torch.stack([p[1] for p in pending])            # [T, B]
        ints = torch.stack([p[2] for p in pending])               # [T, B, I]
        floats = torch.stack([p[3] for p in pending])             # [T, B, F]
        grads = torch.stack([p[4] for p in pending])              # [T, B]: the leaving step's own gradient
        ints = ints.clone()
        ints[..., _INTS.index("encoder_grad_steps")] += grads
        where = leaving.nonzero()
        t_idx, slot = where[:, 0], where[:, 1]
        i = ints[t_idx, slot].cpu().numpy()
        f = floats[t_idx, slot].cpu().numpy()
        t_host, slot_host = t_idx.cpu().numpy(), slot.cpu().numpy()
        exit_step = np.asarray([p[0] for p in pending], dtype=np.int64)[t_host]
        col = {name: i[:, k] for k, name in enumerate(_INTS)}
        col.update({name: f[:, k] for k, name in enumerate(_FLOATS)})
        task = fold_tasks(col["puzzle_id"], self.task_of_puzzle)
        rows = [tuple(r) for r in zip(
            col["sample_id"].tolist(), col["puzzle_id"].tolist(), task.tolist(), slot_host.tolist(),
            [self.rank] * len(slot_host), col["enter_step"].tolist(), exit_step.tolist(), col["steps_used"].tolist(),
            col["reason"].tolist(), col["vetoes"].tolist(), col["exact"].tolist(), col["token_correct"].tolist(),
            col["token_count"].tolist(), [float(x) for x in col["q_halt_logit"]],
            [None if x != x else float(x) for x in col["q_continue_logit"]], col["encoder_grad_steps"].tolist())]
        return {TABLE: rows}
