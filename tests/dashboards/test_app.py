"""The app and the CLI without a browser: routing refuses paths outside --runs, tabs draw on real runs, the CLI
binds to 127.0.0.1 by default and prints the URL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import psutil
import pytest

from dashboards.components import ago
from dashboards.pages import compare_body, compare_page
from dashboards.run_view import CARD_FIGURES, CARD_STEPS, TABS, focus_range, kpis, run_page, tab_figures, tab_layout
from dashboards import cli
from dashboards.runs import Runs



def texts(component) -> str:
    """All text inside a Dash component tree."""
    return json.dumps(component.to_plotly_json(), default=lambda o: o.to_plotly_json() if hasattr(o, "to_plotly_json")
                      else str(o))


@pytest.mark.parametrize("name", ["..%2F..%2Fetc", "../outside", "%2Ftmp", "cached/../../x"])
def test_run_page_refuses_paths_outside_the_root(runs_root, name):
    page = run_page(Runs(runs_root), name, "")
    assert page.id == "refused"
    assert "refused" in texts(page)


def test_compare_page_refuses_paths_outside_the_root(runs_root):
    page = compare_page(Runs(runs_root), "?runs=cached,..%2F..%2Fetc")
    t = texts(page)
    assert "Refused" in t and "outside the runs directory" in t


def test_every_tab_draws_for_real_runs(runs_root):
    runs = Runs(runs_root)
    for name in ("cached", "reencode"):
        cache = runs.get(name)
        for tab, _ in TABS:
            figs = tab_figures(cache, tab)
            assert figs, tab
            for fid, fig in figs.items():
                assert "could not draw" not in json.dumps(fig, default=str), (name, tab, fid)
            tab_layout(tab, figs, cache)
        zoomed = tab_figures(cache, "overview", [5, 15], focus=10)
        assert zoomed["loss"]["layout"]["xaxis"]["range"] == [5.0, 15.0]


def test_compare_body_shows_cards_overlay_and_efficiency(runs_root):
    body, live = compare_body(Runs(runs_root), ["cached", "reencode"], "coverage")
    t = json.dumps([b.to_plotly_json() for b in body], default=lambda o: o.to_plotly_json()
                   if hasattr(o, "to_plotly_json") else str(o))
    assert "gradient-starvation" in t and "healthy" in t and "encoder forwards per step" in t
    assert live is False


def test_focus_range_and_ago():
    assert focus_range(100, 1, 1000) == (50, 150)
    assert focus_range(3, 1, 40) == (1, 18)
    assert ago(95.0, now=100.0) == "5 s ago" and ago(None) == "never"


def test_cli_defaults_to_loopback_and_rejects_bad_input(tmp_path, capsys):
    args = cli.build_parser().parse_args([])
    assert (args.host, args.port, args.runs) == ("127.0.0.1", 8050, "runs")
    assert cli.main(["--runs", str(tmp_path / "missing")]) == 2
    assert "no runs directory" in capsys.readouterr().err
    assert cli.main(["--runs", str(tmp_path), "--port", "0"]) == 2
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("::1") and not cli.is_loopback("0.0.0.0")


def test_served_app_binds_127_0_0_1_by_default_and_prints_the_url(served):
    assert served.first_line.endswith(f"at http://127.0.0.1:{served.port}/")
    addrs = {c.laddr for c in psutil.Process(served.proc.pid).net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN}
    assert addrs and {a.ip for a in addrs} == {"127.0.0.1"}, addrs
    assert urllib.request.urlopen(served.url + "/").status == 200


def test_no_url_serves_a_file_from_outside_the_root(served, runs_root):
    """Paths in URLs only ever name runs; static routes serve the app's own assets, nothing from disk by path."""
    for path in ("/run/..%2F..%2F..%2Fetc%2Fpasswd", "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                 "/_dash-component-suites/..%2F..%2F..%2Fetc%2Fpasswd", "/assets/../../etc/passwd"):
        try:
            body = urllib.request.urlopen(served.url + path).read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            assert exc.code >= 400, path  # refused (Dash answers 500 to a malformed suite path)
            assert b"root:" not in exc.read(), path
            continue
        assert "root:" not in body, path


def _find(component, id_: str):
    """The component with ``id_`` inside a Dash tree."""
    if getattr(component, "id", None) == id_:
        return component
    kids = getattr(component, "children", None)
    for kid in kids if isinstance(kids, list) else [kids] if kids is not None else []:
        if hasattr(kid, "to_plotly_json"):
            found = _find(kid, id_)
            if found is not None:
                return found
    return None


def test_run_card_shows_the_traces_own_sums_over_its_window(runs_root):
    """"loss per slot" on the card is sum(loss) / sum(slots) over the steps it names (it showed the per-step sum,
    batch-size times larger, because two figures were both called ``loss_mean``)."""
    from diagnostics.trace import figures
    from diagnostics.trace.loading import load_run

    for name in ("cached", "reencode"):
        cache = Runs(runs_root).get(name)
        card = kpis(cache.info, cache)
        df = load_run(runs_root / name)
        last = df.loc[max(1, cache.info.last_step - CARD_STEPS + 1):]
        expect = figures.over(last)
        for fig in CARD_FIGURES:
            shown = _find(card, f"card-{fig}").children
            assert shown == figures.format_value(figures.REGISTRY[fig], expect[fig]), (name, fig)
        assert f"steps {int(last.index[0]):,}..{int(last.index[-1]):,}" in texts(card)
        assert "encoder coverage" in texts(card) and "loss per slot" in texts(card)


def test_starvation_band_is_the_runs_own_threshold(tmp_path):
    """The band and the card's colour follow ``doctor.coverage_min`` of the run (it was a hard-coded 0.5)."""
    from dashboards.synthetic import write_synthetic

    write_synthetic(tmp_path / "r", 200, mode="cached", batch_size=16, max_steps_per_sample=4, timings=False,
                    doctor={"coverage_min": 0.2})
    cache = Runs(tmp_path).get("r")
    assert cache.info.thresholds.coverage_min == 0.2
    fig = tab_figures(cache, "overview")["coverage"]
    lines = [s for s in fig["layout"]["shapes"] if s.get("type") == "line" and s.get("yref") == "y"]
    assert lines and lines[0]["y0"] == 0.2
    assert any("coverage < 0.2" in a["text"] for a in fig["layout"]["annotations"])
    cov = _find(kpis(cache.info, cache), "card-coverage")
    assert cov is not None


def test_trm_runs_say_puzzle_table_rows_where_etrm_runs_say_encoder(tmp_path):
    from dashboards.synthetic import write_synthetic

    for mode in ("trm", "reencode"):
        write_synthetic(tmp_path / mode, 100, mode=mode, batch_size=8, max_steps_per_sample=4, timings=False)
    runs = Runs(tmp_path)
    trm, etrm = runs.get("trm"), runs.get("reencode")
    title = lambda c, tab, fid: tab_figures(c, tab)[fid]["layout"]["title"]["text"]  # noqa: E731
    assert title(trm, "overview", "coverage").startswith("Puzzle-table row")
    assert title(etrm, "overview", "coverage").startswith("Encoder")
    assert "puzzle-table rows" in title(trm, "coverage", "grad-norm")
    assert "puzzle-table row coverage" in texts(kpis(trm.info, trm))
    assert "encoder coverage" in texts(kpis(etrm.info, etrm))
