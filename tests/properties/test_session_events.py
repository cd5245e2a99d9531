"""``diagnostics.session.build_events`` gives an upstream-shaped model (a dict carry, no events of its own) the
property suite's events checks: they pass on the healthy model and name the bug of labels read from the batch."""

from __future__ import annotations

import pytest

from diagnostics.properties.property_suite import run_suite
from example_user_events import make_adapter, make_label_bug_adapter


def test_events_built_by_the_session_pass_every_check_with_coverage():
    stats = run_suite(make_adapter, max_examples=10)
    assert stats.coverage_checks > 0 and stats.steps > 0


def test_labels_read_from_the_batch_are_named():
    with pytest.raises(AssertionError, match="invariant 'loss-labels-aligned' violated"):
        run_suite(make_label_bug_adapter, max_examples=10, shrink=False)
