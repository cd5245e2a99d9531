"""Evaluation audits: accuracy at every ACT step, the would-halt step under the training rule, EMA and raw weights
at their cadence, the config hash, all stored in the trace and read back by ``load_eval_audits``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagnostics import load_eval_audits
from diagnostics.trace.eval_audits import COLUMNS, EvalAudit, act_key
from diagnostics.trace.loading import load_evals
from diagnostics.trace.schema import TRACE_NAME
from diagnostics.trace.writer import TraceWriter
from etrm.loss import IGNORE_LABEL
from etrm.train import instrument_setup
from etrm.train.console import Reporter
from etrm.train.evaluate import evaluate


def reference(model, dataset, batch_size: int) -> dict[str, np.ndarray]:
    """Per ACT step exact / token accuracy and would-halt shares, recomputed in numpy from the model's own
    ``evaluate_batch`` (would-halt: the first step with q_halt > 0, else the last)."""
    exact, token, halts = [], [], []
    n = len(dataset)
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n))
        batch = dataset.batch(ids)
        res = model.evaluate_batch(batch)
        preds, labels = res["preds"].numpy(), res["labels"].numpy()
        valid = labels != IGNORE_LABEL
        right = (preds == labels[None]) & valid[None]
        exact.append((right.sum(-1) == valid.sum(-1)[None]) & (valid.sum(-1)[None] > 0))
        token.append(right.sum(-1) / np.maximum(valid.sum(-1)[None], 1))
        says = res["q_halt_logits"].numpy() > 0
        t = preds.shape[0]
        halts.append(np.where(says.any(0), says.argmax(0), t - 1))
    exact_a, token_a, halt_a = np.concatenate(exact, 1), np.concatenate(token, 1), np.concatenate(halts)
    t = exact_a.shape[0]
    return {"exact": exact_a.mean(1), "token": token_a.mean(1),
            "halts": np.bincount(halt_a, minlength=t) / len(halt_a), "halt_step": halt_a.mean() + 1}


@pytest.mark.parametrize("mode", ["reencode", "trm"])
def test_accuracy_at_every_act_step_matches_a_recount(mode: str, make_trainer) -> None:
    trainer = make_trainer(mode, "train.ema=false", "data.heldout_tasks=5")
    for _ in range(6):
        trainer.train_step()
    res = evaluate(trainer.model, trainer.eval_ds, 4, trainer.device, trainer.autocast)  # 4: a ragged last batch
    ref = reference(trainer.model, trainer.eval_ds, 4)
    t = trainer.cfg.max_steps_per_sample
    got = {what: np.array([res[act_key(k, what)] for k in range(1, t + 1)]) for what in ("exact", "token", "halts")}
    for what in got:
        np.testing.assert_allclose(got[what], ref[what], atol=1e-12, err_msg=what)
    assert (ref["halts"] > 0).sum() >= 2, "the staggered Q-head should halt samples at different steps"
    assert res["exact"] == got["exact"][-1] and res["token"] == pytest.approx(got["token"][-1])
    assert res["halt.step"] == pytest.approx(ref["halt_step"]) == pytest.approx((np.arange(1, t + 1) * got["halts"]).sum())


@pytest.mark.parametrize("q_continue, halt_bias, continue_bias, halt_step", [
    (True, 1.0, 2.0, 4),    # q_halt > 0 but below q_continue: the training rule says continue to the last step
    (True, 1.0, 0.5, 1),    # q_halt above q_continue: halt at once
    (False, 1.0, 2.0, 1),   # no Q-continue: q_halt > 0 alone decides
])
def test_would_halt_step_follows_the_training_rule(q_continue, halt_bias, continue_bias, halt_step, make_trainer):
    trainer = make_trainer("reencode", f"act.q_continue={str(q_continue).lower()}", "train.ema=false",
                           staggered=False)
    q = trainer.model.core.q_head
    with torch.no_grad():  # constant logits: zero weights, the biases decide
        q.weight.zero_()
        q.bias.copy_(torch.tensor([halt_bias, continue_bias]))
    res = trainer.evaluate()
    assert res["halt.step"] == halt_step
    assert res[act_key(halt_step, "halts")] == 1.0
    audit = trainer.audit(trainer.eval_weights, res)
    assert audit.halt_rule == ("q_halt > q_continue" if q_continue else "q_halt > 0")


def traced_run(make_trainer, steps: int, *overrides: str):
    trainer = make_trainer("reencode", "train.eval_every=5", *overrides)
    instrument_setup.add_trace(trainer)
    trainer.run(steps, Reporter(steps, live=False))
    return trainer


@pytest.mark.parametrize("ema, raw_every, expected", [
    (True, 2, {5: ["ema"], 10: ["ema", "raw"], 12: ["ema", "raw"]}),  # 10 = 2nd eval; 12 = the last
    (True, 1, {5: ["ema", "raw"], 10: ["ema", "raw"], 12: ["ema", "raw"]}),
    (True, 0, {5: ["ema"], 10: ["ema"], 12: ["ema"]}),
    (False, 2, {5: ["raw"], 10: ["raw"], 12: ["raw"]}),  # without EMA the raw weights are the evaluated ones
])
def test_audits_are_stored_at_their_cadence(ema, raw_every, expected, make_trainer) -> None:
    trainer = traced_run(make_trainer, 12, f"train.ema={str(ema).lower()}", f"train.eval_raw_every={raw_every}")
    audits = load_eval_audits(trainer.run_dir)
    assert list(audits.columns) == list(COLUMNS)
    got = {int(s): sorted(g["weights"].unique()) for s, g in audits.groupby("step")}
    assert got == expected
    t = trainer.cfg.max_steps_per_sample
    assert all(g.tolist() == list(range(1, t + 1)) for _, g in audits.groupby(["step", "weights"])["act_step"])
    assert set(audits["config_hash"]) == {trainer.cfg.digest()} and set(audits["halt_rule"]) == {"q_halt > 0"}
    assert (audits["count"] == len(trainer.eval_ds)).all()
    # The evals table holds what it held before (the per-step figures live in the audit tables only), and the
    # evaluated weights' audit agrees with it.
    evals = load_evals(trainer.run_dir)
    assert not [c for c in evals.columns if c.startswith("act.")]
    main = audits[audits["weights"] == trainer.eval_weights]
    at_max = main[main["act_step"] == t].set_index("step")
    np.testing.assert_allclose(at_max["exact"], evals.loc[at_max.index, "exact"])
    np.testing.assert_allclose(at_max["halt_exact"], evals.loc[at_max.index, "halt.exact"])


def test_raw_and_ema_audits_score_their_own_weights(make_trainer) -> None:
    trainer = traced_run(make_trainer, 12, "train.ema=true", "train.ema_rate=0.5", "train.lr=3e-3")
    audits = load_eval_audits(trainer.run_dir)
    last = audits[audits["step"] == 12]
    t = trainer.cfg.max_steps_per_sample
    raw = evaluate(trainer.model, trainer.eval_ds, 8, trainer.device, trainer.autocast)
    ema = trainer.evaluate()
    for weights, res in (("raw", raw), ("ema", ema)):
        rows = last[last["weights"] == weights].sort_values("act_step")
        np.testing.assert_allclose(rows["token"], [res[act_key(k, "token")] for k in range(1, t + 1)], atol=1e-12)
        np.testing.assert_allclose(rows["halt_share"], [res[act_key(k, "halts")] for k in range(1, t + 1)])
    # the two really are different weights (a broken copy would give two equal audits)
    assert not np.allclose(last[last["weights"] == "raw"]["token"], last[last["weights"] == "ema"]["token"])


def test_config_hash_names_the_config(make_trainer) -> None:
    a, b = make_trainer("reencode"), make_trainer("reencode", "train.lr=2e-3")
    assert a.cfg.digest() == make_trainer("reencode").cfg.digest()
    assert a.cfg.digest() != b.cfg.digest() and len(a.cfg.digest()) == 12


def audit(step: int, weights: str = "ema", t: int = 3) -> EvalAudit:
    values = {"count": 10.0, "halt.exact": 0.5, "halt.token": 0.7, "halt.step": 2.0,
              **{act_key(k, w): 0.1 * k for k in range(1, t + 1) for w in ("exact", "token", "halts")}}
    return EvalAudit.from_values(step, weights, values, "abc", "q_halt > 0")


def test_a_resume_truncates_the_audits_past_its_checkpoint(tmp_path) -> None:
    w = TraceWriter(tmp_path / TRACE_NAME, {"mode": "reencode"})
    w.write_eval_audits([audit(5), audit(5, "raw"), audit(10)])
    w.commit()
    assert sorted(set(load_eval_audits(tmp_path)["step"])) == [5, 10]
    w.truncate_after(6)
    w.close()
    got = load_eval_audits(tmp_path)
    assert sorted(set(got["step"])) == [5] and len(got) == 6
    assert got["act_step"].tolist() == [1, 2, 3, 1, 2, 3] and got["weights"].tolist() == ["ema"] * 3 + ["raw"] * 3


def test_a_trace_before_schema_3_reads_as_no_audits(tmp_path) -> None:
    w = TraceWriter(tmp_path / TRACE_NAME, {"mode": "reencode"})
    w.conn.execute("DROP TABLE eval_audits")
    w.conn.execute("DROP TABLE eval_act_steps")
    w.conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    w.close()
    got = load_eval_audits(tmp_path)
    assert got.empty and list(got.columns) == list(COLUMNS)
