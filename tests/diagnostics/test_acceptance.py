"""Acceptance of issue 5, end to end: ``etrm-train --trace`` on the demo presets (shrunk), then ``etrm-doctor``.

Each seeded fault of the background summary must be named by the doctor (offline, and live by the trainer, which
prints a warning and stores the finding), healthy runs must stay quiet with coverage exactly 1.0, and a trace must
survive SIGKILL and Ctrl-C: it loads, and ``--resume`` continues it with every step exactly once.

Training runs in-process (``etrm.cli.main``) where nothing needs a separate process; the doctor, the killed run and
the interrupted run are real subprocesses. Tiny models on one thread: each 60-step run takes about a second.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diagnostics.trace.loading import STALE_AFTER_S, load_findings, load_markers, load_run, run_status
from diagnostics.trace.schema import TRACE_NAME
from etrm.cli import main as train_main
from etrm.config import Config, apply_overrides
from etrm.presets import load_preset
from etrm.train import instrument_setup, instruments
from etrm.train.checkpoint import load_checkpoint
from etrm.train.console import Reporter
from etrm.train.trainer import Trainer

# The shrunk model and data of tests/train/conftest.py (hidden 16), evaluating rarely: a 60-step run is ~1 s.
TINY = [
    "arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
    "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
    "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
    "train.eval_every=30", "train.lr_warmup_steps=2",
]
STEPS = 60
SAMPLERS = ("refill", "trm")

_script = Path(sys.executable).with_name("etrm-doctor")
DOCTOR = [str(_script)] if _script.is_file() else [sys.executable, "-m", "diagnostics.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    return env


# ----------------------------------------------------------------------------------------------------------------
# helpers

def train(capsys: pytest.CaptureFixture, run: Path, *args: str, max_steps: int = STEPS) -> str:
    """``etrm-train ARGS --trace`` in-process on CPU; returns its stdout (it must exit 0)."""
    capsys.readouterr()
    code = train_main([*args, "--trace", "--run-dir", str(run), "--device", "cpu", "--max-steps", str(max_steps),
                       *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def tiny_config(*overrides: str) -> Config:
    return Config.from_dict(apply_overrides(load_preset("demo"), [*TINY, 'train.device="cpu"', *overrides]))


def doctor(run: Path) -> tuple[int, dict]:
    """``etrm-doctor RUN --json`` as a subprocess: (exit code, parsed JSON)."""
    proc = subprocess.run([*DOCTOR, str(run), "--json"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode in (0, 1), f"etrm-doctor exit {proc.returncode}: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def by_code(report: dict) -> dict[str, dict]:
    codes = [f["code"] for f in report["findings"]]
    assert len(codes) == len(set(codes)), f"a code reported twice: {codes}"
    return {f["code"]: f for f in report["findings"]}


def first_continuing_step(df: pd.DataFrame) -> int:
    """The first step on which some slot was not reset (continues its sample)."""
    return int(df.index[(df["resets"] < df["slots"]).to_numpy()][0])


def assert_contiguous(df: pd.DataFrame, last: int) -> None:
    steps = df.index.to_list()
    assert steps == list(range(1, last + 1)), f"steps are not exactly 1..{last}: {_gaps(steps, last)}"


def _gaps(steps: list[int], last: int) -> str:
    missing = sorted(set(range(1, last + 1)) - set(steps))
    extra = sorted(set(steps) - set(range(1, last + 1)))
    dup = sorted({s for s in steps if steps.count(s) > 1})
    return f"missing {missing[:10]}, extra {extra[:10]}, duplicated {dup[:10]}"


def assert_no_duplicate_rows(run: Path) -> None:
    """Every step-keyed table holds each key once (alignment has no primary key, so check it by hand)."""
    db = sqlite3.connect(f"file:{run / TRACE_NAME}?mode=ro", uri=True)
    try:
        for table, key in (("steps", "step"), ("timings", "step, rank, phase"), ("evals", "step, name"),
                           ("alignment_samples", "step, slot")):
            total, distinct = db.execute(
                f"SELECT COUNT(*), (SELECT COUNT(*) FROM (SELECT DISTINCT {key} FROM {table})) FROM {table}"
            ).fetchone()
            assert total == distinct, f"{table}: {total - distinct} duplicated rows"
    finally:
        db.close()


def trace_steps(run: Path) -> int:
    """The last stored step (0 when none or the trace is not there yet), read without pandas."""
    db_path = run / TRACE_NAME
    if not db_path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError:  # created but not yet initialised
        return 0


def assert_live_matches_offline(run: Path, stdout: str, report: dict) -> None:
    """The live doctor stored exactly the offline doctor's codes (same first step), and printed each error/warning
    finding once labelled with its own severity (``error:``/``warning:``); an info finding is not a warning."""
    stored = load_findings(run)
    live = {r.code: (r.severity, int(r.first_step)) for r in stored.itertuples()}
    offline = {f["code"]: (f["severity"], f["first_step"]) for f in report["findings"]}
    assert live == offline
    for code, (severity, _) in offline.items():
        n = stdout.count(f"{severity}: {code} (")
        assert n == (1 if severity in ("error", "warning") else n), f"{code}: printed {n} times\n{stdout}"
        assert f"warning: {code} (" not in stdout or severity == "warning", stdout  # an error is not a warning
    warned = sum(sev == "warning" for sev, _ in offline.values())
    assert stdout.count("warning:") == warned, stdout


# ----------------------------------------------------------------------------------------------------------------
# 1. Faults are named, healthy runs are quiet

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_mode_is_gradient_starvation_with_coverage_equal_to_reset_fraction(sampler, tmp_path, capsys):
    run = tmp_path / "cached"
    out = train(capsys, run, "--preset", "demo", "encoder.mode=cached", f"train.sampler={sampler}")
    code, report = doctor(run)
    assert code == 1
    f = by_code(report)["gradient-starvation"]
    assert f["severity"] == "error"
    ev = f["evidence"]
    df = load_run(run)
    assert_contiguous(df, STEPS)
    # exact per step: only reset slots are encoded fresh, so only they get encoder gradient
    assert (df["coverage_num"] == df["resets"]).all() and (df["coverage_den"] == df["slots"]).all()
    assert (df["resets"] < df["slots"]).any()
    # the evidence: over the same window, mean coverage equals the mean reset fraction, and both match the trace
    start, end = ev["window"]
    # named on its first step with continuing slots (issue 18: the signature is exact, so one step is conclusive)
    assert start == end == f["first_step"] == first_continuing_step(df) and ev["evidence"] == "single step"
    assert ev["coverage_mean"] < ev["threshold"] == 0.5
    assert abs(ev["coverage_mean"] - ev["reset_fraction_mean"]) < 1e-9
    w = df.loc[start:end]
    assert ev["coverage_mean"] == pytest.approx(w["coverage_num"].sum() / w["coverage_den"].sum(), abs=1e-12)
    assert ev["reset_fraction_mean"] == pytest.approx(w["resets"].sum() / w["slots"].sum(), abs=1e-12)
    assert abs(ev["run_coverage_mean"] - ev["run_reset_fraction_mean"]) < 1e-9
    summary = report["summary"]
    assert summary["mode"] == "cached" and summary["sampler"] == sampler and summary["status"] == "finished"
    assert summary["figures"]["coverage"] == pytest.approx(summary["figures"]["reset_fraction"], abs=1e-12)
    assert summary["figures"]["coverage"] < 0.5
    assert_live_matches_offline(run, out, report)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_label_from_batch_is_label_misalignment_with_its_count(sampler, tmp_path, capsys):
    run = tmp_path / "labels"
    out = train(capsys, run, "--preset", "demo", "fault=label-from-batch", f"train.sampler={sampler}")
    code, report = doctor(run)
    assert code == 1
    f = by_code(report)["label-misalignment"]
    assert f["severity"] == "error"
    df = load_run(run)
    mismatches = int(df["label_mismatch"].sum())
    assert mismatches > 0
    assert f["evidence"]["label_mismatch"] == mismatches
    assert f["evidence"]["steps_affected"] == int((df["label_mismatch"] > 0).sum())
    assert f["first_step"] == int(df.index[df["label_mismatch"] > 0][0]) == first_continuing_step(df)
    assert report["summary"]["alignment_mismatches"] >= mismatches
    # every continuing slot takes the incoming position's labels: padding under refill (never its own), a fresh
    # sample under the trm sampler (its own only by chance)
    continuing = df["aligned_den"] - df["resets"]
    if sampler == "refill":
        assert (df["label_mismatch"] == continuing).all()
    else:
        assert (df["label_mismatch"] <= continuing).all() and df["label_mismatch"].sum() > 0.5 * continuing.sum()
    assert (df.loc[df["resets"] == df["slots"], "label_mismatch"] == 0).all()
    samples = f["evidence"]["first_samples"]
    assert samples and all(s["label_sample_id"] != s["sample_id"] for s in samples)
    assert_live_matches_offline(run, out, report)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_encode_full_batch_is_wasted_encoder_compute(sampler, tmp_path, capsys):
    run = tmp_path / "wasted"
    out = train(capsys, run, "--preset", "demo", "encoder.mode=cached", "fault=encode-full-batch",
                f"train.sampler={sampler}")
    code, report = doctor(run)
    assert code == 1  # it is still cached mode: gradient-starvation holds too
    found = by_code(report)
    assert {"wasted-encoder-compute", "gradient-starvation"} <= set(found)
    f = found["wasted-encoder-compute"]
    assert f["severity"] == "warning"
    df = load_run(run)
    assert (df["encoded"] == df["slots"]).all() and (df["encode_needed"] == df["resets"]).all()
    # the rows encoded and then discarded get an exact-zero gradient: coverage still counts reset slots only
    assert (df["coverage_num"] == df["resets"]).all() and (df["resets"] < df["slots"]).any()
    ev = f["evidence"]
    start, end = ev["window"]
    assert start == end == f["first_step"] == first_continuing_step(df) and ev["evidence"] == "single step"
    w = df.loc[start:end]
    assert (ev["encoded"], ev["encode_needed"]) == (int(w["encoded"].sum()), int(w["encode_needed"].sum()))
    assert ev["encoded"] > ev["threshold"] * ev["encode_needed"]
    assert report["summary"]["figures"]["encode_ratio"] > 1.5
    assert_live_matches_offline(run, out, report)


def test_a_run_built_never_to_halt_is_halting_never_learned(tmp_path, capsys):
    """Upstream's Q bias -5 and no learning signal for it (loss.q_weight=0): the Q-head never asks to halt."""
    run = tmp_path / "never"
    out = train(capsys, run, "--preset", "demo", "loss.q_weight=0", max_steps=80)
    code, report = doctor(run)
    assert code == 0  # a warning
    f = by_code(report)["halting-never-learned"]
    ev = f["evidence"]
    assert f["first_step"] == 50 + 20  # after the warm-up (max(50, 0.5 x 80)), one 20-step window
    assert ev["q_bias_init"] == -5.0 and ev["q_halt_requests_in_run"] == 0
    assert -5.0 <= ev["q_halt_logit_mean"] < -4.9  # weight decay is all that moves the untrained bias
    assert ev["halts_at_max_steps"] == ev["halts"] > 0
    assert "halting-collapse" not in by_code(report)
    assert_live_matches_offline(run, out, report)


