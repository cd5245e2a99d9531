"""The pytest plugin works from the installed package: pytest in a subprocess, outside this repository's test tree,
runs the suite against the worked example's user model (passing) and its broken variant (failing, naming the
invariant). Also: ``diagnostics`` never imports ``etrm``."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import diagnostics

HERE = Path(__file__).resolve().parent
DIAGNOSTICS = Path(diagnostics.__file__).resolve().parent


def _pytest(tmp_path: Path, *args: str, autoload: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    if autoload:
        env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    else:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.name == "etrm" and ep.value == "diagnostics.pytest_plugin" for ep in eps)


def test_plugin_passes_on_the_user_model(tmp_path):
    res = _pytest(tmp_path, "-p", "diagnostics.pytest_plugin", "--etrm-model", "example_user_model:make_adapter",
                  "--etrm-examples", "8")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "2 passed" in out and "etrm property suite" in out and "example_user_model:make_adapter:" in out


def test_plugin_fails_on_the_broken_user_model_naming_the_invariant(tmp_path):
    res = _pytest(tmp_path, "-p", "diagnostics.pytest_plugin", "--etrm-model",
                  "example_user_model:make_broken_adapter", "--etrm-examples", "8", "--etrm-no-shrink")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "invariant 'reset-from-init' violated at step" in out, out
    assert "1 failed, 1 passed" in out


def test_plugin_on_an_upstream_shaped_model_lists_skips_drops_and_time(tmp_path):
    """The faithful upstream-shaped model as it is (dataclass carry, no forced halt, torch.empty, full batches) under
    the plugin's own fast default: passes, lists the checks it skipped, reports the upstream feed's dropped samples
    as an info line with the fraction, and prints the time."""
    res = _pytest(tmp_path, "-p", "diagnostics.pytest_plugin", "--etrm-model", "upstream_shaped:make_adapter")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "upstream_shaped:make_adapter: 1" in out and " examples, " in out  # the fast default, not 100
    assert "skipped coverage-matches-mode: needs StepEvents and a loss" in out
    assert "info dropped-samples: feed 'adapter' dropped " in out and "%): they landed in continuing slots" in out
    assert "etrm property suite: 1 model(s) in " in out


def test_plugin_autoloads_from_its_entry_point_for_several_models(tmp_path):
    """No ``-p``: the installed ``pytest11`` entry point loads the plugin; the option repeats for several models."""
    res = _pytest(tmp_path, "--etrm-model", "example_user_model:make_adapter", "--etrm-model",
                  "etrm.testing:bundled_adapter", "--etrm-examples", "3")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "4 passed" in out and "etrm.testing:bundled_adapter:" in out


def test_plugin_by_entry_point_name_without_autoload(tmp_path):
    res = _pytest(tmp_path, "-p", "etrm", "--etrm-model", "example_user_model:make_adapter", "--etrm-examples", "3",
                  autoload=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_bad_spec_is_a_usage_error(tmp_path):
    res = _pytest(tmp_path, "--etrm-model", "example_user_model:no_such_factory")
    assert res.returncode != 0
    assert "--etrm-model 'example_user_model:no_such_factory': module example_user_model has no attribute" in res.stderr


def test_diagnostics_never_imports_etrm():
    for path in DIAGNOSTICS.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n == "etrm" or n.startswith("etrm.") for n in names), f"{path.name} imports {names}"


def test_field_props_plugin_skip_option_and_fork_report(tmp_path):
    """``--etrm-skip`` on the fork-shaped example: passes, lists the opt-out and the declaration as skipped, and the
    dropped samples of every feed."""
    res = _pytest(tmp_path, "-p", "diagnostics.pytest_plugin", "--etrm-model", "fork_adapter:make_adapter",
                  "--etrm-skip", "slot-permutation-independence", "--etrm-examples", "3")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "skipped slot-permutation-independence: opted out (--etrm-skip)" in out, out
    assert "skipped padding-adds-nothing: the adapter declares drops_partial_batches" in out, out
    assert "info dropped-samples: feed 'refill' dropped 0 of " in out, out


def test_field_props_plugin_failing_run_reports_and_bad_skip_is_a_usage_error(tmp_path):
    res = _pytest(tmp_path, "-p", "diagnostics.pytest_plugin", "--etrm-model", "fork_adapter:make_no_state_reset_adapter",
                  "--etrm-examples", "5", "--etrm-no-shrink")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "invariant 'reset-from-init' violated at step" in out and "info dropped-samples: feed " in out, out
    assert "fork_adapter:make_no_state_reset_adapter: " in out  # the failing run is in the summary too
    bad = _pytest(tmp_path, "--etrm-model", "fork_adapter:make_adapter", "--etrm-skip", "no-such-invariant")
    assert bad.returncode == 4 and "--etrm-skip: unknown invariant 'no-such-invariant' to skip" in bad.stderr, bad.stderr
