"""Content fingerprints: sample data that carries a recoverable signature of whose it is.

The property suite (adapter protocol v2) supplies each sample's inputs, labels and demos itself. The first
``digits + 1`` tokens of every sequence spell ``sample_id * roles + role`` in base ``vocab - token_lo`` plus a check
digit, so any row a model embedded, encoded or trained on can be decoded back to (sample id, role) without trusting
the model's bookkeeping. A padding row (all PAD) or a mixed row decodes to ``-1``.

``checksum`` is the runtime counterpart (``--check-invariants`` and the alignment probe): a per-sample integer hash of
a token tensor, computed with the batch and recomputed on the device from what the model used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

ROLE_INPUTS, ROLE_LABELS = 0, 1
IGNORE_LABEL = -100


def demo_role(k: int, output: bool) -> int:
    """The role of demo ``k``'s input (or output) grid."""
    return 2 + 2 * k + int(output)


@dataclass(frozen=True)
class ContentSpec:
    """Sizes of the content the suite makes for one adapter: token range [token_lo, vocab), sequence length, demos."""

    vocab: int
    seq_len: int
    num_demos: int = 0
    token_lo: int = 1
    num_puzzles: int = 0
    ignore_label: int = IGNORE_LABEL

    @property
    def base(self) -> int:
        return self.vocab - self.token_lo

    @property
    def roles(self) -> int:
        return 2 + 2 * self.num_demos

    @property
    def digits(self) -> int:
        """Signature digits (one more position holds the check digit)."""
        return max(1, min(self.seq_len - 1, 6))

    @property
    def max_ids(self) -> int:
        return self.base ** self.digits // self.roles

    def validate(self) -> None:
        if self.base < 2 or self.seq_len < 2:
            raise ValueError(f"content fingerprints need vocab - token_lo >= 2 and seq_len >= 2, got {self}")


@dataclass
class SampleContent:
    """One sample's data as the suite makes it; ``demo_*`` are [K, S] (K = 0 without demos)."""

    sample_id: int
    inputs: Tensor
    labels: Tensor
    puzzle_id: int
    demo_inputs: Tensor
    demo_outputs: Tensor
    demo_mask: Tensor


def _signature(spec: ContentSpec, value: int) -> list[int]:
    digits = []
    for _ in range(spec.digits):
        value, d = divmod(value, spec.base)
        digits.append(d)
    check = (sum((i + 1) * d for i, d in enumerate(digits)) * 7 + 3) % spec.base
    return [spec.token_lo + d for d in digits + [check]]


def _sequence(spec: ContentSpec, sample_id: int, role: int, g: torch.Generator) -> Tensor:
    seq = torch.randint(spec.token_lo, spec.vocab, (spec.seq_len,), generator=g)
    sig = _signature(spec, sample_id * spec.roles + role)
    seq[: len(sig)] = torch.tensor(sig)
    return seq


def make_content(spec: ContentSpec, sample_id: int, seed: int = 0) -> SampleContent:
    """The deterministic content of ``sample_id``: signed inputs, labels (some ignored, never the signature) and
    demos (at least one valid), and a puzzle id in [1, num_puzzles] when the spec has puzzles."""
    if not 0 <= sample_id < spec.max_ids:
        raise ValueError(f"sample id {sample_id} does not fit the fingerprint ({spec.max_ids} ids)")
    g = torch.Generator().manual_seed(seed * 1_000_003 + sample_id)
    inputs = _sequence(spec, sample_id, ROLE_INPUTS, g)
    labels = _sequence(spec, sample_id, ROLE_LABELS, g)
    tail = torch.rand(spec.seq_len, generator=g) < 0.3
    tail[: spec.digits + 1] = False
    labels = torch.where(tail, spec.ignore_label, labels)
    k = spec.num_demos
    demo_in = torch.stack([_sequence(spec, sample_id, demo_role(j, False), g) for j in range(k)]) if k else \
        torch.zeros(0, spec.seq_len, dtype=torch.long)
    demo_out = torch.stack([_sequence(spec, sample_id, demo_role(j, True), g) for j in range(k)]) if k else \
        torch.zeros(0, spec.seq_len, dtype=torch.long)
    mask = torch.rand(k, generator=g) < 0.7
    if k:
        mask[0] = True
    puzzle = 1 + sample_id % spec.num_puzzles if spec.num_puzzles else 0
    return SampleContent(sample_id, inputs, labels, puzzle, demo_in, demo_out, mask)


