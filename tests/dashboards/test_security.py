"""Who the dashboard answers: only its own Host names (no DNS rebinding), no cross-origin POST to its callbacks,
and each refused request (or refused run name) is one log line, not a traceback."""

from __future__ import annotations

import http.client
import json

import pytest

from dashboards.security import allowed_hosts, host_name, refusal

LOOP = allowed_hosts("127.0.0.1")


@pytest.mark.parametrize("bind, extra, host, served", [
    ("127.0.0.1", [], "127.0.0.1:8050", True),
    ("127.0.0.1", [], "localhost:8050", True),
    ("127.0.0.1", [], "LOCALHOST", True),
    ("127.0.0.1", [], "[::1]:8050", True),
    ("127.0.0.1", [], "evil.example:8050", False),    # DNS rebinding: a name the attacker controls
    ("127.0.0.1", [], "evil.example", False),
    ("127.0.0.1", [], "127.0.0.1.evil.example:8050", False),
    ("127.0.0.1", [], "", False),
    ("0.0.0.0", [], "0.0.0.0:8050", False),           # a wildcard bind is not a name to serve
    ("0.0.0.0", ["gpu-box", "10.0.0.5"], "gpu-box:8050", True),
    ("0.0.0.0", ["gpu-box", "10.0.0.5"], "10.0.0.5:8050", True),
    ("0.0.0.0", ["gpu-box"], "other-box:8050", False),
    ("192.168.1.20", [], "192.168.1.20:8050", True),
    ("::1", [], "[::1]:9000", True),
])
def test_host_rule(bind, extra, host, served):
    assert (refusal("GET", host, None, allowed_hosts(bind, extra)) is None) == served


@pytest.mark.parametrize("method, origin, served", [
    ("POST", "http://127.0.0.1:8050", True),          # Dash's own callbacks
    ("POST", None, True),                             # not from a browser page (curl, scripts)
    ("POST", "http://evil.example", False),
    ("POST", "http://127.0.0.1:9999", False),         # another origin on the same machine
    ("POST", "null", False),                          # sandboxed iframes, file:// pages
    ("GET", "http://evil.example", True),             # reads are guarded by the Host rule
])
def test_origin_rule(method, origin, served):
    assert (refusal(method, "127.0.0.1:8050", origin, LOOP) is None) == served


def test_host_name_parsing():
    assert host_name("Example.COM:80") == "example.com"
    assert host_name("[::1]:8050") == "::1" and host_name("::1") == "::1" and host_name("[fe80::1]") == "fe80::1"


def _request(port: int, method: str, path: str, host: str, body: bytes | None = None,
             origin: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host, "Content-Type": "application/json"}
    if origin:
        headers["Origin"] = origin
    conn.request(method, path, body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def _poll(name: str) -> bytes:
    """The body Dash's browser side posts for the run page's live refresh, with run name ``name``."""
    return json.dumps({
        "output": "..run-header.children...run-version.data...run-tick.disabled..",
        "outputs": [{"id": "run-header", "property": "children"}, {"id": "run-version", "property": "data"},
                    {"id": "run-tick", "property": "disabled"}],
        "inputs": [{"id": "run-tick", "property": "n_intervals", "value": 1}],
        "state": [{"id": "run-name", "property": "data", "value": name},
                  {"id": "run-version", "property": "data", "value": 0}],
        "changedPropIds": ["run-tick.n_intervals"],
    }).encode()


def test_served_dashboard_refuses_foreign_hosts_and_cross_origin_posts(helpers, tmp_path):
    (tmp_path / "runs").mkdir()
    served = helpers.Served(tmp_path / "runs")
    port, me = served.port, f"127.0.0.1:{served.port}"
    try:
        assert _request(port, "GET", "/", me) == 200
        assert _request(port, "GET", "/", f"localhost:{port}") == 200
        assert _request(port, "GET", "/", f"evil.example:{port}") == 403
        assert _request(port, "GET", "/_dash-layout", f"evil.example:{port}") == 403
        update = "/_dash-update-component"
        assert _request(port, "POST", update, me, _poll("x"), origin="http://evil.example") == 403
        assert _request(port, "POST", update, me, _poll("x"), origin=f"http://{me}") == 200
        # a run name outside --runs: refused in the callback, answered with its error card, logged as one line
        assert _request(port, "POST", update, me, _poll("../../etc"), origin=f"http://{me}") == 200
    finally:
        served.stop()
    log = served.proc.stdout.read()
    assert "Traceback" not in log
    refused = [line for line in log.splitlines() if "refused" in line]
    assert len(refused) == 4, log
    assert sum("Host 'evil.example:" in line for line in refused) == 2
    assert sum("cross-origin POST from Origin 'http://evil.example'" in line for line in refused) == 1
    assert sum("outside the runs directory" in line for line in refused) == 1


def test_allow_host_names_what_a_wildcard_bind_serves(helpers, tmp_path):
    (tmp_path / "runs").mkdir()
    served = helpers.Served(tmp_path / "runs", "--host", "0.0.0.0", "--allow-host", "gpu-box",
                            "--allow-host", "gpu-box.lab")
    port = served.port
    try:
        assert _request(port, "GET", "/", f"gpu-box:{port}") == 200
        assert _request(port, "GET", "/", f"gpu-box.lab:{port}") == 200
        assert _request(port, "GET", "/", f"127.0.0.1:{port}") == 200
        assert _request(port, "GET", "/", f"other-box:{port}") == 403
    finally:
        served.stop()
