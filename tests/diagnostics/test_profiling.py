"""Profiler windows: the schedule and its settings, zero cost when off, and traces that TensorBoard's PyTorch
Profiler plugin (torch-tb-profiler) loads, checked against a real ``tensorboard`` process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from diagnostics.probes.profiling import PROFILER_DIR, ProfilerWindows, WindowSchedule
from etrm.cli import main as train_main
from etrm.config import Config, ConfigError, apply_overrides
from etrm.presets import load_preset
from etrm.train import instrument_setup, instruments
from etrm.train.trainer import Trainer

TINY = [
    "arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
    "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
    "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
    "train.eval_every=1000", "train.lr_warmup_steps=2",
]
PROFILE = ["profile.wait=1", "profile.warmup=1", "profile.active=2"]


def tiny_config(*overrides: str) -> Config:
    return Config.from_dict(apply_overrides(load_preset("demo"), [*TINY, *overrides]))


def trace_events(path: Path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


# ---------------------------------------------------------------------------------------------------------------
# Settings and schedule

def test_profile_settings_are_validated():
    cfg = tiny_config()
    assert (cfg.profile.wait, cfg.profile.warmup, cfg.profile.active, cfg.profile.repeat) == (1, 1, 3, 1)
    assert cfg.profile.on_finding is True
    for bad in ("profile.active=0", "profile.wait=-1", "profile.repeat=-2", "profile.warmup=1.5",
                "profile.on_finding=3", "profile.nope=1"):
        with pytest.raises(ConfigError, match="profile"):
            tiny_config(bad)


def test_window_schedule():
    s = WindowSchedule(wait=2, warmup=1, active=3, repeat=2)
    assert s.cycle == 6 and s.total_steps == 12
    assert WindowSchedule(repeat=0).total_steps is None
    with pytest.raises(ValueError, match="active"):
        WindowSchedule(active=0)


def test_on_findings_opens_one_window_only_when_allowed(tmp_path):
    off = ProfilerWindows(tmp_path / "off", on_finding=False)
    assert off.on_findings(["encoder-collapse"], 10) is None and not off.recording
    on = ProfilerWindows(tmp_path / "on", WindowSchedule(wait=5, warmup=1, active=2))
    assert on.on_findings([], 10) is None  # nothing found: nothing opens
    w = on.on_findings(["gradient-starvation", "encoder-collapse"], 10)
    assert w is not None and on.recording and w.worker == "finding-gradient-starvation"
    assert w.schedule == WindowSchedule(wait=0, warmup=1, active=2, repeat=1) and w.first_active == (12, 13)
    for _ in range(3):
        torch.ones(4).sum()
        on.step()
    assert not on.recording  # closed once its schedule was done
    assert on.on_findings(["label-misalignment"], 20) is None  # once per run
    assert [p.name.split(".")[0] for p in on.trace_files()] == ["finding-gradient-starvation"]


# ---------------------------------------------------------------------------------------------------------------
# Zero cost when off; stepped once per training step when on

def profiler_states(trainer: Trainer, steps: int) -> list[bool]:
    """Whether torch's profiler was enabled during each step (read from a step hook, mid-step)."""
    seen: list[bool] = []
    trainer.add(instruments.OnStep(lambda step, ev, m: seen.append(torch._C._autograd._profiler_enabled())))
    for _ in range(steps):
        trainer.train_step()
    return seen


