"""The browser's own time to a drawn run view: headless Debian chromium opens ``/run/<name>`` on a served etrm-dash
and reports, by its own clock (``performance.now()``, milliseconds from the start of navigation), when the last of
the overview's charts has drawn its traces and a frame has been painted after it. Not a test (asserts nothing):

    python tests/dashboards/browser_timing.py --runs /tmp/dash-bench --run bench-10000000   # a kept benchmark trace
    python benchmarks/dash_load.py --keep /tmp/dash-bench    # writes that trace (and times the app without a browser)

Each repetition starts a fresh etrm-dash (its caches cold; the OS's file cache warm), opens the run view (cold),
then opens it again (warm: the server's run cache already holds the run). Prints each time and the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

OVERVIEW_CHARTS = 5  # coverage, loss, accuracy, halting, timing (dashboards.run_view.tab_figures "overview")

# Resolves with [performance.now(), the page shell's DOMContentLoaded end] (ms from navigation) once every overview
# chart has drawn traces, after two animation frames (the second runs after the frame that painted them).
DRAWN_JS = """
const done = arguments[arguments.length - 1], want = arguments[0];
function drawn() {
  const plots = document.querySelectorAll("div[id*='step-graph'] .js-plotly-plot");
  if (plots.length < want) return false;
  return Array.from(plots).every(p => p._fullLayout && p.querySelector("g.trace, g.heatmaplayer image"));
}
(function poll() {
  const shell = () => performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd;
  if (drawn()) requestAnimationFrame(() => requestAnimationFrame(() => done([performance.now(), shell()])));
  else setTimeout(poll, 10);
})();
"""


def _conftest():
    """The dashboard tests' fixtures module (``Served``, the chromium paths), loaded by path."""
    spec = importlib.util.spec_from_file_location("dashboards_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def open_run(driver, url: str, timeout_s: float = 300) -> tuple[float, float]:
    """Seconds from navigation to the last overview chart painted, and to the page shell loaded (the Dash
    scripts, before any callback), by the browser's clock."""
    driver.set_script_timeout(timeout_s)
    driver.get(url)
    drawn, shell = driver.execute_async_script(DRAWN_JS, OVERVIEW_CHARTS)
    return drawn / 1000.0, shell / 1000.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="the runs directory to serve")
    p.add_argument("--run", required=True, help="the run to open (a name under --runs)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not (args.runs / args.run / "trace.sqlite").is_file():
        print(f"browser_timing: no trace at {args.runs / args.run}; write one with "
              f"python benchmarks/dash_load.py --keep {args.runs}", file=sys.stderr)
        return 2
    cf = _conftest()
    why = cf.browser_missing()
    if why:
        print(f"browser_timing: {why}", file=sys.stderr)
        return 2
    os.environ.setdefault("DASH_TEST_CHROMEPATH", cf.CHROMIUM)
    from dash.testing.browser import Browser

    browser = Browser("chrome", headless=True, percy_run=False, wait_timeout=60)
    browser.driver.set_window_size(1400, 1200)
    cold, warm, shells, loads = [], [], [], []
    try:
        for i in range(args.repeats):
            served = cf.Served(args.runs)
            try:
                url = f"{served.url}/run/{args.run}"
                loads.append(os.getloadavg()[0])
                (c, shell), (w, _) = open_run(browser.driver, url), open_run(browser.driver, url)
                cold.append(c)
                warm.append(w)
                shells.append(shell)
            finally:
                served.stop()
            print(f"  repetition {i + 1}: cold server {c:.2f} s (page shell loaded at {shell:.2f} s), warm {w:.2f} s "
                  f"(load average {loads[-1]:.2f})", flush=True)
    finally:
        browser.driver.quit()
    print(f"browser time to a drawn run view of {args.run} (headless chromium, navigation to the last of "
          f"{OVERVIEW_CHARTS} overview charts painted; median of {args.repeats}): cold server "
          f"{statistics.median(cold):.2f} s (page shell at {statistics.median(shells):.2f} s), warm "
          f"{statistics.median(warm):.2f} s "
          f"(load average {statistics.mean(loads):.2f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
