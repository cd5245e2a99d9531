"""CUDA-side options that a CPU can check: ``train.compile`` compiles in place (checkpoint names unchanged)."""

from __future__ import annotations

import pytest
import torch

from etrm.config import Config


def test_compile_is_off_by_default() -> None:
    assert Config().train.compile is False


@pytest.mark.parametrize("mode", ["reencode", "trm"])
def test_compile_compiles_core_and_encoder_in_place(mode: str, make_trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[type] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self)))
    plain = make_trainer(mode)
    assert compiled == []
    trainer = make_trainer(mode, "train.compile=true")
    expected = [type(trainer.model.core)] + ([type(trainer.model.encoder)] if mode != "trm" else [])
    assert compiled == expected
    assert list(trainer.model.state_dict()) == list(plain.model.state_dict())  # no _orig_mod prefixes
