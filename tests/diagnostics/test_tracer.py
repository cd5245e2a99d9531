"""The tracer: exact counters per step, no host sync in the traced path, flat memory, rows in SQLite."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diagnostics.probes import default_probes
from diagnostics.session import RunSpec, trace_run
from diagnostics.trace.writer import TraceWriter
from diagnostics.probes.tracer import Tracer
from etrm.config import Config
from etrm.train import instrument_setup, instruments
from etrm.train.trainer import Trainer

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")

TINY = {
    "arch": {"hidden_size": 16, "num_heads": 2, "L_layers": 1, "H_cycles": 2, "L_cycles": 1, "puzzle_emb_len": 2},
    "encoder": {"num_layers": 1},
    "act": {"halt_max_steps": 3, "halt_exploration_prob": 0.5},
    "fct": {"steps": 3},
    "data": {"canvas": 4, "min_grid": 2, "max_grid": 3, "train_tasks": 8, "heldout_tasks": 2, "num_demos": 2,
             "families": ["recolour"]},
    "train": {"batch_size": 6, "eval_batch_size": 6, "trace_every": 5, "eval_every": 1000,
              "checkpoint_every": 1000, "ema": False},
}


def make_trainer(tmp_path, model="etrm", mode="reencode", fault="none", **train) -> Trainer:
    data = {k: dict(v) for k, v in TINY.items()}
    data["train"].update(train)
    cfg = Config.from_dict({"model": model, "fault": fault, "encoder": {**data.pop("encoder"), "mode": mode}, **data})
    trainer = Trainer(cfg, tmp_path / "run", device=torch.device("cpu"))
    (tmp_path / "run").mkdir(parents=True)
    instrument_setup.add_trace(trainer)
    return trainer


class FailOnSync(TorchDispatchMode):
    """Fails on any op that reads a device value back to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(op) for op in SYNC_OPS):
            raise AssertionError(f"host sync inside the traced step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model,mode", [("etrm", "reencode"), ("etrm", "fct"), ("trm", "reencode")])
def test_traced_step_adds_no_host_sync(tmp_path, model, mode):
    """Forward, loss, probes, backward (with the coverage hooks) and the grad-norm probe: no sync at all."""
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, model, mode)
    tracer = trainer.instruments.find(instruments.Trace).tracer
    for _ in range(3):
        batch = trainer.next_batch()  # the sampler's read of the reset mask is the trainer's, outside the step
        with FailOnSync():
            carry, out, events = trainer.model(trainer.carry, batch)
            loss, metrics = trainer.loss_fn(out, events)
            tracer.on_step(trainer.step, events, metrics)
            loss.backward()
            tracer.after_backward()
        trainer.carry = carry
        trainer.step += 1
        trainer.model.zero_grad()
    rows = tracer.flush()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["coverage_num"] == r["coverage_den"] == 6 for r in rows)
    # the encoder's gradient norm; TRM's is its looked-up puzzle-table rows' (its table is a buffer, not a parameter)
    assert all(r["grad_norm_encoder"] > 0 and r["grad_norm_rest"] > 0 for r in rows), rows
    tracer.close()


def test_the_sync_detector_does_fire():
    with pytest.raises(AssertionError, match="host sync"):
        with FailOnSync():
            torch.ones(3).sum().item()


