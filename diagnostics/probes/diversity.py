"""Context diversity: does the encoder's context differ between puzzles, and how loud is it beside the tokens?

Per step, over the real rows of the fresh encoder output (each row pooled over its context tokens), a one-way
analysis of variance grouped by puzzle id: the cross-puzzle sum of squares (each row's puzzle mean around the
overall mean) and the within-puzzle sum of squares (each row around its puzzle mean); both are per element, so they
add up to the total spread and compare directly with ``context_sq_norm`` (the rows' mean square). A collapsed
encoder (the same context whatever the demos) shows a cross-puzzle share near zero: ``encoder-collapse``.

Beside it, the context's RMS per element against the token embeddings' RMS (``StepEvents.token_embed_rms``): both
are scaled alike by the model (sqrt(hidden)), so the ratio is the one the inner model sees. Upstream ETRM's context
ran about 22x louder than its token embeddings before it collapsed.

ETRM only: TRM's task conditioning is a per-puzzle table row, distinct per puzzle by construction; its rows are 0.

Cost: the grouping is O(N^2 D) and a few dozen small ops, the largest probe by far (0.5-16 ms per demo step on a
loaded 2-core machine), so the probe measures every ``every``-th step (``train.diversity_every``, 8 by default; the
first step always) and leaves the others at zero, marking the measured ones in ``context_measured``. Its figures are
ratios of sums, so over any step range they are the exact figures of the measured steps: an estimate of the figure
over every step whose error ``benchmarks/trace_overhead.py`` prints against the exact value (docs/performance.md).
"""

from __future__ import annotations

import torch

from diagnostics.events import Mode, StepEvents
from diagnostics.probes.base import ETRM_MODES, Figure, Probe, Row, Tensor
from diagnostics.probes.coverage import distinct_count

EVERY = 8  # default of train.diversity_every: measure one step in 8 (the first one always)


class ContextDiversityProbe(Probe):
    """Cross- vs within-puzzle variance of the fresh encoder context, and its RMS beside the token embeddings'."""

    name = "diversity"
    counters = (
        ("context_measured", "1 on the steps the probe measured (every train.diversity_every-th step; summed over "
                             "ranks), 0 on the steps it skipped; the other counters are 0 there"),
        ("context_rows", "real slots whose context was freshly encoded this step"),
        ("context_puzzles", "distinct puzzle ids among those slots"),
        ("context_cross_ss", "cross-puzzle sum of squares of the token-pooled context, per element"),
        ("context_within_ss", "within-puzzle sum of squares of the token-pooled context, per element"),
        ("context_sq_norm", "sum over rows of the token-pooled context's mean square per element"),
        ("context_ms", "sum over rows of the context's mean square per element (unpooled)"),
        ("token_ms", "token embeddings' mean square per element, times context_rows (RMS ratio = "
                     "sqrt(context_ms / token_ms))"),
    )
    figures = (
        Figure("context_cross_share", "cross-puzzle share of the context", ("context_cross_ss",),
               ("context_sq_norm",), "fraction",
               "cross-puzzle sum of squares of the token-pooled context over its sum of squared norms "
               "(near 0: the context ignores the demos); over the measured steps (every train.diversity_every-th)",
               modes=ETRM_MODES),
        Figure("context_within_share", "within-puzzle share of the context", ("context_within_ss",),
               ("context_sq_norm",), "fraction",
               "within-puzzle sum of squares of the token-pooled context over its sum of squared norms; over the "
               "measured steps", modes=ETRM_MODES),
        Figure("context_to_token_rms", "context RMS / token RMS", ("context_ms",), ("token_ms",), "ratio",
               "RMS per element of the encoder context over the token embeddings' RMS; over the measured steps",
               modes=ETRM_MODES, sqrt=True),
    )

    def __init__(self, every: int = EVERY) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"ContextDiversityProbe: every must be a whole number of steps >= 1, not {every!r}")
        self.every = every
        self.seen = 0  # steps observed (host-side: choosing a step reads nothing from the device)

    def resume(self, step: int, state: dict[str, Tensor] | None = None) -> None:
        self.seen = step  # the sampling phase is part of the resumable state: measured steps stay those of one run

    def observe(self, events: StepEvents, metrics: dict[str, Tensor], row: Row) -> None:
        # A row starts at zero: skipped steps and steps without a fresh ETRM context (TRM, or no slot encoded) keep
        # their zeros, and nothing is copied from the host (a blocking copy would sync a GPU).
        due = self.seen % self.every == 0
        self.seen += 1
        out = events.encoder_out
        if not due or out is None or events.mode == Mode.TRM or out.shape[0] == 0:
            return
        row.set("context_measured", 1.0)
        with torch.no_grad():
            stats = context_stats(out.detach(), events.puzzle_id_after[events.encoded_slots],
                                  events.sample_id_after[events.encoded_slots] >= 0)
            for name, value in stats.items():
                row.set(name, value)
            if events.token_embed_rms is not None:
                row.set("token_ms", events.token_embed_rms.detach().float().square() * stats["context_rows"])


def context_stats(context: Tensor, puzzle_ids: Tensor, real: Tensor) -> dict[str, Tensor]:
    """The probe's per-step sums for a context [N, tokens, D] (or [N, D]) whose rows belong to ``puzzle_ids``.

    Only rows where ``real`` holds count. Device scalars, no host sync: the grouping is an [N, N] same-puzzle
    matrix, so the cost is O(N^2 D), small beside the encoder that produced the rows.
    """
    x = context.float()
    if x.dim() == 2:
        x = x[:, None, :]
    d = x.shape[-1]
    w = real.to(torch.float32)
    n = w.sum()
    ms = x.square().mean(dim=(1, 2))                                    # [N] per-element mean square, unpooled
    pooled = x.mean(1)                                                  # [N, D]
    same = (puzzle_ids[:, None] == puzzle_ids[None, :]).to(torch.float32) * w[None, :]
    group_mean = (same @ pooled) / same.sum(1, keepdim=True).clamp_min(1.0)
    mean = (w[:, None] * pooled).sum(0) / n.clamp_min(1.0)
    cross = ((group_mean - mean).square().sum(1) * w).sum() / d
    within = ((pooled - group_mean).square().sum(1) * w).sum() / d
    return {
        "context_rows": n,
        "context_puzzles": distinct_count(puzzle_ids, real),
        "context_cross_ss": cross,
        "context_within_ss": within,
        "context_sq_norm": (pooled.square().sum(1) * w).sum() / d,
        "context_ms": (ms * w).sum(),
    }


__all__ = ["EVERY", "ContextDiversityProbe", "context_stats"]
