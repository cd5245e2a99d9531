"""Fixtures for the dashboard tests: real runs made by the trainer, synthetic traces, a served etrm-dash, a browser.

Trainer runs use a tiny model (milliseconds per step on one thread). The browser is Debian's chromium driven through
``dash[testing]``'s ``Browser`` (selenium), headless; the browser tests skip, saying why, only where chromium or
chromedriver is not installed (``make test`` installs both).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

BIN = Path(sys.executable).parent
TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
        "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
        "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
        "train.eval_every=20"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def train_cmd(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [str(BIN / "etrm-train"), "--preset", "demo", "--trace", "--max-steps", str(steps), "--run-dir",
            str(run_dir), *TINY, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """A runs directory holding a ``cached`` and a ``reencode`` run of 40 steps, trained side by side."""
    root = tmp_path_factory.mktemp("runs")
    procs = [subprocess.Popen(train_cmd(root / "reencode", 40), env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(train_cmd(root / "cached", 40, "encoder.mode=cached"), env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode in (0, 1), out[-2000:]  # 1: the run finished with an error finding (cached)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An ``etrm-dash`` process serving a runs directory."""

    def __init__(self, root: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([str(BIN / "etrm-dash"), "--runs", str(root), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        self.first_line = self.proc.stdout.readline().strip()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"etrm-dash did not start: {self.first_line} {self.proc.stdout.read()}")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def helpers():
    """What the browser tests need from here: ``train_cmd``, ``env``, ``Served``."""
    return type("Helpers", (), {"train_cmd": staticmethod(train_cmd), "env": staticmethod(env), "Served": Served})


@pytest.fixture(scope="session")
def served(runs_root) -> Iterator[Served]:
    s = Served(runs_root)
    yield s
    s.stop()


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return (f"{path} is not installed (Debian packages chromium and chromium-driver; `make test` installs "
                    "them with apt-get)")
    try:
        import selenium  # noqa: F401
        from dash.testing.browser import Browser  # noqa: F401
    except ImportError as exc:
        return f"dash[testing] is not installed ({exc}); pip install -e '.[test]'"
    return None


@pytest.fixture(scope="session")
def browser():
    """A headless chromium (one for the whole session: starting it is the slow part)."""
    why = browser_missing()
    if why:
        pytest.skip(why)
    os.environ.setdefault("DASH_TEST_CHROMEPATH", CHROMIUM)
    from dash.testing.browser import Browser

    b = Browser("chrome", headless=True, percy_run=False, wait_timeout=30)
    b.driver.set_window_size(1400, 1200)
    yield b
    b.driver.quit()