def run_steps(trainer: Trainer, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        trainer.train_step()
        if trainer.step % trainer.cfg.train.trace_every == 0:
            rows += trainer.instruments.flush_rows()
    return rows


def test_cached_coverage_equals_reset_fraction_and_reencode_is_full(tmp_path):
    torch.manual_seed(1)
    cached = run_steps(make_trainer(tmp_path / "c", mode="cached"), 15)
    assert any(r["resets"] < r["slots"] for r in cached)
    for r in cached:
        assert r["coverage_num"] == r["resets"] == r["encoded"] == r["encode_needed"]
    torch.manual_seed(1)
    reencode = run_steps(make_trainer(tmp_path / "r", mode="reencode"), 15)
    assert all(r["coverage_num"] == r["coverage_den"] == r["encoded"] for r in reencode)


def test_encode_full_batch_shows_wasted_work_but_reset_coverage(tmp_path):
    torch.manual_seed(2)
    rows = run_steps(make_trainer(tmp_path, mode="cached", fault="encode-full-batch"), 10)
    assert all(r["encoded"] == r["slots"] for r in rows)
    assert all(r["coverage_num"] == r["resets"] == r["encode_needed"] for r in rows)
    assert any(r["encode_needed"] < r["encoded"] for r in rows)


def test_label_from_batch_counts_every_continuing_real_slot(tmp_path):
    torch.manual_seed(3)
    rows = run_steps(make_trainer(tmp_path, fault="label-from-batch"), 10)
    for r in rows:
        assert r["label_mismatch"] == r["aligned_den"] - r["resets"]
    assert sum(r["label_mismatch"] for r in rows) > 0


def test_trm_sampler_counts_dropped_samples(tmp_path):
    torch.manual_seed(4)
    trainer = make_trainer(tmp_path, sampler="trm")
    rows = run_steps(trainer, 10)
    assert sum(r["samples_dropped"] for r in rows) == trainer.samples_dropped > 0
    assert all(r["samples_dropped"] == r["slots"] - r["resets"] for r in rows)


def test_rows_reach_sqlite_and_halting_histogram_adds_up(tmp_path):
    torch.manual_seed(5)
    trainer = make_trainer(tmp_path)
    rows = run_steps(trainer, 10)
    trainer.instruments.find(instruments.Trace).tracer.close()
    db = sqlite3.connect(tmp_path / "run" / "trace.sqlite")
    stored = db.execute("SELECT step, halted, halt_at_1, halt_at_2, halt_at_3, resets FROM steps ORDER BY step").fetchall()
    assert [s[0] for s in stored] == list(range(1, 11))
    for step, halted, h1, h2, h3, _ in stored:
        assert halted == h1 + h2 + h3
    # every slot that halts at step k is reset at step k+1
    for (_, halted, *_), (_, _, _, _, _, resets_next) in zip(stored, stored[1:]):
        assert resets_next == halted
    phases = {p for (p,) in db.execute("SELECT DISTINCT phase FROM timings")}
    assert {"data", "h2d", "encoder", "inner", "loss", "backward", "optimizer", "trace"} <= phases
    assert len(rows) == 10


def test_tracer_memory_is_flat(tmp_path):
    """The device buffer and host lists do not grow with the number of steps (flushed every N)."""
    writer = TraceWriter(tmp_path / "t.sqlite")
    torch.manual_seed(6)
    trainer = make_trainer(tmp_path)
    tracer = Tracer(default_probes(3), writer, torch.device("cpu"), capacity=5)
    trainer.instruments[:] = [instruments.OnStep(tracer.on_step)]
    sizes = []
    for _ in range(4):
        for _ in range(5):
            trainer.train_step()
        tracer.flush()
        sizes.append((tracer.buffer.numel(), len(tracer.steps), len(tracer.rows), len(tracer.clocks)))
    assert len(set(sizes)) == 1 and sizes[0][1:] == (0, 0, 0)
    tracer.close()


# ----------------------------------------------------------------------------------------------------------------
# The own-loop session (diagnostics.session) on code that is not etrm's: the same no-sync rule

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_loop"


@pytest.mark.parametrize("variant", ["healthy", "labels-from-batch", "full-batch-encode", "cached"])
def test_own_loop_traced_step_adds_no_host_sync(tmp_path, monkeypatch, variant):
    """The example's upstream-shaped loop through the session: building the events, the probes, backward with the
    coverage hook (caught by a forward hook on the encoder) and ``after_backward`` read nothing back. The ``cached``
    model's subset encode (a boolean index) is the model's own sync, so its forward runs outside the detector."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from act_loss import ACTLossHead
    from pretrain import MODE, VARIANTS
    from tasks import FewShotTasks, TaskConfig, upstream_feed
    from tiny_etrm import ModelConfig, TinyETRM

    torch.manual_seed(0)
    encoder, labels_from_batch = VARIANTS[variant]
    data = FewShotTasks(TaskConfig())
    model = TinyETRM(ModelConfig(vocab=data.cfg.colours, seq_len=data.cfg.seq_len, encoder=encoder))
    head = ACTLossHead(model, labels_from_batch=labels_from_batch)
    batches = upstream_feed(data, 6)
    carry = head.initial_carry(next(batches))
    spec = RunSpec(model="tiny-etrm", mode=MODE[encoder], batch_size=6, max_steps=100, max_steps_per_sample=4,
                   trace_every=50)
    run = trace_run(tmp_path / "run", spec, model, encoder=model.encoder)
    for _ in range(6):
        batch = next(batches)
        with contextlib.nullcontext() if encoder == "cached" else FailOnSync():
            new, loss, metrics, outputs = head(carry, batch)
        with FailOnSync():
            run.step(carry, new, batch, outputs, loss, labels=outputs["labels"], terms=metrics)
            loss.backward()
            assert run.after_backward() == []  # no flush due: nothing read back
        carry = new
        model.zero_grad()
    rows = run.tracer.flush()
    run.close()
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["resets"] for r in rows] == [6, 0, 0, 0, 6, 0]  # the untrained Q-head never halts: max steps 4
    for r in rows:
        fresh = r["resets"] if encoder != "reencode" else 6
        assert r["coverage_num"] == fresh and r["encode_needed"] == fresh
        assert r["encoded"] == (6 if encoder != "cached" else fresh)
        assert r["label_mismatch"] == (6 - r["resets"] if labels_from_batch else 0)
        assert r["grad_norm_encoder"] > 0 or fresh == 0


def test_session_on_a_dict_carry_trm_model_adds_no_host_sync(tmp_path, monkeypatch):
    """``CarryShape``'s defaults read upstream's dict carry too (tests/properties' ToyACT, TRM-like: a puzzle
    embedding, no encoder): its looked-up rows get gradient in every slot, read without a sync."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "properties"))
    import torch.nn.functional as F
    from example_user_model import ToyAdapter

    torch.manual_seed(0)
    toy = ToyAdapter(batch_size=5)
    model = toy.model
    spec = RunSpec(model="toy", mode="trm", batch_size=5, max_steps=100, max_steps_per_sample=model.max_steps,
                   trace_every=50)
    run = trace_run(tmp_path / "run", spec, model, encoder=model.puzzle)
    carry = model.initial_carry(toy.make_batch([-1] * 5))
    for step in range(4):
        batch = toy.make_batch(list(range(5 * step, 5 * step + 5)))  # upstream's feed: fresh everywhere
        new, outputs = model(carry, batch)
        labels = new["current_data"]["labels"]
        with FailOnSync():
            loss = F.cross_entropy(outputs["logits"].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum")
            run.step(carry, new, batch, outputs, loss, labels=labels)
            loss.backward()
            run.after_backward()
        carry = new
        model.zero_grad()
    rows = run.tracer.flush()
    run.close()
    assert all(r["coverage_num"] == r["coverage_den"] == 5 for r in rows)
    assert all(1 <= r["puzzle_ids_with_grad"] <= 5 for r in rows) and sum(r["label_mismatch"] for r in rows) == 0
