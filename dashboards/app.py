"""The etrm-dash app: pages (runs list, run view with tabs, compare), their layout and callbacks.

Pages are routed on the URL path: ``/`` lists the runs under the root, ``/run/<name>`` shows one run (``?step=N``
zooms every chart around step N, ``?tab=coverage`` opens a tab), ``/compare?runs=a,b`` puts runs side by side. Every run name in a URL goes through
``dashboards.runs.resolve_run``: a path outside the root is refused, never read. Figures come from
``dashboards.figures`` (pure functions); data from ``dashboards.runs`` (read-only, incremental). A run that cannot be
read shows an error card; a callback never lets an exception reach the browser.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qs, quote, unquote

import dash
from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboards import figures as F
from dashboards import samples
from diagnostics.trace.loading import load_task_stats
from diagnostics.trace import figures as registry
from diagnostics.trace.schema import TraceError
from dashboards.runs import (ALIGNMENT, COMPARE, COVERAGE, OVERVIEW, TIMING, Refused, RunCache, RunError, RunInfo, Runs,
                             halting_spec, metric_spec)

ASSETS = Path(__file__).with_name("assets")
REFRESH_MS = 2000
LIST_REFRESH_MS = 5000
TABS = (("overview", "Overview"), ("coverage", "Coverage"), ("halting", "Halting"), ("samples", "Samples"),
        ("alignment", "Alignment"), ("timing", "Timing"))
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": False, "responsive": True}


# ------------------------------------------------------------------------------------------------------------------
# Small pieces

def ago(t: float | None, now: float | None = None) -> str:
    """'12 s ago', '3 min ago', '2 h ago', '4 d ago'."""
    if not t:
        return "never"
    d = max(0.0, (time.time() if now is None else now) - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= size:
            return f"{int(d // size)} {unit} ago"
    return f"{int(d)} s ago"


def run_href(name: str, step: int | None = None) -> str:
    return f"/run/{quote(name, safe='')}" + (f"?step={step}" if step is not None else "")


def status_pill(status: str) -> html.Span:
    return html.Span([html.Span(className="dot"), status], className=f"status {status}")


def restart_pill(info: RunInfo) -> list[html.Span]:
    """``restarted N×`` when torchrun restarted the run's workers (each resumed from the last checkpoint)."""
    if not info.restarts:
        return []
    return [html.Span(f"restarted {info.restarts}×", className="badge v-warning", id="restart-pill",
                      title="torchrun restarted the workers; each restart resumed from the last checkpoint")]


def verdict_badge(info: RunInfo, big: bool = False) -> html.Span:
    """The doctor's verdict as a coloured badge: green healthy, red error (first code), amber warning, grey n/a."""
    v = info.verdict
    cls = {"healthy": "v-healthy", "error": "v-error", "warning": "v-warning", "info": "v-info"}.get(v, "v-none")
    text = "healthy" if v == "healthy" else info.headline
    icon = {"healthy": "✓", "error": "✕", "warning": "!", "info": "i"}.get(v, "·")
    return html.Span([icon, " ", text], className=f"badge {cls}" + (" big" if big else ""),
                     title=f"doctor's verdict ({info.findings_source})")


def error_card(title: str, message: str, refused: bool = False) -> html.Div:
    return html.Div([html.H3(title), html.Div(message, className="mono")],
                    className="card " + ("refused-card" if refused else "error-card"))


def chips(meta: Mapping[str, Any]) -> list:
    out = []
    for key in ("model", "mode", "preset", "sampler", "device"):
        if meta.get(key):
            out.append(html.Span(f"{key} {meta[key]}", className="chip"))
    if meta.get("fault") not in (None, "", "none"):
        out.append(html.Span(f"fault {meta['fault']}", className="chip", style={"background": "#fef2f2",
                                                                                  "color": "#b91c1c"}))
    return out


