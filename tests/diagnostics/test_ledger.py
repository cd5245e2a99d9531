"""The per-sample ACT ledger, checked exactly: a bundled model driven with known halting patterns, every consumed
sample's record against a host-side reference of the same slots (entry and exit steps, steps used, reason, vetoes,
correctness, logits), the per-task aggregates against the records, the encoder-gradient count against the coverage
probe, the sampling of raw records and a resume's truncation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from diagnostics import load_ledger, load_task_stats

from diagnostics.trace import ledger
from diagnostics.trace.loading import load_run
from diagnostics.probes import default_probes
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter
from diagnostics.probes.tracer import Tracer
from etrm.testing import bundled_adapter

B, M = 6, 4
TASK_OF = np.array([0, 10, 10, 11, 11, 12, 12, 13], dtype=np.int64)  # puzzle ids 1..7 fold into four tasks


def halt_pattern(sample_id: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The known pattern: sample s halts after (s % (M + 1)) + 1 steps; s % (M + 1) == M never asks (max step)."""
    want = sample_id % (M + 1) + 1
    return (steps + 1) >= want  # steps: taken before this step; the model halts at max steps anyway


def drive(tmp_path, mode: str = "reencode", steps: int = 23, forced: bool = True, exploration: float = 0.0,
          every: int = 1, trace_every: int = 5, seed: int = 0, writer_meta: dict | None = None):
    """Run ``steps`` traced training steps of a bundled model (refill feed, every slot real), the last one forcing
    every slot to halt so that every consumed sample leaves; return the run dir and the host-side reference."""
    torch.manual_seed(seed)
    model_kind = "trm" if mode == "trm" else "etrm"
    ad = bundled_adapter(model_kind, mode, seed=seed, batch_size=B, max_steps=M, exploration=exploration,
                         q_scale=2.0)
    model = ad.model
    run = tmp_path / f"run-{mode}-{every}"
    run.mkdir()
    meta = {"mode": mode, "model": model_kind, "max_steps_per_sample": M, "ledger_sample_every": every,
            **(writer_meta or {})}
    writer = TraceWriter(run / TRACE_NAME, meta)
    probes = default_probes(M, task_of_puzzle=TASK_OF)
    tracer = Tracer(probes, writer, torch.device("cpu"), capacity=trace_every)
    batch0 = ad.make_batch(list(range(B)))
    carry = model.initial_carry(batch0)
    next_id = 0
    slot_state: dict[int, dict] = {}
    expected: list[dict] = []
    for t in range(1, steps + 1):
        reset = carry.halted.clone()
        ids = []
        for slot in range(B):
            if reset[slot]:
                ids.append(next_id)
                next_id += 1
            else:
                ids.append(-1)
        batch = ad.make_batch(ids)
        sid_now = torch.where(reset, batch["sample_id"], carry.data["sample_id"])
        force = None
        if forced:
            force = halt_pattern(sid_now, torch.where(reset, 0, carry.steps))
        if t == steps:
            force = torch.ones(B, dtype=torch.bool)
        new_carry, out, events = model(carry, batch, force_halt=force)
        loss, metrics = ad.loss_fn(out, events)
        tracer.on_step(t - 1, events, metrics)
        loss.backward()
        tracer.after_backward()
        model.zero_grad()
        # the host-side reference of the same slots
        for slot in range(B):
            if reset[slot]:
                slot_state[slot] = {"sample_id": int(sid_now[slot]), "enter": t, "vetoes": 0}
            st = slot_state[slot]
            st["vetoes"] += int(events.explore_veto[slot])
            if events.halted[slot]:
                q_cont = events.q_continue_logits
                expected.append({
                    "sample_id": st["sample_id"], "puzzle_id": int(events.puzzle_id_after[slot]), "slot": slot,
                    "enter_step": st["enter"], "exit_step": t, "steps_used": int(events.steps[slot]),
                    "reason": "max_step" if bool(events.is_last_step[slot]) else "q_halt", "vetoes": st["vetoes"],
                    "exact": int(events.seq_correct[slot]), "token_correct": int(events.token_correct[slot]),
                    "token_count": int(events.token_count[slot]),
                    "q_halt_logit": float(events.q_halt_logits[slot].detach()),
                    "q_continue_logit": None if q_cont is None else float(q_cont[slot])})
        carry = new_carry
        if t % trace_every == 0 or t == steps:
            tracer.flush()
    tracer.close()
    return run, pd.DataFrame(expected), next_id


@pytest.mark.parametrize("mode", ["reencode", "cached", "trm"])
def test_every_consumed_sample_has_its_exact_record(tmp_path, mode):
    run, exp, consumed = drive(tmp_path, mode)
    got = load_ledger(run)
    assert got.attrs["sample_rate"] == 1.0
    assert len(got) == consumed == len(exp)
    assert sorted(got["sample_id"]) == list(range(consumed))  # every consumed sample once
    got = got.set_index("sample_id").sort_index()
    exp = exp.set_index("sample_id").sort_index()
    for col in ("puzzle_id", "slot", "enter_step", "exit_step", "steps_used", "reason", "vetoes", "exact",
                "token_correct", "token_count"):
        assert got[col].tolist() == exp[col].tolist(), col
    np.testing.assert_allclose(got["q_halt_logit"], exp["q_halt_logit"], rtol=1e-6)
    assert got["q_continue_logit"].isna().all()  # q_continue off in the bundled default
    assert got["task"].tolist() == TASK_OF[exp["puzzle_id"]].tolist()
    assert (got["rank"] == 0).all()
    # the known pattern: steps used (s % 5) + 1, capped at M; the last step forced every slot out
    last = exp["exit_step"].max()
    pattern = got[got["exit_step"] < last]
    want = np.minimum(pattern.index.to_numpy() % (M + 1) + 1, M)
    assert pattern["steps_used"].tolist() == want.tolist()
    assert (pattern["reason"] == np.where(want == M, "max_step", "q_halt")).all()
    assert (got["steps_used"] == got["exit_step"] - got["enter_step"] + 1).all()


