"""Injected faults are overrides of one seam each (``etrm.model.faults``); the healthy forward holds no fault."""

from __future__ import annotations

import ast
import inspect
from dataclasses import replace

import pytest
import torch

from etrm.config import Fault
from etrm.model import ACTModel, act
from etrm.model.faults import FAULTY

B = 6
SEAMS = ("reset", "choose_demos", "encode_resets", "pick_labels", "carry_forward")


def test_every_fault_is_registered_and_overrides_exactly_one_seam():
    assert set(FAULTY) == set(Fault) - {Fault.NONE}
    for fault, cls in FAULTY.items():
        assert issubclass(cls, ACTModel) and cls.leaves_parameters_unused
        overridden = [name for name in vars(cls) if callable(vars(cls)[name]) and not name.startswith("__")]
        assert len(overridden) == 1 and overridden[0] in SEAMS, (fault, overridden)


def test_the_model_module_names_no_fault():
    """The healthy model's code (forward and every seam) reads only TRM/ETRM semantics: no fault name or branch."""
    tree = ast.parse(inspect.getsource(act))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert "fault" not in names and "Fault" not in names
    assert not [s for s in strings if s in {f.value for f in Fault} - {"none"}]
    assert "fault" not in inspect.getsource(ACTModel.forward)


@pytest.mark.parametrize("fault,kept", [("no-state-reset", ("z_H", "z_L")), ("no-step-reset", ("steps",))])
def test_reset_faults_break_exactly_their_half_of_the_rule(fault, kept, make_mode_config, make_model, make_batch):
    healthy = make_model(make_mode_config("reencode"))
    broken = make_model(make_mode_config("reencode", fault=fault))
    first, second = make_batch(B, seed=0), make_batch(B, seed=1, first_sample_id=100)
    carry = healthy(healthy.initial_carry(first), first, force_halt=torch.zeros(B, dtype=torch.bool))[0]
    carry = replace(carry, halted=torch.tensor([True, False, True, False, False, True]))
    good, bad = healthy.reset(carry, second), broken.reset(carry, second)
    for name in ("z_H", "z_L", "steps"):
        expect = getattr(carry, name) if name in kept else getattr(good, name)
        assert torch.equal(getattr(bad, name), expect), name
    assert all(torch.equal(bad.data[k], good.data[k]) for k in good.data)
