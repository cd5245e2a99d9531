"""A PNG of an etrm-dash page in real headless chromium, for the docs (needs the ``test`` extra and Debian's
chromium + chromium-driver, as the browser tests do).

    python -m dashboards.screenshot --runs runs --path "/compare?runs=demo-cached,demo-reencode" \\
        --out docs/dashboard-compare.png
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_drawn(driver, timeout_s: float = 90.0) -> None:
    """Until the page's charts are drawn: at least one, and as many as a second ago (a loaded machine may take
    tens of seconds; a fixed pause shot empty pages)."""
    count = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
    deadline, last = time.time() + timeout_s, -1
    while time.time() < deadline:
        n = driver.execute_script(count)
        if n and n == last:
            return
        last = n
        time.sleep(1.0)


def shoot(runs: Path, path: str, out: Path, width: int = 1440, settle_s: float = 2.0) -> Path:
    """Serve ``runs`` with etrm-dash on a free loopback port, open ``path``, save the full page as ``out``."""
    os.environ.setdefault("DASH_TEST_CHROMEPATH", "/usr/bin/chromium")
    from dash.testing.browser import Browser

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "dashboards.cli", "--runs", str(runs), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(url + "/", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        browser = Browser("chrome", headless=True, percy_run=False, wait_timeout=30)
        try:
            browser.driver.set_window_size(width, 1200)
            browser.driver.get(url + path)
            wait_drawn(browser.driver)
            time.sleep(settle_s)
            for _ in range(3):  # the window includes the browser's frame: grow until the page fits the viewport
                page = browser.driver.execute_script("return document.documentElement.scrollHeight")
                view = browser.driver.execute_script("return window.innerHeight")
                if view >= page:
                    break
                size = browser.driver.get_window_size()
                browser.driver.set_window_size(width, size["height"] + page - view + 4)
                time.sleep(1.0)
            out.parent.mkdir(parents=True, exist_ok=True)
            browser.driver.save_screenshot(str(out))
        finally:
            browser.driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Screenshot an etrm-dash page (headless chromium).")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--path", default="/compare")
    p.add_argument("--out", type=Path, default=Path("docs/dashboard-compare.png"))
    p.add_argument("--width", type=int, default=1440)
    args = p.parse_args(argv)
    print(shoot(args.runs, args.path, args.out, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
