"""pytest plugin (entry point ``pytest11: etrm``): ``pytest --etrm-model MODULE:FACTORY`` runs the ACT property suite
against the adapter that ``FACTORY()`` builds, next to whatever else pytest collects.

The suite's tests live in ``diagnostics/properties/suite_tests.py``; the plugin adds that file to the collection when
``--etrm-model`` is given (repeat the option to test several models) and prints what the suite exercised at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Nothing heavy at import: this module is auto-loaded into every pytest run of an environment that has etrm
# installed, so torch and hypothesis are imported only once --etrm-model asks for the suite.

SUITE_FILE = Path(__file__).with_name("suite_tests.py")
ENTRY_POINT = "etrm"
_RESULTS = pytest.StashKey[list]()
_FACTORIES = pytest.StashKey[dict]()


def pytest_plugin_registered(plugin, plugin_name, manager) -> None:
    """Loaded explicitly (``-p diagnostics.pytest_plugin``) while the package's entry point would auto-load the same
    module under the name ``etrm``: block that second registration, which pluggy would refuse with an error."""
    if plugin is _this_module() and plugin_name != ENTRY_POINT and not manager.has_plugin(ENTRY_POINT):
        manager.set_blocked(ENTRY_POINT)


def _this_module():
    import sys

    return sys.modules[__name__]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("etrm", "ACT carry/label property suite (etrm diagnostics)")
    group.addoption("--etrm-model", action="append", default=[], metavar="MODULE:FACTORY",
                    help="run the property suite against the adapter FACTORY() returns (repeatable)")
    group.addoption("--etrm-examples", type=int, default=None, metavar="N",
                    help="Hypothesis examples per model (default: a fast 10; the profile's under "
                         "HYPOTHESIS_PROFILE=thorough)")
    group.addoption("--etrm-steps", type=int, default=None, metavar="N",
                    help="rules per example, i.e. steps of the state machine (default 12)")
    group.addoption("--etrm-no-shrink", action="store_true", default=False,
                    help="report the first failing example as found, without shrinking it (faster)")
    group.addoption("--etrm-skip", action="append", default=[], metavar="INVARIANT",
                    help="opt out of one invariant by name (repeatable); reported as skipped")
    group.addoption("--etrm-shrink-seconds", type=float, default=None, metavar="S",
                    help="seconds shrinking may take after the first failure (default 30)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "etrm_suite: the ACT property suite run by --etrm-model")
    config.stash[_RESULTS] = []
    specs = config.getoption("etrm_model")
    factories = {}
    if specs:
        from diagnostics.properties.adapter import load_factory  # noqa: PLC0415 (lazy on purpose)
    for spec in specs:  # import now, so a wrong spec stops pytest at once with one clear line
        try:
            factories[spec] = load_factory(spec, search=[Path.cwd(), config.rootpath]).factory
        except ValueError as exc:
            raise pytest.UsageError(f"--etrm-model {exc}") from None
    config.stash[_FACTORIES] = factories
    if specs:
        from diagnostics.properties.suite_report import check_skip_names  # noqa: PLC0415 (lazy on purpose)
        try:
            check_skip_names(config.getoption("etrm_skip"))
        except ValueError as exc:
            raise pytest.UsageError(f"--etrm-skip: {exc}") from None
    if specs and str(SUITE_FILE) not in config.args:
        config.args.append(str(SUITE_FILE))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "etrm_model_spec" not in metafunc.fixturenames:
        return
    specs = metafunc.config.getoption("etrm_model")
    if specs:
        metafunc.parametrize("etrm_model_spec", specs, ids=specs, scope="module")
    else:
        skip = pytest.mark.skip(reason="no --etrm-model MODULE:FACTORY given")
        metafunc.parametrize("etrm_model_spec", [pytest.param(None, marks=skip)], ids=["no-model"])


@pytest.fixture(scope="module")
def etrm_adapter_factory(etrm_model_spec: str, pytestconfig: pytest.Config) -> Any:
    """The adapter factory named by ``--etrm-model`` (imported at configure time, cwd and rootdir as fallbacks)."""
    return pytestconfig.stash[_FACTORIES][etrm_model_spec]


@pytest.fixture
def etrm_suite_options(pytestconfig: pytest.Config) -> dict:
    """``max_examples``/``steps``/``shrink`` for ``run_suite`` from the command line (the suite's fast defaults
    otherwise, not the user's Hypothesis profile: ``--etrm-examples`` or the thorough profile ask for more)."""
    from diagnostics.properties.property_suite import SHRINK_SECONDS, default_examples  # noqa: PLC0415 (lazy)

    shrink_seconds = pytestconfig.getoption("etrm_shrink_seconds")
    return {"max_examples": default_examples(pytestconfig.getoption("etrm_examples")),
            "steps": pytestconfig.getoption("etrm_steps"), "shrink": not pytestconfig.getoption("etrm_no_shrink"),
            "skip": tuple(pytestconfig.getoption("etrm_skip")), "skip_reason": "opted out (--etrm-skip)",
            "shrink_seconds": SHRINK_SECONDS if shrink_seconds is None else shrink_seconds}


@pytest.fixture
def etrm_record(pytestconfig: pytest.Config):
    """Record (spec, stats, seconds) for the terminal summary."""
    return pytestconfig.stash[_RESULTS].append


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    terminalreporter.section("etrm property suite")
    for spec, stats, seconds in results:
        if stats is None:
            continue
        for line in summary_lines(spec, stats, seconds):
            terminalreporter.write_line(line)
    total = sum(seconds for _, _, seconds in results)
    terminalreporter.write_line(f"etrm property suite: {len(results)} model(s) in {total:.1f}s")


def summary_lines(spec: str, stats: Any, seconds: float) -> list[str]:
    """What one model's run exercised, which checks it skipped and why, the dropped samples of every feed, and (for
    a failing run) every invariant that failed and whether shrinking stopped early."""
    lines = [
        f"{spec}: {stats.examples} examples, {stats.steps} training steps, {stats.eval_runs} eval runs, "
        f"{stats.evaluate_runs} evaluate() runs, {stats.restores} checkpoint restores, {stats.reset_checks} "
        f"reset-from-init, {stats.permutation_checks} permutation and {stats.metamorphic_checks} metamorphic checks, "
        f"{stats.content_checks} content, {stats.loss_checks} loss, {stats.q_target_checks} Q-target and "
        f"{stats.coverage_checks} coverage checks ({seconds:.1f}s)"]
    if stats.cases:
        lines.append("  cases reached: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.cases.items())))
    return lines + stats.report_lines()
