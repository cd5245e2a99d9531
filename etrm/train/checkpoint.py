"""Checkpoints: written atomically (temp file, then rename), read back with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from diagnostics.trace.killpoints import kill_point
from etrm.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``run_dir/checkpoint.pt`` so that a crash mid-write leaves the previous one intact."""
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    kill_point("checkpoint-tmp", int(state.get("step", -1)))  # tests: the temporary file whole, not yet renamed
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read the run's checkpoint; a missing or unreadable one is a UserError saying what to do."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; cannot resume (start a new run without --resume)")
    state = read_torch_file(path, "restore it from a backup or start a new run")
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise UserError(f"checkpoint {path} is not an etrm checkpoint; restore it or start a new run")
    return state


def read_torch_file(path: Path, advice: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only``; a truncated or foreign file is one UserError ending in
    ``advice``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):  # torch's text here is advice to load unsafely: not for users
            first = "not a PyTorch checkpoint file"
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({first[:120]}); {advice}") from None
