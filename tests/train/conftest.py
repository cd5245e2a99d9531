"""Fixtures for the trainer and CLI tests: tiny configs, trainers built from presets, a CLI runner, halting helpers.

Everything runs on CPU with one intra-op thread: on a small shared machine, torch's default thread pool makes these
tiny steps tens of times slower (the threads spin on each other), and nothing here measures speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train import instruments
from etrm.train.checkpoint import CHECKPOINT_NAME
from etrm.train.trainer import Trainer

# A model and data small enough that one ACT step takes milliseconds on one CPU thread.
TINY = [
    "arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
    "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
    "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
    "train.eval_every=5", "train.lr_warmup_steps=2",
    'data.families=["recolour"]',  # the tiny world the seeded halting patterns below were chosen in (the demo
    #                                preset mixes draw_border in since issue 18)
]

# The presets (and their one-override variants) that the trainer must handle: TRM, and ETRM in each encoder mode.
MODES: dict[str, tuple[str, list[str]]] = {
    "reencode": ("demo", []),
    "cached": ("demo", ["encoder.mode=cached"]),
    "fct": ("demo", ["encoder.mode=fct"]),
    "trm": ("demo-trm", []),
}


@pytest.fixture
def tiny() -> list[str]:
    """The ``TINY`` overrides, as CLI arguments."""
    return list(TINY)


@pytest.fixture
def mode_args() -> Callable[[str], list[str]]:
    """``mode_args("cached")`` -> ``["--preset", "demo", "encoder.mode=cached"]``."""
    return lambda mode: ["--preset", MODES[mode][0], *MODES[mode][1]]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch):
    """rich wraps at 80 columns off a terminal; wide lines keep one message on one line for the asserts."""
    monkeypatch.setenv("COLUMNS", "200")


def tiny_config(preset: str, *overrides: str) -> Config:
    """A preset shrunk by ``TINY``, then ``overrides``, on CPU."""
    data = apply_overrides(load_preset(preset), TINY + ['train.device="cpu"', *overrides])
    return Config.from_dict(data)


# With the Q loss on, a few tiny steps teach the core "never halt" and every slot runs to max steps in lockstep;
# exploration (which only vetoes Q-halts) then never acts. Tests that need staggered halting switch the Q loss off.
STAGGER = ["loss.q_weight=0"]


def stagger_halting(trainer: Trainer, seed: int = 6) -> None:
    """Make the Q-head decide per slot from the start: random weights, zero bias (upstream initialises it far from
    halting); seed 6 staggers both models under both samplers at upstream's initialisation. With ``STAGGER`` in the config it stays so: some slots halt early, others not, exploration vetoes some
    halts, so the halting RNG matters. Apply it to every Trainer of a comparison."""
    q = trainer.model.core.q_head
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.weight.copy_(torch.randn(q.weight.shape, generator=g) * 0.5)
        q.bias.zero_()


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., Trainer]:
    """``make_trainer(mode_or_preset, *overrides, staggered=True, run_dir=None)`` -> a Trainer on CPU in tmp_path.

    ``mode_or_preset`` is a key of ``MODES`` (reencode, cached, fct, trm) or a preset name."""
    counter = iter(range(10_000))

    def make(name: str, *overrides: str, staggered: bool = True, run_dir: Path | None = None) -> Trainer:
        preset, extra = MODES.get(name, (name, []))
        cfg = tiny_config(preset, *extra, *(STAGGER if staggered else []), *overrides)
        trainer = Trainer(cfg, run_dir or tmp_path / f"trainer{next(counter)}", device=torch.device("cpu"))
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        if staggered:
            stagger_halting(trainer)
        return trainer

    return make


@pytest.fixture
def record_events() -> Callable[[Trainer], list[dict[str, torch.Tensor]]]:
    """Attach a step hook that keeps a CPU copy of each step's halting events; returns the (growing) list."""

    def attach(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        rows: list[dict[str, torch.Tensor]] = []

        def hook(step: int, events, _metrics) -> None:
            rows.append({
                "step": torch.tensor(step),
                "reset": events.reset.detach().cpu().clone(),
                "halted": events.halted.detach().cpu().clone(),
                "steps": events.steps.detach().cpu().clone(),
                "veto": events.explore_veto.detach().cpu().clone(),
                "batch_sample_id": events.batch_sample_id.detach().cpu().clone(),
                "sample_id_after": events.sample_id_after.detach().cpu().clone(),
                "sample_id_before": events.sample_id_before.detach().cpu().clone(),
            })

        trainer.add(instruments.OnStep(hook))
        return rows

    return attach


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    return env


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for a child ``etrm-train``: unbuffered, one thread, wide lines."""
    return cli_env()


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m etrm.cli ARGS`` in a separate process (cwd tmp_path); returns the completed process."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "etrm.cli", *args], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step tiny run (config.toml + checkpoint.pt), made once; copy it before changing anything."""
    from etrm.cli import main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("trained") / "run"
        code = main(["--preset", "demo", "--run-dir", str(run_dir), "--max-steps", "4", "--device", "cpu", *TINY])
    finally:
        torch.set_num_threads(previous)
    assert code == 0 and (run_dir / CHECKPOINT_NAME).is_file()
    return run_dir


def snapshot(path: Path) -> dict[str, Any]:
    """Every file under ``path`` with its bytes and mtime: equal snapshots mean nothing was written."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def dir_snapshot() -> Callable[[Path], dict[str, Any]]:
    return snapshot
