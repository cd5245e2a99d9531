"""Encoder gradient coverage: slots whose fresh encoder output row received a non-zero gradient, out of B."""

from __future__ import annotations

from typing import Callable

import torch

from diagnostics.events import Mode, StepEvents
from diagnostics.probes.base import Figure, Probe, Row, Tensor, count


class CoverageProbe(Probe):
    """Exact per-step coverage from a hook on the fresh encoder output, placed before any mixing with cache.

    For TRM the hooked rows are the looked-up puzzle-table rows; ``puzzle_ids_with_grad`` counts the distinct ids
    among them that got gradient (the rows sign-SGD will move).
    """

    name = "coverage"
    counters = (
        ("coverage_num", "slots whose fresh encoder-output row got a non-zero gradient"),
        ("coverage_den", "slots in the batch (B)"),
        ("puzzle_ids_with_grad", "TRM: distinct puzzle ids whose table row got a non-zero gradient"),
    )
    figures = (
        Figure("coverage", "encoder gradient coverage", ("coverage_num",), ("coverage_den",), "fraction",
               "share of slots whose fresh encoder-output row (TRM: puzzle-table row) got a non-zero gradient"),
        Figure("puzzle_rows_trained_per_step", "puzzle-table rows trained per step", ("puzzle_ids_with_grad",), (),
               "per step", "distinct puzzle-table rows that got a non-zero gradient, per step", modes=("trm",)),
    )

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        row.set("coverage_den", float(events.batch_size))
        row.set("coverage_num", 0.0)
        row.set("puzzle_ids_with_grad", 0.0)
        out = events.encoder_out
        if out is None or not out.requires_grad or not events.training:
            return
        set_cov, set_ids = row.later("coverage_num"), row.later("puzzle_ids_with_grad")
        slots, ids, is_trm = events.encoded_slots, events.puzzle_id_after, events.mode == Mode.TRM

        def hook(grad: Tensor) -> None:
            got = grad.reshape(grad.shape[0], -1).ne(0).any(1)
            set_cov(count(got))
            if is_trm:
                set_ids(distinct_count(ids[slots], got))

        out.register_hook(hook)


def distinct_count(ids: Tensor, keep: Tensor) -> Tensor:
    """Distinct values of ``ids`` where ``keep`` holds, without a host sync (sort, then count boundaries)."""
    v = torch.where(keep, ids, torch.full_like(ids, -1)).sort().values
    if v.numel() == 0:
        return v.new_zeros((), dtype=torch.float32)
    starts = torch.cat([v[:1] >= 0, (v[1:] != v[:-1]) & (v[1:] >= 0)])
    return count(starts)


class GradNormProbe(Probe):
    """Gradient norms of the encoder (or puzzle table rows) vs the rest of the model, before clipping."""

    name = "grad_norm"
    counters = (("grad_norm_encoder", "L2 norm of encoder parameter gradients"),
                ("grad_norm_rest", "L2 norm of all other parameter gradients"))
    figures = (
        Figure("grad_norm_encoder_mean", "encoder gradient norm", ("grad_norm_encoder",), (), "per step",
               "mean per step of the encoder's (TRM: puzzle table's) gradient L2 norm, before clipping"),
        Figure("grad_norm_rest_mean", "rest-of-model gradient norm", ("grad_norm_rest",), (), "per step",
               "mean per step of every other parameter's gradient L2 norm, before clipping"),
    )

    def __init__(self, groups: dict[str, list[torch.nn.Parameter] | Callable[[], list[Tensor]]]) -> None:
        self.groups = groups  # a group may be a callable: tensors that are new each step (TRM's looked-up rows)

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        """Nothing to read from the events: the norms come after backward."""

    def after_backward(self, row: Row) -> None:
        for name in ("encoder", "rest"):
            group = self.groups.get(name, [])
            grads = [p.grad for p in (group() if callable(group) else group) if p.grad is not None]
            value = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))
                     if grads else 0.0)  # one fused norm per parameter list (a loop of norms cost ~2 ops each)
            row.set(f"grad_norm_{name}", value)
