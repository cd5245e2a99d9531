"""The bundled feed and the per-sample ledger under the property suite's random halting patterns: a Hypothesis state
machine that drives a sampler (host or device refill, host or device ``trm``) and a ``LedgerProbe`` with the same
halting masks and checks them, every step, against its own model of the stream and of the slots.

Feed properties: ``exactly-once`` (the ids a step takes are the next ones of the stream, none twice, none skipped),
``order`` (the k-th reset slot takes the k-th id), ``drops`` (only the ``trm`` feed drops, exactly the ids at
continuing positions, counted), ``consumed`` (the sampler's count equals what was taken), ``resume`` (a sampler
loaded from ``state_dict`` continues the same sequence). Ledger properties (per record at a flush): ``enter-step``,
``exit-step``, ``steps-used``, ``halt-reason``, ``vetoes``, and ``records`` (one record per sample that left).
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from diagnostics.events import Mode, StepEvents
from diagnostics.probes.ledger import LedgerProbe
from diagnostics.properties.property_suite import FORCED_HALTING, halting_mask
from diagnostics.trace.ledger import MAX_STEP, Q_HALT, RECORD_COLUMNS
from etrm.data.device_sampler import DeviceRefillSampler, DeviceTRMSampler
from etrm.data.samplers import RefillSampler, TRMSampler

B, MAX_STEPS = 5, 3
COL = {name: i for i, name in enumerate(RECORD_COLUMNS)}
LEDGER_FIELDS = {"enter-step": "enter_step", "exit-step": "exit_step", "steps-used": "steps_used",
                 "halt-reason": "reason", "vetoes": "vetoes"}


def bundled_sampler(kind: str, num_samples: int, seed: int):
    """The bundled samplers on the CPU, with small windows so chunks and snapshots turn over within an example."""
    if kind == "host-refill":
        return RefillSampler(num_samples, seed)
    if kind == "device-refill":
        return DeviceRefillSampler(num_samples, seed, torch.device("cpu"), chunk=4, snapshot_every=2)
    if kind == "host-trm":
        return TRMSampler(num_samples, B, seed)
    if kind == "device-trm":
        return DeviceTRMSampler(num_samples, B, seed, torch.device("cpu"), chunk=4)
    raise ValueError(kind)


KINDS = ("host-refill", "device-refill", "host-trm", "device-trm")


def stream(num_samples: int, seed: int, start: int, n: int) -> np.ndarray:
    """Positions [start, start + n) of the documented stream: epoch e is ``default_rng([seed, e]).permutation``."""
    out = [np.random.default_rng([seed, p // num_samples]).permutation(num_samples)[p % num_samples]
           for p in range(start, start + n)]
    return np.asarray(out, dtype=np.int64)


def _fill(sampler, reset: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(slot ids, batch ids, dropped count) of one fill, host or device alike."""
    if isinstance(sampler, (DeviceRefillSampler, DeviceTRMSampler)):
        f = sampler.fill(torch.from_numpy(reset))
        return f.slot_ids.numpy().copy(), f.batch_ids.numpy().copy(), int(f.dropped)
    f = sampler.fill(reset)
    return f.slot_ids.copy(), np.asarray(f.batch_ids).copy(), len(f.dropped_ids)


