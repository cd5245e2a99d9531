"""The runs list's badge shows every finding of a run: the worst first, the count, all of them on hover."""

from __future__ import annotations

from dashboards.components import verdict_badge
from dashboards.runs import RunInfo, _sorted


def _text(node) -> str:
    if isinstance(node, (str, int)):
        return str(node)
    kids = getattr(node, "children", None)
    if kids is None:
        return ""
    return "".join(_text(k) for k in (kids if isinstance(kids, list) else [kids]))


def test_field_findings_badge_counts_every_finding_worst_first_all_on_hover() -> None:
    found = [{"code": "loss-spike", "severity": "warning", "first_step": 40, "message": "m"},
             {"code": "dropped-samples", "severity": "info", "first_step": 1, "message": "m"},
             {"code": "mode-mismatch", "severity": "error", "first_step": 2, "message": "m"},
             {"code": "step-time-regression", "severity": "warning", "first_step": 30, "message": "m"}]
    info = RunInfo(name="r", last_step=50, findings=_sorted(found))
    badge = verdict_badge(info)
    text = _text(badge)
    assert text.startswith("✕ mode-mismatch") and text.endswith("4")  # the worst first, the count of all
    assert "v-error" in badge.className
    lines = badge.title.splitlines()
    assert lines[0].endswith("4 findings")
    assert lines[1:] == ["error: mode-mismatch (step 2)", "warning: step-time-regression (step 30)",
                         "warning: loss-spike (step 40)", "info: dropped-samples (step 1)"]


def test_field_findings_badge_of_one_finding_and_of_a_healthy_run() -> None:
    one = verdict_badge(RunInfo(name="r", last_step=5, findings=[
        {"code": "eval-regression", "severity": "warning", "first_step": 5, "message": "m"}]))
    assert _text(one) == "! eval-regression" and "warning: eval-regression (step 5)" in one.title
    healthy = verdict_badge(RunInfo(name="r", last_step=5))
    assert _text(healthy) == "✓ healthy" and "finding" not in healthy.title
