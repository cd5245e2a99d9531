"""Issue 15 end to end: an upstream-shaped loop written outside etrm, traced through ``diagnostics.session``.

Each variant of examples/own_loop trains 40 steps traced; ``etrm-doctor`` (a real subprocess) must name exactly the
findings it names on the bundled trainer's equivalent run (same feed: upstream's, ``train.sampler=trm``), the live
doctor must have stored the same, the per-step counters must show each fault's signature exactly, the dashboard's
callbacks must draw the run like a bundled one, and the tracing must be the marked lines, at most 20, additive.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards.app import create_app
from dashboards.run_view import TABS
from diagnostics.doctor.diagnose import diagnose
from diagnostics.trace.loading import load_findings, load_run
from etrm.cli import main as train_main

STEPS, BATCH = 40, 8
VARIANTS = ("healthy", "cached", "labels-from-batch", "full-batch-encode")
# the bundled trainer's equivalent of each variant, on the acceptance tests' tiny demo model and upstream's feed
BUNDLED = {"healthy": [], "cached": ["encoder.mode=cached"], "labels-from-batch": ["fault=label-from-batch"],
           "full-batch-encode": ["encoder.mode=cached", "fault=encode-full-batch"]}
EXPECTED = {"healthy": {"dropped-samples"}, "cached": {"gradient-starvation", "dropped-samples"},
            "labels-from-batch": {"label-misalignment", "dropped-samples"},
            "full-batch-encode": {"gradient-starvation", "wasted-encoder-compute", "dropped-samples"}}
TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
        "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
        "data.train_tasks=8", "data.heldout_tasks=2", f"train.batch_size={BATCH}", f"train.eval_batch_size={BATCH}",
        "train.eval_every=1000", "train.lr_warmup_steps=2", "train.sampler=trm"]

_script = Path(sys.executable).with_name("etrm-doctor")
DOCTOR = [str(_script)] if _script.is_file() else [sys.executable, "-m", "diagnostics.cli"]


@pytest.fixture(scope="module")
def own_runs(own_loop, tmp_path_factory) -> Path:
    """A runs directory holding one traced run of each example variant."""
    import pretrain

    root = tmp_path_factory.mktemp("own_runs")
    for variant in VARIANTS:
        pretrain.pretrain(root / variant, variant, steps=STEPS, batch_size=BATCH)
    return root


@pytest.fixture(scope="module")
def bundled_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundled_runs")
    for variant, extra in BUNDLED.items():
        code = train_main(["--preset", "demo", *extra, "--trace", "--run-dir", str(root / variant), "--device",
                           "cpu", "--max-steps", str(STEPS), *TINY])
        assert code == 0
    return root


def etrm_doctor(run: Path) -> tuple[int, dict]:
    proc = subprocess.run([*DOCTOR, str(run), "--json"], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "COLUMNS": "200",
                               **{k: v for k, v in __import__("os").environ.items() if k == "PYTHONPATH"}})
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_own_loop_variant_gets_the_bundled_trainers_findings(variant, own_runs, bundled_runs):
    run = own_runs / variant
    code, report = etrm_doctor(run)
    codes = {f["code"] for f in report["findings"]}
    bundled = load_run(bundled_runs / variant)
    bundled_codes = {f.code for f in diagnose(bundled)}
    assert codes == bundled_codes == EXPECTED[variant], (codes, bundled_codes)
    assert code == (1 if variant != "healthy" else 0)
    summary = report["summary"]
    assert summary["status"] == "finished" and summary["steps"] == STEPS and summary["mode"] == (
        "cached" if variant in ("cached", "full-batch-encode") else "reencode")
    # the live doctor (at each flush of the session) stored exactly the offline doctor's findings
    stored = {r.code: int(r.first_step) for r in load_findings(run).itertuples()}
    assert stored == {f["code"]: f["first_step"] for f in report["findings"]}

    df = load_run(run)
    assert df.index.to_list() == list(range(1, STEPS + 1))
    assert (df["slots"] == BATCH).all() and (df["samples_dropped"] == df["slots"] - df["resets"]).all()
    continuing = df["slots"] - df["resets"]
    if variant == "healthy":
        assert (df["coverage_num"] == BATCH).all() and (df["encoded"] == df["encode_needed"]).all()
        assert df["label_mismatch"].sum() == 0 and summary["figures"]["coverage"] == 1.0
    if variant in ("cached", "full-batch-encode"):  # only the slots encoded fresh this step get gradient
        assert (df["coverage_num"] == df["resets"]).all() and (df["resets"] < BATCH).any()
        assert (df["encode_needed"] == df["resets"]).all()
        assert (df["encoded"] == (BATCH if variant == "full-batch-encode" else df["resets"])).all()
    if variant == "labels-from-batch":  # every continuing slot read the fresh sample fed at its position
        assert (df["label_mismatch"] == continuing).all() and df["label_mismatch"].sum() > 0
        samples = df.attrs["alignment_samples"]
        assert samples and all(s["label_sample_id"] != s["sample_id"] for s in samples)
    else:
        assert df["label_mismatch"].sum() == 0


def test_own_loop_runs_load_in_the_dashboard_through_its_callbacks(own_runs):
    app = create_app(own_runs)
    callbacks = {key: entry["callback"].__wrapped__ for key, entry in app.callback_map.items()}
    listing = json.dumps(callbacks["page.children"]("/", "").to_plotly_json(), default=_plain)
    for variant in VARIANTS:
        assert f"/run/{variant}" in listing
    assert "gradient-starvation" in listing and "label-misalignment" in listing and "healthy" in listing
    for variant in VARIANTS:
        page = json.dumps(callbacks["page.children"](f"/run/{variant}", "").to_plotly_json(), default=_plain)
        assert "tiny-etrm" in page and "Could not" not in page and "Something went wrong" not in page
        for code in EXPECTED[variant] - {"dropped-samples"}:
            assert code in page
        header, version, stop = callbacks["..run-header.children...run-version.data...run-tick.disabled.."](
            1, variant, None)
        assert version == STEPS and stop is True  # finished: the live refresh stops
        for tab, _ in TABS:
            body = json.dumps([c.to_plotly_json() for c in callbacks["tab-content.children"](
                tab, STEPS, None, variant, None)], default=_plain)
            assert "Could not draw" not in body and "could not draw" not in body and "Nothing to draw" not in body, tab


def _plain(o):
    return o.to_plotly_json() if hasattr(o, "to_plotly_json") else str(o)


def test_own_loop_tracing_is_at_most_20_marked_lines_listed_in_the_docs(own_loop):
    import plain

    lines = plain.marked_lines()
    assert 0 < len(lines) <= 20, len(lines)
    doc = (own_loop.parents[1] / "docs" / "own-loop.md").read_text()
    for line in lines:
        code = plain.MARK.split(line)[0].strip()
        assert code in doc, f"docs/own-loop.md does not show the added line {code!r}"


def test_own_loop_without_the_marked_lines_is_the_plain_loop(own_loop, tmp_path):
    """Deleting every marked line leaves a loop that imports nothing of etrm and still trains."""
    import plain
    import torch

    for name in plain.TRACED_FILES:
        src = plain.plain_source(name)
        ours = [line for line in src.splitlines() if re.match(r"(from|import)\s+(etrm|diagnostics|dashboards)\b", line)]
        assert not ours, ours
    assert "from diagnostics import" in (own_loop / "pretrain.py").read_text()  # the check above can fail
    loss = plain.plain_pretrain().pretrain(tmp_path / "unused", "healthy", steps=5, batch_size=4)
    assert torch.isfinite(torch.tensor(loss)) and not (tmp_path / "unused").exists()


def test_own_loop_script_refuses_bad_input_in_one_line(own_loop, tmp_path, capsys):
    import pretrain

    assert pretrain.main(["--variant", "cache", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown --variant 'cache'" in err and not (tmp_path / "x").exists()
    run = tmp_path / "taken"
    assert pretrain.main(["--steps", "3", "--batch-size", "4", "--run-dir", str(run)]) == 0
    before = (run / "trace.sqlite").read_bytes()
    capsys.readouterr()
    assert pretrain.main(["--steps", "3", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a trace" in err
    assert (run / "trace.sqlite").read_bytes() == before