def findings_list(name: str, info: RunInfo, limit: int | None = None, compact: bool = False) -> html.Ul | html.Div:
    """The findings, each linked to the step where it first held."""
    if info.error:
        return html.Div()
    if not info.findings:
        return html.Div("✓ no findings: no rule of the doctor holds on this run", className="none-found")
    items = []
    for fd in info.findings[:limit]:
        sev = fd.get("severity", "info")
        step = fd.get("first_step")
        items.append(html.Li([
            html.Span(sev, className=f"badge v-{sev}"),
            html.Span(fd["code"], className="code"),
            html.Span(fd.get("message", "") if not compact else _short(fd.get("message", "")), className="msg"),
            dcc.Link(f"step {step} →", href=run_href(name, step), className="at") if step is not None else None,
        ], className=f"finding finding-{fd['code']}"))
    return html.Ul(items, className="findings")


def _short(text: str, n: int = 150) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def dgraph(gid: Any, figure: Any) -> dcc.Graph:
    """A graph whose box has the figure's height (so a card never squashes it)."""
    h = figure.get("layout", {}).get("height", F.HEIGHT) if isinstance(figure, dict) else F.HEIGHT
    return dcc.Graph(id=gid, figure=figure, config=GRAPH_CONFIG, style={"height": f"{h}px"})


def graph(fid: str, figure: Any, cls: str = "fig") -> html.Div:
    return html.Div(dgraph({"type": "step-graph", "fig": fid}, figure), className=cls)


