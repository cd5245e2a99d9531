"""``etrm-dash [--runs DIR] [--host 127.0.0.1] [--port 8050]``: serve the dashboard of the runs under DIR.

Binds to loopback unless told otherwise (the dashboard has no authentication), opens every trace read-only, serves
nothing outside DIR, and prints the URL. Exit 2 on bad input (missing runs directory, bad port).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
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
    return p


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        root = Path(args.runs)
        if not root.is_dir():
            raise _BadInput(f"no runs directory at {root} (make one, or pass --runs DIR)")
        if not 0 < args.port < 65536:
            raise _BadInput(f"--port must be 1..65535, not {args.port}")
    except _BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from dashboards.app import create_app  # after argument checks: importing Dash takes a moment

    app = create_app(root)
    print(f"{PROG}: serving the runs under {root.resolve()} at {url_for(args.host, args.port)}", flush=True)
    if not is_loopback(args.host):
        print(f"{PROG}: warning: bound to {args.host}, reachable from other machines; the dashboard has no "
              "authentication", file=sys.stderr, flush=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request; errors still show
    try:
        app.run(host=args.host, port=args.port, debug=False)
    except OSError as exc:
        print(f"{PROG}: error: cannot serve on {args.host}:{args.port} ({exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