def stagger_halting(trainer: Trainer, seed: int = 6) -> None:
    """Random Q-head weights, halting bias -2.5 (and no Q loss to undo them): slots halt at different steps, about
    a quarter of the batch resets per step. Through the CLI every tiny slot runs to max steps in lockstep, where resets are
    0 or B and "coverage equals the reset fraction" would also hold for a probe that counts "the encoder ran"."""
    q = trainer.model.core.q_head
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.weight.copy_(torch.randn(q.weight.shape, generator=g) * 0.5)
        q.bias.fill_(-2.5)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["cached", "reencode"])
def test_coverage_is_exact_per_step_under_staggered_halting(mode, sampler, tmp_path, capsys):
    run = tmp_path / mode
    cfg = tiny_config(f"encoder.mode={mode}", f"train.sampler={sampler}", "loss.q_weight=0",
                      "act.halt_exploration_prob=0.3", f"train.max_steps={STEPS}")
    trainer = Trainer(cfg, run, device=torch.device("cpu"))
    run.mkdir()
    stagger_halting(trainer)
    instrument_setup.add_trace(trainer, "demo")
    capsys.readouterr()
    trainer.run(STEPS, Reporter(STEPS, live=False))
    out = capsys.readouterr().out
    df = load_run(run)
    assert_contiguous(df, STEPS)
    partial = (df["resets"] > 0) & (df["resets"] < df["slots"])
    assert partial.sum() >= STEPS // 2, "halting did not stagger"
    code, report = doctor(run)
    if mode == "cached":
        assert (df["coverage_num"] == df["resets"]).all()
        assert code == 1
        ev = by_code(report)["gradient-starvation"]["evidence"]
        assert abs(ev["coverage_mean"] - ev["reset_fraction_mean"]) < 1e-9 and ev["coverage_mean"] < 0.5
        start, end = ev["window"]
        w = df.loc[start:end]
        assert ev["coverage_mean"] == pytest.approx(w["resets"].sum() / w["slots"].sum(), abs=1e-12)
    else:
        assert (df["coverage_num"] == df["coverage_den"]).all()
        assert code == 0 and report["summary"]["figures"]["coverage"] == 1.0
        assert not [f for f in report["findings"] if f["severity"] in ("error", "warning")], report["findings"]
    assert_live_matches_offline(run, out, report)