def make_feed_ledger_machine(kind: str, make_sampler: Callable = bundled_sampler,
                             make_probe: Callable = LedgerProbe) -> type[RuleBasedStateMachine]:
    """The machine for one sampler kind; ``make_sampler(kind, n, seed)`` and ``make_probe()`` may plant faults."""
    trm = kind.endswith("trm")

    class FeedLedgerMachine(RuleBasedStateMachine):
        @initialize(seed=st.integers(0, 2**16), n=st.integers(B, 3 * B))
        def build(self, seed: int, n: int) -> None:
            self.seed, self.n = seed, n
            self.sampler = make_sampler(kind, n, seed)
            self.probe = make_probe()
            self.pos = 0  # the model's stream position
            self.step_no = 0
            self.slot = np.full(B, -1, dtype=np.int64)
            self.steps = np.zeros(B, dtype=np.int64)
            self.halted = np.ones(B, dtype=bool)
            self.enter = np.zeros(B, dtype=np.int64)
            self.vetoes = np.zeros(B, dtype=np.int64)
            self.expected: list[dict] = []  # records of the samples that left since the last flush

        def _fail(self, found: list[str]) -> None:
            if found:
                raise AssertionError("\n".join(f"feed-ledger property '{f}' violated at step {self.step_no} "
                                               f"({kind}, {self.n} samples, seed {self.seed})" for f in found))

        @rule(pattern=FORCED_HALTING, veto_bits=st.integers(0, 2**B - 1))
        def step(self, pattern: tuple, veto_bits: int) -> None:
            reset = self.halted.copy()
            slot_ids, batch_ids, dropped = _fill(self.sampler, reset)
            k = int(reset.sum())
            take = B if trm else k
            want = stream(self.n, self.seed, self.pos, take)
            self.pos += take
            want_new = want[reset] if trm else want
            got_new = slot_ids[reset]
            found = []
            if sorted(got_new.tolist()) != sorted(want_new.tolist()):
                found.append("exactly-once")
            elif got_new.tolist() != want_new.tolist():
                found.append("order")
            want_dropped = int((~reset).sum()) if trm else 0
            if dropped != want_dropped or bool((slot_ids[~reset] != -1).any()) or \
                    (trm and batch_ids[~reset].tolist() != want[~reset].tolist()):
                found.append("drops")
            if int(self.sampler.consumed) != self.pos:
                found.append("consumed")
            self._fail(found)
            self._advance(reset, got_new, pattern, veto_bits)

        def _advance(self, reset: np.ndarray, new_ids: np.ndarray, pattern: tuple, veto_bits: int) -> None:
            """The model of the slots, and the probe fed the same step as events."""
            self.step_no += 1
            self.slot[reset] = new_ids
            self.steps[reset] = 0
            self.enter[reset] = self.step_no
            self.vetoes[reset] = 0
            self.steps += 1
            last = self.steps >= MAX_STEPS
            halted = halting_mask(pattern, B).numpy() | last
            veto = np.array([bool(veto_bits >> i & 1) for i in range(B)]) & ~halted
            self.vetoes += veto
            self.halted = halted
            t = torch.from_numpy
            ids = t(self.slot.copy())
            zeros = torch.zeros(B, dtype=torch.bool)
            events = StepEvents(
                reset=t(reset), steps=t(self.steps.copy()), halted=t(halted), sample_id_before=ids,
                sample_id_after=ids, puzzle_id_before=ids % 3, puzzle_id_after=ids % 3, batch_sample_id=ids,
                label_sample_id=ids, demo_sample_id=ids, encoded=zeros, needs_encode=zeros,
                encoded_slots=torch.zeros(0, dtype=torch.long), encoder_out=None,
                q_halt_logits=torch.zeros(B), q_continue_logits=None, q_says_halt=t(halted | veto),
                explore_veto=t(veto), is_last_step=t(last), mode=Mode.REENCODE)
            self.probe.observe(events, {}, SimpleNamespace(step=self.step_no))
            for s in np.nonzero(halted & (self.slot >= 0))[0]:
                self.expected.append({"sample_id": int(self.slot[s]), "slot": int(s), "enter_step": int(self.enter[s]),
                                      "exit_step": self.step_no, "steps_used": int(self.steps[s]),
                                      "reason": MAX_STEP if last[s] else Q_HALT, "vetoes": int(self.vetoes[s])})

        @rule()
        def flush(self) -> None:
            rows = self.probe.flush([])["ledger"]
            found = [] if len(rows) == len(self.expected) else ["records"]
            for row, want in zip(rows, self.expected):  # both in (exit step, slot) order
                if (row[COL["sample_id"]], row[COL["slot"]]) != (want["sample_id"], want["slot"]):
                    found.append("records")
                    continue
                found += [name for name, col in LEDGER_FIELDS.items() if row[COL[col]] != want[col]]
            self.expected = []
            self._fail(sorted(set(found)))

        @rule()
        def resume(self) -> None:
            """Save the sampler's state (through JSON), load it into a fresh sampler: its next ids are those the
            running sampler (a copy of it) gives next."""
            state = json.loads(json.dumps(self.sampler.state_dict()))
            trial = make_sampler(kind, self.n, self.seed)
            trial.load_state_dict(state)
            everything = np.ones(B, dtype=bool)
            if _fill(trial, everything)[0].tolist() != _fill(copy.deepcopy(self.sampler), everything)[0].tolist():
                self._fail(["resume"])
            self.sampler = make_sampler(kind, self.n, self.seed)
            self.sampler.load_state_dict(state)

        def teardown(self) -> None:
            if hasattr(self, "probe"):
                self.flush()

    FeedLedgerMachine.__name__ = FeedLedgerMachine.__qualname__ = f"FeedLedger_{kind.replace('-', '_')}"
    return FeedLedgerMachine
