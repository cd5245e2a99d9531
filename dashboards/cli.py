"""``etrm-dash [--runs DIR] [--host 127.0.0.1] [--port 8050]``: serve the dashboard of the runs under DIR.

Binds to loopback unless told otherwise (the dashboard has no authentication), opens every trace read-only, serves
nothing outside DIR, answers only requests addressed to it (``dashboards.security``: Host and Origin checks), and
prints the URL. Exit 2 on bad input (missing runs directory, bad port, a port in use or an address that cannot be
bound), before any URL is printed.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import re
import socket
import sys
from pathlib import Path
from typing import Sequence

PROG = "etrm-dash"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


class _BadInput(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise _BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Live dashboard of traced etrm runs: gradient starvation at a glance, "
                                       "run comparison, halting, alignment and timing.")
    p.add_argument("--runs", default="runs", metavar="DIR", help="directory holding the run directories (./runs)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8050)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host is NAME (repeatable; for --host 0.0.0.0, the names other "
                        "machines use to reach it). Loopback names and the bound address are always served")
    return p


def check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` once (as the server will, address reuse on) and let go; a ``_BadInput`` saying why not,
    so that a port in use or an address this machine does not have fails before any URL is printed."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise _BadInput(f"cannot serve on {host}:{port}: unknown host ({exc}); pass an address of this machine "
                        "with --host") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        hint = "another program uses it; pass another --port" if exc.errno == errno.EADDRINUSE else \
            "pass an address of this machine with --host, or another --port"
        raise _BadInput(f"cannot serve on {host}:{port} ({exc.strerror or exc}); {hint}") from None


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


def is_host_name(text: str) -> bool:
    """An IP address, or a DNS name of letters, digits and hyphens (RFC 1123 labels, 253 characters at most)."""
    try:
        ipaddress.ip_address(text.strip("[]") if text.startswith("[") else text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(HOST_LABEL.match(label) for label in name.split("."))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not args.runs.strip():
            raise _BadInput("--runs is empty; pass the directory holding the run directories, e.g. --runs runs")
        root = Path(args.runs)
        for flag, name in (("--host", args.host), *(("--allow-host", h) for h in args.allow_host)):
            if not is_host_name(name):
                raise _BadInput(f"{flag} {name!r} is not a host name or address; pass e.g. 127.0.0.1, 0.0.0.0 or "
                                "a name like my-machine.example")
        if not root.is_dir():
            raise _BadInput(f"no runs directory at {root} (make one, or pass --runs DIR)")
        if not 0 < args.port < 65536:
            raise _BadInput(f"--port must be 1..65535, not {args.port}")
        check_bindable(args.host, args.port)
    except _BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from dashboards.app import create_app  # after argument checks: importing Dash takes a moment
    from dashboards.security import allowed_hosts, protect

    app = create_app(root)
    protect(app.server, allowed_hosts(args.host, args.allow_host))
    print(f"{PROG}: serving the runs under {root.resolve()} at {url_for(args.host, args.port)}", flush=True)
    if not is_loopback(args.host):
        print(f"{PROG}: warning: bound to {args.host}, reachable from other machines; the dashboard has no "
              "authentication", file=sys.stderr, flush=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request; errors still show
    try:
        app.run(host=args.host, port=args.port, debug=False)
    except (OSError, SystemExit) as exc:  # taken between the check and the bind: werkzeug exits with its own lines
        print(f"{PROG}: error: cannot serve on {args.host}:{args.port} ({exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
