"""ARC augmentation on the device renders exactly what the host's variant + encode_at produce."""

import numpy as np
import pytest
import torch

from diagnostics.probes.sync_audit import SyncAudit, format_reads
from etrm.data.arc import load_arc_tasks
from etrm.data.arc_variants import Variant, encode_at
from etrm.data.arc_device import pad_grids, render


@pytest.fixture(scope="module")
def arc_grids():
    train, _ = load_arc_tasks("arc1")
    return [g for t in train[:40] for g in t.grids() if max(g.shape) <= 12]


def test_render_equals_the_host_variant_for_every_transform(arc_grids):
    canvas = 14
    rng = np.random.default_rng(0)
    grids, shapes = pad_grids(arc_grids, canvas)
    n = len(arc_grids)
    which = rng.integers(0, n, 400)
    tid = np.tile(np.arange(8), 50)
    perms = np.stack([np.concatenate([[0], rng.permutation(np.arange(1, 10))]) for _ in range(400)])
    tops, lefts, expected = [], [], []
    for k in range(400):
        v = Variant(int(tid[k]), tuple(int(x) for x in perms[k]))
        g = v.apply(arc_grids[which[k]])
        top, left = int(rng.integers(canvas - g.shape[0] + 1)), int(rng.integers(canvas - g.shape[1] + 1))
        tops.append(top)
        lefts.append(left)
        expected.append(encode_at(g, canvas, top, left))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    got = render(torch.from_numpy(grids), t(shapes), t(which), t(tid), t(perms), t(tops), t(lefts), canvas)
    np.testing.assert_array_equal(got.numpy(), np.stack(expected).astype(np.int64))


@pytest.mark.parametrize("view", ["trm", "etrm"])
def test_arc_device_batch_equals_the_host_batch(view):
    """Rows (and ETRM's pooled demos) rendered on the device from base grids + the variant table equal the
    materialised host rows, sample for sample, with translation on and augmentations de-duplicated."""
    from etrm.data.arc import build_arc
    from etrm.data.arc_device import ArcDeviceData

    train, ev = load_arc_tasks("arc1")
    ds = build_arc(train, ev, 12, view, num_aug=3, seed=2, translate=True, max_train_tasks=8, max_eval_tasks=3)[0]
    data = ArcDeviceData(ds, torch.device("cpu"))
    assert len(ds.arc_variants.rows.tid) == len(ds) and len(set(ds.arc_variants.rows.tid)) > 1
    if view == "trm":  # ETRM trains on test pairs, mostly one per task: the one pair kept in place
        assert (ds.arc_variants.rows.offset > 0).any()
    ids = np.arange(-1, len(ds), dtype=np.int64)
    with SyncAudit("cpu") as audit:  # rendering reads nothing back
        dev = data.batch(torch.from_numpy(ids))
    assert audit.count() == 0, format_reads(audit.reads)
    host = ds.batch(ids)
    assert host.keys() == dev.keys()
    for k in host:
        assert dev[k].dtype == host[k].dtype and torch.equal(dev[k], host[k]), k


@pytest.mark.parametrize("view", ["trm", "etrm"])
def test_arc_training_set_holds_only_base_grids_and_the_variant_table(view):
    """The training set is base grids + variant table: drawing rows (host or device) materialises nothing, the
    device copy is the size ``device_bytes`` says, far below the materialised set whose size
    ``materialised_bytes`` gives without building it; the materialised set equals the rendered rows."""
    from etrm.data.arc import build_arc
    from etrm.data.arc_device import ArcDeviceData
    from etrm.data.arc_rows import ArcTrainSet

    train, ev = load_arc_tasks("arc1")
    ds = build_arc(train, ev, 12, view, num_aug=20, seed=4, translate=True, max_train_tasks=6, max_eval_tasks=2)[0]
    assert isinstance(ds, ArcTrainSet) and len(ds) > 100
    data = ArcDeviceData(ds, torch.device("cpu"))
    ids = np.random.default_rng(1).integers(-1, len(ds), 64)
    host, dev = ds.batch(ids), data.batch(torch.from_numpy(ids))
    assert ds._full is None  # neither path built the augmented rows
    assert data.nbytes() == ds.device_bytes() + data.coeffs.numel() * data.coeffs.element_size()
    full = ds.materialise()
    held = [full.inputs, full.labels, full.puzzle_ids, full.demo_inputs, full.demo_outputs, full.demo_slots]
    assert ds.materialised_bytes() == sum(a.nbytes for a in held if a is not None)
    assert ds.device_bytes() * 5 < ds.materialised_bytes()
    reference = full.batch(np.where(ids >= 0, ids, -1))
    for k in host:
        assert torch.equal(host[k], reference[k]) and torch.equal(dev[k], reference[k]), k
