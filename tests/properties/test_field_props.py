"""The property suite on the fork-shaped example (``fork_adapter.py`` over ``examples/upstream_fork``): starvation seen
without sample ids, padding judged against the feed the fork has, opt-outs and skips in the report, every failing
invariant listed, tolerances scaled to the forward dtype, optional carry fields, no silent pass, a shrink budget."""

from __future__ import annotations

import functools

import pytest
import torch

from diagnostics.capture import ContentHooks
from diagnostics.properties.property_suite import run_suite
from diagnostics.properties.pytest_plugin import summary_lines
from diagnostics.properties.suite_checks import rerun_tolerance, rows_differ
from fork_adapter import ForkAdapter

EXAMPLES, STEPS = 6, 10


def _fails(factory, **kw) -> str:
    with pytest.raises(AssertionError) as info:
        run_suite(factory, max_examples=kw.pop("max_examples", EXAMPLES), steps=STEPS, shrink=kw.pop("shrink", False),
                  **kw)
    return str(info.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_field_props_healthy_fork_passes_with_its_declarations(dtype):
    examples = EXAMPLES if dtype == "float32" else 3
    stats = run_suite(functools.partial(ForkAdapter, "healthy", dtype), max_examples=examples, steps=STEPS)
    assert stats.coverage_checks == stats.steps == stats.content_checks  # coverage by content, no sample ids
    assert stats.reset_checks and stats.restores and stats.metamorphic_checks
    assert stats.captured["embeds-own-inputs"] > 0  # bf16's cast token table is followed, not silently passed
    assert "embeds-own-inputs" not in stats.skipped and "coverage-matches-mode" not in stats.skipped
    assert "drops_partial_batches" in stats.skipped["padding-adds-nothing"]
    assert "tail" not in stats.fed and "trm" in stats.fed and "full-batch" not in stats.fed, stats.fed
    lines = summary_lines("fork", stats, 1.0)
    assert any(ln.startswith("  info dropped-samples: feed 'trm' dropped ") for ln in lines), lines
    assert any(ln.startswith("  info dropped-samples: feed 'refill' dropped 0 of ") for ln in lines), lines


def test_field_props_cached_fork_fails_coverage_and_lists_every_failing_invariant():
    message = _fails(functools.partial(ForkAdapter, "cached"))
    assert "invariant 'coverage-matches-mode' violated at step " in message, message
    assert "invariant 'encoder-work-matches-mode' violated at step " in message, message
    assert "failing invariants: coverage-matches-mode, encoder-work-matches-mode" in message, message
    assert "info dropped-samples: feed " in message and "skipped padding-adds-nothing: " in message, message


def test_field_props_full_batch_encode_starves_the_encoder():
    message = _fails(functools.partial(ForkAdapter, "full-batch-encode"))
    assert "invariant 'coverage-matches-mode' violated at step " in message
    assert "encoder-work-matches-mode" not in message  # every slot was encoded; only the gradient is missing


def test_field_props_padding_rows_in_the_q_loss_fail_only_when_the_feed_makes_them():
    no_drop = functools.partial(ForkAdapter, "healthy", drops_partial_batches=False)
    assert "invariant 'padding-adds-nothing' violated at step " in _fails(no_drop, max_examples=15)
    stats = run_suite(no_drop, max_examples=4, steps=STEPS, skip=("padding-adds-nothing",))
    assert stats.skipped["padding-adds-nothing"] == "opted out (run_suite(skip=...))"
    assert stats.fed.get("tail")  # the padded tail was fed, the opted-out check stayed quiet


def test_field_props_unknown_skip_name_is_refused():
    with pytest.raises(ValueError, match="unknown invariant 'padding-adds-everything' to skip; known: "):
        run_suite(ForkAdapter, max_examples=1, skip=("padding-adds-everything",))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_field_props_no_state_reset_fails_reset_from_init(dtype):
    message = _fails(functools.partial(ForkAdapter, "no-state-reset", dtype))
    assert "invariant 'reset-from-init' violated at step " in message, message


def test_field_props_sub_batch_encode_passes_reset_from_init():
    stats = run_suite(functools.partial(ForkAdapter, "sub-batch-encode"), max_examples=EXAMPLES, steps=STEPS)
    assert stats.reset_checks and stats.restores and stats.coverage_checks


def test_field_props_tolerance_scales_with_dtype_and_magnitude():
    ref = torch.tensor([[10.0, -3.0], [0.5, 1.0]])
    fp32 = rerun_tolerance(ref, 1e-5)
    assert 1e-5 < fp32 < 1e-4  # 1e-5 + 16 * eps(fp32) * 10
    assert not bool(rows_differ(ref + 1.06e-5, ref, fp32).any())  # sub-batch float noise passes
    assert bool(rows_differ(ref + 1e-3, ref, fp32).all())
    bf16 = rerun_tolerance(ref.bfloat16(), 1e-5)
    assert fp32 < bf16 < 2.0
    assert rerun_tolerance(ref, 1e-5, torch.bfloat16) == bf16  # the declared forward dtype, not the output's
    assert rerun_tolerance(torch.tensor([[0.1, 0.2]]), 1e-5) == pytest.approx(1e-5 + 16 * torch.finfo().eps)


def test_field_props_optional_carry_field_round_trips():
    a = ForkAdapter("sub-batch-encode")
    batch = a.make_batch(list(range(6)), [None] * 6)
    init = a.initial_carry(batch)
    state0 = a.carry_state(init)
    assert init.cached_context is None and not any(k.startswith("cached_context") for k in state0)
    carry, _, _ = a.step(init, batch, None)
    assert carry.cached_context is not None
    a.carry_state(carry)  # the template now has a tensor there
    back = a.carry_from_state(state0)
    assert back.cached_context is None and torch.equal(back.halted, init.halted)
    again = a.carry_from_state(a.carry_state(carry))
    assert torch.equal(again.cached_context, carry.cached_context)


def test_field_props_a_check_that_captured_nothing_is_reported_skipped():
    class NeverIndexed(ForkAdapter):
        def __init__(self):
            super().__init__("healthy")
            self.hooks = ContentHooks(inputs_table="lm_head", encoder="encoder")  # a table no lookup reads

    stats = run_suite(NeverIndexed, max_examples=2, steps=4)
    assert stats.skipped["embeds-own-inputs"].startswith("checked nothing: captured no [B, S] lookup"), stats.skipped


def test_field_props_shrinking_stops_at_its_budget_and_says_so():
    message = _fails(functools.partial(ForkAdapter, "no-state-reset"), max_examples=10, shrink=True,
                     shrink_seconds=0.0)
    assert "invariant 'reset-from-init' violated at step " in message
    assert "shrinking stopped early at its 0 s budget" in message, message