HEALTHY = {"reencode": ["--preset", "demo"], "fct": ["--preset", "demo", "encoder.mode=fct"],
           "demo-trm": ["--preset", "demo-trm"]}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_runs_have_no_finding_and_coverage_exactly_one(name, sampler, tmp_path, capsys):
    run = tmp_path / name
    out = train(capsys, run, *HEALTHY[name], f"train.sampler={sampler}")
    code, report = doctor(run)
    assert code == 0
    df = load_run(run)
    assert_contiguous(df, STEPS)
    assert (df["coverage_num"] == df["coverage_den"]).all() and (df["coverage_den"] > 0).all()
    assert report["summary"]["figures"]["coverage"] == 1.0
    assert not [f for f in report["findings"] if f["severity"] in ("error", "warning")], report["findings"]
    found = by_code(report)
    if sampler == "trm":  # upstream's feed drops the fresh samples that land in continuing slots: a fact, info
        assert set(found) == {"dropped-samples"}
        f = found["dropped-samples"]
        assert f["severity"] == "info"
        assert f["evidence"]["samples_dropped"] == int(df["samples_dropped"].sum()) > 0
    else:
        assert found == {} and df["samples_dropped"].sum() == 0
    assert report["summary"]["status"] == "finished"
    assert_live_matches_offline(run, out, report)


