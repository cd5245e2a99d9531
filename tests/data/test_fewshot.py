"""Families, task generation, the ETRM and TRM views, and GridDataset's batch gather."""

import numpy as np
import pytest
import torch

from etrm.data.dataset import GridDataset
from etrm.data.families import FAMILY_NAMES, dihedral, get_family, inverse_dihedral
from etrm.data.fewshot import FewShotConfig, build_fewshot, etrm_view, generate_tasks
from etrm.data.tokens import IGNORE_LABEL, PAD, decode_grid, encode_grid, labels_from_tokens

SMALL = dict(train_tasks=24, heldout_tasks=12, num_demos=3, num_queries=2, canvas=8, min_grid=3, max_grid=8)


def rows_of(arr: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(arr).reshape(-1, arr.shape[-1])}


# --- families --------------------------------------------------------------------------------------------------------

def test_at_least_eight_families():
    assert len(FAMILY_NAMES) >= 8 and len(set(FAMILY_NAMES)) == len(FAMILY_NAMES)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("canvas,min_grid,max_grid", [(8, 3, 8), (5, 3, 5)])
def test_family_outputs_fit_and_mostly_differ(name, canvas, min_grid, max_grid):
    family = get_family(name)
    rng = np.random.default_rng(123)
    differ = total = 0
    rules = set()
    for _ in range(40):
        rule = family.sample_rule(rng)
        rules.add(repr(rule))
        for _ in range(3):
            inp, out = family.sample_pair(rng, rule, canvas, min_grid, max_grid)
            assert inp.ndim == out.ndim == 2 and out.dtype == np.uint8
            assert 1 <= min(out.shape) and max(out.shape) <= canvas and max(inp.shape) <= max_grid
            assert out.max() <= 9 and inp.max() <= 9
            np.testing.assert_array_equal(decode_grid(encode_grid(out, canvas), canvas), out)
            total += 1
            differ += inp.shape != out.shape or not np.array_equal(inp, out)
    assert len(rules) > 1, "rule parameters must be random"
    assert differ / total >= 0.9, f"{name}: only {differ}/{total} outputs differ from their inputs"


def test_family_rules_are_deterministic_in_the_rng():
    for name in FAMILY_NAMES:
        fam = get_family(name)
        a = fam.sample_rule(np.random.default_rng(5))
        assert a == fam.sample_rule(np.random.default_rng(5))


@pytest.mark.parametrize("tid", range(8))
def test_dihedral_inverse(tid):
    g = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(dihedral(dihedral(g, tid), inverse_dihedral(tid)), g)
    assert len({dihedral(g, t).tobytes() + bytes(dihedral(g, t).shape) for t in range(8)}) == 8