def decode(spec: ContentSpec, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(sample id, role) of each row of ``tokens`` [..., S] (any integer dtype); -1, -1 where no valid signature."""
    t = tokens.detach().to("cpu", torch.long)
    n = spec.digits
    d = t[..., : n + 1] - spec.token_lo
    ok = ((d >= 0) & (d < spec.base)).all(-1)
    d = d.clamp(0, spec.base - 1)
    weights = spec.base ** torch.arange(n)
    value = (d[..., :n] * weights).sum(-1)
    check = ((d[..., :n] * torch.arange(1, n + 1)).sum(-1) * 7 + 3) % spec.base
    ok &= check == d[..., n]
    sid = torch.where(ok, value // spec.roles, -1)
    role = torch.where(ok, value % spec.roles, -1)
    return sid, role


def decode_ids(spec: ContentSpec, tokens: Tensor, role: int) -> Tensor:
    """Sample id of each row whose signature has ``role``; -1 for rows without one (or of another role)."""
    sid, got = decode(spec, tokens)
    return torch.where(got == role, sid, -1)


def stack_content(spec: ContentSpec, content: Sequence[Optional[SampleContent]], pad: int = 0) -> dict[str, Tensor]:
    """The usual batch tensors of a list of contents (None = padding row: PAD inputs, ignored labels, no demos)."""
    s, k = spec.seq_len, spec.num_demos
    rows = []
    for c in content:
        if c is None:
            rows.append({"inputs": torch.full((s,), pad), "labels": torch.full((s,), spec.ignore_label),
                         "puzzle_id": torch.tensor(0), "sample_id": torch.tensor(-1),
                         "demo_inputs": torch.full((k, s), pad), "demo_outputs": torch.full((k, s), pad),
                         "demo_mask": torch.zeros(k, dtype=torch.bool)})
        else:
            rows.append({"inputs": c.inputs, "labels": c.labels, "puzzle_id": torch.tensor(c.puzzle_id),
                         "sample_id": torch.tensor(c.sample_id), "demo_inputs": c.demo_inputs,
                         "demo_outputs": c.demo_outputs, "demo_mask": c.demo_mask})
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


# --------------------------------------------------------------------------------------------------------------------
# Runtime checksums

_PRIME = 2_147_483_629


def checksum(tokens: Tensor) -> Tensor:
    """Per-row hash [B] (int64) of an integer tensor [B, ...]: position-weighted, so a permuted row differs too.

    Computed the same way on the host (with the batch) and on the device (from what the model used)."""
    flat = tokens.reshape(tokens.shape[0], -1).to(torch.int64)
    pos = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=torch.int64)
    return (((flat + 101) * (pos * 2_654_435_761 % _PRIME)) % _PRIME).sum(1) % _PRIME


#: The batch key holding each sample's checksums: [B, 3] int64 of (inputs, labels, demos); 0 where absent.
CHECKSUM_KEY = "checksum"
CHECKSUM_PARTS = ("inputs", "labels", "demos")


def content_checksums(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{CHECKSUM_KEY: [B, 3]}`` for a batch dict (inputs, labels and, when present, demo inputs+outputs)."""
    inputs = batch["inputs"]
    parts = [checksum(inputs), checksum(batch["labels"])]
    if "demo_inputs" in batch:
        parts.append(checksum(torch.cat([batch["demo_inputs"], batch["demo_outputs"]], dim=-1)))
    else:
        parts.append(torch.zeros(inputs.shape[0], dtype=torch.int64, device=inputs.device))
    return {CHECKSUM_KEY: torch.stack(parts, dim=1)}
