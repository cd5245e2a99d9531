"""The etrm-dash app: the Dash app and its callbacks (routing, live refresh, the shared zoom, tabs, compare).

Pages are routed on the URL path: ``/`` lists the runs under the root, ``/run/<name>`` shows one run (``?step=N``
zooms every chart around step N, ``?tab=coverage`` opens a tab), ``/compare?runs=a,b`` puts runs side by side.
Every run name in a URL goes through ``dashboards.runs.resolve_run``: a path outside the root is refused, never read.
The pages' layout comes from ``dashboards.pages`` and ``dashboards.run_view``, figures from ``dashboards.figures``
(pure functions), data from ``dashboards.runs`` (read-only, incremental). A run that cannot be read shows an error
card; a callback never lets an exception reach the browser.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import dash
from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboards.components import REFRESH_MS, error_card
from dashboards.pages import compare_body, compare_page, not_found, runs_page, runs_table, topbar
from dashboards.run_view import run_header, run_page, tab_figures, tab_layout
from dashboards.runs import RunError, Runs

ASSETS = Path(__file__).with_name("assets")


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
