"""The README's first screen, run as written in a fresh clone of the committed tree: `make demo` (fewer steps, tiny
model, no server), then the tools the way the README calls them (activated venv), including extending a finished run.

Nothing is installed: the clone's ``.venv`` is a link to the environment running these tests, and the clone's
``pyproject.toml`` is dated before that environment's install stamp, so make finds it up to date (the test fails if
make would still install). That ``make`` builds the venv from nothing on a fresh machine is checked separately on a
clone without ``.venv`` (``make -n``). The venv's editable install may point at another checkout, so ``PYTHONPATH``
puts the clone's own code first (checked: ``etrm`` is imported from the clone).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
TINY = ("arch.hidden_size=16 arch.num_heads=2 arch.L_layers=1 arch.L_cycles=1 arch.expansion=1.0 "
        "arch.puzzle_emb_len=2 data.canvas=4 data.min_grid=2 data.max_grid=3 data.num_demos=2 data.train_tasks=8 "
        "data.heldout_tasks=2 train.batch_size=8 train.eval_batch_size=8 train.eval_every=100 "
        "train.lr_warmup_steps=2")


def first_screen() -> list[str]:
    """The commands of the README's first code block, comments stripped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_for(commands: list[str], port: int) -> str:
    """One bash script running the first screen: `make demo` shortened, `make test` dry-run (the suite is what
    runs this test), the training line on the tiny model, the dashboard polled then stopped."""
    lines = ["set -euo pipefail", 'echo "etrm from: $(.venv/bin/python -c \'import etrm; print(etrm.__file__)\')"']
    for cmd in commands:
        words = shlex.split(cmd)
        if words[:2] == ["make", "demo"]:
            lines.append(f"DEMO_SERVE=0 DEMO_STEPS=12 DEMO_ARGS={shlex.quote(TINY)} {cmd}")
        elif words[:2] == ["make", "test"]:
            lines.append(f"{cmd.replace('make test', 'make -n test', 1)} > make-n-{len(lines)}.txt")
        elif words[0] == "etrm-train" and "--resume" not in words:
            lines.append(f"{cmd} {TINY}")
        elif words[0] == "etrm-dash":
            lines += [f"{cmd} --port {port} > dash.log 2>&1 &", "DASH=$!",
                      f"for i in $(seq 120); do curl -sf http://127.0.0.1:{port}/ > dash.html && break; sleep 1; "
                      "done", "kill $DASH", "test -s dash.html"]
        else:
            lines.append(cmd)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None or shutil.which("make") is None or shutil.which("curl") is None:
        pytest.skip("needs git, make and curl")
    if not (VENV / ".installed").is_file():
        pytest.skip(f"the test environment {VENV} was not set up by make (no .installed stamp)")
    dest = tmp_path_factory.mktemp("newcomer") / "etrm"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    return dest


def test_make_builds_the_venv_on_a_fresh_machine(clone):
    """Without .venv, make would create it, install the pinned torch, then this package: the honest path."""
    out = subprocess.run(["make", "-n", "demo"], cwd=clone, capture_output=True, text=True, timeout=60).stdout
    assert "-m venv .venv" in out and "pip install -q torch==" in out and "pip install -q -e '.[test]'" in out


def test_readme_first_screen_runs_as_written(clone):
    commands = first_screen()
    assert commands[0].startswith("make demo") and any(c.startswith("source .venv/bin/activate") for c in commands)
    assert any("--resume" in c and "--max-steps" in c for c in commands)
    (clone / ".venv").symlink_to(VENV)
    stamp = (VENV / ".installed").stat().st_mtime
    os.utime(clone / "pyproject.toml", (stamp - 60, stamp - 60))
    (clone / "first-screen.sh").write_text(script_for(commands, free_port()))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DEMO_DIR")}
    env.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", COLUMNS="200",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin"))
    proc = subprocess.run(["bash", "first-screen.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"etrm from: {clone / 'etrm' / '__init__.py'}" in out
    assert "pip install" not in out  # make found the environment set up: nothing was installed
    assert "demo: done in" in out and "UNEXPECTED" not in out
    assert "gradient-starvation (step 2)" in out
    # `make test BROWSER=0` never calls apt; plain `make test` would (when chromium is missing)
    dry = {p.name: p.read_text() for p in clone.glob("make-n-*.txt")}
    assert len(dry) == 2
    assert sum("apt-get" in text for text in dry.values()) == 1
    # the run was extended to 400 steps by --resume --max-steps 400
    assert "400" in out and (clone / "runs" / "first" / "trace.sqlite").is_file()
    from diagnostics import load_run

    df = load_run(clone / "runs" / "first")
    assert df.index.min() == 1 and df.index.max() == 400 and len(df) == 400
    assert "etrm" in (clone / "dash.html").read_text().lower()
