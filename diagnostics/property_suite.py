"""The property suite: a Hypothesis state machine that steps any ACT model (through an adapter) under random halting
patterns and feeds, and checks the carry and label invariants after every rule.

Rules: a training step with a drawn halting mask (never, all, single slot, alternating, burst, random, or the model's
own decision) and a drawn feed (``refill``: new ids only into reset slots, -1 padding elsewhere; ``full-batch``:
fresh ids everywhere, as upstream TRM's loader); an eval run on a fresh carry; a checkpoint of the carry, a few steps, a restore and a replay. After each
step: every check of ``diagnostics.invariants`` (the carry-only ones for models without events), gradient coverage
after a backward of the step's loss, reset-from-init equivalence, and (on drawn steps) slot-permutation independence.

A failure raises ``AssertionError`` naming the invariant, e.g.
``invariant 'loss-labels-aligned' violated at step 3, slots [1, 4]: ...``.
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from diagnostics.adapter import ACTAdapter, AdapterFactory, EvalStep
from diagnostics.events import CarryView, Mode, StepEvents
from diagnostics.invariants import STEP_INVARIANTS, GradRows, StepContext, Violation, violations

Tensor = torch.Tensor

#: Checks that need only the carry: they run for every model, with or without ``StepEvents``.
CARRY_ONLY = ("reset-takes-sample", "continuing-keeps-sample", "steps-in-range", "carry-detached")

#: Checks the suite adds beyond ``diagnostics.invariants`` (they need to re-run the model).
SUITE_CHECKS = {
    "reset-from-init": "a reset slot's outputs must equal a fresh carry's first step on that sample alone",
    "slot-permutation-independence": "permuting the slots (carry, batch, mask) must permute the outputs",
    "eval-runs-to-max": "in eval every slot must run exactly max steps, halting only at the last",
    "eval-leaves-carry": "an eval run must leave the training carry untouched",
    "training-mode-restored": "after an eval run the model must step in training mode again",
    "checkpoint-restore": "restoring a saved carry and replaying the same steps must give identical results",
    "events-match-carry": "the step's events must agree with the carry before and after it",
}

# --------------------------------------------------------------------------------------------------------------------
# Halting masks and feeds

#: Halting-mask patterns, simplest first (Hypothesis shrinks towards the first). Slots and lengths are taken mod B.
HALTING = st.one_of(
    st.just(("never",)),
    st.just(("all",)),
    st.tuples(st.just("single"), st.integers(0, 63)),
    st.tuples(st.just("alternating"), st.integers(0, 1)),
    st.tuples(st.just("burst"), st.integers(0, 63), st.integers(1, 63)),
    st.tuples(st.just("random"), st.integers(0, 2**16 - 1)),
    st.just(("model",)),
)
FORCED_HALTING = HALTING.filter(lambda p: p[0] != "model")
FEEDS = st.sampled_from(("refill", "full-batch"))


def halting_mask(pattern: tuple, batch_size: int) -> Optional[Tensor]:
    """The [B] bool mask of a drawn pattern; None for ``("model",)`` (the model decides)."""
    kind, b = pattern[0], batch_size
    slots = torch.arange(b)
    if kind == "model":
        return None
    if kind == "never":
        return torch.zeros(b, dtype=torch.bool)
    if kind == "all":
        return torch.ones(b, dtype=torch.bool)
    if kind == "single":
        return slots == pattern[1] % b
    if kind == "alternating":
        return (slots + pattern[1]) % 2 == 0
    if kind == "burst":
        start, length = pattern[1] % b, 1 + (pattern[2] - 1) % b
        return (slots - start) % b < length
    if kind == "random":
        return torch.tensor([bool(pattern[1] >> i & 1) for i in range(b)])
    raise ValueError(f"unknown halting pattern {pattern!r}")


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _snapshot(view: CarryView) -> CarryView:
    """A detached copy of a view, so a model that updates its carry in place cannot make the checks vacuous."""
    def c(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().clone()
    return CarryView(steps=c(view.steps), halted=c(view.halted), sample_id=c(view.sample_id),
                     puzzle_id=c(view.puzzle_id), fields={k: c(v) for k, v in view.fields.items()}, state={})


def derived_events(before: CarryView, after: CarryView, fed: Tensor, expected_ids: Tensor,
                   training: bool = True) -> StepEvents:
    """Events read off the carry alone, for models that emit none: enough for the ``CARRY_ONLY`` checks."""
    reset = before.halted.clone()
    zeros = torch.zeros_like(reset)
    minus = torch.full_like(fed, -1)
    return StepEvents(
        reset=reset, steps=after.steps, halted=after.halted,
        sample_id_before=minus if before.sample_id is None else before.sample_id,
        sample_id_after=expected_ids if after.sample_id is None else after.sample_id,
        puzzle_id_before=minus, puzzle_id_after=minus, batch_sample_id=fed,
        label_sample_id=expected_ids, demo_sample_id=expected_ids,
        encoded=zeros, needs_encode=zeros, encoded_slots=torch.zeros(0, dtype=torch.long), encoder_out=None,
        q_halt_logits=torch.zeros(reset.shape), q_continue_logits=None, q_says_halt=zeros, explore_veto=zeros,
        is_last_step=zeros, mode=Mode.UNKNOWN, training=training,
    )


def _rows_differ(a: Tensor, b: Tensor, atol: float = 0.0) -> Tensor:
    """Per slot (dim 0): do ``a`` and ``b`` differ (beyond ``atol``; NaN counts as different)?"""
    if a.shape != b.shape:
        return torch.ones(a.shape[0] if a.dim() else 1, dtype=torch.bool)
    a2, b2 = a.detach().reshape(a.shape[0], -1), b.detach().reshape(b.shape[0], -1)
    if atol == 0.0 or not (a2.is_floating_point() or b2.is_floating_point()):
        return (a2 != b2).any(1)
    diff = (a2.double() - b2.double()).abs()
    return (~(diff <= atol)).any(1)


def format_violations(found: Sequence[Violation], step: int | str, where: str = "") -> str:
    """``invariant 'NAME' violated at step N, slots [...]: what it means`` per violation, then the context."""
    at = f"step {step}" if isinstance(step, int) else step
    lines = [f"invariant '{v.name}' violated at {at}, slots {v.slots}: {v.description}" for v in found]
    if where:
        lines.append(f"  ({where})")
    return "\n".join(lines)


def _violation(name: str, bad: Tensor | Sequence[int]) -> Optional[Violation]:
    slots = bad.nonzero().flatten().tolist() if isinstance(bad, Tensor) else list(bad)
    return Violation(name, slots, SUITE_CHECKS[name]) if slots else None


@dataclass
class SuiteStats:
    """What one suite run exercised (counted over every example Hypothesis ran)."""

    examples: int = 0
    steps: int = 0
    eval_runs: int = 0
    restores: int = 0
    resets: int = 0
    reset_checks: int = 0
    permutation_checks: int = 0
    coverage_checks: int = 0
    patterns: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# The state machine


def make_state_machine(adapter_factory: AdapterFactory, name: str = "ACTCarryMachine",
                       stats: Optional[SuiteStats] = None) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class that builds a fresh adapter per example (after seeding torch)."""
    stats = stats if stats is not None else SuiteStats()

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.adapter: Optional[ACTAdapter] = None

        # -- setup --------------------------------------------------------------------------------------------------
        @initialize(seed=st.integers(0, 2**31 - 1))
        def build(self, seed: int) -> None:
            torch.manual_seed(seed)
            self.adapter = adapter_factory()
            a = self.adapter
            self.B = int(a.batch_size)
            self.max_steps = int(a.max_steps)
            self.sup = a.supports
            self.next_id = 0
            self.slot_ids = torch.full((self.B,), -1, dtype=torch.long)  # the sample each slot holds, as fed
            self.step_no = 0
            self.after_eval = False
            self.carry = a.initial_carry(a.make_batch([-1] * self.B))
            stats.examples += 1
            init = a.view(self.carry)
            if not bool(init.halted.all()):
                raise AssertionError("invariant 'initial-carry-halted' violated at step 0, slots "
                                     f"{(~init.halted).nonzero().flatten().tolist()}: the initial carry must have "
                                     "every slot halted, so the first step loads the whole batch")

        # -- feeding ------------------------------------------------------------------------------------------------
        def _fresh(self, n: int) -> list[int]:
            ids = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            return ids

        def _feed(self, reset: Tensor, feed: str) -> Tensor:
            if feed == "full-batch":
                return torch.tensor(self._fresh(self.B), dtype=torch.long)
            fed = torch.full((self.B,), -1, dtype=torch.long)
            fed[reset] = torch.tensor(self._fresh(int(reset.sum())), dtype=torch.long)
            return fed

        # -- one training step with every check ---------------------------------------------------------------------
        def _train_step(self, pattern: tuple, feed: str, perm_seed: Optional[int] = None) -> dict[str, Tensor]:
            a = self.adapter
            before = _snapshot(a.view(self.carry))
            reset = before.halted.to(torch.bool).cpu()
            fed = self._feed(reset, feed)
            batch = a.make_batch(fed.tolist())
            force = halting_mask(pattern, self.B)
            state0 = a.carry_state(self.carry) if (perm_seed is not None and self.sup.checkpoint) else None

            carry, events, outputs = a.step(self.carry, batch, force)
            after = a.view(carry)
            self.step_no += 1
            stats.steps += 1
            stats.resets += int(reset.sum())
            stats.patterns[pattern[0]] = stats.patterns.get(pattern[0], 0) + 1
            self.slot_ids = torch.where(reset, fed, self.slot_ids)
            where = f"halting={pattern}, feed={feed}, resets={reset.nonzero().flatten().tolist()}"

            found = self._step_checks(events, before, after, fed, batch, outputs)
            if not found and events is not None and self.sup.loss and bool(events.training):
                found += self._coverage(events, before, after, batch, outputs)
            if not found and bool(reset.any()):
                found += self._reset_from_init(reset, fed, outputs)
            if not found and state0 is not None and force is not None:
                found += self._permutation(perm_seed, state0, batch, fed, force, outputs, after)
            if found:
                raise AssertionError(format_violations(found, self.step_no, where))
            self.carry = carry
            self.after_eval = False
            return {k: v.detach().clone() for k, v in outputs.items()}

        def _step_checks(self, events, before, after, fed, batch, outputs) -> list[Violation]:
            a = self.adapter
            fields = a.batch_fields(batch)
            if events is None:
                ev = derived_events(before, after, fed, self.slot_ids)
                invs = tuple(i for i in STEP_INVARIANTS if i.name in CARRY_ONLY)
            else:
                ev, invs = events, STEP_INVARIANTS
            found = violations(StepContext(ev, before, after, self.max_steps, fields), invariants=invs)
            if events is not None:
                bad = (events.reset.cpu() != before.halted.cpu()) | (events.steps.cpu() != after.steps.cpu())
                bad |= (events.halted.cpu() != after.halted.cpu()) | (events.batch_sample_id.cpu() != fed)
                if after.sample_id is not None:
                    bad |= events.sample_id_after.cpu() != after.sample_id.cpu()
                found += [v for v in [_violation("events-match-carry", bad)] if v]
                if self.after_eval and not bool(events.training):
                    found += [Violation("training-mode-restored", list(range(self.B)),
                                        SUITE_CHECKS["training-mode-restored"])]
            # The loss's labels, read from the outputs when the model returns them: an events-free alignment check.
            if "labels" in outputs and "labels" in after.fields:
                bad = _rows_differ(outputs["labels"].cpu(), after.fields["labels"].cpu()) & (self.slot_ids >= 0)
                if bool(bad.any()) and not any(v.name == "loss-labels-aligned" for v in found):
                    found.append(Violation("loss-labels-aligned", bad.nonzero().flatten().tolist(),
                                           "the loss must use the labels of the slot's own sample (outputs' labels "
                                           "differ from the carry's)"))
            return found

        def _coverage(self, events, before, after, batch, outputs) -> list[Violation]:
            stats.coverage_checks += 1
            rows = GradRows(events)
            loss = self.adapter.loss(outputs, events)
            if loss.requires_grad:
                loss.backward()
            ctx = StepContext(events, before, after, self.max_steps, None)
            return violations(ctx, grad_rows=rows.mask, invariants=())

        def _reset_from_init(self, reset: Tensor, fed: Tensor, outputs: dict[str, Tensor]) -> list[Violation]:
            stats.reset_checks += 1
            slots = reset.nonzero().flatten()
            fresh = self.adapter.fresh_first_step_outputs(fed[slots].tolist())
            bad = torch.zeros(len(slots), dtype=torch.bool)
            keys = [k for k in self.adapter.compared_outputs if k in fresh and k in outputs]
            for k in keys:
                bad |= _rows_differ(outputs[k].detach().cpu()[slots], fresh[k].detach().cpu(), self.adapter.atol)
            v = _violation("reset-from-init", slots[bad].tolist())
            return [v] if v else []

        def _permutation(self, perm_seed, state0, batch, fed, force, outputs, after) -> list[Violation]:
            stats.permutation_checks += 1
            a = self.adapter
            perm = torch.randperm(self.B, generator=torch.Generator().manual_seed(perm_seed))
            carry_p = a.carry_from_state({k: v[perm] for k, v in state0.items()})
            batch_p = a.make_batch(fed[perm].tolist())
            with torch.no_grad():
                carry_p, _, out_p = a.step(carry_p, batch_p, force[perm])
            after_p = a.view(carry_p)
            bad = torch.zeros(self.B, dtype=torch.bool)  # indexed by position in the permuted batch
            for k in outputs.keys() & out_p.keys():
                bad |= _rows_differ(outputs[k].detach().cpu()[perm], out_p[k].detach().cpu(), a.atol)
            bad |= _rows_differ(after.steps.cpu()[perm], after_p.steps.cpu())
            bad |= _rows_differ(after.halted.cpu()[perm], after_p.halted.cpu())
            for k in after.fields.keys() & after_p.fields.keys():
                bad |= _rows_differ(after.fields[k].cpu()[perm], after_p.fields[k].cpu())
            v = _violation("slot-permutation-independence", perm[bad].sort().values.tolist())  # original slots
            return [v] if v else []

        # -- rules --------------------------------------------------------------------------------------------------
        @rule(pattern=HALTING, feed=FEEDS, perm_seed=st.none() | st.integers(0, 2**16))
        def act_step(self, pattern: tuple, feed: str, perm_seed: Optional[int]) -> None:
            """One training step under a drawn halting mask and feed."""
            self._train_step(pattern, feed, perm_seed)

        @precondition(lambda self: self.adapter is not None and self.sup.eval_run)
        @rule(n_real=st.integers(1, 64))
        def evaluate(self, n_real: int) -> None:
            """Switch to eval (a fresh carry to max steps, padding in the tail) and back."""
            a = self.adapter
            stats.eval_runs += 1
            n = 1 + (n_real - 1) % self.B
            ids = self._fresh(n) + [-1] * (self.B - n)
            batch = a.make_batch(ids)
            saved = a.carry_state(self.carry) if self.sup.checkpoint else None
            saved_view = _snapshot(a.view(self.carry))
            run: list[EvalStep] = a.eval_run(batch)
            found: list[Violation] = []
            fed = torch.tensor(ids, dtype=torch.long)
            for i, s in enumerate(run, start=1):
                bad = (s.after.steps.cpu() != i) | (s.after.halted.cpu() != (i >= self.max_steps))
                if i == len(run) and i != self.max_steps:
                    bad |= torch.ones_like(bad)
                found += [v for v in [_violation("eval-runs-to-max", bad)] if v]
                ev = s.events
                slot_ids = torch.tensor(ids, dtype=torch.long)
                if ev is None:
                    ev = derived_events(s.before, s.after, fed, slot_ids, training=False)
                    invs = tuple(inv for inv in STEP_INVARIANTS if inv.name in CARRY_ONLY)
                else:
                    invs = STEP_INVARIANTS
                found += violations(StepContext(ev, _snapshot(s.before), s.after, self.max_steps,
                                                a.batch_fields(batch)), invariants=invs)
                if found:
                    at = f"eval step {i} (after training step {self.step_no})"
                    raise AssertionError(format_violations(found, at, f"eval run on {n} real samples"))
            # the training carry must not have moved
            now = _snapshot(a.view(self.carry))
            bad = _rows_differ(now.steps, saved_view.steps) | _rows_differ(now.halted, saved_view.halted)
            for k in now.fields.keys() & saved_view.fields.keys():
                bad |= _rows_differ(now.fields[k], saved_view.fields[k])
            if saved is not None:
                for k, v in a.carry_state(self.carry).items():
                    bad |= _rows_differ(v.cpu(), saved[k].cpu()) if k in saved else torch.ones_like(bad)
            v = _violation("eval-leaves-carry", bad.cpu())
            if v:
                raise AssertionError(format_violations([v], self.step_no, f"after an eval run on {n} samples"))
            self.after_eval = True

        @precondition(lambda self: self.adapter is not None and self.sup.checkpoint)
        @rule(plan=st.lists(st.tuples(FORCED_HALTING, FEEDS), min_size=1, max_size=3))
        def checkpoint_and_restore(self, plan: list[tuple[tuple, str]]) -> None:
            """Save the carry (through ``torch.save``), take steps, restore, replay them: results must be identical."""
            a = self.adapter
            stats.restores += 1
            blob = io.BytesIO()
            torch.save(a.carry_state(self.carry), blob)
            mark = (self.next_id, self.slot_ids.clone(), self.step_no)
            first = [self._train_step(p, f) for p, f in plan]
            end_state = a.carry_state(self.carry)
            blob.seek(0)
            self.carry = a.carry_from_state(torch.load(blob, weights_only=True))
            self.next_id, self.slot_ids, self.step_no = mark[0], mark[1].clone(), mark[2]
            second = [self._train_step(p, f) for p, f in plan]
            bad = torch.zeros(self.B, dtype=torch.bool)
            for o1, o2 in zip(first, second):
                for k in o1.keys() | o2.keys():
                    bad |= _rows_differ(o1[k].cpu(), o2[k].cpu()) if k in o1 and k in o2 else torch.ones_like(bad)
            replay_state = a.carry_state(self.carry)
            for k in end_state.keys() | replay_state.keys():
                if k in end_state and k in replay_state:
                    bad |= _rows_differ(end_state[k].cpu(), replay_state[k].cpu())
                else:
                    bad |= torch.ones_like(bad)
            v = _violation("checkpoint-restore", bad)
            if v:
                raise AssertionError(format_violations([v], self.step_no, f"replayed plan {plan}"))

        def teardown(self) -> None:
            self.adapter = None
            self.carry = None

    Machine.__name__ = Machine.__qualname__ = name
    Machine.stats = stats
    return Machine