# ----------------------------------------------------------------------------------------------------------------
# 2. SIGKILL mid-run, then --resume

KILL_ARGS = ["--preset", "demo", "--trace", "--device", "cpu", *TINY, "train.eval_every=1000",
             "train.trace_every=5", "train.checkpoint_every=20", "train.lr_schedule=constant"]


def start_training(run: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "etrm.cli", "--run-dir", str(run), *args], cwd=run.parent,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run: Path, steps: int, timeout: float = 120) -> int:
    """Poll the trace until it holds at least ``steps`` rows; the process must still be running then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = trace_steps(run)
        if n >= steps:
            assert proc.poll() is None, "the run ended before it could be interrupted; raise --max-steps"
            return n
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"etrm-train exited {proc.returncode} early:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the trace did not reach {steps} steps in {timeout} s")


def resume(capsys: pytest.CaptureFixture, run: Path, max_steps: int) -> str:
    """``etrm-train --resume --run-dir RUN --max-steps N`` in-process (a fresh Trainer, as a new process would
    build); no --trace: a traced run's resume continues its trace by itself. Returns stdout (it must exit 0)."""
    capsys.readouterr()
    code = train_main(["--resume", "--run-dir", str(run), "--max-steps", str(max_steps)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


COUNTS = ("resets", "slots", "coverage_num", "coverage_den", "encoded", "encode_needed", "samples_consumed",
          "samples_dropped", "label_mismatch", "halted", "inflight_step_sum", "halt_at_1", "halt_at_4")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sigkill_leaves_a_loadable_trace_and_resume_continues_it_exactly_once(sampler, tmp_path, capsys):
    run = tmp_path / "killed"
    proc = start_training(run, *KILL_ARGS, f"train.sampler={sampler}", "--max-steps", "400")
    try:
        wait_for_steps(proc, run, 40)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # what is left loads, has no gap, and reads as crashed at once: its trainer's lock is free (diagnostics.trace.liveness)
    killed = load_run(run)
    n = int(killed.index.max())
    assert 40 <= n < 400
    assert_contiguous(killed, n)
    assert list(load_markers(run)["kind"]) == ["start"]
    assert run_status(run, stale_after=1e9) == "crashed"  # a fresh heartbeat does not make a killed trainer live
    assert run_status(run, now=time.time() + STALE_AFTER_S + 1) == "crashed"
    assert run_status(run, stale_after=0.0, now=time.time() + 1) == "crashed"
    code, report = doctor(run)
    assert report["summary"]["steps"] == n and report["summary"]["last_step"] == n
    assert code == (1 if any(f["severity"] == "error" for f in report["findings"]) else 0)

    checkpoint = int(load_checkpoint(run)["step"])
    assert 20 <= checkpoint <= n and checkpoint % 20 == 0 and n - checkpoint < 20 + 5

    # resume past where it was killed: rows after the checkpoint are replaced, every step is there exactly once
    final = n + 25
    resume(capsys, run, final)
    resumed = load_run(run)
    assert_contiguous(resumed, final)
    assert_no_duplicate_rows(run)
    markers = load_markers(run)
    assert list(markers["kind"]) == ["start", "resume", "end"]
    assert list(markers["step"]) == [0, checkpoint, final]
    assert run_status(run) == "finished"
    assert resumed.attrs["meta"]["preset"] == "demo"  # the resumed trace still names its preset
    # resume is exact, so the re-run steps after the checkpoint repeat the killed run's counters
    again = resumed.loc[checkpoint + 1:n, list(COUNTS)]
    assert again.equals(killed.loc[checkpoint + 1:n, list(COUNTS)])
    assert np.allclose(resumed.loc[:n, "loss"], killed.loc[:, "loss"], rtol=1e-6, atol=0)
    code, report = doctor(run)
    assert report["summary"]["steps"] == final and report["summary"]["status"] == "finished"


# ----------------------------------------------------------------------------------------------------------------
# 3. Ctrl-C, then --resume

def test_ctrl_c_stops_at_a_checkpoint_and_resume_continues_the_trace(tmp_path, capsys):
    """One Ctrl-C: the run flushes, checkpoints at the step it stopped on and exits 0; --resume continues."""
    run = tmp_path / "interrupted"
    proc = start_training(run, *KILL_ARGS, "--max-steps", "400")
    try:
        wait_for_steps(proc, run, 20)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    stopped = int(load_checkpoint(run)["step"])
    assert f"stopped at step {stopped} on request" in out
    df = load_run(run)
    assert_contiguous(df, stopped)  # flushed up to the step it stopped on, not just to the last trace_every
    assert list(load_markers(run)["kind"]) == ["start", "stopped"]
    assert run_status(run) == "stopped"

    final = stopped + 15
    resume(capsys, run, final)
    assert_contiguous(load_run(run), final)
    assert_no_duplicate_rows(run)
    markers = load_markers(run)
    assert list(markers["kind"]) == ["start", "stopped", "resume", "end"]
    assert list(markers["step"]) == [0, stopped, stopped, final]


def windowed_only(trainer: Trainer) -> None:
    """The live doctor without the single-step rules, so that gradient-starvation first holds at step 10 (its
    window), past the checkpoint at 8: the finding this test needs (the single-step rule names step 2)."""
    from diagnostics.doctor.coverage_rules import GradientStarvationAtStep, WastedEncoderComputeAtStep
    from diagnostics.doctor.diagnose import RULES
    from diagnostics.doctor.live import LiveDoctor

    rules = [r for r in RULES if not isinstance(r, (GradientStarvationAtStep, WastedEncoderComputeAtStep))]
    live = trainer.instruments.find(instruments.Doctor)
    live.doctor = LiveDoctor(live.doctor.meta, live.doctor.cfg, rules=rules)
    if trainer.step:
        live.doctor.replay(load_run(trainer.run_dir))


def test_second_ctrl_c_leaves_rows_past_the_checkpoint_which_resume_deletes(tmp_path, capsys):
    """Two Ctrl-C stop at once, after the trace has rows past the last checkpoint (flushes every 4 steps,
    checkpoints every 8). Resuming deletes those rows (and findings that first held in them) before training
    continues; the live doctor does not warn again about a finding that already held before the checkpoint."""
    run = tmp_path / "run"
    cfg = tiny_config("encoder.mode=cached", "fault=label-from-batch", "train.trace_every=4",
                      "train.checkpoint_every=8", "train.eval_every=6", "train.max_steps=40")
    trainer = Trainer(cfg, run, device=torch.device("cpu"))
    run.mkdir()
    instrument_setup.add_trace(trainer, "demo")
    windowed_only(trainer)

    def ctrl_c_twice(step, events, metrics):
        if step + 1 == 14:  # after the flush at 12 and the checkpoint at 8
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    trainer.add(instruments.OnStep(ctrl_c_twice))
    with pytest.raises(KeyboardInterrupt):
        trainer.run(40, Reporter(40, live=False))
    first_out = capsys.readouterr().out
    assert "error: label-misalignment (" in first_out and "error: gradient-starvation (step 10)" in first_out
    assert_contiguous(load_run(run), 12)
    assert list(load_markers(run)["kind"]) == ["start", "crashed"]
    assert set(load_findings(run)["code"]) == {"label-misalignment", "gradient-starvation"}
    assert int(load_checkpoint(run)["step"]) == 8

    resumed = Trainer(cfg, run, device=torch.device("cpu"))
    resumed.resume()
    instrument_setup.add_trace(resumed)
    windowed_only(resumed)
    # before a single resumed step: nothing past the checkpoint is left
    df = load_run(run)
    assert_contiguous(df, 8)
    findings = load_findings(run)
    assert list(findings["code"]) == ["label-misalignment"]  # gradient-starvation first held at step 10 > 8
    db = sqlite3.connect(f"file:{run / TRACE_NAME}?mode=ro", uri=True)
    try:
        for table in ("timings", "evals", "alignment_samples"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE step > 8").fetchone()[0] == 0, table
        assert db.execute("SELECT COUNT(*) FROM evals WHERE step = 6").fetchone()[0] > 0
    finally:
        db.close()

    capsys.readouterr()
    result = resumed.run(40, Reporter(40, start=8, live=False))
    assert result.step == 40 and not result.stopped_early
    out = capsys.readouterr().out
    assert "error: label-misalignment" not in out  # held before the checkpoint: already reported and stored
    assert out.count("error: gradient-starvation (step 10)") == 1  # its rows were re-run, so it holds again
    final = load_run(run)
    assert_contiguous(final, 40)
    assert_no_duplicate_rows(run)
    assert list(load_markers(run)["kind"]) == ["start", "crashed", "resume", "end"]
    code, report = doctor(run)
    assert code == 1
    stored = {r.code: int(r.first_step) for r in load_findings(run).itertuples()}
    offline = {f["code"]: f["first_step"] for f in report["findings"]}
    assert set(stored) == set(offline) and stored["label-misalignment"] == offline["label-misalignment"]
    assert (stored["gradient-starvation"], offline["gradient-starvation"]) == (10, 2)  # window vs single step
    assert by_code(report)["label-misalignment"]["evidence"]["label_mismatch"] == int(final["label_mismatch"].sum())
