"""The property suite's semantic and content checks: pure functions over what one step (or eval) consumed and produced.

Each returns the violating slots (a [B] bool tensor on the host) or a list of ``Violation``. Identity comes from
content (``diagnostics.properties.fingerprints``): the rows the model looked up, the demos its encoder read, the labels its loss
pushed towards (the argmin of the loss gradient over the vocabulary), never from what the model reports.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from diagnostics.properties.fingerprints import ROLE_INPUTS, ROLE_LABELS, ContentSpec, decode, decode_ids, demo_role
from diagnostics.properties.invariants import Violation

Tensor = torch.Tensor

CHECKS = {
    "embeds-own-inputs": "every slot must embed its own sample's inputs (decoded from the token-table lookups)",
    "embeds-own-puzzle-row": "every slot must look up its own puzzle's row of the puzzle table",
    "encoder-reads-own-demos": "the encoder must read each slot's own demos, demo k in place k (decoded by content)",
    "encoder-work-matches-mode": "the encoder must run on exactly the slots its mode needs (decoded by content)",
    "loss-labels-aligned": "the loss must use the labels of the slot's own sample (decoded from the loss gradient)",
    "padding-adds-nothing": "padding slots (sample id -1) must contribute nothing to any loss term or metric",
    "halted-metrics-halted-only": "halted-slot metrics must count halted slots only (reference from the same outputs)",
    "q-continue-target": "the Q-continue target must be sigmoid(max(next q_halt, next q_continue)), next q_halt alone "
                         "at the last step",
    "exploration-only-delays": "exploration may only delay a Q-halt: a slot halted before max steps only where its "
                               "Q-head said halt",
    "fct-runs-fct-steps": "in fct every slot must run exactly fct.steps steps, whatever the mask or Q-head says",
    "eval-returns-every-step": "evaluation must return the predictions of every step up to max steps",
    "eval-fresh-carry": "evaluation must run a fresh carry: the same batch gives the same predictions whatever the "
                        "training carry holds, equal to a fresh carry stepped in eval mode",
    "continuing-ignores-batch": "a continuing slot's outputs and carry must not depend on the incoming batch row at "
                                "its position",
    "reported-ids-match-content": "the ids the model reports (StepEvents) must match the ids recovered by content",
}


def violation(name: str, bad: Tensor | Sequence[int], description: Optional[str] = None) -> Optional[Violation]:
    """A ``Violation`` for the true slots of ``bad`` (or the listed slots), None when there are none."""
    slots = bad.nonzero().flatten().tolist() if isinstance(bad, Tensor) else list(bad)
    if not slots:
        return None
    return Violation(name, slots, description or CHECKS.get(name, name))


#: Re-run comparisons tolerate this many units in the last place of the forward dtype, relative to the compared
#: outputs' magnitude (``rerun_tolerance``): float noise of another batch composition, never a missing reset.
NOISE_ULPS = 16


def rerun_tolerance(reference: Tensor, atol: float, dtype: Optional[torch.dtype] = None) -> float:
    """The tolerance of a re-run comparison: ``atol + NOISE_ULPS * eps(dtype) * max(1, max |reference|)``, ``dtype``
    the forward's (default: the reference's own). fp32 logits of magnitude 10 allow 1e-5 + 1.9e-5; bf16 ones 1.25."""
    dtype = dtype or reference.dtype
    if not (dtype.is_floating_point and reference.is_floating_point()):
        return atol
    finite = reference.detach().float().abs().nan_to_num(0.0, 0.0, 0.0)
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    return atol + NOISE_ULPS * torch.finfo(dtype).eps * scale


def rows_differ(a: Tensor, b: Tensor, atol: float = 0.0) -> Tensor:
    """Per slot (dim 0): do ``a`` and ``b`` differ? NaN-safe: exact comparisons are bitwise (NaN equals the same
    NaN), tolerant ones treat NaN in both as equal. Different shapes differ everywhere."""
    if a.shape != b.shape:
        return torch.ones(a.shape[0] if a.dim() else 1, dtype=torch.bool)
    a2, b2 = a.detach().cpu().reshape(a.shape[0], -1), b.detach().cpu().reshape(b.shape[0], -1)
    if a2.dtype != b2.dtype:
        a2, b2 = a2.double(), b2.double()
    if a2.is_floating_point():
        if atol == 0.0:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a2.element_size()]
            return (a2.contiguous().view(bits) != b2.contiguous().view(bits)).any(1)
        both_nan = a2.isnan() & b2.isnan()
        close = (a2.double() - b2.double()).abs() <= atol
        return ~(close | both_nan).all(1)
    return (a2 != b2).any(1)


# --------------------------------------------------------------------------------------------------------------------
# What the model consumed


def check_inputs(spec: ContentSpec, lookups: Sequence[Tensor], expected: Tensor) -> Optional[Violation]:
    """Every [B, S] lookup into the token table decodes, per row, to the slot's own sample id (-1 for padding)."""
    b = expected.shape[0]
    bad = torch.zeros(b, dtype=torch.bool)
    for idx in lookups:
        if idx.dim() == 2 and idx.shape[0] == b:
            bad |= decode_ids(spec, idx, ROLE_INPUTS) != expected
    return violation("embeds-own-inputs", bad)


def check_puzzles(lookups: Sequence[Tensor], expected: Tensor) -> Optional[Violation]:
    """Every [B] lookup into the puzzle table holds the slot's own puzzle id."""
    b = expected.shape[0]
    bad = torch.zeros(b, dtype=torch.bool)
    for idx in lookups:
        if idx.shape == (b,):
            bad |= idx.cpu() != expected
    return violation("embeds-own-puzzle-row", bad)