# --------------------------------------------------------------------------------------------------------------------
# Running it


def suite_settings(max_examples: Optional[int] = None, steps: Optional[int] = None, shrink: bool = True,
                   **overrides: Any) -> settings:
    """Settings for a suite run, on top of the loaded Hypothesis profile (``ci`` under CI=true)."""
    kwargs: dict[str, Any] = {
        "deadline": None,
        "stateful_step_count": steps or 12,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    }
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    if not shrink:
        kwargs.update(phases=(Phase.explicit, Phase.reuse, Phase.generate), report_multiple_bugs=False,
                      database=None)
    kwargs.update(overrides)
    return settings(**kwargs)


def run_suite(adapter_factory: AdapterFactory, *, max_examples: Optional[int] = None, steps: Optional[int] = None,
              shrink: bool = True, name: Optional[str] = None, **overrides: Any) -> SuiteStats:
    """Run the state machine against ``adapter_factory``; raise ``AssertionError`` naming the first broken invariant.

    Returns what was exercised (examples, steps, resets, checks). ``shrink=False`` stops at the first failure
    (faster when a failure is expected, as in the bug zoo).
    """
    stats = SuiteStats()
    label = name or getattr(adapter_factory, "__name__", "adapter")
    machine = make_state_machine(adapter_factory, name=f"{label}Machine".replace("-", "_"), stats=stats)
    run_state_machine_as_test(machine, settings=suite_settings(max_examples, steps, shrink, **overrides))
    return stats


