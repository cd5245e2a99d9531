"""ARC voting: pass@K on hand-made predictions (denominator = tasks evaluated), submission format, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from etrm.cli import main
from etrm.train.evaluate import ArcVotes

A = np.array([[1, 2], [3, 4]], np.uint8)
B = np.array([[5]], np.uint8)
C = np.array([[0, 0, 7]], np.uint8)
D = np.array([[9, 9]], np.uint8)

TRUTHS = {("t1", 0): A, ("t2", 0): B, ("t2", 1): C, ("t3", 0): D, ("t4", 0): A}
NUM_TESTS = {"t1": 1, "t2": 2, "t3": 1, "t4": 1}


def test_pass_at_k_with_votes_and_q_tiebreak():
    v = ArcVotes()
    # t1: the right answer wins the vote -> pass@1.
    v.add("t1", 0, A, 0.1); v.add("t1", 0, A, 0.1); v.add("t1", 0, B, 0.9)
    # t2: test 0 right at rank 2 (tie on votes, lower q); test 1 wrong -> pass@1 0, pass@2 0.5.
    v.add("t2", 0, D, 0.9); v.add("t2", 0, B, 0.2); v.add("t2", 1, D, 0.5)
    # t3: right answer third -> 0 at both K.
    v.add("t3", 0, A, 0.9); v.add("t3", 0, A, 0.9); v.add("t3", 0, B, 0.8); v.add("t3", 0, B, 0.8)
    v.add("t3", 0, D, 0.99)
    # t4 never evaluated: not in the denominator.
    out = v.score(TRUTHS, NUM_TESTS)
    assert out["arc.tasks"] == 3
    assert np.isclose(out["arc.pass@1"], 1 / 3)
    assert np.isclose(out["arc.pass@2"], (1 + 0.5) / 3)


def test_mean_q_breaks_ties():
    v = ArcVotes()
    v.add("t3", 0, A, 0.9); v.add("t3", 0, A, 0.1)  # mean 0.5
    v.add("t3", 0, D, 0.6); v.add("t3", 0, D, 0.6)  # mean 0.6 -> first
    assert v.score(TRUTHS, NUM_TESTS, ks=(1,))["arc.pass@1"] == 1.0


def test_subset_denominator():
    v = ArcVotes()
    v.add("t1", 0, A, 0.5)
    assert v.score(TRUTHS, NUM_TESTS)["arc.pass@1"] == 1.0  # one task evaluated, solved: 100%, not 1/4


def test_submission_format():
    v = ArcVotes()
    v.add("t2", 0, B, 0.5); v.add("t2", 0, D, 0.4)
    sub = v.submission(NUM_TESTS)
    assert list(sub) == ["t2"] and len(sub["t2"]) == 2
    assert sub["t2"][0] == {"attempt_1": [[5]], "attempt_2": [[9, 9]]}
    assert sub["t2"][1] == {"attempt_1": [[0]], "attempt_2": [[0]]}


def test_arc_run_writes_submission(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code = main(["--preset", "arc1-small", "--run-dir", str(run), "arch.hidden_size=16", "arch.num_heads=2",
                 "arch.L_layers=1", "arch.L_cycles=1", "arch.H_cycles=1", "data.canvas=6", "data.num_aug=1",
                 "data.max_train_tasks=6", "data.max_eval_tasks=3", "train.max_steps=2", "train.batch_size=4",
                 "train.eval_batch_size=8"])
    assert code == 0
    sub = json.loads((run / "submission.json").read_text())
    assert 1 <= len(sub) <= 3
    for entries in sub.values():
        for e in entries:
            assert set(e) == {"attempt_1", "attempt_2"}