def encoder_rows(spec: ContentSpec, calls: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(sample id per encoded row, rows whose demos are mixed up) over all encoder calls of a step.

    A row's id is its first demo's; a row is mixed up when any valid-looking demo k decodes to another sample or
    another place (demo inputs as role ``demo_role(k, False)``, outputs as ``demo_role(k, True)``)."""
    ids, mixed = [], []
    for demo_in, demo_out in calls:
        if demo_in.dim() != 3:
            continue
        sid_in, role_in = decode(spec, demo_in)
        sid_out, role_out = decode(spec, demo_out)
        k = torch.arange(demo_in.shape[1])
        want_in, want_out = demo_role(0, False) + 2 * k, demo_role(0, True) + 2 * k
        row_id = sid_in[:, 0]
        signed = (sid_in >= 0) | (sid_out >= 0)  # a demo that carries any signature must carry the right one
        wrong = signed & ((sid_in != row_id[:, None]) | (sid_out != row_id[:, None]) | (role_in != want_in)
                          | (role_out != want_out))
        ids.append(row_id)
        mixed.append(wrong.any(1))
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    return torch.cat(ids), torch.cat(mixed)


def check_encoder(spec: ContentSpec, calls: Sequence[tuple[Tensor, Tensor]], slot_ids: Tensor,
                  needs: Tensor) -> list[Violation]:
    """The encoder read exactly the slots in ``needs`` (in slot order), each its own demos, each demo in place."""
    rows, mixed = encoder_rows(spec, calls)
    want = slot_ids[needs]
    found: list[Violation] = []
    if rows.shape[0] != want.shape[0]:
        got = set(rows.tolist())
        extra = ~needs & torch.tensor([int(s) in got and int(s) >= 0 for s in slot_ids.tolist()], dtype=torch.bool)
        missing = needs & torch.tensor([int(s) not in got for s in slot_ids.tolist()], dtype=torch.bool)
        v = violation("encoder-work-matches-mode", extra | missing) or Violation(
            "encoder-work-matches-mode", needs.nonzero().flatten().tolist() or list(range(len(slot_ids))),
            f"{CHECKS['encoder-work-matches-mode']} ({rows.shape[0]} rows encoded, {want.shape[0]} needed)")
        return [v]
    slots = needs.nonzero().flatten()
    bad_rows = (rows != want) | mixed
    v = violation("encoder-reads-own-demos", slots[bad_rows].tolist())
    if v:
        found.append(v)
    return found


def labels_from_gradient(spec: ContentSpec, grad_logits: Tensor) -> Tensor:
    """Sample id of the labels a cross-entropy-type loss pushed each slot towards: per position, the vocabulary entry
    with the most negative gradient (positions with zero gradient carry none), decoded as a label signature."""
    g = grad_logits.detach().cpu().double()
    live = g.ne(0).any(-1)
    tokens = torch.where(live, g.argmin(-1), -1)
    return decode_ids(spec, tokens, ROLE_LABELS)


# --------------------------------------------------------------------------------------------------------------------
# Halting and targets


def q_says_halt(q_halt: Tensor, q_continue: Optional[Tensor], rule: str) -> Tensor:
    """The Q-head's own decision under the adapter's rule."""
    if rule == "q_halt>q_continue" and q_continue is not None:
        return q_halt > q_continue
    return q_halt > 0


def check_exploration(halted: Tensor, steps: Tensor, q_says: Tensor, max_steps: int) -> Tensor:
    """Slots that halted before max steps although their Q-head did not say halt (exploration caused a halt)."""
    return halted & (steps < max_steps) & ~q_says


def expected_q_target(next_halt: Tensor, next_cont: Tensor, steps: Tensor, max_steps: int) -> Tensor:
    """sigmoid of the next step's Q: max of halt and continue, halt alone where this step was the last."""
    is_last = steps >= max_steps
    return torch.sigmoid(torch.where(is_last, next_halt, torch.maximum(next_halt, next_cont)))


def check_fixed_steps(halted: Tensor, steps: Tensor, fixed: int) -> Tensor:
    """fct: a slot halts exactly when it reached ``fixed`` steps, and never runs past it."""
    return (halted != (steps >= fixed)) | (steps > fixed) | (steps < 1)


def perturb_rows(outputs: dict[str, Tensor], rows: Tensor, seed: int) -> dict[str, Tensor]:
    """Outputs with the float entries of ``rows`` replaced by other finite values (a metamorphic input)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in outputs.items():
        if isinstance(v, Tensor) and v.is_floating_point() and v.dim() and v.shape[0] == rows.shape[0]:
            noise = torch.randn(v.shape, generator=g).to(v.device, v.dtype)
            mask = rows.to(v.device).view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(mask, noise, v.detach())
        else:
            out[k] = v.detach() if isinstance(v, Tensor) else v
    return out


def metrics_differ(m1: dict, m2: dict, keys: Sequence[str], rtol: float = 1e-6) -> list[str]:
    """Keys whose values differ between two metric dicts (relative tolerance; a key missing from one differs)."""
    bad = []
    for k in keys:
        if k not in m1 or k not in m2:
            bad.append(k)
            continue
        a, b = torch.as_tensor(m1[k]).double().cpu(), torch.as_tensor(m2[k]).double().cpu()
        if a.shape != b.shape or not bool(((a - b).abs() <= rtol * (1 + a.abs())).all()):
            bad.append(k)
    return bad
