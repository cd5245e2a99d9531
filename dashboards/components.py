"""Small pieces every page of etrm-dash uses: status and verdict badges, error cards, findings lists, graphs, and
``safe`` (a figure that fails to build becomes a blank one that says why)."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping
from urllib.parse import quote

from dash import dcc, html

from dashboards.figures.base import HEIGHT, empty_figure
from dashboards.runs import RunInfo

REFRESH_MS = 2000
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": False, "responsive": True}


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
    """The doctor's verdict as a coloured badge: green healthy, red error, amber warning, grey n/a; the worst finding's
    code with the count of all the run's findings, every one of them (severity, code, step) on hover."""
    v = info.verdict
    cls = {"healthy": "v-healthy", "error": "v-error", "warning": "v-warning", "info": "v-info"}.get(v, "v-none")
    text = "healthy" if v == "healthy" else info.headline
    icon = {"healthy": "✓", "error": "✕", "warning": "!", "info": "i"}.get(v, "·")
    n = len(info.findings) if not info.error else 0
    title = f"doctor's verdict ({info.findings_source})"
    if n:
        title += f": {n} finding{'s' if n > 1 else ''}\n" + "\n".join(
            f"{f.get('severity')}: {f['code']} (step {f.get('first_step')})" for f in info.findings)
    count = [" ", html.Span(str(n), className="badge-count")] if n > 1 else []
    return html.Span([icon, " ", text, *count], className=f"badge {cls}" + (" big" if big else ""), title=title)


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
    h = figure.get("layout", {}).get("height", HEIGHT) if isinstance(figure, dict) else HEIGHT
    return dcc.Graph(id=gid, figure=figure, config=GRAPH_CONFIG, style={"height": f"{h}px"})


def graph(fid: str, figure: Any, cls: str = "fig") -> html.Div:
    return html.Div(dgraph({"type": "step-graph", "fig": fid}, figure), className=cls)


def safe(build: Callable[[], Any], title: str = "") -> Any:
    """Build a figure; on any error, a blank figure that says what went wrong (the page keeps working)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - a figure must never take the page down
        return empty_figure(f"could not draw: {' '.join(str(exc).split())[:120]}", title)
