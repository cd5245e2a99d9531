"""The property suite passes on every bundled model/mode and on the independent user model of the worked example.

Each run is a Hypothesis state machine (``diagnostics.property_suite``): random halting masks, refill and trm feeds,
eval runs and checkpoint restores, with every invariant checked after each rule.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import settings

from diagnostics.property_suite import check_adapter, run_suite
from etrm.testing import bundled_adapter
from example_user_model import make_adapter

MODES = ("trm", "reencode", "cached", "fct")
#: Examples per machine: at least 50, more under a longer profile (HYPOTHESIS_PROFILE=thorough).
EXAMPLES = max(50, settings().max_examples)
STEPS = 15


@pytest.mark.parametrize("mode", MODES)
def test_adapter_contract(mode):
    check_adapter(bundled_adapter(mode=mode, seed=0))


@pytest.mark.parametrize("mode", MODES)
def test_bundled_model_keeps_every_invariant(mode, record_property):
    stats = run_suite(functools.partial(bundled_adapter, mode=mode), max_examples=EXAMPLES, steps=STEPS, name=mode)
    record_property("suite_stats", stats)
    # the run exercised what it claims to: resets, both equivalence checks, coverage, eval, restores
    assert stats.steps >= EXAMPLES and stats.resets > stats.examples
    assert stats.reset_checks and stats.permutation_checks and stats.coverage_checks == stats.steps
    assert stats.eval_runs and stats.restores
    assert {"never", "all", "single", "alternating", "burst", "random"} <= set(stats.patterns)


def test_user_model_keeps_every_carry_invariant(record_property):
    check_adapter(make_adapter())
    stats = run_suite(make_adapter, max_examples=EXAMPLES, steps=STEPS, name="user")
    record_property("suite_stats", stats)
    assert stats.reset_checks and stats.permutation_checks and stats.eval_runs and stats.restores
    assert stats.coverage_checks == 0  # no events, no loss: the carry-only checks ran


