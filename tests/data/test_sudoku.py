"""Generated Sudoku: unique solutions, givens as asked, shuffles keep validity; upstream tokens."""

from __future__ import annotations

import numpy as np

from etrm.data.sudoku import build_sudoku, count_solutions, generate_puzzle, is_valid_solution, shuffle


def test_every_generated_puzzle_has_exactly_one_solution():
    for i in range(12):
        rng = np.random.default_rng(i)
        givens = (30, 36, 45)[i % 3]
        puzzle, solution = generate_puzzle(rng, givens)
        assert int((puzzle > 0).sum()) == givens
        assert count_solutions(puzzle) == 1
        assert is_valid_solution(solution)
        assert np.array_equal(puzzle[puzzle > 0], solution[puzzle > 0])


def test_solver_counts_multiple_and_none():
    empty = np.zeros((9, 9), np.uint8)
    assert count_solutions(empty, 2) == 2
    bad = empty.copy()
    bad[0, 0] = bad[0, 1] = 5
    assert count_solutions(bad) == 0


def test_shuffles_preserve_validity_and_uniqueness():
    rng = np.random.default_rng(3)
    puzzle, solution = generate_puzzle(rng, 32)
    for _ in range(20):
        p, s = shuffle(puzzle, solution, rng)
        assert is_valid_solution(s)
        assert count_solutions(p) == 1
        assert np.array_equal(p[p > 0], s[p > 0])
        assert int((p > 0).sum()) == 32


def test_tokens_and_ids():
    train, test, info = build_sudoku(3, 2, 40, 2, seed=0)
    assert len(train) == 9 and len(test) == 2
    assert train.inputs.shape[1] == 81 and train.inputs.min() >= 1 and train.inputs.max() <= 10
    assert train.labels.min() >= 2 and train.labels.max() <= 10  # every cell supervised, digits 2..10
    assert set(train.puzzle_ids.tolist()) == {1} and set(test.puzzle_ids.tolist()) == {1}
    assert ((train.inputs == 1) | (train.inputs == train.labels)).all()


def test_cli_trains_on_sudoku(tmp_path, monkeypatch):
    from etrm.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "sudoku", "--run-dir", str(tmp_path / "run"), "data.train_tasks=3",
                 "data.heldout_tasks=2", "data.givens=40", "data.num_aug=1", "arch.hidden_size=16",
                 "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.H_cycles=1", "train.max_steps=2",
                 "train.batch_size=4", "train.eval_batch_size=4"]) == 0
