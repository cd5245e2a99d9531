"""The property suite passes on every bundled model/mode and on the independent user model of the worked example.

Each run is a Hypothesis state machine (``diagnostics.properties.property_suite``): random halting masks, refill, tail and trm
feeds, eval runs, the model's own ``evaluate_batch``, checkpoint restores, with every invariant checked after each
rule. The variants drive the branches a default config never takes: exploration on, the Q-continue target, and fct
with ``fct.steps`` (3) different from ``halt_max_steps`` (4). Each run asserts that it reached its branches.
"""

from __future__ import annotations

import functools

import pytest

from diagnostics.properties.property_suite import check_adapter, default_examples, run_suite
from etrm.testing import bundled_adapter
from example_user_model import make_adapter

MODES = ("trm", "reencode", "cached", "fct")
#: Examples per machine: the suite's fast default, more under HYPOTHESIS_PROFILE=thorough.
EXAMPLES = default_examples()
#: The branch variants drive the same machine again with one branch on: fewer examples are enough to reach it.
VARIANT_EXAMPLES = max(5, EXAMPLES // 2)
STEPS = 12

#: name -> (bundled_adapter kwargs, cases the run must reach)
VARIANTS = {
    "cached-exploration": (dict(mode="cached", exploration=0.7), ("exploration-veto", "q-halt-at-last-step")),
    "trm-q-continue-exploration": (dict(mode="trm", q_continue=True, exploration=0.5), ("exploration-veto",)),
    "reencode-q-continue": (dict(mode="reencode", q_continue=True), ("q-halt-early",)),
}


@pytest.mark.parametrize("mode", MODES)
def test_adapter_contract(mode):
    check_adapter(bundled_adapter(mode=mode, seed=0))


def _exercised(stats, examples: int, evals: bool = True) -> None:
    """The run exercised what it claims to: resets, equivalences, content, loss, eval, restores, rare cases."""
    assert stats.steps >= examples and stats.resets > stats.examples
    assert stats.reset_checks and stats.permutation_checks and stats.metamorphic_checks
    assert stats.coverage_checks == stats.steps == stats.content_checks == stats.loss_checks
    assert stats.restores
    if evals:  # the eval rules are the modes' business; the short branch runs may not draw them
        assert stats.eval_runs and stats.evaluate_runs
    assert {"all-halt", "none-halt", "padding-in-loss"} <= set(stats.cases), stats.cases


@pytest.mark.parametrize("mode", MODES)
def test_bundled_model_keeps_every_invariant(mode, record_property):
    stats = run_suite(functools.partial(bundled_adapter, mode=mode), max_examples=EXAMPLES, steps=STEPS, name=mode)
    record_property("suite_stats", stats)
    _exercised(stats, EXAMPLES)
    assert {"never", "all", "single"} <= set(stats.patterns) and len(stats.patterns) >= 5, stats.patterns
    if mode != "fct":
        assert "q-halt-early" in stats.cases  # the random Q-head halts some slots on its own
    assert set(stats.skipped) <= {"embeds-own-puzzle-row", "encoder-reads-own-demos", "fct-runs-fct-steps",
                                  "exploration-only-delays"}, stats.skipped


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bundled_branches_keep_every_invariant(variant):
    kwargs, cases = VARIANTS[variant]
    stats = run_suite(functools.partial(bundled_adapter, **kwargs), max_examples=VARIANT_EXAMPLES, steps=STEPS,
                      name=variant)
    _exercised(stats, VARIANT_EXAMPLES, evals=False)
    assert set(cases) <= set(stats.cases), stats.cases
    if kwargs.get("q_continue"):
        assert stats.q_target_checks > 0


def test_user_model_keeps_every_carry_invariant(record_property):
    check_adapter(make_adapter())
    stats = run_suite(make_adapter, max_examples=EXAMPLES, steps=STEPS, name="user")
    record_property("suite_stats", stats)
    assert stats.reset_checks and stats.permutation_checks and stats.eval_runs and stats.restores
    assert stats.coverage_checks == 0  # no events, no loss: the carry-only checks ran
    assert "embeds-own-inputs" in stats.skipped  # protocol v1: the content checks are listed as skipped
