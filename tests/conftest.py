"""Shared fixtures: a tiny config, a random batch builder and a model builder, all seeded explicitly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

from etrm.config import Config
from etrm.model import ACTModel, ModelShape, faults

torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to oversubscription

# Fast and reproducible by default (CI on 2 cores); HYPOTHESIS_PROFILE=thorough for a longer random search.
_checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("etrm", deadline=None, max_examples=10, derandomize=True, suppress_health_check=_checks)
settings.register_profile("thorough", deadline=None, max_examples=200, suppress_health_check=_checks)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "etrm"))

VOCAB = 12
SEQ_LEN = 16
NUM_DEMOS = 3
NUM_PUZZLES = 10
IGNORE = -100

TINY: dict[str, Any] = {
    "arch": {
        "hidden_size": 64, "num_heads": 4, "expansion": 2.0, "L_layers": 1,
        "H_cycles": 2, "L_cycles": 2, "puzzle_emb_len": 2,
    },
    "encoder": {"num_layers": 1, "set_layers": 1},
    "act": {"halt_max_steps": 4, "halt_exploration_prob": 0.0},
    "fct": {"steps": 3},
    "train": {"seed": 0},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def tiny_config(**sections: Any) -> Config:
    """The tiny config with nested overrides, e.g. ``tiny_config(model="trm", act={"q_continue": True})``."""
    return Config.from_dict(_merge(TINY, sections))


def random_batch(
    batch_size: int, *, seed: int, seq_len: int = SEQ_LEN, num_demos: int = NUM_DEMOS,
    first_sample_id: int = 0, ignore_frac: float = 0.25,
) -> dict[str, torch.Tensor]:
    """A batch as the model expects it: tokens in [0, VOCAB), some ignored labels, distinct sample ids, demo masks
    with at least one valid demo per row."""
    g = torch.Generator().manual_seed(seed)
    b, s, k = batch_size, seq_len, num_demos
    labels = torch.randint(1, VOCAB, (b, s), generator=g)
    labels = torch.where(torch.rand(b, s, generator=g) < ignore_frac, IGNORE, labels)
    labels[:, 0] = torch.randint(1, VOCAB, (b,), generator=g)  # every row keeps a supervised token
    demo_mask = torch.rand(b, k, generator=g) < 0.7
    demo_mask[:, 0] = True
    return {
        "inputs": torch.randint(0, VOCAB, (b, s), generator=g),
        "labels": labels,
        "puzzle_id": torch.randint(0, NUM_PUZZLES, (b,), generator=g),
        "sample_id": torch.arange(first_sample_id, first_sample_id + b, dtype=torch.int64),
        "demo_inputs": torch.randint(0, VOCAB, (b, k, s), generator=g),
        "demo_outputs": torch.randint(0, VOCAB, (b, k, s), generator=g),
        "demo_mask": demo_mask,
    }


def build_model(cfg: Config, *, seed: int = 0, seq_len: int = SEQ_LEN, trm_table: bool = True) -> ACTModel:
    """An ``ACTModel`` for the tiny shapes; TRM's puzzle table is filled with random rows unless ``trm_table=False``."""
    torch.manual_seed(seed)
    model = faults.build_model(cfg, ModelShape(vocab_size=VOCAB, seq_len=seq_len, num_puzzle_ids=NUM_PUZZLES))
    if model.is_trm and trm_table:
        with torch.no_grad():
            model.puzzle_emb.weights.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model


def select(batch: dict[str, torch.Tensor], index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
    """The rows ``index`` of every batch tensor."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v[idx] for k, v in batch.items()}


@pytest.fixture
def make_config() -> Callable[..., Config]:
    return tiny_config


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    return random_batch


@pytest.fixture
def make_model() -> Callable[..., ACTModel]:
    return build_model


@pytest.fixture
def take_rows() -> Callable[..., dict[str, torch.Tensor]]:
    return select


@pytest.fixture(params=["trm", "reencode", "cached", "fct"])
def mode(request: pytest.FixtureRequest) -> str:
    """Every model/mode the ACT wrapper supports: TRM and ETRM's three encoder modes."""
    return request.param


def mode_config(mode: str, **sections: Any) -> Config:
    """The tiny config for one of ``trm``, ``reencode``, ``cached``, ``fct``."""
    if mode == "trm":
        return tiny_config(model="trm", **sections)
    enc = _merge({"mode": mode}, sections.pop("encoder", {}))
    return tiny_config(model="etrm", encoder=enc, **sections)


@pytest.fixture
def make_mode_config() -> Callable[..., Config]:
    return mode_config


@pytest.fixture(scope="session")
def train_side_by_side() -> Callable[..., dict[str, Path]]:
    """``train_side_by_side(root, {name: etrm-train args})`` -> {name: run dir}: the runs trained at once, one thread
    each, into ``root/name``; each must exit 0 (its output is the assertion message otherwise)."""

    def train(root: Path, runs: dict[str, list[str]], timeout: float = 1800) -> dict[str, Path]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        exe = str(Path(sys.executable).parent / "etrm-train")
        procs = {name: subprocess.Popen([exe, *args, "--run-dir", str(root / name)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env) for name, args in runs.items()}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, out
        return {name: root / name for name in runs}

    return train
