"""Shared fixtures: a tiny config, a random batch builder and a model builder, all seeded explicitly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

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


class BackgroundRuns:
    """The ``etrm-train`` runs that test modules declare in ``BACKGROUND_RUNS`` ({group: {name: etrm-train args}}),
    trained in subprocesses (one thread each) from the session's start, one at a time on a thread: the serial test
    session leaves the machine's second core idle, so a group is ready, or nearly, when the module that reads it
    comes up. A module that asks for its group earlier starts the group's remaining runs itself, all at once."""

    def __init__(self, root: Path, groups: dict[str, dict[str, list[str]]]) -> None:
        self.root, self.groups = root, groups
        self.pending = [(group, name) for group, runs in groups.items() for name in runs]
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="background-runs", daemon=True)
        self.worker.start()

    def _take(self, group: str | None) -> list[subprocess.Popen]:
        """Start the next pending run (``group`` None) or every pending run of ``group``."""
        with self.lock:
            if self.closed:
                return []
            keys = [k for k in self.pending if k[0] == group] if group else self.pending[:1]
            started = []
            for key in keys:
                self.pending.remove(key)
                (self.root / key[0]).mkdir(parents=True, exist_ok=True)
                with open(self._log(key), "w") as log:
                    self.procs[key] = subprocess.Popen(
                        [str(Path(sys.executable).parent / "etrm-train"), *self.groups[key[0]][key[1]], "--run-dir",
                         str(self.root / key[0] / key[1])], stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
                started.append(self.procs[key])
            return started

    def _work(self) -> None:
        while started := self._take(None):
            started[0].wait()

    def _log(self, key: tuple[str, str]) -> Path:
        return self.root / f"{key[0]}.{key[1]}.log"  # beside the group's folder, which holds only its runs

    def runs(self, group: str, timeout: float = 1800) -> dict[str, Path]:
        """The group's run dirs (all in ``root/group``), once every run of it has exited 0 (the end of its output is
        the assertion message otherwise)."""
        self._take(group)
        for name in self.groups[group]:
            code = self.procs[(group, name)].wait(timeout=timeout)
            assert code == 0, self._log((group, name)).read_text()[-4000:]
        return {name: self.root / group / name for name in self.groups[group]}

    def close(self) -> None:
        """Start nothing more; end the runs still going (a session stopped early)."""
        with self.lock:
            self.closed = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session", autouse=True)
def background_runs(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRuns]:
    """The session's ``BackgroundRuns``: the groups of every module with a selected test, in the order the tests
    come, started now."""
    modules = dict.fromkeys(item.module for item in request.session.items if getattr(item, "module", None))
    groups = {g: runs for m in modules for g, runs in getattr(m, "BACKGROUND_RUNS", {}).items()}  # in test order
    background = BackgroundRuns(tmp_path_factory.mktemp("background"), groups)
    yield background
    background.close()