def test_no_profiler_unless_asked(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", device=torch.device("cpu"))
    assert instrument_setup.add_profile(trainer, requested=False) is None  # untraced: no live doctor, nothing to profile for
    assert trainer.instruments.find(instruments.Profile) is None
    assert profiler_states(trainer, 3) == [False, False, False]
    assert not (tmp_path / "run" / PROFILER_DIR).exists()


def test_traced_run_arms_but_does_not_profile(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path / "run", device=torch.device("cpu"))
    trainer.run_dir.mkdir()
    instrument_setup.add_trace(trainer)
    windows = instrument_setup.add_profile(trainer, requested=False).windows
    assert windows is not None and not windows.recording  # waits for a finding
    assert profiler_states(trainer, 3) == [False, False, False]
    trainer.instruments.find(instruments.Trace).tracer.close()
    off = Trainer(tiny_config("profile.on_finding=false"), tmp_path / "off", device=torch.device("cpu"))
    off.run_dir.mkdir()
    instrument_setup.add_trace(off)
    assert instrument_setup.add_profile(off, requested=False) is None
    off.instruments.find(instruments.Trace).tracer.close()


def test_requested_window_covers_the_scheduled_steps(tmp_path):
    trainer = Trainer(tiny_config(*PROFILE), tmp_path / "run", device=torch.device("cpu"))
    trainer.run_dir.mkdir()
    windows = instrument_setup.add_profile(trainer, requested=True).windows
    assert windows.windows[0].first_active == (3, 4)
    states = profiler_states(trainer, 6)
    assert states == [False, False, True, True, False, False]  # wait, warmup, 2 recorded steps; then closed
    [trace] = windows.trace_files()
    assert trace.name.startswith("train.")
    names = {e.get("name") for e in trace_events(trace)}
    assert {"etrm.step 3", "etrm.step 4"} <= names and "etrm.step 2" not in names
    assert {"etrm.data", "etrm.loss", "etrm.backward", "etrm.optimizer"} <= names
    assert any(n and n.startswith("ProfilerStep#") for n in names)


# ---------------------------------------------------------------------------------------------------------------
# The acceptance: TensorBoard with torch-tb-profiler lists the run; the trace parses

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def test_tensorboard_lists_the_profiled_run(tmp_path):
    run = tmp_path / "run"
    code = train_main(["--preset", "demo", "--profile", "--run-dir", str(run), "--max-steps", "6", "--device", "cpu",
                       *TINY, *PROFILE])
    assert code == 0
    logdir = run / PROFILER_DIR
    [trace] = sorted(logdir.glob("*.pt.trace.json"))
    events = trace_events(trace)  # Chrome trace JSON, as Perfetto reads it
    assert any(e.get("ph") == "X" and e.get("name") == "etrm.step 3" for e in events)

    port = free_port()
    script = Path(sys.executable).with_name("tensorboard")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "tensorboard.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/runs"
        answer, answers = None, []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stderr.read().decode()[-2000:]}"
            answer = get_json(url)
            if answer is not None:
                answers.append(answer)
                if answer.get("runs") and not answer.get("loading"):
                    break
            time.sleep(1.0)
        assert answer is not None and answer.get("runs") == [PROFILER_DIR], answers[-3:]
        base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
        views = get_json(f"{base}/views?run={PROFILER_DIR}")
        assert views and "Trace" in views, views
        workers = get_json(f"{base}/workers?run={PROFILER_DIR}&view={views[0]}")
        assert workers == ["train"], workers
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # stop it by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        proc.stderr.close()


# ---------------------------------------------------------------------------------------------------------------
# Kineto's start/stop lines stay out of the console; everything else written meanwhile still reaches stderr

def test_profiled_run_console_has_no_kineto_lines(tmp_path):
    cmd = [sys.executable, "-m", "etrm.cli", "--preset", "demo", *TINY, *PROFILE, "--profile", "--max-steps", "6",
           "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((tmp_path / "run" / PROFILER_DIR).glob("*.pt.trace.json*")), "the window was recorded"
    assert "profiler_start" not in proc.stdout + proc.stderr
    assert "profiler_stop" not in proc.stdout + proc.stderr


def test_kineto_filter_passes_other_stderr_lines(capfd):
    from diagnostics.probes.profiling import _without_kineto_noise

    with _without_kineto_noise():
        os.write(2, b"USDT:2026-12-01 21:51:20 11002:11002 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert err == "a real warning\n"
