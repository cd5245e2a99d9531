"""Who the dashboard answers: a Host check (against DNS rebinding) and an Origin check on state-changing requests.

A page on another site can make a browser send requests to a loopback dashboard through a name it controls that
resolves to 127.0.0.1 (DNS rebinding); the request then carries that name in ``Host``. So only the bound address,
``localhost`` and the loopback addresses (and, for a wildcard bind, the names given with ``--allow-host``) are
served, and a POST (Dash's callbacks) whose ``Origin`` is not this very dashboard is refused. A refused request is
answered 403 and logged as one line.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable
from urllib.parse import urlsplit

from dash.exceptions import DependencyException
from flask import Flask, Response, request

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names served: loopback names, the bound address unless a wildcard, and ``extra`` (``--allow-host``)."""
    names = {*LOOPBACK_NAMES, *(h.strip().lower().strip("[]") for h in extra if h.strip())}
    if bind_host not in WILDCARDS:
        names.add(bind_host.lower().strip("[]"))
    return frozenset(names)


def host_name(netloc: str) -> str:
    """``Host``/``Origin`` netloc without the port, lower case, IPv6 brackets removed."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc[1:]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def refusal(method: str, host: str, origin: str | None, allowed: frozenset[str],
            scheme: str = "http") -> str | None:
    """Why a request is refused (one line), or None when it is served. Pure, so that the rule is tested directly.
    An ``Origin`` must be this dashboard: its scheme (``scheme``, what it is served over) and its host and port."""
    if host_name(host) not in allowed:
        return f"Host {host!r} is not served (allowed: {', '.join(sorted(allowed))}; see --allow-host)"
    if method.upper() not in SAFE_METHODS and origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.scheme.lower() != scheme or parts.netloc.lower() != host.strip().lower():
            return f"cross-origin {method.upper()} from Origin {origin!r} (this dashboard is {host!r})"
    return None


def protect(server: Flask, allowed: frozenset[str], log: Callable[[str], None] | None = None) -> None:
    """Answer 403, and log one line, for every request ``refusal`` refuses (installed before any other handler)."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def check() -> Response | None:
        why = refusal(request.method, request.host, request.headers.get("Origin"), allowed, request.scheme)
        if why is None:
            return None
        say(f"etrm-dash: refused {request.method} {request.path} from {request.remote_addr}: {why}")
        return Response(f"refused: {why}\n", status=403, mimetype="text/plain")

    server.before_request_funcs.setdefault(None, []).insert(0, check)

    def not_found(exc: Exception) -> Response:  # Dash raises on an unknown component-suite path: a 404, not a 500
        say(f"etrm-dash: not found {request.method} {request.path} from {request.remote_addr}: "
            f"{' '.join(str(exc).split())[:160]}")
        return Response("not found\n", status=404, mimetype="text/plain")

    server.register_error_handler(DependencyException, not_found)