def test_family_semantics_on_known_grids():
    g = np.array([[1, 0, 0], [0, 2, 0], [3, 0, 0]], dtype=np.uint8)
    gravity = get_family("gravity").apply
    np.testing.assert_array_equal(gravity({"direction": "down"}, g), [[0, 0, 0], [1, 0, 0], [3, 2, 0]])
    np.testing.assert_array_equal(gravity({"direction": "right"}, g), [[0, 0, 1], [0, 0, 2], [0, 0, 3]])
    np.testing.assert_array_equal(gravity({"direction": "left"}, g.T), [[1, 3, 0], [2, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(gravity({"direction": "up"}, g[::-1]), [[3, 2, 0], [1, 0, 0], [0, 0, 0]])
    translate = get_family("translate").apply
    np.testing.assert_array_equal(translate({"dy": 1, "dx": -1, "wrap": False}, g), [[0, 0, 0], [0, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(translate({"dy": 1, "dx": 0, "wrap": True}, g), g[[2, 0, 1]])
    ring = np.array([[4, 4, 4, 0], [4, 0, 4, 0], [4, 4, 4, 0], [0, 0, 0, 0]], dtype=np.uint8)
    filled = get_family("fill_enclosed").apply({"colour": 7}, ring)
    assert filled[1, 1] == 7 and np.count_nonzero(filled != ring) == 1
    blobs = np.array([[5, 0, 5, 5], [0, 0, 0, 5], [5, 5, 0, 0]], dtype=np.uint8)
    by_size = get_family("recolour_by_size").apply({"palette": [1, 2, 3]}, blobs)
    np.testing.assert_array_equal(by_size, [[1, 0, 3, 3], [0, 0, 0, 3], [2, 2, 0, 0]])
    crop = get_family("crop_object").apply({"colour": 6}, np.array([[0, 0, 0], [0, 6, 1], [0, 0, 6]]))
    np.testing.assert_array_equal(crop, [[6, 1], [0, 6]])
    mirror = get_family("mirror_concat").apply({"axis": 1}, np.array([[1, 2]]))
    np.testing.assert_array_equal(mirror, [[1, 2, 2, 1]])
    up = get_family("upscale").apply({"fy": 2, "fx": 1}, np.array([[1, 2]]))
    np.testing.assert_array_equal(up, [[1, 2], [1, 2]])
    cmap = get_family("colour_map").sample_rule(np.random.default_rng(0))["perm"]
    assert cmap[0] == 0 and sorted(cmap) == list(range(10)) and all(cmap[c] != c for c in range(1, 10))


# --- generation ------------------------------------------------------------------------------------------------------

def test_config_validation():
    with pytest.raises(ValueError, match="unknown task family"):
        FewShotConfig(families=("nope",))
    with pytest.raises(ValueError, match="min_grid <= max_grid <= canvas"):
        FewShotConfig(min_grid=5, max_grid=4)
    with pytest.raises(ValueError, match="held out"):
        FewShotConfig(families=("gravity",), heldout_families=("gravity",))


def test_tasks_follow_their_rule_and_ids():
    cfg = FewShotConfig(seed=3, **SMALL)
    train, heldout = generate_tasks(cfg)
    assert len(train) == 24 and len(heldout) == 12
    assert [t.puzzle_id for t in train + heldout] == list(range(1, 37))
    for t in train + heldout:
        assert len(t.demos) == 3 and len(t.queries) == 2
        fam = get_family(t.family)
        for a, b in t.pairs:
            np.testing.assert_array_equal(fam.apply(t.rule, a), b)
    assert {t.family for t in train} == set(FAMILY_NAMES)


def test_same_seed_same_arrays_different_seed_different():
    for view in ("etrm", "trm"):
        a = build_fewshot(FewShotConfig(seed=1, **SMALL), view)
        b = build_fewshot(FewShotConfig(seed=1, **SMALL), view)
        c = build_fewshot(FewShotConfig(seed=2, **SMALL), view)
        for ds_a, ds_b, ds_c in zip(a[:2], b[:2], c[:2]):
            for name in ("inputs", "labels", "puzzle_ids", "demo_inputs", "demo_outputs", "demo_mask"):
                x, y = getattr(ds_a, name), getattr(ds_b, name)
                assert (x is None and y is None) or np.array_equal(x, y), name
            assert ds_a.inputs.shape != ds_c.inputs.shape or not np.array_equal(ds_a.inputs, ds_c.inputs)
        assert a[2] == b[2]


def test_heldout_inputs_never_seen_in_training():
    cfg = FewShotConfig(seed=0, num_aug=2, **SMALL)
    train, heldout = generate_tasks(cfg)
    train_inputs = {a.tobytes() + bytes(a.shape) for t in train for a, _ in t.pairs}
    for t in heldout:
        for a, _ in t.pairs:
            assert a.tobytes() + bytes(a.shape) not in train_inputs


def test_heldout_families_only_in_heldout():
    cfg = FewShotConfig(seed=0, heldout_families=("upscale", "gravity"), **SMALL)
    train, heldout = generate_tasks(cfg)
    assert not {t.family for t in train} & {"upscale", "gravity"}
    assert {"upscale", "gravity"} <= {t.family for t in heldout}


def test_augmented_variants():
    cfg = FewShotConfig(seed=4, num_aug=3, **SMALL)
    train, heldout = generate_tasks(cfg)
    assert len(train) == 24 * 4
    assert len({t.puzzle_id for t in train + heldout}) == len(train) + len(heldout)
    for i in range(0, len(train), 4):
        base, variants = train[i], train[i + 1:i + 4]
        assert base.aug is None and all(v.aug is not None and v.group == base.group for v in variants)
        keys = {b"".join(x.tobytes() + bytes(x.shape) for p in t.pairs for x in p) for t in [base] + variants}
        assert len(keys) == 4, "variants must differ from the base and from each other"
        for v in variants:
            assert v.aug.perm[0] == 0 and sorted(v.aug.perm) == list(range(10))
            for (a, b), (va, vb) in zip(base.pairs, v.pairs):
                np.testing.assert_array_equal(v.aug.apply(a), va)
                np.testing.assert_array_equal(v.aug.apply(b), vb)
    assert all(t.aug is None for t in heldout)


# --- views -----------------------------------------------------------------------------------------------------------

def test_etrm_view_keeps_heldout_out_of_training():
    cfg = FewShotConfig(seed=0, num_aug=1, **SMALL)
    train_ds, eval_ds, info = build_fewshot(cfg, "etrm")
    _, heldout = generate_tasks(cfg)
    assert len(train_ds) == 24 * 2 * 2 and len(eval_ds) == 12 * 2
    assert not set(train_ds.puzzle_ids) & set(eval_ds.puzzle_ids)
    assert set(eval_ds.puzzle_ids) == {t.puzzle_id for t in heldout}
    heldout_inputs = {encode_grid(a, 8).tobytes() for t in heldout for a, _ in t.pairs}
    assert len(heldout_inputs) == 12 * 5
    assert not heldout_inputs & (rows_of(train_ds.inputs) | rows_of(train_ds.demo_inputs))
    assert heldout_inputs == rows_of(eval_ds.inputs) | rows_of(eval_ds.demo_inputs)
    assert info.num_puzzle_ids == 24 * 2 + 12 + 1 and info.seq_len == 64 and info.vocab_size == 12
    assert info.num_demos == 3 and train_ds.num_demos == 3 and eval_ds.has_demos


def test_etrm_rows_carry_their_own_tasks_demos():
    cfg = FewShotConfig(seed=6, **SMALL)
    train, _ = generate_tasks(cfg)
    ds = etrm_view(train, cfg.canvas)
    assert ds.demo_mask.all()
    by_id = {t.puzzle_id: t for t in train}
    for i in range(len(ds)):
        task = by_id[int(ds.puzzle_ids[i])]
        q = task.queries[i % 2]
        np.testing.assert_array_equal(ds.inputs[i], encode_grid(q[0], 8))
        np.testing.assert_array_equal(ds.labels[i], labels_from_tokens(encode_grid(q[1], 8)))
        for k, (a, b) in enumerate(task.demos):
            np.testing.assert_array_equal(ds.demo_inputs[i, k], encode_grid(a, 8))
            np.testing.assert_array_equal(ds.demo_outputs[i, k], encode_grid(b, 8))
        # the query is not one of its own demos
        assert ds.inputs[i].tobytes() not in rows_of(ds.demo_inputs[i])


def test_trm_view_trains_on_heldout_demos_not_queries():
    cfg = FewShotConfig(seed=0, num_aug=1, **SMALL)
    train_ds, eval_ds, info = build_fewshot(cfg, "trm")
    train, heldout = generate_tasks(cfg)
    assert not train_ds.has_demos and not eval_ds.has_demos
    assert len(train_ds) == len(train) * 5 + len(heldout) * 3 and len(eval_ds) == len(heldout) * 2
    pairs_in_train = {(int(p), x.tobytes()) for p, x in zip(train_ds.puzzle_ids, train_ds.inputs)}
    for t in heldout:
        for a, _ in t.demos:
            assert (t.puzzle_id, encode_grid(a, 8).tobytes()) in pairs_in_train
        for a, _ in t.queries:
            assert encode_grid(a, 8).tobytes() not in rows_of(train_ds.inputs)
    eval_rows = {(int(p), x.tobytes()) for p, x in zip(eval_ds.puzzle_ids, eval_ds.inputs)}
    assert eval_rows == {(t.puzzle_id, encode_grid(a, 8).tobytes()) for t in heldout for a, _ in t.queries}
    assert set(eval_ds.puzzle_ids) <= set(train_ds.puzzle_ids)  # every eval id has trained rows
    assert info.num_puzzle_ids == len(train) + len(heldout) + 1 and info.view == "trm"


def test_unknown_view_raises():
    with pytest.raises(ValueError, match="view"):
        build_fewshot(FewShotConfig(**SMALL), "both")


# --- GridDataset -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def etrm_ds() -> GridDataset:
    return build_fewshot(FewShotConfig(seed=9, **SMALL), "etrm")[0]


def test_batch_gathers_rows_and_pads(etrm_ds):
    slots = np.array([3, -1, 0, -1, len(etrm_ds) - 1])
    b = etrm_ds.batch(slots)
    assert set(b) == {"inputs", "labels", "puzzle_id", "sample_id", "demo_inputs", "demo_outputs", "demo_mask",
                      "checksum"}
    for key in ("inputs", "labels", "puzzle_id", "sample_id", "demo_inputs", "demo_outputs"):
        assert b[key].dtype == torch.int64, key
    assert b["demo_mask"].dtype == torch.bool
    assert b["inputs"].shape == (5, 64) and b["demo_inputs"].shape == (5, 3, 64) and b["demo_mask"].shape == (5, 3)
    assert b["sample_id"].tolist() == slots.tolist()
    for pos, row in ((0, 3), (2, 0), (4, len(etrm_ds) - 1)):
        np.testing.assert_array_equal(b["inputs"][pos].numpy(), etrm_ds.inputs[row])
        np.testing.assert_array_equal(b["labels"][pos].numpy(), etrm_ds.labels[row])
        np.testing.assert_array_equal(b["demo_outputs"][pos].numpy(), etrm_ds.demo_outputs[row])
        assert b["puzzle_id"][pos] == etrm_ds.puzzle_ids[row] >= 1 and b["demo_mask"][pos].all()
    for pos in (1, 3):
        assert (b["inputs"][pos] == PAD).all() and (b["labels"][pos] == IGNORE_LABEL).all()
        assert b["puzzle_id"][pos] == 0 and b["sample_id"][pos] == -1
        assert (b["demo_inputs"][pos] == 0).all() and (b["demo_outputs"][pos] == 0).all()
        assert not b["demo_mask"][pos].any()


def test_batch_without_demos_and_all_padding():
    train_ds, _, _ = build_fewshot(FewShotConfig(seed=9, **SMALL), "trm")
    b = train_ds.batch(np.full(4, -1))
    assert "demo_inputs" not in b and (b["labels"] == IGNORE_LABEL).all() and (b["sample_id"] == -1).all()
    empty = GridDataset(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.int16), np.zeros(0, np.int32))
    empty.validate()
    assert empty.batch(np.array([-1, -1]))["inputs"].shape == (2, 4)
    with pytest.raises(IndexError):
        train_ds.batch(np.array([len(train_ds)]))
    with pytest.raises(IndexError):
        train_ds.batch(np.array([-2]))


def test_validate_rejects_corrupt_data(etrm_ds):
    def corrupt(**changes):
        fields = dict(inputs=etrm_ds.inputs, labels=etrm_ds.labels, puzzle_ids=etrm_ds.puzzle_ids,
                      demo_inputs=etrm_ds.demo_inputs, demo_outputs=etrm_ds.demo_outputs,
                      demo_mask=etrm_ds.demo_mask)
        fields.update(changes)
        return GridDataset(**fields)

    etrm_ds.validate()
    bad_token = etrm_ds.inputs.copy()
    bad_token[0, 0] = 12
    bad_label = etrm_ds.labels.copy()
    bad_label[0, 0] = -5
    cases = [
        (dict(inputs=bad_token), "vocab"),
        (dict(labels=bad_label), "labels hold"),
        (dict(labels=etrm_ds.labels.astype(np.int64)), "int16"),
        (dict(inputs=etrm_ds.inputs[:-1]), "shape"),
        (dict(puzzle_ids=etrm_ds.puzzle_ids.astype(np.int64)), "int32"),
        (dict(puzzle_ids=-etrm_ds.puzzle_ids), "negative"),
        (dict(demo_mask=None), "together"),
        (dict(demo_outputs=etrm_ds.demo_outputs[:, :2]), "demo_outputs shape"),
        (dict(demo_mask=etrm_ds.demo_mask.astype(np.uint8)), "bool"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            corrupt(**changes).validate()
