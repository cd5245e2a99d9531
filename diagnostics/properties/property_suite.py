"""The property suite: a Hypothesis state machine that steps any ACT model (through an adapter) under random halting
patterns and feeds, and checks the carry and label invariants after every rule.

Rules: a training step with a drawn halting mask (never, all, single slot, alternating, burst, random, or the model's
own decision) and a drawn feed (``refill``: new ids only into reset slots, -1 padding elsewhere; ``tail``: refill
with some reset slots left padding, as at the end of the data; ``trm``: fresh ids everywhere, as upstream TRM's
loader; ``adapter``: the adapter's own feed); an eval run on a fresh carry; the model's own evaluation entry point; a
checkpoint of the carry, a few steps, a restore and a replay. After each step (``suite_steps``): every check of
``diagnostics.properties.invariants`` (the carry-only ones for models without events), the content checks of
``diagnostics.properties.suite_checks`` (protocol v2), gradient coverage after a backward of the step's loss (by
events or by content), reset-from-init equivalence, and (on drawn steps) slot-permutation independence and the
metamorphic check that a continuing slot ignores the incoming batch row at its position.

A model exception inside a rule is a failure too (``model raised ValueError at step 3 after: ...``), so it shrinks.
A violation does not end the example: it fails at its end naming every invariant it broke (``suite_report``).

A failure raises ``AssertionError`` naming the invariant, e.g.
``invariant 'loss-labels-aligned' violated at step 3, slots [1, 4]: ...``.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any, Callable, Optional, Sequence

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.control import current_build_context
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from diagnostics.events import CarryView
from diagnostics.properties.adapter import ACTAdapter, AdapterFactory, EvalStep, check_adapter
from diagnostics.properties.capture import Capture, Consumed
from diagnostics.properties.fingerprints import make_content
from diagnostics.properties.invariants import STEP_INVARIANTS, StepContext, Violation, violations
from diagnostics.properties import suite_checks as sc
from diagnostics.properties.suite_checks import rows_differ as _rows_differ
from diagnostics.properties.suite_report import (CARRY_ONLY, FEED_NAMES, SUITE_CHECKS, ModelRaised, SuiteStats,
                                                 check_skip_names, coverage_by_content, derived_events, describe,
                                                 format_violations, skipped_checks, snapshot)
from diagnostics.properties.suite_report import suite_violation as _violation
from diagnostics.properties.suite_steps import StepChecks

__all__ = ["CARRY_ONLY", "FAST_EXAMPLES", "FAST_STEPS", "SUITE_CHECKS", "ModelRaised", "SuiteStats", "check_adapter",
           "default_examples", "derived_events", "format_violations", "halting_mask", "make_state_machine",
           "run_suite", "skipped_checks", "suite_settings"]

Tensor = torch.Tensor

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
FEEDS = st.sampled_from(FEED_NAMES)


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


# --------------------------------------------------------------------------------------------------------------------
# The state machine


def make_state_machine(adapter_factory: AdapterFactory, name: str = "ACTCarryMachine",
                       stats: Optional[SuiteStats] = None, skip: Sequence[str] = ()) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class that builds a fresh adapter per example (after seeding torch). Violations of
    the ``skip``ped invariants are not reported; every other one is, all of them (the example ends with a failure
    listing each invariant it broke)."""
    stats = stats if stats is not None else SuiteStats()
    skip = frozenset(check_skip_names(skip))

    class Machine(StepChecks, RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.stats = stats
            self.adapter: Optional[ACTAdapter] = None

        # -- setup --------------------------------------------------------------------------------------------------
        @initialize(seed=st.integers(0, 2**31 - 1))
        def build(self, seed: int) -> None:
            self.failures: dict[str, str] = {}
            self.raising = False
            # Shrinking ran out of time: the remaining candidates draw as usual (Hypothesis replays them) but run
            # nothing, so none is kept; the best example so far is replayed in full at the end.
            self.idle = over_shrink_budget(stats)
            torch.manual_seed(seed)
            self.skip = skip
            self.history: list[str] = []
            self.step_no = 0
            self.adapter = self._call("the adapter factory", adapter_factory)
            a = self.adapter
            self.B = int(a.batch_size)
            self.max_steps = int(a.max_steps)
            self.sup = a.supports
            self.spec = a.content_spec if getattr(a, "protocol", 1) >= 2 else None
            self.content_seed = seed
            self.hooks = a.hooks if self.spec is not None else None
            self.model = getattr(a, "model", None)
            self.next_id = 0
            self.slot_ids = torch.full((self.B,), -1, dtype=torch.long)  # the sample each slot holds, as fed
            self.stepped = torch.zeros(self.B, dtype=torch.bool)  # slots past their uninitialised first carry
            self.after_eval = False
            self.eval_cache: dict[int, Tensor] = {}
            if self.idle:
                return
            self.carry = self._call("initial_carry", a.initial_carry, self._batch([-1] * self.B))
            self.by_content_coverage = coverage_by_content(a)
            stats.examples += 1
            if stats.examples == 1:
                stats.skipped.update({k: v for k, v in skipped_checks(a).items() if k not in stats.skipped})
            init = a.view(self.carry)
            if not bool(init.halted.all()):
                self._record([Violation("initial-carry-halted", (~init.halted).nonzero().flatten().tolist(),
                                        "the initial carry must have every slot halted, so the first step loads "
                                        "the whole batch")], 0)

        # -- reporting ----------------------------------------------------------------------------------------------
        def _record(self, found: Sequence[Violation], at: int | str, where: str = "") -> None:
            """Keep the first violation of each invariant not opted out; the example goes on (nothing is hidden)
            and fails at its end listing them all."""
            for v in found:
                if v.name not in self.skip and v.name not in self.failures:
                    self.failures[v.name] = format_violations([v], at, where)
                    stats.failures.setdefault(v.name, self.failures[v.name])
            if self.failures and stats.first_failure_at is None:
                stats.first_failure_at = time.monotonic()

        def _raise_failures(self, first: str = "") -> None:
            self.raising = True
            if stats.first_failure_at is None:
                stats.first_failure_at = time.monotonic()
            raise (ModelRaised if first else AssertionError)("\n".join([first, *self.failures.values()]).strip())

        # -- calling the model --------------------------------------------------------------------------------------
        def _call(self, what: str, fn: Callable, *args: Any) -> Any:
            """``fn(*args)``; a model exception becomes a named failure with the steps that led to it."""
            try:
                return fn(*args)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 (any model error is a finding)
                after = ", ".join(self.history[-12:]) or "nothing"
                message = (f"invariant 'model-raises-nothing' violated at step {self.step_no}: model raised "
                           f"{type(exc).__name__} in {what} at step {self.step_no} after: {after}: {exc}")
                stats.failures.setdefault("model-raises-nothing", message)
                self._raise_failures(message)

        def _content(self, ids: Sequence[int]):
            return [make_content(self.spec, int(i), self.content_seed) if i >= 0 else None for i in ids]

        def _batch(self, ids: Sequence[int]) -> Any:
            ids = [int(i) for i in ids]
            if self.spec is None:
                return self.adapter.make_batch(ids)
            return self.adapter.make_batch(ids, self._content(ids))

        def _capture(self):
            if self.hooks is None or self.model is None:
                return contextlib.nullcontext(Consumed())
            return Capture(self.model, self.hooks, keep_encoder_outputs=self.by_content_coverage)

        def _step(self, carry: Any, batch: Any, force: Optional[Tensor], what: str = "step"):
            """One adapter step; for models without a forced-halt argument the halted flags are overridden after it
            (max steps still halts). Returns (carry, events, outputs, consumed)."""
            a = self.adapter
            passed = force if self.sup.force_halt else None
            with self._capture() as got:
                carry, events, outputs = self._call(what, a.step, carry, batch, passed)
            if force is not None and not self.sup.force_halt and a.fixed_steps is None:
                steps = a.view(carry).steps.cpu()
                carry = self._call("set_halted", a.set_halted, carry, (steps >= self.max_steps) | force)
            return carry, events, outputs, got

        # -- feeding ------------------------------------------------------------------------------------------------
        def _fresh(self, n: int) -> list[int]:
            ids = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            return ids

        def _feed_name(self, feed: str) -> str:
            """The drawn feed, as this adapter has it: no ``adapter`` feed without one, no padded tail when the
            adapter's training feed drops partial batches."""
            if (feed == "adapter" and not self.sup.feed) or (feed == "tail" and self.adapter.drops_partial_batches):
                return "refill"
            return feed

        def _feed(self, reset: Tensor, feed: str) -> Tensor:
            if feed == "adapter":
                fed = torch.tensor(self._call("feed", self.adapter.feed, reset.clone(), self.next_id),
                                   dtype=torch.long)
                self.next_id = max(self.next_id, int(fed.max()) + 1)
            elif feed == "trm":
                fed = torch.tensor(self._fresh(self.B), dtype=torch.long)
            else:
                fed = torch.full((self.B,), -1, dtype=torch.long)
                slots = reset.nonzero().flatten()
                if feed == "tail":  # the end of the data: every other reset slot stays padding
                    slots = slots[::2]
                fed[slots] = torch.tensor(self._fresh(len(slots)), dtype=torch.long)
            stats.fed[feed] = stats.fed.get(feed, 0) + int((fed >= 0).sum())
            stats.dropped[feed] = stats.dropped.get(feed, 0) + int(((fed >= 0) & ~reset).sum())
            return fed

        # -- one training step with every check ---------------------------------------------------------------------
        def _train_step(self, pattern: tuple, feed: str, perm_seed: Optional[int] = None,
                        meta_seed: Optional[int] = None) -> dict[str, Tensor]:
            a = self.adapter
            meta_seed = self.step_no + 1 if meta_seed is None else meta_seed  # the metamorphic check: every forced step
            before = snapshot(a.view(self.carry))
            reset = before.halted.to(torch.bool).cpu()
            feed = self._feed_name(feed)
            fed = self._feed(reset, feed)
            batch = self._batch(fed.tolist())
            force = halting_mask(pattern, self.B)
            checks_state = self.sup.checkpoint and (perm_seed is not None or meta_seed is not None)
            state0 = a.carry_state(self.carry) if checks_state else None
            self.step_no += 1
            self.history.append(describe(self.step_no, pattern, feed, reset))

            carry, events, outputs, got = self._step(self.carry, batch, force)
            after = a.view(carry)
            stats.steps += 1
            stats.resets += int(reset.sum())
            stats.patterns[pattern[0]] = stats.patterns.get(pattern[0], 0) + 1
            self.slot_ids = torch.where(reset, fed, self.slot_ids)
            self.stepped |= reset
            where = f"halting={pattern}, feed={feed}, resets={reset.nonzero().flatten().tolist()}"

            found = self._step_checks(events, before, after, fed, batch, outputs)
            found += self._content_checks(got, reset, events, training=True)
            found += self._halting_checks(pattern, after, outputs)
            if self.sup.checkpoint and self._has_q_target(outputs) and self._wants("q-continue-target"):
                found += self._q_target(carry, after, outputs)
            found += self._loss_checks(events, before, after, batch, outputs, carry, got, reset)
            if bool(reset.any()) and self._wants("reset-from-init"):
                found += self._reset_from_init(reset, fed, outputs)
            if state0 is not None and force is not None and perm_seed is not None \
                    and self._wants("slot-permutation-independence"):
                found += self._permutation(perm_seed, state0, batch, fed, force, outputs, after)
            if state0 is not None and force is not None and meta_seed is not None \
                    and self._wants("continuing-ignores-batch"):
                found += self._metamorphic(meta_seed, state0, reset, fed, force, outputs, carry)
            self._record(found, self.step_no, where)
            self.carry = carry
            self.after_eval = False
            return {k: v.detach().clone() for k, v in outputs.items() if isinstance(v, Tensor)}


        # -- rules --------------------------------------------------------------------------------------------------
        @rule(pattern=HALTING, feed=FEEDS, perm_seed=st.none() | st.integers(0, 2**16))
        def act_step(self, pattern: tuple, feed: str, perm_seed: Optional[int]) -> None:
            """One training step under a drawn halting mask and feed (the metamorphic check on every one of them:
            even steps pad the continuing slots' rows, odd steps put other samples there)."""
            if self.idle:
                return
            self._train_step(pattern, feed, perm_seed)

        @rule(n=st.integers(1, 4), feed=FEEDS)
        def model_decides(self, n: int, feed: str) -> None:
            """A run of steps where the model's own Q-head (and exploration) decides: slots reach max steps this way,
            where an exploration veto must not hold a slot past the last step."""
            if self.idle:
                return
            for _ in range(n):
                self._train_step(("model",), feed)

        def _training_carry_unmoved(self, saved: Optional[dict], saved_view: CarryView, what: str) -> None:
            a = self.adapter
            now = snapshot(a.view(self.carry))
            bad = _rows_differ(now.steps, saved_view.steps) | _rows_differ(now.halted, saved_view.halted)
            for k in now.fields.keys() & saved_view.fields.keys():
                bad |= _rows_differ(now.fields[k], saved_view.fields[k])
            if saved is not None:
                for k, v in a.carry_state(self.carry).items():
                    if v.dim() and v.shape[0] == self.B:
                        bad |= _rows_differ(v.cpu(), saved[k].cpu()) if k in saved else torch.ones_like(bad)
            bad &= self.stepped  # uninitialised carry memory (before a slot's first step) is no invariant's business
            self._record([v for v in [_violation("eval-leaves-carry", bad.cpu())] if v], self.step_no, what)
            self.after_eval = True

        @precondition(lambda self: self.adapter is not None and self.sup.eval_run)
        @rule(n_real=st.integers(1, 64))
        def evaluate(self, n_real: int) -> None:
            """Switch to eval (a fresh carry to max steps, padding in the tail) and back."""
            if self.idle:
                return
            a = self.adapter
            stats.eval_runs += 1
            n = 1 + (n_real - 1) % self.B
            ids = self._fresh(n) + [-1] * (self.B - n)
            batch = self._batch(ids)
            saved = a.carry_state(self.carry) if self.sup.checkpoint else None
            saved_view = snapshot(a.view(self.carry))
            self.history.append(f"eval run on {n} samples")
            with self._capture() as got:
                run: list[EvalStep] = self._call("eval_run", a.eval_run, batch)
            found: list[Violation] = []
            fed = torch.tensor(ids, dtype=torch.long)
            for i, s in enumerate(run, start=1):
                bad = (s.after.steps.cpu() != i) | (s.after.halted.cpu() != (i >= self.max_steps))
                if i == len(run) and i != self.max_steps:
                    bad |= torch.ones_like(bad)
                found += [v for v in [_violation("eval-runs-to-max", bad)] if v]
                ev = s.events
                if ev is None:
                    ev = derived_events(s.before, s.after, fed, fed, training=False)
                    invs = tuple(inv for inv in STEP_INVARIANTS if inv.name in CARRY_ONLY)
                else:
                    invs = STEP_INVARIANTS
                found += violations(StepContext(ev, snapshot(s.before), s.after, self.max_steps,
                                                a.batch_fields(batch)), invariants=invs)
                if found:
                    self._record(found, f"eval step {i} (after training step {self.step_no})",
                                 f"eval run on {n} real samples")
                    found = []
            if self.spec is not None and run:  # content over the whole run: inputs every step, demos once
                found = [v for v in [sc.check_inputs(self.spec, got.lookups.get("inputs", []), fed)] if v]
                if self.hooks.encoder:  # however often it encodes in eval, each row must be one slot's own demos
                    rows, mixed = sc.encoder_rows(self.spec, got.encoder_calls)
                    stray = mixed | ~torch.isin(rows, fed)
                    bad = torch.isin(fed, rows[stray]) | (torch.ones_like(fed, dtype=torch.bool) & bool(stray.any())
                                                           & ~torch.isin(rows[stray], fed).any())
                    found += [v for v in [_violation("encoder-reads-own-demos", bad)] if v]
                self._record(found, f"an eval run (after training step {self.step_no})",
                             f"eval run on {n} real samples")
            self._training_carry_unmoved(saved, saved_view, f"after an eval run on {n} samples")

        @precondition(lambda self: self.adapter is not None and self.sup.evaluate)
        @rule(n_real=st.integers(1, 64))
        def evaluate_entry_point(self, n_real: int) -> None:
            """The model's own evaluation of a fixed batch: every step's predictions, from a fresh carry."""
            if self.idle:
                return
            a = self.adapter
            stats.evaluate_runs += 1
            n = 1 + (n_real - 1) % self.B
            ids = list(range(n)) + [-1] * (self.B - n)  # the same batch each time n repeats
            batch = self._batch(ids)
            saved = a.carry_state(self.carry) if self.sup.checkpoint else None
            saved_view = snapshot(a.view(self.carry))
            self.history.append(f"evaluate() on {n} samples")
            res = self._call("evaluate", a.evaluate, batch)
            preds = res["preds"].detach().cpu()
            where = f"evaluate() on {n} real samples (after training step {self.step_no})"
            real = torch.tensor(ids) >= 0
            if preds.shape[0] != self.max_steps:
                self._record([Violation("eval-returns-every-step", list(range(self.B)),
                                        f"{SUITE_CHECKS['eval-returns-every-step']} (got {preds.shape[0]} steps, max "
                                        f"is {self.max_steps})")], "evaluate()", where)
                return
            bad = torch.zeros(self.B, dtype=torch.bool)
            if n in self.eval_cache:
                bad |= _rows_differ(preds.transpose(0, 1), self.eval_cache[n].transpose(0, 1))
            self.eval_cache.setdefault(n, preds)
            if self.sup.eval_run:
                run = self._call("eval_run", a.eval_run, batch)
                ref = [s.outputs["logits"].detach().cpu().argmax(-1) for s in run if s.outputs is not None]
                if len(ref) == preds.shape[0]:
                    bad |= _rows_differ(preds.transpose(0, 1), torch.stack(ref).transpose(0, 1))
            self._record([v for v in [_violation("eval-fresh-carry", bad & real)] if v], "evaluate()", where)
            self._training_carry_unmoved(saved, saved_view, f"after evaluate() on {n} samples")

        @precondition(lambda self: self.adapter is not None and self.sup.checkpoint)
        @rule(plan=st.lists(st.tuples(FORCED_HALTING, FEEDS), min_size=1, max_size=3))
        def checkpoint_and_restore(self, plan: list[tuple[tuple, str]]) -> None:
            """Save the carry (through ``torch.save``), take steps, restore, replay them: results must be identical."""
            if self.idle:
                return
            a = self.adapter
            stats.restores += 1
            blob = io.BytesIO()
            torch.save(a.carry_state(self.carry), blob)
            mark = (self.next_id, self.slot_ids.clone(), self.step_no, self.stepped.clone())
            self.history.append("checkpoint")
            first = [self._train_step(p, f) for p, f in plan]
            end_state = a.carry_state(self.carry)
            blob.seek(0)
            self.carry = a.carry_from_state(torch.load(blob, weights_only=True))
            self.history.append("restore")
            self.next_id, self.slot_ids, self.step_no, self.stepped = mark[0], mark[1].clone(), mark[2], mark[3]
            second = [self._train_step(p, f) for p, f in plan]
            bad = torch.zeros(self.B, dtype=torch.bool)
            for o1, o2 in zip(first, second):
                for k in o1.keys() | o2.keys():
                    bad |= _rows_differ(o1[k].cpu(), o2[k].cpu()) if k in o1 and k in o2 else torch.ones_like(bad)
            replay_state = a.carry_state(self.carry)
            for k in end_state.keys() | replay_state.keys():
                if k in end_state and k in replay_state:
                    if end_state[k].dim() and end_state[k].shape[0] == self.B:
                        bad |= _rows_differ(end_state[k].cpu(), replay_state[k].cpu())
                else:
                    bad |= torch.ones_like(bad)
            self._record([v for v in [_violation("checkpoint-restore", bad)] if v], self.step_no,
                         f"replayed plan {plan}")

        def _wants(self, name: str) -> bool:
            """Whether a check that re-runs the model is worth its time: not opted out, not failed already."""
            return name not in self.skip and name not in self.failures

        def teardown(self) -> None:
            self.adapter = None
            self.carry = None
            if getattr(self, "failures", None) and not self.raising:
                self._raise_failures()

    Machine.__name__ = Machine.__qualname__ = name
    Machine.stats = stats
    return Machine


# --------------------------------------------------------------------------------------------------------------------
# Running it


#: The suite's own fast default (the plugin and CI): examples per run and rules per example. ``--etrm-examples`` or
#: a profile named in ``THOROUGH_PROFILES`` (``HYPOTHESIS_PROFILE=thorough``) ask for more, for nightly runs.
FAST_EXAMPLES = 10
FAST_STEPS = 12
THOROUGH_PROFILES = ("thorough",)


def default_examples(requested: Optional[int] = None) -> int:
    """Examples for a run: ``requested``, else the loaded profile's under a thorough profile, else ``FAST_EXAMPLES``."""
    if requested:
        return int(requested)
    if settings.get_current_profile_name() in THOROUGH_PROFILES:
        return int(settings().max_examples)
    return FAST_EXAMPLES


def suite_settings(max_examples: Optional[int] = None, steps: Optional[int] = None, shrink: bool = True,
                   **overrides: Any) -> settings:
    """Settings for a suite run, on top of the loaded Hypothesis profile (``ci`` under CI=true)."""
    kwargs: dict[str, Any] = {
        "deadline": None,
        "report_multiple_bugs": False,
        "stateful_step_count": steps or FAST_STEPS,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    }
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    if not shrink:
        kwargs.update(phases=(Phase.explicit, Phase.reuse, Phase.generate), database=None)
    else:
        kwargs.update(phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))
    kwargs.update(overrides)
    return settings(**kwargs)


