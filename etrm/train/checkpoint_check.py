"""Is a checkpoint fit to resume from? Checked before anything of the run changes: the file's own checksums (a
torch checkpoint is a zip whose records carry CRC-32s), its structure, its step, and every floating tensor finite.
Shapes against the config are checked by loading it into the model (``Trainer.load_state_dict``), also before
anything is written."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from etrm.bounds import MAX_STEPS
from etrm.errors import UserError

REQUIRED = ("step", "model", "optimizers")


def check_file(path: Path) -> None:
    """Refuse a checkpoint whose bytes do not match the checksums written with them (a corrupted tensor)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip (a legacy or foreign file): torch.load says what it is
    except (OSError, EOFError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({exc}); restore it from a backup or start a "
                        "new run") from None
    if bad is not None:
        raise UserError(f"checkpoint {path} is corrupt (record {bad} does not match its checksum); restore it from "
                        "a backup or start a new run")


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")


def check_state(state: Any, path: Path) -> None:
    """Refuse a checkpoint that is not an etrm one, whose step is not an integer in 0..MAX_STEPS, or that holds a
    non-finite floating tensor (weights, EMA, optimizer state, carry)."""
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise UserError(f"checkpoint {path} is not an etrm checkpoint; restore it or start a new run")
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEPS:
        raise UserError(f"checkpoint {path} has step {step!r}, not an integer in 0..{MAX_STEPS}: it is corrupt or "
                        "was edited; restore it from a backup or start a new run")
    state["step"] = step
    for where, tensor in _tensors(state, ""):
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                raise UserError(f"checkpoint {path} holds values that are not finite in {where}; it cannot be "
                                "resumed: restore it from a backup or start a new run")
