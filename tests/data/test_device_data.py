"""The device-resident training set gathers the very batch the host dataset builds, for every dataset layout."""

import numpy as np
import pytest
import torch

from etrm.data.arc import build_arc, load_arc_tasks
from etrm.data.device_data import DeviceGridData, dataset_bytes, fits_on_device
from etrm.data.fewshot import FewShotConfig, build_fewshot


def fewshot(view: str):
    cfg = FewShotConfig(canvas=5, min_grid=2, max_grid=4, train_tasks=6, heldout_tasks=2, num_demos=3, seed=3)
    return build_fewshot(cfg, view)[0]


def arc(view: str):
    train, ev = load_arc_tasks("arc1")
    return build_arc(train, ev, 10, view, num_aug=2, seed=1, max_train_tasks=6, max_eval_tasks=2)[0]


LAYOUTS = {"fewshot-etrm (per-row demos)": lambda: fewshot("etrm"), "fewshot-trm": lambda: fewshot("trm"),
           "arc-etrm (pooled demos)": lambda: arc("etrm"), "arc-trm": lambda: arc("trm")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_device_batch_equals_host_batch(layout):
    ds = LAYOUTS[layout]()
    data = DeviceGridData(ds, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = np.where(rng.random(7) < 0.3, -1, rng.integers(0, len(ds), 7)).astype(np.int64)
        host = ds.batch(ids)
        dev = data.batch(torch.from_numpy(ids))
        assert host.keys() == dev.keys()
        for k in host:
            assert dev[k].dtype == host[k].dtype and torch.equal(dev[k], host[k]), k
    assert dataset_bytes(ds) > 0 and fits_on_device(ds, torch.device("cpu"))
