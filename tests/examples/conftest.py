"""The examples are scripts, not installed packages: make them importable. The bundled trainer's equivalents of
their variants are trained once per session (test_own_loop and test_field_code compare against them)."""

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


@pytest.fixture(scope="session")
def upstream_fork() -> Path:
    """examples/ on ``sys.path``: the fork-shaped example imports as ``upstream_fork``."""
    if str(EXAMPLE.parent) not in sys.path:
        sys.path.insert(0, str(EXAMPLE.parent))
    return EXAMPLE.parent / "upstream_fork"


@pytest.fixture(scope="session")
def bundled_runs(tmp_path_factory) -> Path:
    """One traced ``etrm-train`` run of each variant's bundled equivalent (test_own_loop's ``BUNDLED``), 40 steps."""
    from etrm.cli import main as train_main
    from test_own_loop import BUNDLED, STEPS, TINY

    root = tmp_path_factory.mktemp("bundled_runs")
    for variant, extra in BUNDLED.items():
        code = train_main(["--preset", "demo", *extra, "--trace", "--run-dir", str(root / variant), "--device",
                           "cpu", "--max-steps", str(STEPS), *TINY])
        assert code == 0
    return root
