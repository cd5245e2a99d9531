"""The property suite as pytest tests, collected by the ``etrm`` pytest plugin when ``--etrm-model`` is given.

Not named ``test_*.py`` on purpose: ordinary collection never picks it up; the plugin adds it explicitly.
"""

from __future__ import annotations

import time

import pytest

from diagnostics.properties.property_suite import check_adapter, run_suite

pytestmark = pytest.mark.etrm_suite


def test_adapter_contract(etrm_adapter_factory) -> None:
    """Cheap checks of the adapter itself (sizes, deterministic batches, view shapes) with clear messages."""
    check_adapter(etrm_adapter_factory())


def test_carry_invariants_under_random_halting(etrm_adapter_factory, etrm_model_spec, etrm_suite_options,
                                               etrm_record) -> None:
    """The state machine: random halting masks, refill and trm feeds, eval runs, checkpoint restores."""
    start = time.perf_counter()
    try:
        stats = run_suite(etrm_adapter_factory, name="user", **etrm_suite_options)
    except AssertionError as exc:  # a failing run reports too (skips, dropped samples, every failing invariant)
        etrm_record((etrm_model_spec, getattr(exc, "suite_stats", None), time.perf_counter() - start))
        raise
    etrm_record((etrm_model_spec, stats, time.perf_counter() - start))