#: Seconds shrinking may take after the first failure (then the best example so far is reported, and the report says
#: that shrinking stopped early): the default run, shrinking included, stays within CI's patience.
SHRINK_SECONDS = 30.0


def over_shrink_budget(stats: SuiteStats) -> bool:
    """Whether shrinking has used its budget: later candidate examples run nothing (never the final replay)."""
    if stats.first_failure_at is None or stats.shrink_seconds is None:
        return False
    if time.monotonic() - stats.first_failure_at <= stats.shrink_seconds or current_build_context().is_final:
        return False
    stats.shrink_stopped = True
    return True


def run_suite(adapter_factory: AdapterFactory, *, max_examples: Optional[int] = None, steps: Optional[int] = None,
              shrink: bool = True, name: Optional[str] = None, skip: Sequence[str] = (),
              skip_reason: str = "opted out (run_suite(skip=...))", shrink_seconds: Optional[float] = SHRINK_SECONDS,
              **overrides: Any) -> SuiteStats:
    """Run the state machine against ``adapter_factory``; raise ``AssertionError`` naming every broken invariant.

    Returns what was exercised (examples, steps, resets, checks). ``shrink=False`` stops at the first failure
    (faster when a failure is expected, as in the bug zoo); ``shrink_seconds`` bounds shrinking (None: Hypothesis's
    own limit). ``skip``: invariant names opted out, reported as skipped with ``skip_reason``. A failure's message
    ends with the run's report (skips, dropped samples per feed, every failing invariant, an early shrink stop), and
    the exception carries the stats as ``suite_stats``.
    """
    stats = SuiteStats(shrink_seconds=shrink_seconds if shrink else None)
    stats.skipped.update({n: skip_reason for n in check_skip_names(skip)})
    label = name or getattr(adapter_factory, "__name__", "adapter")
    machine = make_state_machine(adapter_factory, name=f"{label}Machine".replace("-", "_"), stats=stats, skip=skip)
    try:
        run_state_machine_as_test(machine, settings=suite_settings(max_examples, steps, shrink, **overrides))
    except AssertionError as exc:
        stats.mark_silent()
        message = str(exc)
        others = [m for n, m in sorted(stats.failures.items()) if f"invariant '{n}' violated" not in message]
        if others:
            message += "\n  other invariants that failed in this run:\n" + "\n".join(others)
        exc.args = ("\n".join([message, *stats.report_lines()]),)
        exc.suite_stats = stats
        raise
    stats.mark_silent()
    return stats
