"""The run page (``/run/<name>``): its header (status, verdict, numbers at a glance, findings) and its tabs' figures
and layout (plain functions: the benchmark and tests call them without a browser)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs

from dash import dcc, html

from dashboards import samples
from dashboards.components import (REFRESH_MS, ago, status_pill, restart_pill, verdict_badge, error_card, chips,
                                   findings_list, dgraph, graph, safe)
from dashboards.figures.alignment import alignment_figure
from dashboards.figures.base import HEIGHT, empty_figure, with_range
from dashboards.figures.coverage import coverage_figure, grad_norm_figure, encoder_work_figure
from dashboards.figures.halting import halting_summary_figure, halting_heatmap, q_figure
from dashboards.figures.overview import loss_figure, accuracy_figure
from dashboards.figures.timing import timing_figure
from dashboards.runs import (ALIGNMENT, COVERAGE, OVERVIEW, TIMING, Refused, RunCache, RunError, RunInfo, Runs,
                             halting_spec)
from diagnostics.trace import figures as registry
from diagnostics.trace.loading import load_task_stats
from diagnostics.trace.store import TraceError

TABS = (("overview", "Overview"), ("coverage", "Coverage"), ("halting", "Halting"), ("samples", "Samples"),
        ("alignment", "Alignment"), ("timing", "Timing"))


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
        out["loss"] = safe(lambda: loss_figure(f, findings, focus))
        out["accuracy"] = safe(lambda: accuracy_figure(f, _evals_in(cache, xr), findings, focus))
        out["coverage"] = safe(lambda: coverage_figure(f, threshold, findings, focus, title=cov_title))
        out["halting"] = safe(lambda: halting_summary_figure(f, mode, findings, focus))
        out["timing"] = safe(lambda: timing_figure(cache.timings(xr)))
    elif tab == "coverage":
        f = cache.frame(COVERAGE, xr)
        out["coverage-detail"] = safe(lambda: coverage_figure(f, threshold, findings, focus, title=cov_title,
                                                                height=HEIGHT + 80))
        out["grad-norm"] = safe(lambda: grad_norm_figure(f, findings, focus, mode=mode))
        out["encoder-work"] = safe(lambda: encoder_work_figure(f, mode=mode))
    elif tab == "halting":
        if mode == "fct":
            msg = "fct runs a fixed number of steps (fct.steps) per batch: nothing halts early"
            out["halting-heatmap"] = empty_figure(msg, "Halting step over training")
            out["q-halt"] = empty_figure(msg, "Q-halt precision and recall")
            out["inflight"] = empty_figure(msg, "Mean in-flight step")
        else:
            f = cache.frame(halting_spec(cache.columns), xr)
            out["halting-heatmap"] = safe(lambda: halting_heatmap(f))
            out["q-halt"] = safe(lambda: q_figure(f, findings, focus))
            out["inflight"] = safe(lambda: halting_summary_figure(f, mode, findings, focus,
                                                                    title="Mean in-flight and halting step"))
    elif tab == "alignment":
        f = cache.frame(ALIGNMENT, xr)
        out["alignment"] = safe(lambda: alignment_figure(f, findings, focus))
    elif tab == "timing":
        f = cache.frame(TIMING, xr)
        out["timing-detail"] = safe(lambda: timing_figure(cache.timings(xr), height=HEIGHT + 60))
        out["encoder-work-t"] = safe(lambda: encoder_work_figure(f, mode=mode))
    return {k: with_range(fig, xr) for k, fig in out.items()}


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
