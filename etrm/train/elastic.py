"""What torchrun's elastic agent tells a worker: how often the group was restarted, and how often it may be."""

from __future__ import annotations

import os


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def restart_count() -> int:
    """``TORCHELASTIC_RESTART_COUNT``: 0 on the first start (or outside torchrun), N on the N-th restart."""
    return _int_env("TORCHELASTIC_RESTART_COUNT")


def max_restarts() -> int:
    """``TORCHELASTIC_MAX_RESTARTS`` (``torchrun --max-restarts``): 0 outside torchrun."""
    return _int_env("TORCHELASTIC_MAX_RESTARTS")