def check_adapter(adapter: ACTAdapter) -> None:
    """Quick contract checks with a clear message, before the state machine (which would fail more obscurely)."""
    for attr in ("batch_size", "max_steps"):
        if not isinstance(getattr(adapter, attr, None), int) or getattr(adapter, attr) < 1:
            raise AssertionError(f"adapter.{attr} must be a positive int, got {getattr(adapter, attr, None)!r}")
    for meth in ("make_batch", "initial_carry", "step", "view", "batch_fields"):
        if not callable(getattr(adapter, meth, None)):
            raise AssertionError(f"adapter has no method {meth}()")
    b = adapter.batch_size
    ids = list(range(b - 1)) + [-1]
    b1, b2 = adapter.make_batch(ids), adapter.make_batch(ids)
    f1, f2 = adapter.batch_fields(b1), adapter.batch_fields(b2)
    for k in f1:
        if not torch.equal(f1[k], f2[k]):
            raise AssertionError(f"adapter.make_batch is not deterministic per sample id (field {k!r})")
        if f1[k].shape[0] != b:
            raise AssertionError(f"batch field {k!r} has {f1[k].shape[0]} rows, expected batch_size={b}")
    view = adapter.view(adapter.initial_carry(b1))
    if view.steps.shape != (b,) or view.halted.shape != (b,):
        raise AssertionError(f"view().steps and .halted must be [{b}], got {tuple(view.steps.shape)} and "
                             f"{tuple(view.halted.shape)}")
    if view.halted.dtype != torch.bool:
        raise AssertionError(f"view().halted must be bool, got {view.halted.dtype}")
    if adapter.supports.loss and not adapter.supports.events:
        raise AssertionError("supports.loss needs supports.events (coverage reads the encoder output from events)")
    sig = inspect.signature(adapter.step)
    if len(sig.parameters) < 3:
        raise AssertionError("adapter.step must take (carry, batch, force_halt)")
