"""The own-loop example (examples/own_loop/) is a folder of scripts, not a package: make it importable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_loop"


@pytest.fixture(scope="session")
def own_loop() -> Path:
    """The example's folder, on ``sys.path`` for the session (its modules: tasks, tiny_etrm, act_loss, pretrain)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return EXAMPLE