def safe(build: Callable[[], Any], title: str = "") -> Any:
    """Build a figure; on any error, a blank figure that says what went wrong (the page keeps working)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - a figure must never take the page down
        return F.empty_figure(f"could not draw: {' '.join(str(exc).split())[:120]}", title)


# ------------------------------------------------------------------------------------------------------------------
# Figures of one run's tab (plain functions: the benchmark and tests call them without a browser)

def focus_range(step: int, first: int, last: int) -> tuple[float, float]:
    """A window around a finding's step: a tenth of the run, at least 30 steps."""
    half = max(15, (last - first + 1) // 20)
    return (max(first, step - half), min(last, step + half))


def tab_figures(cache: RunCache, tab: str, xrange: Sequence[float] | None = None,
                focus: int | None = None) -> dict[str, Any]:
    """The figures of one tab of the run view, by id, over ``xrange`` (whole run when None)."""
    info = cache.info
    findings, mode = info.findings, info.meta.get("mode")
    xr = tuple(xrange) if xrange else None
    threshold = info.thresholds.coverage_min  # the run's own doctor threshold (its config's [doctor])
    trm = mode == "trm"  # TRM trains puzzle-table rows where ETRM trains an encoder: the titles say which
    cov_title = ("Puzzle-table row gradient coverage vs reset fraction" if trm
                 else "Encoder gradient coverage vs reset fraction")
    out: dict[str, Any] = {}
    if tab == "samples":  # the per-sample ledger (dashboards.samples); its charts have their own axes
        return samples.samples_figures(cache, xr)
    if tab == "overview":
        f = cache.frame(OVERVIEW, xr)
        out["loss"] = safe(lambda: F.loss_figure(f, findings, focus))
        out["accuracy"] = safe(lambda: F.accuracy_figure(f, _evals_in(cache, xr), findings, focus))
        out["coverage"] = safe(lambda: F.coverage_figure(f, threshold, findings, focus, title=cov_title))
        out["halting"] = safe(lambda: F.halting_summary_figure(f, mode, findings, focus))
        out["timing"] = safe(lambda: F.timing_figure(cache.timings(xr)))
    elif tab == "coverage":
        f = cache.frame(COVERAGE, xr)
        out["coverage-detail"] = safe(lambda: F.coverage_figure(f, threshold, findings, focus, title=cov_title,
                                                                height=F.HEIGHT + 80))
        out["grad-norm"] = safe(lambda: F.grad_norm_figure(f, findings, focus, mode=mode))
        out["encoder-work"] = safe(lambda: F.encoder_work_figure(f, mode=mode))
    elif tab == "halting":
        if mode == "fct":
            msg = "fct runs a fixed number of steps (fct.steps) per batch: nothing halts early"
            out["halting-heatmap"] = F.empty_figure(msg, "Halting step over training")
            out["q-halt"] = F.empty_figure(msg, "Q-halt precision and recall")
            out["inflight"] = F.empty_figure(msg, "Mean in-flight step")
        else:
            f = cache.frame(halting_spec(cache.columns), xr)
            out["halting-heatmap"] = safe(lambda: F.halting_heatmap(f))
            out["q-halt"] = safe(lambda: F.q_figure(f, findings, focus))
            out["inflight"] = safe(lambda: F.halting_summary_figure(f, mode, findings, focus,
                                                                    title="Mean in-flight and halting step"))
    elif tab == "alignment":
        f = cache.frame(ALIGNMENT, xr)
        out["alignment"] = safe(lambda: F.alignment_figure(f, findings, focus))
    elif tab == "timing":
        f = cache.frame(TIMING, xr)
        out["timing-detail"] = safe(lambda: F.timing_figure(cache.timings(xr), height=F.HEIGHT + 60))
        out["encoder-work-t"] = safe(lambda: F.encoder_work_figure(f, mode=mode))
    return {k: F.with_range(fig, xr) for k, fig in out.items()}


def _evals_in(cache: RunCache, xr: tuple[float, float] | None):
    ev = cache.evals
    if xr is None or ev is None or ev.empty:
        return ev
    return ev.loc[(ev.index >= xr[0]) & (ev.index <= xr[1])]


def tab_layout(tab: str, figs: Mapping[str, Any], cache: RunCache) -> list:
    """Arrange a tab's figures (and its tables) in the grid."""
    g = lambda k, cls="fig": graph(k, figs[k], cls) if k in figs else None  # noqa: E731
    if tab == "overview":
        return [html.Div([g("coverage", "fig span2"), g("loss"), g("accuracy"), g("halting"), g("timing")],
                         className="grid2"),
                html.P("Long runs are drawn as buckets: a line for the bucket mean, a band for the min/max of its "
                       "steps. At full detail, a 20-step rolling reading. Drag to zoom (every chart follows, every "
                       "step once few enough are shown), double-click to reset. Coverage in the red zone is "
                       "starvation.", className="hint")]
    if tab == "coverage":
        hint = ("Coverage counts the slots whose puzzle-table row got a non-zero gradient: TRM looks its row up "
                "every step, so every slot's row is trained." if cache.info.meta.get("mode") == "trm" else
                "Coverage counts the slots whose fresh encoder output got a non-zero gradient. In cached mode only "
                "reset slots are encoded with gradient, so coverage equals the reset fraction.")
        return [html.Div([g("coverage-detail", "fig span2"), g("grad-norm"), g("encoder-work")], className="grid2"),
                html.P(hint, className="hint")]
    if tab == "halting":
        return [html.Div([g("halting-heatmap", "fig span2"), g("q-halt"), g("inflight")], className="grid2")]
    if tab == "alignment":
        return [g("alignment"), html.H2("First offending samples"), alignment_table(cache)]
    if tab == "samples":
        return samples.samples_layout(figs, load_task_stats(cache.path), graph,
                                      lambda k, fig: dgraph({"type": "samples-graph", "fig": k}, fig))
    if tab == "timing":
        return [html.Div([g("timing-detail", "fig span2"), g("encoder-work-t")], className="grid2"),
                html.H2("Profiler traces"), profiler_panel(cache)]
    return [html.Div("unknown tab")]


def alignment_table(cache: RunCache) -> html.Div:
    df = cache.alignment
    if df is None or df.empty:
        return html.Div("No offending slot was recorded: every slot's loss labels and demos were its own.",
                        className="card none-found")
    head = html.Tr([html.Th(c.replace("_", " ")) for c in df.columns])
    rows = [html.Tr([html.Td("" if v is None or v != v else int(v), className="num") for v in r])
            for r in df.head(32).itertuples(index=False)]
    return html.Table([html.Thead(head), html.Tbody(rows)], className="runs")


def profiler_panel(cache: RunCache) -> html.Div:
    traces = cache.profiler_traces()
    if not traces:
        return html.Div(["No profiler traces in this run. Train with ", html.Code("--profile"),
                         " to record a few steps for TensorBoard and Perfetto."], className="card sub")
    prof = traces[0].parent
    first = traces[0]
    return html.Div([
        html.Div(f"{len(traces)} trace file(s) under {prof}", className="sub"),
        html.Div("TensorBoard (PyTorch Profiler plugin):", style={"marginTop": "8px"}),
        html.Pre(f"tensorboard --logdir {prof}", className="cmd"),
        html.Div("Perfetto (opens a trace in ui.perfetto.dev; open_trace_in_ui is the script in the Perfetto "
                 "repository's tools/ folder; or drag the file onto ui.perfetto.dev):"),
        html.Pre(f"./open_trace_in_ui -i {first}", className="cmd"),
        html.Ul([html.Li(html.Code(str(p.relative_to(cache.path)))) for p in traces], className="sub"),
    ], className="card")


# ------------------------------------------------------------------------------------------------------------------
# Pages

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


def kpis(info: RunInfo, cache: RunCache) -> html.Div:
    """Numbers at a glance: steps (live), coverage and resets over the last window, exact accuracy, loss."""
    try:
        (lo, hi), values = cache.window(CARD_STEPS)
    except (RunError, TraceError, KeyError, IndexError):
        (lo, hi), values = (0, 0), {}

    def val(name: str) -> float | None:
        v = values.get(name)
        return None if v is None or v != v else float(v)

    cov = val("coverage")
    window = f"steps {lo:,}..{hi:,}" if hi else "no steps yet"
    starved = info.thresholds.coverage_min
    tiles = [
        _tile("steps", f"{info.last_step:,}", f"max {info.meta.get('max_steps', '?'):,}"
              if isinstance(info.meta.get("max_steps"), int) else "", id_="run-steps"),
        _tile(coverage_label(info.meta), fmt("coverage", cov), window,
              "bad" if cov is not None and cov < starved else ("good" if cov is not None else ""),
              id_="card-coverage"),
        _tile("reset fraction", fmt("reset_fraction", val("reset_fraction")), window, id_="card-reset_fraction"),
        _tile("exact (in-flight)", fmt("exact_inflight", val("exact_inflight")), window,
              id_="card-exact_inflight"),
        _tile("loss per slot", fmt("loss_per_slot", val("loss_per_slot")), window, id_="card-loss_per_slot"),
        _tile("updated", ago(info.updated), info.status),
    ]
    return html.Div(tiles, className="kpis")


# The run card's figures (registered names) and the window they are over.
CARD_FIGURES = ("coverage", "reset_fraction", "exact_inflight", "loss_per_slot")
CARD_STEPS = 100


def coverage_label(meta: Mapping[str, Any]) -> str:
    """TRM trains puzzle-table rows where ETRM trains an encoder: the card says which."""
    return "puzzle-table row coverage" if meta.get("mode") == "trm" else "encoder coverage"


def fmt(name: str, value: float | None) -> str:
    """A registered figure's value as the cards show it."""
    return registry.format_value(registry.REGISTRY[name], value)


def _tile(label: str, value: str, note: str = "", cls: str = "", id_: str | None = None) -> html.Div:
    v = html.Div(value, className="value", id=id_) if id_ else html.Div(value, className="value")
    return html.Div([html.Div(label, className="label"), v, html.Div(note, className="note")],
                    className=f"kpi {cls}")


def run_header(name: str, cache: RunCache) -> list:
    info = cache.info
    if info.error:
        return [html.Div([html.Div([html.H1(name), html.Div(chips(info.meta))], className="title"),
                          html.Div([verdict_badge(info, big=True)], className="right")], className="run-head"),
                html.Div(style={"height": "12px"}),
                error_card("This run could not be read", info.error)]
    return [
        html.Div([
            html.Div([html.H1(name), html.Div(chips(info.meta))], className="title"),
            html.Div([status_pill(info.status), *restart_pill(info), verdict_badge(info, big=True)], className="right"),
        ], className="run-head"),
        kpis(info, cache),
        html.H2("Findings" + ("" if info.findings_source == "doctor" else " (stored by the trainer's live doctor)")),
        html.Div(findings_list(name, info), className="card"),
    ]


def run_page(runs: Runs, name: str, search: str) -> html.Div:
    try:
        cache = runs.get(name)
    except Refused as exc:
        return html.Div([error_card("Refused", str(exc), refused=True)], className="page", id="refused")
    except RunError as exc:
        return html.Div([error_card("No such run", str(exc))], className="page")
    q = parse_qs(search.lstrip("?")) if search else {}
    focus = _int(q.get("step", [None])[0])
    tab = q.get("tab", ["overview"])[0]
    tab = tab if tab in dict(TABS) else "overview"  # ?tab=coverage opens that tab (links, screenshots)
    xrange = list(focus_range(focus, cache.info.first_step, cache.info.last_step)) if focus is not None else None
    key = cache.name
    return html.Div([
        dcc.Store(id="run-name", data=key),
        dcc.Store(id="run-focus", data=focus),
        dcc.Store(id="xrange", data=xrange),
        dcc.Store(id="run-version", data=cache.info.last_step),
        dcc.Interval(id="run-tick", interval=REFRESH_MS, disabled=cache.info.status != "live" and not cache.info.error),
        html.Div(run_header(key, cache), id="run-header"),
        dcc.Tabs(id="run-tab", value=tab, className="tabs-row",
                 children=[dcc.Tab(label=label, value=v, className="tab", selected_className="tab--selected")
                           for v, label in TABS]),
        dcc.Loading(html.Div(id="tab-content", className="tab-content"), type="dot", delay_show=400),
    ], className="page")


def _int(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


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
    metric = metric if metric in F.METRICS else "coverage"
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
                      dcc.Dropdown(id="cmp-metric", options=[{"label": v, "value": k} for k, v in F.METRICS.items()],
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
    colors = F.run_colors([*runs.names(), *picked])  # a run's colour does not depend on which runs are picked
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
            cov = safe(lambda: F.coverage_figure(f, info.thresholds.coverage_min, info.findings,
                                                 title="Coverage vs reset fraction",
                                                 height=F.HEIGHT + 10))
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
    body.append(html.Div(dgraph("cmp-overlay", safe(lambda: F.compare_figure(frames, metric, colors=colors))),
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
    df = F.efficiency_table(table_in)
    names = list(df.columns)
    colors = colors or F.run_colors(names)
    head = html.Tr([html.Th("")] + [html.Th([html.Span(className="swatch", style={"background": colors[n]}), n])
                                    for n in names])
    rows = [html.Tr([html.Td(idx)] + [html.Td(df.loc[idx, n]) for n in names]) for idx in df.index]
    return html.Table([html.Thead(head), html.Tbody(rows)], className="eff", id="efficiency")


def not_found(path: str) -> html.Div:
    return html.Div([error_card("Not found", f"no page at {path}; see the runs list")], className="page")


# ------------------------------------------------------------------------------------------------------------------
# The app

def create_app(runs_root: str | Path, refresh_ms: int = REFRESH_MS) -> Dash:
    """The Dash app serving the runs under ``runs_root`` (nothing outside it)."""
    runs = Runs(runs_root)
    app = Dash(__name__, assets_folder=str(ASSETS), title="etrm-dash", update_title=None,
               suppress_callback_exceptions=True, serve_locally=True)
    app.runs = runs  # type: ignore[attr-defined]
    app.layout = html.Div([dcc.Location(id="url", refresh=False), topbar(runs.root), html.Div(id="page")])

    def guard(fn: Callable[..., Any], fallback: Callable[[str], Any]) -> Callable[..., Any]:
        """A callback that turns any exception into an error card (the app never crashes)."""

        def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except dash.exceptions.PreventUpdate:
                raise
            except RunError as exc:  # a refused or unreadable run: its card says why; one log line, no traceback
                text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                print(f"etrm-dash: {text}", file=sys.stderr, flush=True)
                return fallback(text)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                return fallback(f"{type(exc).__name__}: {' '.join(str(exc).split())}")

        wrapped.__name__ = fn.__name__
        return wrapped

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None):
        def go():
            path = pathname or "/"
            if path in ("/", "/runs", "/runs/"):
                return runs_page(runs)
            if path.startswith("/run/"):
                return run_page(runs, unquote(path[len("/run/"):]), search or "")
            if path.rstrip("/") == "/compare":
                return compare_page(runs, search or "")
            return not_found(path)

        return guard(go, lambda m: html.Div([error_card("Something went wrong", m)], className="page"))()

    @app.callback(Output("runs-table", "children"), Input("runs-tick", "n_intervals"), prevent_initial_call=True)
    def refresh_list(_n):
        return guard(lambda: runs_table(runs.infos()), lambda m: error_card("Cannot list runs", m))()

    @app.callback(Output("run-header", "children"), Output("run-version", "data"), Output("run-tick", "disabled"),
                  Input("run-tick", "n_intervals"), State("run-name", "data"), State("run-version", "data"),
                  prevent_initial_call=True)
    def poll(_n, name, version):
        """Live refresh: reads only rows past the last step seen; stops polling when the run has ended."""

        def go():
            cache = runs.get(name)
            info = cache.info
            stop = info.status != "live" and not info.error
            if info.last_step == version and not info.error and not stop:
                return no_update, no_update, False
            return run_header(name, cache), info.last_step, stop

        return guard(go, lambda m: (error_card("Refresh failed", m), no_update, False))()

    @app.callback(Output("xrange", "data"), Input({"type": "step-graph", "fig": ALL}, "relayoutData"),
                  State("xrange", "data"), prevent_initial_call=True)
    def zoom(relayouts, current):
        """Any step chart's zoom sets the visible range of all of them (double-click resets)."""
        trig = ctx.triggered_id
        if not trig:
            return no_update
        data = next((r for r, s in zip(relayouts, ctx.inputs_list[0]) if s["id"] == trig), None) or {}
        if "xaxis.range[0]" in data and "xaxis.range[1]" in data:
            new = [data["xaxis.range[0]"], data["xaxis.range[1]"]]
        elif isinstance(data.get("xaxis.range"), list):
            new = list(data["xaxis.range"])
        elif data.get("xaxis.autorange"):
            new = None
        else:
            return no_update
        try:
            new = None if new is None else [float(new[0]), float(new[1])]
        except (TypeError, ValueError):
            return no_update
        return no_update if new == current else new

    @app.callback(Output("tab-content", "children"), Input("run-tab", "value"), Input("run-version", "data"),
                  Input("xrange", "data"), State("run-name", "data"), State("run-focus", "data"))
    def show_tab(tab, _version, xrange, name, focus):
        def go():
            cache = runs.get(name, refresh=False)
            if cache.info.error and not cache.info.last_step:
                return [error_card("Nothing to draw", cache.info.error)]
            figs = tab_figures(cache, tab or "overview", xrange, focus)
            return tab_layout(tab or "overview", figs, cache)

        return guard(go, lambda m: [error_card("Could not draw this tab", m)])()

    @app.callback(Output("cmp-body", "children"), Output("cmp-tick", "disabled"),
                  Input("cmp-runs", "value"), Input("cmp-metric", "value"), Input("cmp-tick", "n_intervals"))
    def compare(picked, metric, _n):
        def go():
            body, live = compare_body(runs, picked or [], metric or "coverage")
            return body, not live

        return guard(go, lambda m: ([error_card("Could not compare", m)], True))()

    return app