@pytest.mark.parametrize("mode", ["reencode", "cached"])
def test_encoder_gradient_count_matches_the_coverage_probe(tmp_path, mode):
    run, exp, consumed = drive(tmp_path, mode)
    got = load_ledger(run)
    steps = load_run(run)
    # every slot is real and every consumed sample left: the coverage probe's counts, summed, are the samples'
    assert got["encoder_grad_steps"].sum() == steps["coverage_num"].sum() > 0
    if mode == "cached":  # encoded once, at its reset step; the context is carried detached after that
        assert (got["encoder_grad_steps"] == 1).all()
    else:  # re-encoded every step
        assert (got["encoder_grad_steps"] == got["steps_used"]).all()


def test_exploration_vetoes_are_counted_per_sample(tmp_path):
    run, exp, consumed = drive(tmp_path, "reencode", steps=40, forced=False, exploration=0.7, seed=3)
    got = load_ledger(run).set_index("sample_id").sort_index()
    exp = exp.set_index("sample_id").sort_index()
    assert got["vetoes"].tolist() == exp["vetoes"].tolist()
    assert got["vetoes"].sum() > 0 and got["reason"].tolist() == exp["reason"].tolist()
    assert (got["reason"] == "q_halt").any() and (got["reason"] == "max_step").any()


def test_task_aggregates_are_exact_and_raw_records_sampled(tmp_path):
    run, exp, consumed = drive(tmp_path, "reencode", steps=40, forced=False, exploration=0.3)
    full = load_ledger(run)
    stats = load_task_stats(run)
    g = full.groupby("task")
    assert stats["task"].tolist() == sorted(g.groups)
    s = stats.set_index("task")
    assert s["samples"].tolist() == g.size().tolist()
    assert s["exact"].tolist() == g["exact"].sum().tolist()
    assert s["steps_sum"].tolist() == g["steps_used"].sum().tolist()
    assert s["q_halts"].tolist() == g["reason"].apply(lambda r: (r == "q_halt").sum()).tolist()
    np.testing.assert_allclose(s["mean_halt_step"], g["steps_used"].mean())
    np.testing.assert_allclose(s["exact_rate"], g["exact"].mean())
    for task, part in g:  # the task's calibration error from its bins equals the records'
        ece, n = ledger.records_calibration(part)
        assert n == s.loc[task, "samples"] and math.isclose(ece, s.loc[task, "calibration_error"], rel_tol=1e-9)
    # the same run keeping every 3rd raw record: aggregates unchanged, records a subset at about a third
    run3, _, _ = drive(tmp_path, "reencode", steps=40, forced=False, exploration=0.3, every=3)
    part = load_ledger(run3)
    assert part.attrs["sample_rate"] == pytest.approx(1 / 3)
    assert 0 < len(part) < len(full)
    assert set(part["sample_id"]) <= set(full["sample_id"])
    keep = ledger.kept(full["sample_id"].to_numpy(), full["exit_step"].to_numpy(), 3)
    assert sorted(part["sample_id"]) == sorted(full["sample_id"][keep])
    pd.testing.assert_frame_equal(load_task_stats(run3), stats, check_like=True)


def test_a_resume_drops_exactly_the_exits_it_reruns(tmp_path):
    run, exp, consumed = drive(tmp_path, "reencode", steps=20)
    before = load_task_stats(run)
    # a checkpoint at step 20, more steps after it, then a resume from that checkpoint
    w = TraceWriter(run / TRACE_NAME, {})
    w.ledger_checkpoint(20)
    w.write_ledger([(999, 1, 10, 0, 0, 21, 23, 3, ledger.Q_HALT, 0, 1, 5, 5, 2.0, None, 3)])
    w.commit()
    assert load_task_stats(run).set_index("task").loc[10, "samples"] == before.set_index("task").loc[10, "samples"] + 1
    w.truncate_after(20)
    w.close()
    pd.testing.assert_frame_equal(load_task_stats(run), before, check_like=True)
    assert 999 not in set(load_ledger(run)["sample_id"])


def test_a_version_2_trace_reads_an_empty_ledger(tmp_path):
    """Readers accept every schema version: a trace written before the ledger has no records and no tasks."""
    import sqlite3

    run = tmp_path / "old"
    run.mkdir()
    TraceWriter(run / TRACE_NAME, {"mode": "reencode"}).close()
    with sqlite3.connect(run / TRACE_NAME) as conn:
        for table in ("ledger", "ledger_tasks", "ledger_bins"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute("DELETE FROM meta WHERE key LIKE 'ledger%'")
    got = load_ledger(run)
    assert got.empty and list(got.columns[:4]) == ["sample_id", "puzzle_id", "task", "slot"]
    assert math.isnan(got.attrs["sample_rate"])
    assert load_task_stats(run).empty
