"""``etrm-eval``: a run's every-eval checkpoints, or upstream's step_N files, evaluated into a fresh run directory that
``etrm-doctor`` judges and the dashboard draws; the source is only read; bad input gets one line and exit 2.

The trained runs are the evaluation-findings tests' constructed ``late`` and ``premature`` cases
(``tests/diagnostics/test_eval_findings_runs.py``: a Q-head pinned at "halt"), kept every 40 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from upstream_files import upstream_state, write_folder

STEPS, EVERY = 80, 40
BASE = ['data.families=["draw_border"]', "arch.hidden_size=32", "arch.num_heads=2", "arch.L_layers=1",
        "train.batch_size=32", "data.train_tasks=256", "data.heldout_tasks=16", "train.seed=0"]
PINNED = ["arch.q_init_bias=5", "loss.q_weight=0", "train.ema=false", f"train.eval_every={EVERY}",
          'train.keep_checkpoints="every-eval"']
RUNS = {"late": [*PINNED, "act.halt_exploration_prob=0"], "premature": [*PINNED, "act.halt_exploration_prob=1"]}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def etrm_eval(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etrm.eval.cli", *args], capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=cwd)


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` with its bytes and mtime."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def doctor(run: Path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "diagnostics.cli", str(run), "--json"], capture_output=True,
                         text=True, timeout=120, env=_env())
    assert out.returncode in (0, 1), out.stderr
    return {f["code"]: f for f in json.loads(out.stdout)["findings"]}


BACKGROUND_RUNS = {"etrm-eval": {  # trained from the session's start (tests/conftest.py: BackgroundRuns)
    name: ["--preset", "demo", *BASE, *extra, "--max-steps", str(STEPS), "--device", "cpu"]
    for name, extra in RUNS.items()}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, background_runs) -> dict[str, tuple[Path, Path, dict, dict]]:
    """{kind: (source run, etrm-eval run, source snapshot before, after)}."""
    root = tmp_path_factory.mktemp("etrm-eval")
    runs = background_runs.runs("etrm-eval", timeout=900)
    out = {}
    for kind, src in runs.items():
        before = snapshot(src)
        done = etrm_eval(str(src), "--out", str(root / "evals" / kind), "--device", "cpu")
        assert done.returncode == 0, done.stderr
        out[kind] = (src, root / "evals" / kind, before, snapshot(src))
    return out


@pytest.mark.parametrize("kind, sign", [("late", -1), ("premature", 1)])
def test_etrm_eval_series_is_judged_by_the_doctor(kind: str, sign: int, evaluated) -> None:
    from diagnostics.trace.loading import load_eval_audits

    src, run, before, after = evaluated[kind]
    assert before == after  # the source run is byte-identical (and untouched) afterwards
    audits = load_eval_audits(run)
    assert sorted(set(audits["step"])) == [EVERY, STEPS]  # one evaluation per kept checkpoint, in step order
    assert set(audits["weights"]) == {"raw"}  # EMA off in these runs: the raw weights
    f = doctor(run)["eval-halting-mismatch"]
    assert f["evidence"]["kind"] == kind and f["first_step"] in (EVERY, STEPS)
    assert f["evidence"]["mean_would_halt_step"] == 1.0
    assert sign * (f["evidence"]["exact_at_max_step"] - f["evidence"]["exact_at_would_halt"]) >= 0.1


def _texts(component) -> str:
    return json.dumps(component.to_plotly_json(), default=lambda o: o.to_plotly_json()
                      if hasattr(o, "to_plotly_json") else str(o))


def test_etrm_eval_dashboard_draws_the_evaluation_curve(evaluated) -> None:
    from dashboards.pages import runs_page
    from dashboards.run_view import TABS, run_page, tab_figures, tab_layout
    from dashboards.runs import Runs

    run = evaluated["late"][1]
    runs = Runs(run.parent)
    listed = _texts(runs_page(runs))
    assert "late" in listed and "eval-halting-mismatch" in listed  # the runs list shows it with its finding
    page = _texts(run_page(runs, run.name, ""))
    assert "refused" not in page and "eval-halting-mismatch" in page  # the run page names the finding too
    cache = runs.get(run.name)
    for tab, _ in TABS:
        figs = tab_figures(cache, tab)
        for fid, fig in figs.items():
            assert "could not draw" not in json.dumps(fig, default=str), (tab, fid)
        tab_layout(tab, figs, cache)
    curve = tab_figures(cache, "overview")["accuracy"]
    held = [t for t in curve["data"] if t.get("name") == "held-out"]
    assert held and [float(x) for x in held[0]["x"]] == [EVERY, STEPS]


# ---------------------------------------------------------------------------------------------------------------
# Upstream's checkpoints on upstream's data folder

ARCH = {"hidden_size": 32, "num_heads": 2, "expansion": 2.0, "L_layers": 2, "H_cycles": 1, "L_cycles": 1,
        "puzzle_emb_len": 2, "halt_max_steps": 2, "halt_exploration_prob": 0.1, "pos_encodings": "rope",
        "puzzle_emb_ndim": 32, "no_ACT_continue": True, "name": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"}


def _upstream_run(root: Path, data: Path | None = None) -> Path:
    """A folder as upstream's pretrain.py leaves it: ``all_config.yaml`` (naming ``data`` in ``data_paths``) and
    ``step_N`` files (one compiled)."""
    ckpt = root / "checkpoints"
    ckpt.mkdir(parents=True)
    paths = {"data_paths": [str(data)]} if data is not None else {}
    (ckpt / "all_config.yaml").write_text(yaml.safe_dump({"arch": ARCH, "ema": True, "epochs": 2,
                                                          "global_batch_size": 4, **paths}))
    state = upstream_state(32, 2.0, 2, 12, 8)
    torch.save(state, ckpt / "step_10")
    torch.save({"_orig_mod." + k: v * 1.01 for k, v in state.items()}, ckpt / "step_20")
    return ckpt


def test_etrm_eval_upstream_series_on_a_data_folder(tmp_path) -> None:
    from diagnostics.trace.loading import load_eval_audits

    data, ckpt = write_folder(tmp_path / "data"), _upstream_run(tmp_path / "up")
    before = snapshot(ckpt)
    done = etrm_eval(str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "step_10 (ema)" in done.stdout and "step_20 (ema)" in done.stdout
    audits = load_eval_audits(tmp_path / "ev")
    assert sorted(set(audits["step"])) == [10, 20] and set(audits["weights"]) == {"ema"}
    assert sorted(set(audits["act_step"])) == [1, 2]  # halt_max_steps from all_config.yaml
    assert snapshot(ckpt) == before
    # without --data: the data folder all_config.yaml names (data_paths), when it is found here
    named = _upstream_run(tmp_path / "named", data)
    done = etrm_eval(str(named / "step_20"), "--out", str(tmp_path / "ev2"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert sorted(set(load_eval_audits(tmp_path / "ev2")["step"])) == [20]


def _one_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("etrm-eval: error:"), done.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_etrm_eval_bad_input_one_line_exit_2(tmp_path) -> None:
    data, ckpt = write_folder(tmp_path / "data"), _upstream_run(tmp_path / "up")
    out = tmp_path / "ev"
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "all_config.yaml").write_text((ckpt / "all_config.yaml").read_text())
    torch.save(upstream_state(16, 2.0, 2, 12, 8), narrow / "step_1")
    _one_line(etrm_eval(str(narrow / "step_1"), "--data", str(data), "--out", str(out)),
              "'embed_tokens.embedding_weight' has shape [12, 16] in the checkpoint, [12, 32] in the model",
              "all_config.yaml")
    whole = (ckpt / "step_10").read_bytes()
    (narrow / "step_1").write_bytes(whole[: len(whole) // 3])
    _one_line(etrm_eval(str(narrow / "step_1"), "--data", str(data), "--out", str(out)), "corrupt or unreadable")
    torch.save({"weights": torch.zeros(2)}, narrow / "step_1")
    _one_line(etrm_eval(str(narrow / "step_1"), "--data", str(data), "--out", str(out)),
              "tried an etrm checkpoint", "an upstream TRM state dict")
    _one_line(etrm_eval(str(ckpt), "--out", str(out)), "--data DIR")
    _one_line(etrm_eval(str(ckpt), "--data", str(data), "--out", str(ckpt / "inside")), "inside the source")
    _one_line(etrm_eval(str(ckpt), "--data", str(data), "--out", str(data)), "already exists")
    _one_line(etrm_eval(str(tmp_path / "nothing"), "--out", str(out)), "does not exist")
    assert not out.exists() and not (ckpt / "inside").exists()  # nothing half-made is left
