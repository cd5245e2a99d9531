"""`make demo`'s script end to end, shortened: tiny model, few steps, no server; each run gets its expected verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo.py"

# As tests/train/conftest.py's TINY: one ACT step takes milliseconds on one CPU thread.
TINY = ("arch.hidden_size=16 arch.num_heads=2 arch.L_layers=1 arch.L_cycles=1 arch.expansion=1.0 "
        "arch.puzzle_emb_len=2 data.canvas=4 data.min_grid=2 data.max_grid=3 data.num_demos=2 data.train_tasks=8 "
        "data.heldout_tasks=2 train.batch_size=8 train.eval_batch_size=8 train.eval_every=8 "
        "train.lr_warmup_steps=2")
STEPS = 16  # above the doctor's 10-step starvation window

EXPECTED = {"reencode": (0, None), "cached": (1, "gradient-starvation"), "fct": (0, None), "demo-trm": (0, None)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo") / "runs"
    env = {**os.environ, "DEMO_SERVE": "0", "DEMO_STEPS": str(STEPS), "DEMO_ARGS": TINY, "DEMO_DIR": str(out),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, out


def test_demo_script_succeeds_and_prints_verdicts(demo):
    proc, out = demo
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in EXPECTED:
        assert (out / name / "trace.sqlite").is_file()
        assert (out / f"{name}.log").is_file()
    assert "gradient-starvation" in proc.stdout
    assert "UNEXPECTED" not in proc.stdout
    assert "dashboard at" not in proc.stdout  # DEMO_SERVE=0 skips the server


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_run_gets_its_verdict(demo, name):
    _, out = demo
    rc, first = EXPECTED[name]
    doctor = Path(sys.executable).parent / "etrm-doctor"
    res = subprocess.run([str(doctor), str(out / name), "--json"], capture_output=True, text=True)
    assert res.returncode == rc, res.stdout + res.stderr
    report = json.loads(res.stdout)
    errors = [f["code"] for f in report["findings"] if f["severity"] == "error"]
    assert errors == ([first] if first else [])
    assert report["summary"]["steps"] == STEPS


def test_existing_demo_dir_is_refused(tmp_path):
    env = {**os.environ, "DEMO_SERVE": "0", "DEMO_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr


def _png_exporter() -> bool:
    import importlib.util
    import shutil
    return any(importlib.util.find_spec(m) is not None for m in ("kaleido", "matplotlib")) or any(
        shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))


def test_reproduce_redraws_from_the_demo_runs(demo, tmp_path):
    if not _png_exporter():
        pytest.skip("no PNG exporter (kaleido, matplotlib or chromium); `make browser` installs chromium")
    _, out = demo
    uses = [arg for name in EXPECTED for arg in ("--use", f"{name}={out / name}")]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), *uses, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for fig in ("repro-coverage.png", "repro-accuracy.png", "repro-encoder-work.png"):
        assert (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (tmp_path / "repro-tables.md").read_text()
    assert "| encoder gradient coverage | 100.0% |" in tables  # reencode, the first column
    assert f"| steps | {STEPS} |" in tables


def test_time_cap_stops_a_run_that_saves_and_can_resume(tmp_path):
    """`reproduce --minutes`: a run still training at the cap gets Ctrl-C, saves its checkpoint and exits 0."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("etrm_demo_cap", SCRIPT)
    demo_mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo_mod
    spec.loader.exec_module(demo_mod)
    job = demo_mod.Job("capped", ["--preset", "demo", *TINY.split(), "train.trace_every=1"], 0, tmp_path / "run",
                       tmp_path / "run.log")
    demo_mod.train_all([job], 5000, 1, [], cap_s=0.5)  # 5000 tiny steps: a minute or more
    log = job.log.read_text()
    assert job.capped and job.rc == 0, log
    assert "stopped at step" in log and "on request; checkpoint saved" in log
    steps = demo_mod.traced_step(job.run_dir)
    assert 0 < steps < 5000
    assert list((job.run_dir).glob("checkpoint*")), sorted(p.name for p in job.run_dir.iterdir())
