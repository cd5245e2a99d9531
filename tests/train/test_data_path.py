"""train.data_path: the device path trains exactly as the host path does (same samples, same order, same weights),
and a checkpoint of one resumes under the other."""

from __future__ import annotations

import pytest
import torch

from etrm.data.feed import DeviceFeed, HostFeed
from etrm.data.staged import StagedRows

STEPS = 10


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("mode,sampler", [("reencode", "refill"), ("cached", "refill"), ("trm", "refill"),
                                          ("reencode", "trm")])
def test_device_path_trains_as_the_host_path(mode, sampler, make_trainer, record_events):
    """``device`` (the set resident) and ``pinned`` (rows staged a chunk ahead: a small chunk here, so that the run
    crosses many chunks and epochs) feed what ``host`` feeds."""
    runs = {}
    for path in ("host", "device", "pinned"):
        torch.manual_seed(0)
        trainer = make_trainer(mode, f"train.data_path={path}", f"train.sampler={sampler}",
                               "act.halt_exploration_prob=0.5")
        assert isinstance(trainer.feed, HostFeed if path == "host" else DeviceFeed)
        if path == "pinned":
            assert isinstance(trainer.feed.data, StagedRows)
            trainer.sampler.chunk = 5
            trainer.sampler.load_state_dict(trainer.sampler.state_dict())  # restart the window with 5-id chunks
        rows = record_events(trainer)
        for _ in range(STEPS):
            trainer.train_step()
        runs[path] = (trainer, rows)
    host, host_rows = runs["host"]
    assert any(0 < int(r["reset"].sum()) < len(r["reset"]) for r in host_rows)  # staggered halting
    for path in ("device", "pinned"):
        dev, dev_rows = runs[path]
        for h, d in zip(host_rows, dev_rows):
            assert torch.equal(h["batch_sample_id"], d["batch_sample_id"])
            assert torch.equal(h["sample_id_after"], d["sample_id_after"])
        for k, v in weights(host).items():
            assert torch.equal(v, weights(dev)[k]), (path, k)
        assert host.sampler.state_dict() == dev.sampler.state_dict()
        assert host.samples_dropped == dev.samples_dropped


@pytest.mark.parametrize("first,second", [("host", "device"), ("device", "host")])
def test_checkpoint_resumes_across_data_paths(first, second, make_trainer, tmp_path):
    torch.manual_seed(0)
    whole = make_trainer("reencode", f"train.data_path={second}", "train.sampler=trm")
    torch.manual_seed(0)
    part = make_trainer("reencode", f"train.data_path={first}", "train.sampler=trm")
    for _ in range(4):
        whole.train_step()
        part.train_step()
    state = part.state_dict()
    resumed = make_trainer("reencode", f"train.data_path={second}", "train.sampler=trm")
    resumed.load_state_dict(state)
    assert resumed.samples_dropped == part.samples_dropped > 0
    for _ in range(4):
        whole.train_step()
        resumed.train_step()
    assert torch.equal(whole.carry.data["sample_id"], resumed.carry.data["sample_id"])
    assert whole.sampler.state_dict() == resumed.sampler.state_dict()
    assert whole.samples_dropped == resumed.samples_dropped


@pytest.mark.parametrize("preset_mode,sampler", [("trm", "refill"), ("etrm", "refill"), ("etrm", "trm")])
def test_arc_rows_rendered_on_the_device_train_as_the_host_rows(preset_mode, sampler, make_trainer, record_events):
    """ARC on the device path: base grids and the variant table on the device, each drawn row rendered there;
    the steps see the same batches as on the host path (augmentations and translation included), under the
    refill and upstream's feed; no path builds the augmented rows."""
    small = ["data.max_train_tasks=6", "data.max_eval_tasks=2", "data.num_aug=2", "data.canvas=10",
             "data.max_demos=2", f"model={preset_mode}", "arch.puzzle_emb_len=2", f"train.sampler={sampler}"]
    runs = {}
    for path in ("host", "device", "pinned"):
        torch.manual_seed(0)
        trainer = make_trainer("arc1-small", f"train.data_path={path}", *small)
        rows = record_events(trainer)
        for _ in range(3):
            trainer.train_step()
        assert trainer.train_ds._full is None, path  # only the drawn rows were rendered
        runs[path] = (trainer, rows)
    assert type(runs["device"][0].feed.data).__name__ == "ArcDeviceData"
    for path in ("device", "pinned"):  # pinned: the pooled demos staged per row
        for h, d in zip(runs["host"][1], runs[path][1]):
            assert torch.equal(h["batch_sample_id"], d["batch_sample_id"])
        for k, v in weights(runs["host"][0]).items():
            assert torch.equal(v, weights(runs[path][0])[k]), (path, k)
