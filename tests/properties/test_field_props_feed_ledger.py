"""The bundled samplers and the per-sample ledger under random halting patterns (``feed_ledger_machine.py``): every
kind keeps every property, and a realistic fault planted in a sampler or in the ledger probe breaks the property it
should (the machine fails naming it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from diagnostics.probes.ledger import LedgerProbe
from etrm.data.device_sampler import DeviceFill, DeviceRefillSampler, DeviceTRMSampler
from etrm.data.samplers import Fill, TRMSampler
from feed_ledger_machine import B, KINDS, make_feed_ledger_machine

SETTINGS = settings(max_examples=25, stateful_step_count=20, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
#: A planted fault is reported as found (no shrinking: the test only needs the property's name).
FOUND = settings(SETTINGS, phases=(Phase.explicit, Phase.generate))


def _run(kind, **faults) -> None:
    run_state_machine_as_test(make_feed_ledger_machine(kind, **faults), settings=FOUND if faults else SETTINGS)


@pytest.mark.parametrize("kind", KINDS)
def test_field_props_feed_and_ledger_keep_every_property(kind):
    _run(kind)


# -- planted faults: the sampler ----------------------------------------------------------------------------------


class RetakesLastId(DeviceRefillSampler):
    """Starts each refill one position early (an off-by-one index): the previous step's last id is fed again and
    the last one of this step's share never; the count stays right."""

    def fill(self, reset):
        back = (self._pos > 0).long()
        self._pos -= back
        out = super().fill(reset)
        self._pos += back
        return out


class FromTheEnd(DeviceRefillSampler):
    """Numbers the reset slots from the last one: the same ids, out of the sampler's order."""

    def fill(self, reset):
        out = super().fill(reset.flip(0))
        return DeviceFill(out.slot_ids.flip(0), out.slot_ids.flip(0), out.dropped, out.at.flip(0))


class CountsResetsAsDropped(DeviceTRMSampler):
    """Counts the reset positions as the dropped ones."""

    def fill(self, reset):
        out = super().fill(reset)
        return DeviceFill(out.slot_ids, out.batch_ids, reset.sum(), out.at)


class KeepsWholeBatch(TRMSampler):
    """Reports no drop: the ids at continuing positions vanish uncounted."""

    def fill(self, reset_mask):
        out = super().fill(reset_mask)
        return Fill(out.slot_ids, out.fed_ids, np.empty(0, dtype=np.int64), batch_ids=out.batch_ids)


class BoundAsConsumed(DeviceRefillSampler):
    """Reports the host's upper bound on the position as ``consumed``."""

    @property
    def consumed(self) -> int:
        return self._upper


class SavesSnapshot(DeviceRefillSampler):
    """Saves the last snapshot's position (stale), not the exact one: a resume repeats samples."""

    def state_dict(self):
        landed = self._snapshot.value()
        return {**self._identity(), "consumed": landed[0] if landed else 0}


SAMPLER_FAULTS = {
    "exactly-once": ("device-refill", RetakesLastId), "order": ("device-refill", FromTheEnd),
    "drops": ("device-trm", CountsResetsAsDropped), "drops ": ("host-trm", KeepsWholeBatch),
    "consumed": ("device-refill", BoundAsConsumed), "resume": ("device-refill", SavesSnapshot),
}


@pytest.mark.parametrize("prop", sorted(SAMPLER_FAULTS))
def test_field_props_planted_sampler_fault_breaks_its_property(prop):
    kind, cls = SAMPLER_FAULTS[prop]

    def make(k, n, seed):  # the bundled sampler's arguments, the faulty class
        if k == "device-refill":
            return cls(n, seed, torch.device("cpu"), chunk=4, snapshot_every=2)
        return cls(n, B, seed, torch.device("cpu"), chunk=4) if k == "device-trm" else cls(n, B, seed)

    with pytest.raises(AssertionError, match=f"feed-ledger property '{prop.strip()}' violated"):
        _run(kind, make_sampler=make)


# -- planted faults: the ledger probe -----------------------------------------------------------------------------


class EnterOneLate(LedgerProbe):
    """Records a sample's entry one step late once it continues."""

    def observe(self, events, metrics, row):
        super().observe(events, metrics, row)
        self.enter = self.enter + events.reset.long()


class ExitAtReset(LedgerProbe):
    """Dates an exit at the step that resets the slot (one late)."""

    def flush(self, steps):
        self.pending = [(s + 1, *rest) for s, *rest in self.pending]
        return super().flush(steps)


class StepsBeforeIncrement(LedgerProbe):
    """Reads the step count before the step's increment."""

    def observe(self, events, metrics, row):
        events.steps = events.steps - 1
        super().observe(events, metrics, row)


class ReasonFromHalted(LedgerProbe):
    """Calls every exit a max-step exit."""

    def observe(self, events, metrics, row):
        events.is_last_step = events.halted.clone()
        super().observe(events, metrics, row)


class VetoesCarriedOver(LedgerProbe):
    """Does not clear the veto count when a new sample enters the slot."""

    def observe(self, events, metrics, row):
        old = None if self.vetoes is None else self.vetoes.clone()
        super().observe(events, metrics, row)
        if old is not None:
            self.vetoes = self.vetoes + torch.where(events.reset, old, 0)


LEDGER_FAULTS = {"enter-step": EnterOneLate, "exit-step": ExitAtReset, "steps-used": StepsBeforeIncrement,
                 "halt-reason": ReasonFromHalted, "vetoes": VetoesCarriedOver}


@pytest.mark.parametrize("prop", sorted(LEDGER_FAULTS))
def test_field_props_planted_ledger_fault_breaks_its_property(prop):
    with pytest.raises(AssertionError, match=f"feed-ledger property '{prop}' violated"):
        _run("host-refill", make_probe=LEDGER_FAULTS[prop])

