"""The other pages of etrm-dash: the top bar, the runs list (``/``), compare (``/compare?runs=a,b``) and not found."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs, unquote

from dash import dcc, html

from dashboards.components import (REFRESH_MS, ago, run_href, status_pill, verdict_badge, error_card, findings_list,
                                   dgraph, safe)
from dashboards.figures.base import HEIGHT
from dashboards.figures.compare import METRICS, run_colors, compare_figure, efficiency_table
from dashboards.figures.coverage import coverage_figure
from dashboards.runs import COMPARE, Refused, RunError, RunInfo, Runs, metric_spec

LIST_REFRESH_MS = 5000


def topbar(root: Path) -> html.Div:
    return html.Div([
        html.Div(["etrm", html.Span("-dash")], className="brand"),
        html.Nav([dcc.Link("Runs", href="/"), dcc.Link("Compare", href="/compare")]),
        html.Div(f"runs: {root}", className="root"),
    ], className="topbar")


def runs_table(infos: Sequence[RunInfo]) -> html.Div:
    if not infos:
        return html.Div(["No traced runs yet. Start one with ",
                         html.Code("etrm-train --preset demo --trace"), "; it appears here while it trains."],
                        className="card sub")
    head = html.Tr([html.Th("run"), html.Th("model · mode"), html.Th("preset"), html.Th("status"),
                    html.Th("steps", className="num"), html.Th("last update"), html.Th("doctor")])
    rows = []
    for i in infos:
        if i.error:
            rows.append(html.Tr([html.Td(dcc.Link(i.name, href=run_href(i.name), className="run-name")),
                                 html.Td(i.error, colSpan=5, className="sub"), html.Td(verdict_badge(i))],
                                className="run-row"))
            continue
        m = i.meta
        rows.append(html.Tr([
            html.Td(dcc.Link(i.name, href=run_href(i.name), className="run-name")),
            html.Td(f"{m.get('model', '?')} · {m.get('mode', '?')}"),
            html.Td(m.get("preset") or "—"),
            html.Td(status_pill(i.status)),
            html.Td(f"{i.last_step:,}", className="num"),
            html.Td(ago(i.updated), title=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.updated or 0))),
            html.Td(verdict_badge(i)),
        ], className="run-row", id={"type": "run-row", "name": i.name}))
    return html.Table([html.Thead(head), html.Tbody(rows)], className="runs")


def runs_page(runs: Runs) -> html.Div:
    return html.Div([
        html.H1("Runs"),
        html.Div("Every traced run under the runs directory, newest first. Live runs update by themselves.",
                 className="sub"),
        html.Div(style={"height": "14px"}),
        html.Div(runs_table(runs.infos()), id="runs-table"),
        dcc.Interval(id="runs-tick", interval=LIST_REFRESH_MS),
    ], className="page")



def compare_page(runs: Runs, search: str) -> html.Div:
    q = parse_qs(search.lstrip("?")) if search else {}
    names = runs.names()
    wanted = [unquote(n) for part in q.get("runs", []) for n in part.split(",") if n]
    refused = []
    picked = []
    for n in wanted:
        try:
            picked.append(runs.get(n, refresh=False).name)
        except RunError as exc:
            refused.append(str(exc))
    if not wanted:
        picked = _default_pair(runs, names)
    metric = q.get("metric", ["coverage"])[0]
    metric = metric if metric in METRICS else "coverage"
    return html.Div([
        html.H1("Compare runs"),
        html.Div("Pick runs to put side by side; overlay any metric; the efficiency table is computed from the "
                 "traces.", className="sub"),
        *([error_card("Refused", "; ".join(refused), refused=True)] if refused else []),
        html.Div([
            html.Div([html.Label("runs"), dcc.Dropdown(id="cmp-runs", options=[{"label": n, "value": n}
                                                                             for n in names],
                                                       value=picked, multi=True, placeholder="pick runs")]),
            html.Div([html.Label("overlay metric"),
                      dcc.Dropdown(id="cmp-metric", options=[{"label": v, "value": k} for k, v in METRICS.items()],
                                   value=metric, clearable=False)]),
        ], className="picker card", style={"marginTop": "14px"}),
        dcc.Interval(id="cmp-tick", interval=REFRESH_MS, disabled=True),
        html.Div(id="cmp-body"),
    ], className="page")


def _default_pair(runs: Runs, names: Sequence[str]) -> list[str]:
    """Without a choice: up to the four newest runs."""
    return list(names[:4])


def compare_body(runs: Runs, picked: Sequence[str], metric: str) -> tuple[list, bool]:
    """Side-by-side cards (verdict, coverage chart, findings), the overlay and the efficiency table; and whether any
    picked run is live."""
    cards, frames, table_in, live = [], {}, {}, False
    colors = run_colors([*runs.names(), *picked])  # a run's colour does not depend on which runs are picked
    for name in picked:
        try:
            cache = runs.get(name)
        except RunError as exc:
            cards.append(html.Div([html.Div([html.Span(name, className="name")], className="head"),
                                   error_card("Refused" if isinstance(exc, Refused) else "Cannot read", str(exc),
                                              refused=isinstance(exc, Refused))], className="run-card"))
            continue
        info = cache.info
        live = live or info.status == "live"
        color = colors[name]
        head = html.Div([
            html.Div([html.Span(className="swatch", style={"background": color}),
                      dcc.Link(name, href=run_href(name), className="name"),
                      html.Span(f"  {info.meta.get('model', '')} · {info.meta.get('mode', '')}", className="sub")]),
            html.Div([status_pill(info.status), " ", verdict_badge(info)]),
        ], className="head")
        if info.error:
            cards.append(html.Div([head, error_card("This run could not be read", info.error)],
                                  className="run-card bad"))
            continue
        try:
            f = cache.frame(COMPARE)
            cov = safe(lambda: coverage_figure(f, info.thresholds.coverage_min, info.findings,
                                                 title="Coverage vs reset fraction",
                                                 height=HEIGHT + 10))
            frames[name] = f if metric == "coverage" else cache.frame(metric_spec(metric))
            table_in[name] = (info.meta, cache.totals())
        except RunError as exc:
            cards.append(html.Div([head, error_card("This run could not be read", str(exc))],
                                  className="run-card bad"))
            continue
        cls = {"error": "bad", "warning": "warn", "healthy": "good"}.get(info.verdict, "")
        cards.append(html.Div([
            head,
            dgraph({"type": "cmp-coverage", "run": name}, cov),
            findings_list(name, info, limit=3, compact=True),
        ], className=f"run-card {cls}", id={"type": "cmp-card", "run": name}))
    body: list = []
    if not picked:
        body.append(html.Div("Pick two or more runs above.", className="card sub", style={"marginTop": "14px"}))
        return body, False
    body.append(html.H2("Side by side"))
    body.append(html.Div(cards, className=f"side cols{side_columns(len(cards))}"))
    body.append(html.H2("Overlay"))
    body.append(html.Div(dgraph("cmp-overlay", safe(lambda: compare_figure(frames, metric, colors=colors))),
                         className="fig"))
    body.append(html.H2("Efficiency (from the traces)"))
    body.append(efficiency_html(table_in, colors))
    return body, live


def side_columns(n: int) -> int:
    """Cards per row on the compare page: up to three side by side, four as two rows of two (so that each card's
    chart and findings keep a readable width)."""
    return 2 if n == 4 else max(1, min(n, 3))


def efficiency_html(table_in: Mapping[str, tuple[Mapping[str, Any], Mapping[str, float]]],
                    colors: Mapping[str, str] | None = None) -> html.Div:
    if not table_in:
        return html.Div("no readable run picked", className="card sub")
    df = efficiency_table(table_in)
    names = list(df.columns)
    colors = colors or run_colors(names)
    head = html.Tr([html.Th("")] + [html.Th([html.Span(className="swatch", style={"background": colors[n]}), n])
                                    for n in names])
    rows = [html.Tr([html.Td(idx)] + [html.Td(df.loc[idx, n]) for n in names]) for idx in df.index]
    return html.Table([html.Thead(head), html.Tbody(rows)], className="eff", id="efficiency")


def not_found(path: str) -> html.Div:
    return html.Div([error_card("Not found", f"no page at {path}; see the runs list")], className="page")
