"""``--tensorboard``: TensorBoard scalars of the flushed trace rows and the evals, one point per flush."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diagnostics.trace.loading import load_run
from diagnostics.trace.tb_scalars import TENSORBOARD_DIR, flush_scalars
from etrm.cli import main as train_main

TINY = [
    "arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
    "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
    "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
    "train.lr_warmup_steps=2", "train.trace_every=5", "train.eval_every=10", "act.halt_max_steps=2",
]
EXPECTED = {"train/coverage", "train/reset_fraction", "train/loss_per_slot", "train/exact_inflight", "train/exact_halted",
            "train/mean_halt_step", "train/mean_inflight_step", "train/context_cross_share",
            "train/context_to_token_rms", "eval/exact", "eval/token", "eval/halt.step"}


def test_flush_scalars_are_ratios_of_sums():
    rows = [{"step": 1, "resets": 8.0, "slots": 8.0, "halted_steps": 2.0, "halted_count": 1.0,
             "context_ms": 16.0, "token_ms": 1.0},
            {"step": 2, "resets": 0.0, "slots": 8.0, "halted_steps": 6.0, "halted_count": 3.0,
             "context_ms": 0.0, "token_ms": 0.0}]
    out = flush_scalars(rows)
    assert out["train/reset_fraction"] == 0.5 and out["train/mean_halt_step"] == 2.0
    assert out["train/context_to_token_rms"] == 4.0
    assert "train/coverage" not in out  # its columns are absent
    assert flush_scalars([]) == {}
    # a zero denominator writes nothing rather than NaN
    assert "train/exact_halted" not in flush_scalars([{"step": 1, "halted_exact": 0.0, "halted_count": 0.0}])


def test_tensorboard_flag_writes_the_expected_tags(tmp_path):
    run = tmp_path / "run"
    assert train_main(["--preset", "demo", "--tensorboard", "--run-dir", str(run), "--max-steps", "20", "--device",
                       "cpu", *TINY]) == 0
    assert (run / "trace.sqlite").is_file()  # --tensorboard turns tracing on: the scalars are the trace's rows
    files = list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(run / TENSORBOARD_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert EXPECTED <= tags, EXPECTED - tags
    assert [e.step for e in acc.Scalars("train/coverage")] == [5, 10, 15, 20]  # one point per flush
    assert all(e.value == 1.0 for e in acc.Scalars("train/coverage"))  # re-encode: every slot gets gradient
    assert [e.step for e in acc.Scalars("eval/exact")] == [10, 20]
    # each point is the ratio of sums over its flush's rows, as the trace store has them
    df = load_run(run)
    block = df.loc[6:10]
    loss = [e.value for e in acc.Scalars("train/loss_per_slot") if e.step == 10][0]
    assert loss == pytest.approx(block["loss"].sum() / block["slots"].sum(), rel=1e-6)
    halt = [e.value for e in acc.Scalars("train/mean_halt_step") if e.step == 10]
    if block["halted_count"].sum() > 0:
        assert halt[0] == pytest.approx(block["halted_steps"].sum() / block["halted_count"].sum(), rel=1e-6)
    assert all(math.isfinite(e.value) for t in tags for e in acc.Scalars(t))


def test_without_the_flag_nothing_is_written(tmp_path):
    run = tmp_path / "run"
    assert train_main(["--preset", "demo", "--trace", "--run-dir", str(run), "--max-steps", "5", "--device", "cpu",
                       *TINY]) == 0
    assert not (run / TENSORBOARD_DIR).exists()
