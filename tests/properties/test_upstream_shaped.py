"""The suite on a faithful upstream-shaped model (``upstream_shaped.py``: dataclass carry with ``current_data``,
``torch.empty`` initial carry, no forced-halt argument, full batches only, labels read from the carry by the loss):
no false alarm in any of its configurations, and every broken variant reported by the invariant's name."""

from __future__ import annotations

import functools

import pytest
import torch

from diagnostics.properties.property_suite import default_examples, run_suite
from diagnostics.properties.pytest_plugin import summary_lines
from upstream_shaped import BUGS, CONFIGS, UpstreamAdapter, make_adapter

EXAMPLES = default_examples()
STEPS = 12
ZOO_EXAMPLES = 25

#: bug -> the configuration where it is a bug
BUG_CONFIG = {
    "eval-from-train-carry": "trm", "eval-last-only": "trm", "eval-q-halts": "trm",
    "explore-causes-halt": "etrm-cached", "qc-target-no-last": "trm-q-continue", "qc-crash": "trm-q-continue",
    "padding-in-q-loss": "trm", "metrics-all-slots": "trm", "cached-encodes-all": "etrm-cached",
    "context-from-batch": "etrm-cached", "demos-rolled": "etrm-reencode", "fct-uses-max-steps": "fct",
    "inputs-from-batch": "trm", "puzzle-from-batch": "trm", "labels-from-batch": "trm", "leak-batch-mask": "trm",
}


def test_every_bug_has_a_case():
    assert set(BUG_CONFIG) == set(BUGS) - {"none"}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_faithful_model_passes(config):
    stats = run_suite(functools.partial(make_adapter, config), max_examples=EXAMPLES, steps=STEPS, name=config)
    assert stats.content_checks == stats.steps == stats.loss_checks
    assert stats.evaluate_runs and stats.eval_runs and stats.metamorphic_checks and stats.reset_checks
    assert {"all-halt", "none-halt", "padding-in-loss"} <= set(stats.cases), stats.cases
    if CONFIGS[config].get("halt_exploration_prob"):
        assert stats.cases.get("exploration-veto"), stats.cases
    if CONFIGS[config].get("no_ACT_continue") is False:
        assert stats.q_target_checks
    assert stats.dropped.get("adapter"), "the upstream-style feed drops the samples landing in continuing slots"


class NaNInit(UpstreamAdapter):
    """``torch.empty`` memory can hold anything, NaN included: the suite must not read it as a violation."""

    def initial_carry(self, batch):
        carry = super().initial_carry(batch)
        carry.inner_carry.z_H.fill_(float("nan"))
        carry.inner_carry.z_L.fill_(float("nan"))
        for v in carry.current_data.values():
            v.fill_(-7)
        return carry


def test_nan_in_the_uninitialised_carry_is_no_false_alarm():
    run_suite(NaNInit, max_examples=EXAMPLES, steps=STEPS)


@pytest.mark.parametrize("bug", sorted(BUG_CONFIG))
def test_broken_variant_is_named(bug):
    names = BUGS[bug] if isinstance(BUGS[bug], tuple) else (BUGS[bug],)
    with pytest.raises(AssertionError) as info:
        run_suite(functools.partial(make_adapter, BUG_CONFIG[bug], bug), max_examples=ZOO_EXAMPLES, steps=STEPS,
                  shrink=False)
    message = str(info.value)
    assert any(f"invariant '{n}' violated at " in message for n in names), message


def test_model_exception_is_a_named_failure_that_shrinks():
    """Upstream's no_ACT_continue=False crash: a ValueError inside a rule, reported with the steps that led to it,
    shrunk (no Hypothesis 'flaky' error hiding it)."""
    with pytest.raises(AssertionError) as info:
        run_suite(functools.partial(make_adapter, "trm-q-continue", "qc-crash"), max_examples=ZOO_EXAMPLES, steps=6)
    message = str(info.value)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert message.startswith("invariant 'model-raises-nothing' violated at step 1: model raised ValueError in step "
                              "at step 1 after: "), message
    assert "step 1 (reset all; halting=" in message and "not enough values to unpack" in message, message
    assert "Flaky" not in type(info.value).__name__
    assert "state.build(seed=0)" in notes, notes  # shrunk to the minimal example


def test_dropped_samples_are_an_info_line():
    stats = run_suite(functools.partial(make_adapter, "trm"), max_examples=3, steps=STEPS)
    lines = summary_lines("upstream_shaped:make_adapter", stats, 1.0)
    info = [ln for ln in lines if "info dropped-samples: feed 'adapter'" in ln]
    assert info and f"dropped {stats.dropped['adapter']} of {stats.fed['adapter']} fed samples" in info[0], lines
    assert 0 < stats.dropped_fraction("adapter") < 1
    assert any(ln.startswith("  skipped coverage-matches-mode: ") for ln in lines), lines
