"""Generated Maze-Hard: labels are BFS shortest paths, walls and endpoints kept, deterministic, hard; valid-path
scoring accepts any shortest path and nothing longer; the CPU preset trains traced."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from etrm.data.maze import (
    GOAL, HARD_MIN_PATH, MAZE_VOCAB, OPEN, PATH, START, VALID_PATH_KEY, WALL, MazeSpec, build_maze, generate_maze,
    generate_split, hard_min_path, load_or_generate, valid_shortest_path,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test caches into its own folder, never ./data."""
    monkeypatch.setenv("ETRM_DATA_CACHE", str(tmp_path / "cache"))


def _bfs_distance(grid: np.ndarray, passable: np.ndarray) -> int:
    """Independent BFS by whole-frontier dilation: moves from S to G over ``passable`` cells (-1 if unreachable)."""
    start, goal = grid == START, grid == GOAL
    seen, frontier, d = start.copy(), start.copy(), 0
    while frontier.any():
        if (frontier & goal).any():
            return d
        grow = np.zeros_like(frontier)
        grow[1:] |= frontier[:-1]
        grow[:-1] |= frontier[1:]
        grow[:, 1:] |= frontier[:, :-1]
        grow[:, :-1] |= frontier[:, 1:]
        frontier = grow & passable & ~seen
        seen |= frontier
        d += 1
    return -1


def _mazes(side: int, count: int, seed: int = 0):
    for i in range(count):
        yield generate_maze(np.random.default_rng([seed, i]), side, hard_min_path(side))


@pytest.mark.parametrize("side", [10, 30])
def test_every_maze_label_is_a_shortest_path(side):
    for x, y in _mazes(side, 6 if side == 30 else 20):
        shortest = _bfs_distance(x, x != WALL)
        path = y == PATH
        assert shortest > 0 and int(path.sum()) == shortest - 1
        # The marked cells alone (with G) carry S to G in exactly the shortest distance: a connected shortest route.
        assert _bfs_distance(y, path | (y == GOAL)) == shortest


def test_maze_walls_and_endpoints_are_kept():
    for x, y in _mazes(30, 4):
        assert set(np.unique(x).tolist()) <= {WALL, OPEN, START, GOAL}
        assert (x == START).sum() == 1 and (x == GOAL).sum() == 1
        changed = x != y
        assert (x[changed] == OPEN).all() and (y[changed] == PATH).all()
        assert np.array_equal(x == WALL, y == WALL)


def test_maze_generator_is_deterministic_per_seed():
    spec = MazeSpec(side=10, min_path=12, train=12, test=5, seed=3)
    a, b = generate_split(spec, 0, 12), generate_split(spec, 0, 12)  # generated twice, no cache involved
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], generate_split(MazeSpec(side=10, min_path=12, seed=4), 0, 12)[0])
    assert np.array_equal(generate_split(spec, 0, 6)[0], a[0][:6])  # maze i does not depend on the count
    arrays = load_or_generate(spec)[0]
    assert np.array_equal(arrays["train_inputs"], a[0])
    rows = {r.tobytes() for r in a[0]}
    assert len(rows) == 12 and not rows & {r.tobytes() for r in arrays["test_inputs"]}  # distinct, splits disjoint


def test_maze_hardness_threshold_holds():
    assert hard_min_path(30) == HARD_MIN_PATH == 110 and hard_min_path(10) == 12
    spec = MazeSpec(side=30, train=8, test=4)
    arrays = load_or_generate(spec)[0]
    for split in ("train", "test"):
        for x in arrays[f"{split}_inputs"]:
            assert _bfs_distance(x.reshape(30, 30), x.reshape(30, 30) != WALL) >= 110
    for x, _ in [generate_maze(np.random.default_rng(i), 12, 40) for i in range(5)]:
        assert _bfs_distance(x, x != WALL) >= 40
    with pytest.raises(ValueError, match="min_path"):
        generate_maze(np.random.default_rng(0), 4, 30)


