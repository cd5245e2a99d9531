"""Bug zoo: every injectable fault of ``etrm.config.FAULTS`` makes the property suite fail, naming the invariant
that caught it; and the worked example's user model, broken in the ways a careless carry refactor would break it.

``constant-context`` is no carry fault: the carry and labels stay right, the encoder is fed constant demos. The id
checks cannot see it; the content check of what the encoder read (``encoder-reads-own-demos``) does, as does the
doctor's ``encoder-collapse`` finding on a real run.
"""

from __future__ import annotations

import functools

import pytest

from diagnostics.properties.property_suite import run_suite
from etrm.config import FAULTS
from etrm.testing import bundled_adapter
from example_user_model import ToyAdapter

EXAMPLES = 25
STEPS = 12

#: fault -> (modes where it is a bug, the invariant that must name it)
CAUGHT_BY = {
    "label-from-batch": (("trm", "reencode", "cached", "fct"), "loss-labels-aligned"),
    "encode-full-batch": (("cached",), "encoder-work-matches-mode"),
    "no-state-reset": (("trm", "reencode", "cached", "fct"), "reset-from-init"),
    "no-step-reset": (("trm", "reencode", "cached", "fct"), "reset-takes-sample"),
    # cached mode reads demos only on reset, when the batch row is the slot's own sample: there it is no bug
    "stale-demos": (("reencode", "fct"), "demos-aligned"),
    "carry-keeps-grad": (("trm", "reencode", "cached", "fct"), "carry-detached"),
    "constant-context": (("reencode", "cached", "fct"), "encoder-reads-own-demos"),
}

CASES = [(fault, mode, inv) for fault, (modes, inv) in CAUGHT_BY.items() for mode in modes]


def _fails_naming(factory, invariant: str | tuple[str, ...]) -> str:
    """Run the suite (no shrinking: the first failure is enough) and check that it names one of ``invariant``."""
    with pytest.raises(AssertionError) as info:
        run_suite(factory, max_examples=EXAMPLES, steps=STEPS, shrink=False)
    message = str(info.value)
    names = (invariant,) if isinstance(invariant, str) else invariant
    assert any(f"invariant '{name}' violated at " in message for name in names), message
    return message


def test_every_fault_is_in_the_zoo():
    assert set(FAULTS) - {"none"} == set(CAUGHT_BY)


@pytest.mark.parametrize("fault,mode,invariant", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_fault_is_caught(fault, mode, invariant):
    _fails_naming(functools.partial(bundled_adapter, mode=mode, fault=fault), invariant)


# --------------------------------------------------------------------------------------------------------------------
# The user model: bugs a refactor of an upstream-shaped carry update introduces, seen without any StepEvents


USER_BUGS = {
    "no-inner-reset": "reset-from-init",  # halted slots keep their old z_H/z_L
    "inputs-from-batch": "continuing-keeps-sample",  # the carry update forgot one key of current_data
    # a reshape mixes the batch and sequence dims: a re-run with other slots (a padded fresh batch, a permutation)
    "slot-mixing": ("reset-from-init", "slot-permutation-independence"),
    "eval-early-halt": "eval-runs-to-max",  # the Q-head halts samples in eval too
}


@pytest.mark.parametrize("bug", sorted(USER_BUGS))
def test_user_model_bug_is_caught(bug):
    _fails_naming(functools.partial(ToyAdapter, bug=bug), USER_BUGS[bug])


class ResumeReinitialisesCarry(ToyAdapter):
    """Upstream's resume: the carry is not saved, a fresh one (all halted) is built instead."""

    def carry_from_state(self, state):
        carry = super().carry_from_state(state)
        return self.model.initial_carry(carry["current_data"])


def test_resume_without_the_carry_is_caught():
    _fails_naming(ResumeReinitialisesCarry, "checkpoint-restore")
