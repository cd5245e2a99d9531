"""The per-step checks of the property suite's state machine: the invariants, content, halting, loss and coverage
checks of one training step, and the equivalences that re-run the model (reset-from-init, slot permutation, the
metamorphic check, restore round-trip). A mixin of the machine in ``property_suite``: it reads the machine's state
(adapter, slot ids, step number) and counts into ``self.stats``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from diagnostics.events import CarryView
from diagnostics.properties import suite_checks as sc
from diagnostics.properties.capture import Consumed
from diagnostics.properties.invariants import STEP_INVARIANTS, GradRows, StepContext, Violation, violations
from diagnostics.properties.suite_checks import rows_differ as _rows_differ
from diagnostics.properties.suite_report import CARRY_ONLY, SUITE_CHECKS, derived_events
from diagnostics.properties.suite_report import suite_violation as _violation

Tensor = torch.Tensor


class StepChecks:
    """The checks of one training step (mixed into the state machine)."""

    def _tol(self, reference: Tensor) -> float:
        """A re-run comparison's tolerance: scaled to the forward dtype and the reference's magnitude."""
        return sc.rerun_tolerance(reference, self.adapter.atol, self.adapter.forward_dtype)

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

    # -- content: what the model embedded and encoded -----------------------------------------------------------
    def _content_checks(self, got: Consumed, reset: Tensor, events, training: bool,
                        slot_ids: Optional[Tensor] = None) -> list[Violation]:
        if self.spec is None:
            return []
        self.stats.content_checks += 1
        ids = self.slot_ids if slot_ids is None else slot_ids
        b = ids.shape[0]
        self.stats.capture("embeds-own-inputs", sum(1 for i in got.lookups.get("inputs", [])
                                                    if i.dim() == 2 and i.shape[0] == b))
        found = [v for v in [sc.check_inputs(self.spec, got.lookups.get("inputs", []), ids)] if v]
        if self.hooks.puzzle_table:
            puzzles = torch.tensor([c.puzzle_id if c is not None else 0 for c in self._content(ids.tolist())])
            self.stats.capture("embeds-own-puzzle-row", sum(1 for i in got.lookups.get("puzzle", [])
                                                            if i.shape == (b,)))
            found += [v for v in [sc.check_puzzles(got.lookups.get("puzzle", []), puzzles)] if v]
        on_reset = self.adapter.encoder_on_reset_only
        if self.hooks.encoder:
            self.stats.capture("encoder-reads-own-demos", sum(1 for c in got.encoder_calls if c[0].dim() == 3))
        if self.hooks.encoder and (on_reset is not None or not training):
            needs = reset.clone() if (on_reset or not training) else torch.ones_like(reset)
            found += sc.check_encoder(self.spec, got.encoder_calls, ids, needs)
        if events is not None and not found:
            bad = (events.sample_id_after.cpu() != ids) | ((events.demo_sample_id.cpu() != ids) & (ids >= 0))
            found += [v for v in [_violation("reported-ids-match-content", bad)] if v]
        return found

    # -- halting ------------------------------------------------------------------------------------------------
    def _halting_checks(self, pattern: tuple, after: CarryView, outputs: dict[str, Tensor]) -> list[Violation]:
        a = self.adapter
        halted, steps = after.halted.cpu().bool(), after.steps.cpu()
        self.stats.count("all-halt", int(bool(halted.all())))
        self.stats.count("none-halt", int(not bool(halted.any())))
        if a.fixed_steps is not None:
            return [v for v in [_violation("fct-runs-fct-steps", sc.check_fixed_steps(halted, steps,
                                                                                     a.fixed_steps))] if v]
        qh, qc, _ = a.q_keys
        if pattern[0] != "model" or qh not in outputs:
            return []
        q_says = sc.q_says_halt(outputs[qh].detach().cpu(), outputs.get(qc, None) if qc in outputs else None,
                                a.halt_rule)
        if isinstance(q_says, Tensor):
            q_says = q_says.cpu()
        self.stats.count("exploration-veto", int((q_says & ~halted & (steps < self.max_steps)).sum()))
        self.stats.count("q-halt-at-last-step", int((q_says & (steps >= self.max_steps)).sum()))
        self.stats.count("q-halt-early", int((q_says & halted & (steps < self.max_steps)).sum()))
        bad = sc.check_exploration(halted, steps, q_says, self.max_steps)
        return [v for v in [_violation("exploration-only-delays", bad)] if v]

    def _has_q_target(self, outputs: dict) -> bool:
        key = self.adapter.q_keys[2]
        return outputs.get(key) is not None and self.adapter.q_keys[0] in outputs

    def _q_target(self, carry: Any, after: CarryView, outputs: dict[str, Tensor]) -> list[Violation]:
        """Re-run the next step from the new carry (nothing halted, so nothing resets): its Q logits must give
        the target this step trained on."""
        a = self.adapter
        self.stats.q_target_checks += 1
        qh, qc, qt = a.q_keys
        state = a.carry_state(carry)
        state[a.halted_key] = torch.zeros_like(state[a.halted_key])
        nxt = a.carry_from_state(state)
        pad = self._batch([-1] * self.B)
        force = torch.zeros(self.B, dtype=torch.bool) if self.sup.force_halt else None
        with torch.no_grad():
            _, _, out2 = self._call("step (Q-continue target check)", a.step, nxt, pad, force)
        want = sc.expected_q_target(out2[qh].detach().cpu().double(), out2[qc].detach().cpu().double(),
                                    after.steps.cpu(), self.max_steps)
        bad = _rows_differ(outputs[qt].detach().cpu().double(), want, self._tol(outputs[qt]))
        return [v for v in [_violation("q-continue-target", bad)] if v]

    # -- the loss: labels, padding, halted metrics, coverage ----------------------------------------------------
    def _loss_checks(self, events, before, after, batch, outputs, carry, got: Consumed,
                     reset: Tensor) -> list[Violation]:
        a = self.adapter
        training = events is None or bool(events.training)
        if self.spec is not None and self.sup.loss_metrics:
            loss, metrics = self._call("loss_and_metrics", a.loss_and_metrics, outputs, events, carry)
            found = self._loss_content(loss, metrics, outputs, events, carry, after)
            if events is not None and self.sup.loss and training:
                return found + self._coverage(events, before, after, loss)
            if training and self.by_content_coverage:
                found += self._coverage_by_content(got, reset, loss)
            return found
        if events is not None and self.sup.loss and training:
            return self._coverage(events, before, after, self.adapter.loss(outputs, events))
        return []

    def _loss_content(self, loss, metrics, outputs, events, carry, after) -> list[Violation]:
        a = self.adapter
        self.stats.loss_checks += 1
        keys = [k for k, v in outputs.items() if isinstance(v, Tensor) and v.requires_grad]
        if not loss.requires_grad or not keys:
            return []
        grads = torch.autograd.grad(loss, [outputs[k] for k in keys], retain_graph=True, allow_unused=True)
        grads = {k: g for k, g in zip(keys, grads) if g is not None}
        ids = self.slot_ids
        pad = ids < 0
        self.stats.count("padding-in-loss", int(pad.sum()))
        found: list[Violation] = []
        if "logits" in grads:
            got = sc.labels_from_gradient(self.spec, grads["logits"])
            found += [v for v in [_violation("loss-labels-aligned", got != ids)] if v]
        bad = torch.zeros(self.B, dtype=torch.bool)
        for g in grads.values():
            bad |= pad & g.detach().cpu().reshape(self.B, -1).ne(0).any(1)
        if bool(pad.any()):
            loss2, metrics2 = a.loss_and_metrics(sc.perturb_rows(outputs, pad, self.step_no), None, carry)
            if sc.metrics_differ({"loss": loss, **metrics}, {"loss": loss2, **metrics2}, ["loss", *metrics]):
                bad |= pad
        found += [v for v in [_violation("padding-adds-nothing", bad)] if v]
        if a.halted_metrics:
            halted = after.halted.cpu().bool()
            _, metrics3 = a.loss_and_metrics(sc.perturb_rows(outputs, ~halted, self.step_no + 1), None, carry)
            bad = torch.zeros(self.B, dtype=torch.bool)
            if sc.metrics_differ(metrics, metrics3, a.halted_metrics):
                bad |= ~halted
            if a.halted_count_metric is not None:
                want = int((halted & (ids >= 0)).sum())
                if int(torch.as_tensor(metrics[a.halted_count_metric]).round()) != want:
                    bad |= ~halted | (ids < 0)
            found += [v for v in [_violation("halted-metrics-halted-only", bad)] if v]
        return found

    def _coverage(self, events, before, after, loss) -> list[Violation]:
        self.stats.coverage_checks += 1
        rows = GradRows(events)
        if loss.requires_grad:
            loss.backward()
        ctx = StepContext(events, before, after, self.max_steps, None)
        return violations(ctx, grad_rows=rows.mask, invariants=())

    def _coverage_by_content(self, got: Consumed, reset: Tensor, loss: Tensor) -> list[Violation]:
        """Coverage without ids: differentiate the loss by each encoder output row, identify the row's sample by
        the content of the demos it encoded, and compare the slots whose row got gradient with the mode's needs."""
        self.stats.coverage_checks += 1
        got_ids: set[int] = set()
        for call, outs in zip(got.encoder_calls, got.encoder_outputs):
            outs = [t for t in outs if t.requires_grad]
            rows, _ = sc.encoder_rows(self.spec, [call])
            if not outs or not loss.requires_grad or rows.numel() == 0:
                continue
            grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
            live = torch.zeros(rows.shape[0], dtype=torch.bool)
            for g in grads:
                if g is not None:
                    live |= g.detach().cpu().reshape(rows.shape[0], -1).ne(0).any(1)
            got_ids.update(rows[live].tolist())
        real = self.slot_ids >= 0
        reached = torch.tensor([int(i) in got_ids for i in self.slot_ids.tolist()], dtype=torch.bool) & real
        needs = (reset.clone() if self.adapter.encoder_on_reset_only else torch.ones_like(reset)) & real
        v = _violation("coverage-matches-mode", reached != needs)
        return [v] if v else []

    # -- equivalences that re-run the model ---------------------------------------------------------------------
    def _reset_from_init(self, reset: Tensor, fed: Tensor, outputs: dict[str, Tensor]) -> list[Violation]:
        self.stats.reset_checks += 1
        slots = reset.nonzero().flatten()
        ids = fed[slots].tolist()
        a = self.adapter
        if self.spec is None:
            fresh = self._call("fresh_first_step_outputs", a.fresh_first_step_outputs, ids)
        else:
            fresh = self._call("fresh_first_step_outputs", a.fresh_first_step_outputs, ids, self._content(ids))
        bad = torch.zeros(len(slots), dtype=torch.bool)
        keys = [k for k in a.compared_outputs if k in fresh and k in outputs]
        for k in keys:
            bad |= _rows_differ(outputs[k].detach().cpu()[slots], fresh[k].detach().cpu(), self._tol(fresh[k]))
        v = _violation("reset-from-init", slots[bad].tolist())
        return [v] if v else []

    def _restore(self, state: dict[str, Tensor]) -> Any:
        """``carry_from_state(state)``, checked to round-trip (a re-run from a wrongly restored carry would blame
        the re-run's own invariant): a slot whose state does not come back is a ``checkpoint-restore`` failure."""
        a = self.adapter
        carry = a.carry_from_state({k: v.clone() for k, v in state.items()})
        back = a.carry_state(carry)
        bad = torch.zeros(self.B, dtype=torch.bool)
        for k, v in state.items():
            if v.dim() and v.shape[0] == self.B:
                bad |= _rows_differ(v.cpu(), back[k].cpu()) if k in back else torch.ones_like(bad)
        bad &= self.stepped
        v = _violation("checkpoint-restore", bad)
        if v:
            self._record([v], self.step_no, "carry_from_state(carry_state(carry)) does not give the carry back")
            self._raise_failures()
        return carry

    def _permutation(self, perm_seed, state0, batch, fed, force, outputs, after) -> list[Violation]:
        self.stats.permutation_checks += 1
        a = self.adapter
        perm = torch.randperm(self.B, generator=torch.Generator().manual_seed(perm_seed))
        carry_p = a.carry_from_state({k: v[perm] for k, v in state0.items()})
        batch_p = self._batch(fed[perm].tolist())
        with torch.no_grad():
            carry_p, _, out_p, _ = self._step(carry_p, batch_p, force[perm], "step (permutation check)")
        after_p = a.view(carry_p)
        bad = torch.zeros(self.B, dtype=torch.bool)  # indexed by position in the permuted batch
        for k in outputs.keys() & out_p.keys():
            if isinstance(outputs[k], Tensor) and isinstance(out_p[k], Tensor):
                bad |= _rows_differ(outputs[k].detach().cpu()[perm], out_p[k].detach().cpu(), self._tol(outputs[k]))
        bad |= _rows_differ(after.steps.cpu()[perm], after_p.steps.cpu())
        bad |= _rows_differ(after.halted.cpu()[perm], after_p.halted.cpu())
        for k in after.fields.keys() & after_p.fields.keys():
            bad |= _rows_differ(after.fields[k].cpu()[perm], after_p.fields[k].cpu())
        v = _violation("slot-permutation-independence", perm[bad].sort().values.tolist())  # original slots
        return [v] if v else []

    def _metamorphic(self, meta_seed, state0, reset, fed, force, outputs, carry) -> list[Violation]:
        """Replace (or pad) the incoming rows at continuing slots and re-run: those slots must not change."""
        cont = ~reset
        if not bool(cont.any()):
            return []
        self.stats.metamorphic_checks += 1
        a = self.adapter
        alt = fed.clone()
        n = int(cont.sum())
        if meta_seed % 2 == 0:
            alt[cont] = -1
        else:  # other samples, not yet fed (peeked, not consumed: their content is fixed per id anyway)
            alt[cont] = torch.arange(self.next_id + 7, self.next_id + 7 + n)
        carry_m = self._restore(state0)
        with torch.no_grad():
            carry_m, _, out_m, _ = self._step(carry_m, self._batch(alt.tolist()), force,
                                              "step (metamorphic check)")
        bad = torch.zeros(self.B, dtype=torch.bool)
        for k in outputs.keys() & out_m.keys():
            if isinstance(outputs[k], Tensor) and isinstance(out_m[k], Tensor) and outputs[k].dim():
                bad |= _rows_differ(outputs[k].detach().cpu(), out_m[k].detach().cpu(), self._tol(outputs[k]))
        s1, s2 = a.carry_state(carry), a.carry_state(carry_m)
        for k in s1.keys() & s2.keys():
            if s1[k].dim() and s1[k].shape[0] == self.B:
                bad |= _rows_differ(s1[k].cpu(), s2[k].cpu(), self._tol(s1[k]))
        v = _violation("continuing-ignores-batch", bad & cont)
        return [v] if v else []
