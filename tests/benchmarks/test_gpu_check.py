"""benchmarks/gpu_check.py without a GPU: its clean exit, argument handling, summary block and the check's flow.

The flow test runs the script's whole check on the CPU with ``torch.cuda``'s sync-debug, synchronize and memory
calls replaced by stand-ins: it proves the plumbing (trainers, sync check, timings table, interleaving), not a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
        "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
        "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.trace_every=4"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through the module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_defaults_and_overrides(gpu_check):
    args = gpu_check.parse_args([])
    assert (args.preset, args.steps, args.rounds, args.block, args.warmup) == ("demo", 100, 6, 10, 5)
    over = gpu_check.overrides_for(args)
    assert over[:len(gpu_check.DEFAULT_OVERRIDES)] == list(gpu_check.DEFAULT_OVERRIDES)
    assert over[-1] == 'train.device="cuda"'
    # options and overrides may be mixed; the user's overrides come after the defaults, so they win
    args = gpu_check.parse_args(["--preset", "demo-trm", "arch.hidden_size=256", "--steps", "7", "--preset-only"])
    assert args.preset == "demo-trm" and args.steps == 7
    assert gpu_check.overrides_for(args) == [*gpu_check.CHECK_OVERRIDES, "arch.hidden_size=256", 'train.device="cuda"']


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--rounds", "0"], ["--block", "-1"], ["--warmup", "-2"],
                                  ["--budget-s", "0"], ["--steps", "many"], ["--no-such-flag"],
                                  ["--variants", "eager,warp-speed"], ["--sync-steps", "0"]])
def test_bad_arguments_exit_2(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_gpu_prints_a_message_and_exits_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "nothing to check" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the check")
def test_the_script_exits_cleanly_without_a_gpu():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "Traceback" not in proc.stderr


def result(gpu_check, **kw):
    base = dict(device="NVIDIA H100", torch_version="2.x", preset="demo", mode="reencode",
                overrides=list(gpu_check.DEFAULT_OVERRIDES), params=1_234_567, batch_size=256, traced_steps=100,
                phase_ms={"data": 0.5, "encoder": 2.0, "backward": 4.25}, phase_steps=100,
                step_ms_untraced=0.010, step_ms_traced=0.0102, ratios=[1.01, 1.02, 1.03],
                peak_mib_traced=2048.0, peak_mib_untraced=2000.0, seconds=42.0)
    base.update(kw)
    return gpu_check.CheckResult(**base)


def test_summary_block_of_a_pass(gpu_check):
    r = result(gpu_check)
    text = gpu_check.format_summary(r)
    lines = text.splitlines()
    assert lines[0] == lines[-1] == "=" * 100
    assert r.passed
    assert "PASS: 100 traced steps" in text and 'set_sync_debug_mode("error")' in text
    assert "1,234,567 params" in text and "batch 256" in text
    assert "data 0.50 | encoder 2.00 | backward 4.25 | sum 6.75" in text
    assert "traced/untraced 1.020 (median of 3 interleaved rounds, 1.010..1.030)" in text
    assert "untraced 10.00 ms, traced 10.20 ms" in text
    assert "traced block 2,048 MiB, untraced block 2,000 MiB" in text


def test_summary_block_names_sync_sites_and_whose_they_are(gpu_check):
    r = result(gpu_check, sync_error="called a synchronizing CUDA operation",
               sync_sites=[("diagnostics/probes/tracer.py:40", "tracing"),
                           ("etrm/model/act.py:190", "model/trainer")], mode="cached",
               notes=[gpu_check.SYNCING_MODES["cached"]])
    text = gpu_check.format_summary(r)
    assert not r.passed and r.tracing_syncs == ["diagnostics/probes/tracer.py:40"]
    assert "FAIL: 2 sync site(s)" in text and "first error: called a synchronizing" in text
    assert "tracing       diagnostics/probes/tracer.py:40" in text
    assert "model/trainer etrm/model/act.py:190" in text
    assert "note" in text and "by design" in text
    # only the model's own syncs: tracing passes
    model_only = result(gpu_check, sync_sites=[("etrm/model/act.py:190", "model/trainer")])
    assert model_only.passed and "PASS for tracing" in gpu_check.format_summary(model_only)


def test_sync_sites_are_attributed_to_tracing_or_the_model(gpu_check):
    repo = gpu_check.REPO
    frames = [traceback.FrameSummary(str(repo / "etrm/train/trainer.py"), 10, "train_step"),
              traceback.FrameSummary(str(repo / "diagnostics/probes/tracer.py"), 40, "set"),
              traceback.FrameSummary(str(repo / ".venv/lib/python3.11/site-packages/torch/x.py"), 5, "f")]
    assert gpu_check._site(frames) == ("diagnostics/probes/tracer.py:40", "tracing")
    assert gpu_check._site(frames[:1]) == ("etrm/train/trainer.py:10", "model/trainer")
    assert gpu_check._site(frames[2:]) is None


class FakeCuda:
    """Stand-ins for the torch.cuda calls the check makes; ``sync_at`` makes one step's sync check fail."""

    def __init__(self):
        self.mode = 0
        self.modes = []

    def set_sync_debug_mode(self, mode):
        self.mode = mode
        self.modes.append(mode)

    def get_sync_debug_mode(self):
        return self.mode


