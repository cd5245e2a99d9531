"""etrm-dash's arguments, Origin scheme and error paths (issue 24): bad arguments exit 2 with one line before any URL,
an Origin of another scheme is cross-origin, and no crafted request path answers 500 (one log line, no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboards.security import allowed_hosts, protect, refusal
from tests.test_bad_input import assert_one_line, run_prog, snapshot


@pytest.mark.parametrize("args, needles", [
    (["--runs", ""], ["--runs", "empty"]),
    (["--runs", "runs", "--host", ""], ["--host ''"]),
    (["--runs", "runs", "--allow-host", "http://evil.example"], ["--allow-host", "http://evil.example"]),
    (["--runs", "runs", "--allow-host", "a b"], ["--allow-host", "'a b'"]),
    (["--runs", "runs", "--allow-host", ""], ["--allow-host ''"]),
    (["--runs", "runs", "--host=-x.example"], ["--host", "-x.example"]),
], ids=["runs-empty", "host-empty", "allow-host-url", "allow-host-space", "allow-host-empty", "host-leading-hyphen"])
def test_reliability_dash_bad_arguments(args: list[str], needles: list[str], tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    before = snapshot(tmp_path)
    proc = run_prog("etrm-dash", args, tmp_path)
    assert_one_line(proc, "etrm-dash", needles)
    assert "http://" not in proc.stdout and snapshot(tmp_path) == before


@pytest.mark.parametrize("origin, served", [
    ("http://127.0.0.1:8050", True),
    ("https://127.0.0.1:8050", False),   # the same host and port over another scheme is another origin
    ("ws://127.0.0.1:8050", False),
    ("HTTP://127.0.0.1:8050", True),
])
def test_reliability_origin_scheme(origin: str, served: bool) -> None:
    assert (refusal("POST", "127.0.0.1:8050", origin, allowed_hosts("127.0.0.1")) is None) == served


def test_reliability_no_path_gives_500(tmp_path: Path) -> None:
    from dashboards.app import create_app

    app = create_app(tmp_path)
    lines: list[str] = []
    protect(app.server, allowed_hosts("127.0.0.1"), log=lines.append)
    client = app.server.test_client()
    paths = ["/_dash-component-suites/nope/x.js", "/_dash-component-suites/dash/../../etc/passwd",
             "/_dash-component-suites/dash/x", "/_dash-component-suites/dash/dcc/nope.v1_0_0m123.js",
             "/_dash-component-suites/plotly/x.js", "/_dash-component-suites/dash/deps/polyfill%00.js"]
    for path in paths:
        response = client.get(path, headers={"Host": "127.0.0.1:8050"})
        assert response.status_code == 404, (path, response.status_code)
        assert b"Traceback" not in response.data
    assert len(lines) == len(paths) and all("\n" not in line and "not found" in line for line in lines)
