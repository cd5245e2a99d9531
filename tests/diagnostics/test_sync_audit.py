"""The whole-step sync audit: 20 traced training steps per mode under the refill sampler, every host read-back
counted (dispatch ops that read values, and Python-level reads of device tensors)."""

from __future__ import annotations

import pytest
import torch

from diagnostics.probes import LedgerProbe
from diagnostics.probes.sync_audit import SyncAudit, format_reads, optimizer_step_counters
from etrm.train import instruments
from etrm.train.trainer import Trainer

from test_tracer import make_trainer  # the tracer tests' tiny traced trainer (same directory)

STEPS = 20


def audit_training(trainer: Trainer, steps: int = STEPS) -> tuple[SyncAudit, list[int]]:
    """Run ``steps`` traced training steps under the audit; the flushes (the tracer's read-back, by design) run
    paused between steps, as the trainer's loop does. Returns the audit and the read count of each step.
    The per-sample ledger is among the audited probes, and it recorded samples leaving their slots."""
    per_step = []
    tracer = trainer.instruments.find(instruments.Trace).tracer
    assert any(isinstance(p, LedgerProbe) for p in tracer.probes)
    records = 0
    with SyncAudit(trainer.device, allow=optimizer_step_counters(trainer.optimizers)) as audit:
        for _ in range(steps):
            label = f"step {trainer.step + 1}"
            with audit.label(label):
                trainer.train_step()
            per_step.append(audit.count(label))
            if trainer.step % trainer.cfg.train.trace_every == 0:
                with audit.paused():
                    rows = tracer.flush()
                assert rows and rows[-1]["step"] == trainer.step
                records += len(tracer.last_ledger)
    tracer.close()
    assert records > 0  # the ledger did its work inside the audited steps
    return audit, per_step




def assert_no_read_back(tmp_path, model: str, mode: str, **train) -> None:
    torch.manual_seed(0)
    audit, per_step = audit_training(make_trainer(tmp_path, model, mode, **{"data_path": "device", **train}))
    assert per_step == [0] * STEPS, format_reads(audit.reads)


def test_sync_audit_reencode(tmp_path):
    assert_no_read_back(tmp_path, "etrm", "reencode")


def test_sync_audit_fct(tmp_path):
    assert_no_read_back(tmp_path, "etrm", "fct")


def test_sync_audit_trm(tmp_path):
    assert_no_read_back(tmp_path, "trm", "reencode")


def test_sync_audit_trm_sampler(tmp_path):
    """Upstream's whole-batch feed on the device path: no read-back either (the dropped count stays on the device)."""
    assert_no_read_back(tmp_path, "etrm", "reencode", sampler="trm")


def test_sync_audit_pinned_data_path(tmp_path):
    """Rows staged from host memory by the sampler's window: no read-back in the step either."""
    assert_no_read_back(tmp_path, "etrm", "reencode", data_path="pinned")


def test_sync_audit_cached(tmp_path):
    """cached mode encodes only the reset slots: how many is the model's one read per step (``reset.nonzero()``)."""
    torch.manual_seed(0)
    audit, per_step = audit_training(make_trainer(tmp_path, "etrm", "cached", data_path="device"))
    assert per_step == [1] * STEPS, format_reads(audit.reads)
    assert {r.what for r in audit.reads} == {"aten.nonzero.default"}
    assert all("etrm/model/act.py" in r.site for r in audit.reads)


def test_sync_audit_fails_on_the_host_data_path(tmp_path):
    """The host path (upstream's, and this trainer's before the device path) reads the reset mask back each step."""
    torch.manual_seed(0)
    audit, per_step = audit_training(make_trainer(tmp_path, "etrm", "reencode", data_path="host"))
    assert all(n >= 1 for n in per_step)
    assert any(r.what == "Tensor.cpu" and "etrm/data/feed.py" in r.site for r in audit.reads)


def test_sync_audit_sees_python_and_dispatch_reads():
    x = torch.arange(6)
    mask = x > 2
    with SyncAudit("cpu") as audit:
        with audit.label("python"):
            x.tolist(), x.numpy(), x.sum().item(), bool(x[0]), int(x[1]), float(x[2]), [0, 1][x[1]], x.cpu()
        with audit.label("dispatch"):
            x[mask], torch.nonzero(x), torch.equal(x, x), torch.unique(x)
        with audit.label("clean"), audit.paused():
            x.tolist()
        with audit.label("clean"):
            torch.where(mask, x, 0).cumsum(0)
    assert audit.count("python") == 8  # one each: the ops underneath a Python read are not counted again
    assert audit.count("dispatch") == 4
    assert audit.count("clean") == 0
    assert torch.Tensor.item is not None and "guarded" not in repr(torch.Tensor.item)