def test_the_check_runs_end_to_end_with_torch_cuda_faked(gpu_check, monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake.set_sync_debug_mode)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", fake.get_sync_debug_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    args = gpu_check.parse_args(["--steps", "6", "--rounds", "2", "--block", "2", "--warmup", "1", *TINY])
    r = gpu_check.run_check(args, device=torch.device("cpu"))
    assert r.passed and r.sync_error is None and r.traced_steps == 6
    assert "error" in fake.modes and fake.mode == 0  # each step checked, and the mode is restored after
    assert {"data", "encoder", "inner", "loss", "trace", "backward", "optimizer"} <= set(r.phase_ms)
    assert r.phase_steps == 8  # 2 unchecked + 6 checked steps, flushed at steps 4 and 8 (trace_every=4)
    assert len(r.ratios) == 2 and all(x > 0 for x in r.ratios)
    assert r.peak_mib_traced == r.peak_mib_untraced == 3.0
    assert "PASS" in gpu_check.format_summary(r)


def test_a_sync_in_a_probe_fails_the_check_and_is_located(gpu_check, monkeypatch):
    """A probe that syncs (simulated: it raises under "error" and warns under "warn", as torch does) is named."""
    import warnings

    import diagnostics.probes.diversity as diversity

    fake = FakeCuda()
    for name, fn in (("set_sync_debug_mode", fake.set_sync_debug_mode),
                     ("get_sync_debug_mode", fake.get_sync_debug_mode), ("synchronize", lambda *a: None),
                     ("reset_peak_memory_stats", lambda *a: None), ("max_memory_allocated", lambda *a: 0)):
        monkeypatch.setattr(torch.cuda, name, fn)
    real = diversity.context_stats

    def syncing_stats(*args):
        if fake.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if fake.mode == "warn":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return real(*args)

    monkeypatch.setattr(diversity, "context_stats", syncing_stats)
    args = gpu_check.parse_args(["--steps", "3", "--rounds", "1", "--block", "1", "--warmup", "0", *TINY])
    r = gpu_check.run_check(args, device=torch.device("cpu"))
    assert not r.passed and r.traced_steps == 0
    assert r.sync_error.startswith("called a synchronizing")
    [(site, who)] = r.sync_sites
    assert site.startswith("diagnostics/probes/diversity.py:") and who == "tracing"
    assert "FAIL: 1 sync site(s)" in gpu_check.format_summary(r)


def test_the_variants_table_prints_each_row_as_it_finishes(gpu_check, monkeypatch):
    fake = FakeCuda()
    for name, fn in (("set_sync_debug_mode", fake.set_sync_debug_mode),
                     ("get_sync_debug_mode", fake.get_sync_debug_mode), ("synchronize", lambda *a: None),
                     ("reset_peak_memory_stats", lambda *a: None), ("max_memory_allocated", lambda *a: 5 * 2**20)):
        monkeypatch.setattr(torch.cuda, name, fn)
    args = gpu_check.parse_args(["--rounds", "1", "--block", "2", "--warmup", "1", "--sync-steps", "2",
                                 "--variants", "eager,eager-traced,eager-host-data", *TINY])
    lines: list[str] = []
    rows = gpu_check.run_table(args, device=torch.device("cpu"), out=lines.append)
    assert [r.name for r in rows] == ["eager", "eager-traced", "eager-host-data"]
    assert all(r.error is None and r.step_ms > 0 and r.samples_per_s > 0 and r.peak_mib == 5.0 for r in rows)
    assert lines[1] == gpu_check.TABLE_HEADER and len(lines) == 2 + len(rows)
    assert lines[4].startswith("eager-host-data") and " host " in lines[4]
    assert fake.modes.count("warn") == 3 * 2 and fake.mode == 0  # syncs counted per step, mode restored
    # a variant that cannot run prints its error in its row; one past the budget says it was skipped
    failed = gpu_check.Row("cudagraphs", error="RuntimeError: boom")
    assert "failed: RuntimeError: boom" in gpu_check.format_row(failed, gpu_check.VARIANTS["cudagraphs"])
    args = gpu_check.parse_args(["--variants", "eager", "--table-budget-s", "1e-9", *TINY])
    [skipped] = gpu_check.run_table(args, device=torch.device("cpu"), out=lines.append)
    assert skipped.error.startswith("skipped")
