"""Findings: the doctor's output (a named problem with its first step and evidence), their order and dedup.

Every findings source (the step rules, ``ledger_doctor``, ``eval_findings``) reports ``Finding``s; the CLI, the
dashboard and the live doctor order and merge them with the functions here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from diagnostics.trace.loading import as_json_value

SEVERITIES = ("error", "warning", "info")
SINGLE_STEP = "single step"  # the evidence marker of a single-step rule's finding


@dataclass
class Finding:
    """A named problem: stable code, severity, the first step where it held, its evidence (numbers) and a message."""

    code: str
    severity: str
    first_step: int | None
    evidence: dict[str, Any]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return as_json_value(asdict(self))

    def store(self, writer: Any) -> None:
        """Write into a run's findings table (a ``TraceWriter``; e.g. ``tracer.submit(finding.store)``)."""
        writer.write_finding(self.code, self.severity, self.first_step, as_json_value(self.evidence), self.message)



def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Findings in report order: errors first, then by first step."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), f.first_step or 0))


def has_error(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)



def earliest_per_code(findings: Iterable[Finding], pending: dict[str, Finding] | None = None) -> list[Finding]:
    """One finding per code, the earliest. A single-step finding (``"evidence": "single step"``) only dates a
    finding: it is reported when its code's windowed rule holds too (the thresholds decide whether a finding
    holds; the exact signature names the step it started), with that window in ``evidence["confirmed_window"]``.
    Unconfirmed ones wait in ``pending`` (the live doctor keeps them across flushes) or are dropped (offline)."""
    pending = {} if pending is None else pending
    best: dict[str, Finding] = {}
    for f in findings:
        if f.evidence.get("evidence") == SINGLE_STEP:
            if f.code not in pending or (f.first_step or 0) < (pending[f.code].first_step or 0):
                pending[f.code] = f
        elif f.code not in best or (f.first_step or 0) < (best[f.code].first_step or 0):
            best[f.code] = f
    out = []
    for code, f in best.items():
        early = pending.pop(code, None)
        if early is not None and (early.first_step or 0) <= (f.first_step or 0):
            early.evidence["confirmed_window"] = f.evidence.get("window")
            f = early
        out.append(f)
    return out