def _open_room() -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 room without walls but one, S top-left, G two right and two down: several shortest paths (4 moves)."""
    x = np.full((4, 4), OPEN, np.uint8)
    x[0, 0], x[2, 2], x[3, 0] = START, GOAL, WALL
    y = x.copy()
    y[0, 1] = y[0, 2] = y[1, 2] = PATH  # right, right, down, down
    return x, y


def _score(x, y, p) -> bool:
    return bool(valid_shortest_path(x[None].reshape(1, -1), y[None].reshape(1, -1), p[None].reshape(1, -1))[0])


def test_maze_valid_path_scoring_accepts_an_alternative_shortest_path_and_rejects_a_longer_one():
    x, y = _open_room()
    assert _bfs_distance(x, x != WALL) == 4
    assert _score(x, y, y)
    alt = x.copy()
    alt[1, 0] = alt[1, 1] = alt[2, 1] = PATH  # down, right, down, right: another shortest path, not the label
    assert not np.array_equal(alt, y) and _score(x, y, alt)
    longer = x.copy()
    longer[0, 1] = longer[0, 2] = longer[0, 3] = longer[1, 3] = longer[2, 3] = PATH  # 6 moves
    assert _bfs_distance(longer, (longer == PATH) | (longer == GOAL)) == 6 and not _score(x, y, longer)
    stray = y.copy()
    stray[3, 3] = PATH  # the label's shortest path plus one cell off it: not a path any more
    assert not _score(x, y, stray)
    broken = x.copy()
    broken[0, 1] = broken[1, 1] = broken[2, 0] = PATH  # right number of cells, not a connected route
    assert not _score(x, y, broken)
    through_wall = x.copy()
    through_wall[1, 0] = through_wall[2, 0] = through_wall[3, 1] = PATH
    through_wall[3, 0] = PATH  # a wall overwritten
    assert not _score(x, y, through_wall)
    moved_goal = alt.copy()
    moved_goal[2, 2], moved_goal[3, 3] = OPEN, GOAL
    assert not _score(x, y, moved_goal)


class _Fixed:
    """A stand-in model whose every ACT step predicts the given rows (evaluation's scoring is what is tested)."""

    def __init__(self, preds: np.ndarray, steps: int = 2) -> None:
        self.preds, self.steps = torch.as_tensor(preds, dtype=torch.long), steps
        self.max_steps = steps  # evaluation audits every ACT step up to the model's maximum

    def evaluate_batch(self, batch):
        ids = batch["sample_id"].clamp_min(0)
        p = self.preds[ids]
        return {"labels": batch["labels"], "preds": p.expand(self.steps, *p.shape),
                "q_halt_logits": torch.full((self.steps, len(ids)), -1.0)}


def test_maze_evaluation_reports_exact_label_and_valid_shortest_path_accuracy():
    from contextlib import nullcontext

    from etrm.data.dataset import GridDataset
    from etrm.data.maze import MazeScorer
    from etrm.train.evaluate import evaluate

    x, y = _open_room()
    alt = x.copy()
    alt[1, 0] = alt[1, 1] = alt[2, 1] = PATH
    ds = GridDataset(np.stack([x.reshape(-1)] * 3), np.stack([y.reshape(-1)] * 3).astype(np.int16),
                     np.ones(3, np.int32), row_scorer=MazeScorer())
    preds = np.stack([y.reshape(-1), alt.reshape(-1), x.reshape(-1)])  # the label, another shortest path, no path
    out = evaluate(_Fixed(preds), ds, 2, torch.device("cpu"), nullcontext)
    assert out["exact"] == pytest.approx(1 / 3)
    assert out[VALID_PATH_KEY] == pytest.approx(2 / 3) and out["halt." + VALID_PATH_KEY] == pytest.approx(2 / 3)


def test_maze_set_is_cached_and_rebuilt_when_broken(tmp_path):
    spec = MazeSpec(side=10, min_path=12, train=5, test=3, seed=1)
    first, cached = load_or_generate(spec)
    files = list((tmp_path / "cache").glob("maze-*.npz"))
    assert not cached and len(files) == 1
    again, cached = load_or_generate(spec)
    assert cached and all(np.array_equal(first[k], again[k]) for k in first)
    files[0].write_bytes(b"not a zip")
    rebuilt, cached = load_or_generate(spec)
    assert not cached and np.array_equal(rebuilt["test_labels"], first["test_labels"])
    assert load_or_generate(spec)[1]  # the broken file was replaced
    assert "/data/" in (Path(__file__).parents[2] / ".gitignore").read_text()  # the default ./data/cache: ignored


def test_maze_datasets_tokens_ids_and_dihedral_variants():
    train, test, info = build_maze(MazeSpec(side=10, min_path=12, train=4, test=3), num_aug=7)
    assert len(train) == 32 and len(test) == 3 and train.seq_len == 100
    assert train.inputs.max() < MAZE_VOCAB and train.labels.min() >= WALL  # every cell supervised
    assert set(train.puzzle_ids.tolist()) == {1} == set(test.puzzle_ids.tolist())
    assert test.row_scorer is not None and train.row_scorer is None
    for xr, yr in zip(train.inputs, train.labels):  # a rotated or flipped maze keeps a shortest-path label
        x, y = xr.reshape(10, 10), yr.reshape(10, 10)
        assert int((y == PATH).sum()) + 1 == _bfs_distance(x, x != WALL) >= 12
    assert "maze: 10x10" in info["line"] and "cached" in info["line"]


def _one_line(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("etrm-train: error:"), err
    for n in needles:
        assert n in err[0], err[0]


def test_maze_bad_settings_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from etrm.cli import main
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, main(["--preset", "maze-small", "model=etrm"]), "no demo pairs", "model=trm")
    _one_line(capsys, main(["--preset", "maze-small", "data.num_aug=8"]), "data.num_aug=8", "0..7")
    _one_line(capsys, main(["--preset", "maze-small", "data.canvas=2"]), "data.canvas=2", "4..64")
    _one_line(capsys, main(["--preset", "maze-small", "data.min_path=-1"]), "data.min_path=-1", ">= 0")
    _one_line(capsys, main(["--preset", "maze-small", "data.canvas=4", "data.min_path=40", "data.train_tasks=1"]),
              "min_path")
    assert not (tmp_path / "runs").exists()


def test_maze_small_preset_trains_traced_on_cpu(tmp_path, monkeypatch, capsys):
    """`etrm-train --preset maze-small --max-steps 5 --trace` (fewer test mazes, to keep the suite quick); the
    evaluation stores both accuracies beside the other eval figures; the doctor and the dashboard read the run."""
    from diagnostics.cli import main as doctor
    from etrm.cli import main
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["--preset", "maze-small", "--max-steps", "5", "--trace", "--run-dir", str(run),
                 "data.heldout_tasks=16", "train.eval_batch_size=16"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console width
    assert "maze valid shortest path" in out and "held-out valid shortest path" in out  # eval line, summary
    with sqlite3.connect(run / "trace.sqlite") as conn:
        evals = dict(conn.execute("SELECT name, value FROM evals WHERE step = 5").fetchall())
    assert {"exact", VALID_PATH_KEY, "halt." + VALID_PATH_KEY} <= set(evals) and evals["count"] == 16
    assert evals[VALID_PATH_KEY] >= evals["exact"]  # an exact label is a valid shortest path
    assert doctor([str(run)]) in (0, 1)
    from dashboards.figures.overview import MAZE_VALID_PATH
    from dashboards.run_view import tab_figures
    from dashboards.runs import Runs
    assert MAZE_VALID_PATH == VALID_PATH_KEY
    acc = tab_figures(Runs(tmp_path).get("run"), "overview")["accuracy"]
    assert {"held-out", "held-out valid shortest path (maze)"} <= {t.get("name") for t in acc["data"]}
