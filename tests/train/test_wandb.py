"""``--wandb``: a real offline W&B run (no login, no network), read back from the files it wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diagnostics.trace.figures import REGISTRY
from diagnostics.trace.loading import load_evals, load_findings
from etrm.cli import main
from etrm.train.wandb_log import INSTALL_HINT, flush_figures

BLOCK, HEADER = 32768, 7  # W&B's record log: 32 KiB blocks of records with a 7-byte header (crc, length, type)


def read_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file (its log format, CRCs not checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    records, part, i = [], b"", HEADER
    while i + HEADER <= len(buf):
        if BLOCK - i % BLOCK < HEADER:  # a block's tail too short for a header is padding
            i += BLOCK - i % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", buf[i:i + HEADER])
        i += HEADER
        part += buf[i:i + length]
        i += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def offline_run(run_dir: Path) -> dict:
    """History rows, config and summary of the one offline W&B run under ``run_dir``."""
    [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"history": [], "config": {}, "summary": {}, "project": None, "name": None, "dir": run_file.parent}
    for r in read_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["project"], out["name"] = r.run.project, r.run.display_name
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    return out


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No login anywhere: a fresh home, no API key; ``wandb.mode=auto`` must then choose offline by itself."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)


def test_demo_trace_wandb_writes_figures_evals_findings_and_config_offline(tmp_path, tiny, offline, capsys):
    run = tmp_path / "run"
    args = ["--preset", "demo", "--trace", "--wandb", "--max-steps", "12", "--run-dir", str(run), *tiny,
            "train.trace_every=4", "train.eval_every=6", "encoder.mode=cached", 'wandb.project="etrm-test"',
            'wandb.name="tiny-cached"']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wandb" in out  # the summary says where the run went
    wb = offline_run(run)
    assert (wb["project"], wb["name"]) == ("etrm-test", "tiny-cached")
    # the resolved config is the W&B config
    assert wb["config"]["encoder"]["mode"] == "cached" and wb["config"]["train"]["max_steps"] == 12
    assert wb["config"]["wandb"]["project"] == "etrm-test"
    # every flush: the trace's figures at its last step; they equal the trace's own figures over those steps
    flushes = [h for h in wb["history"] if any(k.startswith("trace/") for k in h)]
    assert [h["_step"] for h in flushes] == [4, 6, 8, 12]  # trace_every 4, plus the flush before each eval
    logged = {k[len("trace/"):] for h in flushes for k in h if k.startswith("trace/")}
    assert {"coverage", "reset_fraction", "encode_ratio", "loss_per_slot", "mean_halt_step"} <= logged <= set(REGISTRY)
    from diagnostics.trace.loading import load_run

    df = load_run(run)
    window = df.loc[9:12]  # the last flush's rows
    cov = window["coverage_num"].sum() / window["coverage_den"].sum()
    assert flushes[-1]["trace/coverage"] == pytest.approx(cov, rel=1e-9) and cov < 0.5  # cached: reset slots only
    # evals at their steps, as the trace stored them
    evals = load_evals(run)
    logged_evals = {h["_step"]: h for h in wb["history"] if "eval/exact" in h}
    assert sorted(logged_evals) == [6, 12]
    for step, h in logged_evals.items():
        assert h["eval/exact"] == pytest.approx(evals.loc[step, "exact"])
        assert h["eval/baseline.copy_input.exact"] == pytest.approx(evals.loc[step, "baseline.copy_input.exact"])
    # the findings: a W&B table and the summary, the same the trace holds
    stored = load_findings(run)
    assert "gradient-starvation" in set(stored["code"])
    assert wb["summary"]["finding_codes"] == ", ".join(stored["code"])
    for code, first in zip(stored["code"], stored["first_step"]):
        assert wb["summary"][f"finding/{code}"] == first
    assert wb["summary"]["status"] == "end" and wb["summary"]["final_step"] == 12
    [table] = list(wb["dir"].glob("files/media/table/findings_*.table.json"))
    rows = json.loads(table.read_text())
    assert rows["columns"][:3] == ["code", "severity", "first_step"]
    assert [r[0] for r in rows["data"]] == list(stored["code"])
    assert (run / "wandb-id").read_text().strip() == wb["dir"].name.split("-")[-1]


def test_flush_figures_are_ratios_of_sums():
    rows = [{"step": 1, "coverage_num": 1.0, "coverage_den": 4.0, "resets": 1.0, "slots": 4.0},
            {"step": 2, "coverage_num": 3.0, "coverage_den": 4.0, "resets": 0.0, "slots": 4.0}]
    figures = flush_figures(rows)
    assert figures["trace/coverage"] == pytest.approx(0.5)  # (1 + 3) / (4 + 4), not the mean of 0.25 and 0.75
    assert figures["trace/reset_fraction"] == pytest.approx(1 / 8)
    assert "trace/encode_ratio" not in figures  # its columns are absent
    assert flush_figures([]) == {}
    assert flush_figures([{"step": 1, "coverage_num": 0.0, "coverage_den": 0.0}]) == {}  # 0/0 is not a point


def test_wandb_flag_without_the_package_says_how_to_install(tmp_path, tiny, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb sees: ImportError
    run = tmp_path / "run"
    assert main(["--preset", "demo", "--wandb", "--max-steps", "2", "--run-dir", str(run), *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"etrm-train: error: {INSTALL_HINT}"
    assert "pip install 'etrm[wandb]'" in err and not run.exists()  # nothing was created
