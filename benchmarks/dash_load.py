"""How fast etrm-dash draws a long run: the run view, each tab, a zoom, a live refresh and the compare page, for
synthetic traces of 1M and 10M steps side by side (medians of 5, load average beside each), and the 10M/1M ratio.

The traces are written by ``dashboards.synthetic.write_bulk`` (the trainer's schema, rollups included: a numpy
template of the run copied to every step inside SQLite, timings drawn in SQL; its time is printed) and ``--keep DIR``
reuses them. Then it times what the app's callbacks do, without a browser, on a fresh app each repetition (the
OS's file cache warm): the first render of the run view is load (meta, status, findings) + header + the overview's
figures + serialisation as Dash sends them; a tab is its figures + serialisation; a zoom is the overview over a
10,000-step range; a live refresh appends one trainer flush (20 rows, their timings) and times reading the new rows,
the header and the overview redrawn, serialised; the compare page puts two 10M-step runs side by side (the second a
copy of the first's trace). Prints figures; asserts nothing.

    python benchmarks/dash_load.py --keep /tmp/dash-bench            # 1M and 10M (writes them once)
    python benchmarks/dash_load.py --sizes 200000 --keep /tmp/dash-bench-small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import plotly.utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.pages import compare_body
from dashboards.run_view import run_header, tab_figures
from dashboards.runs import Runs  # noqa: E402
from dashboards.synthetic import PHASES, write_bulk  # noqa: E402
from diagnostics.trace.reader import connect, read_rows, step_columns, step_range  # noqa: E402
from diagnostics.trace.store import TRACE_NAME, TraceError, TraceWriter  # noqa: E402

REPEATS = 5
TABS = ("coverage", "halting", "alignment", "timing")
# (what, targets by run length): the targets on this machine
TARGETS = {"first render": {1_000_000: 0.3, 10_000_000: 1.0}, "tab": 0.2, "zoom": 0.1, "live refresh": 0.1,
           "compare": 1.5}


def serialise(obj) -> int:
    return len(json.dumps(obj, cls=plotly.utils.PlotlyJSONEncoder))


def load() -> float:
    return os.getloadavg()[0]


def median_of(fn: Callable[[int], float], repeats: int = REPEATS) -> tuple[float, float, float]:
    """Median wall seconds of ``fn(i)`` (which returns its own seconds) over ``repeats``, the median CPU seconds
    of this process over each call (what the shared cores' load does not inflate), and the mean load average."""
    times, cpus, loads = [], [], []
    for i in range(repeats):
        loads.append(load())
        c = time.process_time()
        times.append(fn(i))
        cpus.append(time.process_time() - c)
    return statistics.median(times), statistics.median(cpus), statistics.mean(loads)


def ensure(root: Path, name: str, steps: int, copy_of: str | None = None) -> None:
    """The synthetic run ``name`` of ``steps`` steps under ``root`` (written unless a kept one is there; a copy of
    run ``copy_of``'s trace when given: the compare page's second run, without writing 10M steps twice)."""
    run = root / name
    try:
        conn = connect(run)
        try:
            lo, hi = step_range(conn)
        finally:
            conn.close()
        if lo == 1 and hi >= steps:
            print(f"reusing the {hi:,}-step trace {run}")
            return
    except (TraceError, sqlite3.Error):  # none yet, or a half-written one (an interrupted bulk load): rewritten
        pass
    shutil.rmtree(run, ignore_errors=True)
    t0, l0 = time.perf_counter(), load()
    if copy_of is not None:
        run.mkdir(parents=True)
        shutil.copyfile(root / copy_of / TRACE_NAME, run / TRACE_NAME)
        print(f"copied {copy_of}'s trace to {name} in {time.perf_counter() - t0:.1f} s")
        return
    write_bulk(run, steps, finished=False)
    t = time.perf_counter() - t0
    print(f"wrote a synthetic {steps:,}-step trace in {t:.1f} s ({steps / t:,.0f} steps/s; "
          f"{(run / TRACE_NAME).stat().st_size / 2**20:,.0f} MiB; load average {l0:.2f} -> {load():.2f})")


def first_render(root: Path, name: str) -> tuple[float, float, int, object]:
    """A fresh app's first view of the run: load it, draw the header and the overview tab, serialise."""
    runs = Runs(root)
    t = time.perf_counter()
    cache = runs.get(name)
    header = run_header(name, cache)
    figs = tab_figures(cache, "overview")
    build = time.perf_counter() - t
    t = time.perf_counter()
    size = serialise({"header": header, "figs": figs})
    return build, time.perf_counter() - t, size, cache


def append_flush(run: Path, rows: int = 20) -> None:
    """One trainer flush: ``rows`` new steps (copies of the last row), their phase timings and a heartbeat."""
    conn = connect(run)
    cols = step_columns(conn)
    _, hi = step_range(conn)
    last = read_rows(conn, hi - 1, cols).iloc[-1].tolist()
    conn.close()
    w = TraceWriter(run / TRACE_NAME)
    steps = range(hi + 1, hi + 1 + rows)
    w.write_steps(cols, [(s, *last) for s in steps])
    w.write_timings([(s, 0, ph, 0.01) for s in steps for ph in PHASES])
    w.heartbeat(hi + rows)
    w.commit()
    w.close()


def measure(root: Path, name: str, steps: int) -> tuple[dict[str, tuple[float, float, float]],
                                                        tuple[float, float, int]]:
    """Every figure of one run: name -> (median seconds, median CPU seconds, mean load average); and the median
    first render's parts (build, serialise, bytes)."""
    out: dict[str, tuple[float, float, float]] = {}
    caches, parts = [], []

    def render(_i: int) -> float:
        build, ser, size, cache = first_render(root, name)
        caches.append(cache)
        parts.append((build + ser, build, ser, size))
        return build + ser

    out["first render"] = median_of(render)
    for tab in TABS:
        def draw(i: int, tab: str = tab) -> float:
            t = time.perf_counter()
            serialise(tab_figures(caches[i], tab))
            return time.perf_counter() - t
        out[f"tab {tab}"] = median_of(draw)

    def zoom(i: int) -> float:
        mid = steps // 2 + i * 37_000
        t = time.perf_counter()
        serialise(tab_figures(caches[i], "overview", [mid, mid + 10_000]))
        return time.perf_counter() - t
    out["zoom"] = median_of(zoom)

    def refresh(i: int) -> float:
        cache = caches[-1]
        append_flush(root / name)
        cache.refreshed_at = 0.0
        t = time.perf_counter()
        cache.refresh()
        serialise({"header": run_header(name, cache), "figs": tab_figures(cache, "overview")})
        return time.perf_counter() - t
    out["live refresh"] = median_of(refresh)
    _, build, ser, size = sorted(parts)[len(parts) // 2]
    return out, (build, ser, size)


def fmt(v: tuple[float, float, float] | None) -> str:
    return "" if v is None else f"{v[0]:6.3f} s (cpu {v[1]:5.3f}, load {v[2]:4.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--keep", type=Path, help="directory to keep (and reuse) the synthetic traces in")
    p.add_argument("--no-compare", action="store_true", help="skip the compare page (and its second run)")
    args = p.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dash-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    try:
        names = {n: f"bench-{n}" for n in sizes}
        for n in sizes:
            ensure(root, names[n], n)
        if not args.no_compare:
            ensure(root, f"bench-{sizes[-1]}-copy", sizes[-1], copy_of=names[sizes[-1]])
        results = {}
        for n in sizes:
            results[n], (build, ser, size) = measure(root, names[n], n)
            print(f"\nfirst render of the run view ({n:,} steps; load + header + overview figures, median of "
                  f"{REPEATS}): {build:.3f} s + serialise {ser:.3f} s = {build + ser:.3f} s  ({size / 1024:.0f} KiB; "
                  f"load average {load():.2f})")
        if not args.no_compare:
            big = sizes[-1]
            pair = [names[big], f"bench-{big}-copy"]

            def compare(_i: int) -> float:
                t = time.perf_counter()
                body, _ = compare_body(Runs(root), pair, "coverage")
                serialise(body)
                return time.perf_counter() - t
            cmp = median_of(compare)
        rows = list(results[sizes[0]])
        print(f"\nmedians of {REPEATS} (fresh app each): wall seconds (this process's CPU seconds; the 1-min load "
              f"average, mean over the repetitions, on this machine's {os.cpu_count()} cores); targets from issue 20")
        head = "".join(f"{n:>36,}" for n in sizes)
        ratio = len(sizes) > 1
        print(f"{'':<22}{head}" + (f"{'ratio':>10}" if ratio else "") + "   target")
        for k in rows:
            vals = [results[n][k] for n in sizes]
            tgt = TARGETS.get(k.split()[0] if k.startswith("tab") else k)
            tgt_s = (" / ".join(f"< {v} s at {s // 1_000_000}M" for s, v in tgt.items()) if isinstance(tgt, dict)
                     else f"< {tgt} s")
            r = f"{vals[-1][0] / vals[0][0]:9.2f}x" if ratio and vals[0][0] > 0 else ""
            print(f"{k:<22}" + "".join(f"{fmt(v):>36}" for v in vals) + r + f"   {tgt_s}")
        if not args.no_compare:
            print(f"{'compare (two runs)':<22}" + f"{'':>36}" * (len(sizes) - 1) + f"{fmt(cmp):>36}" +
                  (f"{'':>10}" if ratio else "") + f"   < {TARGETS['compare']} s  ({sizes[-1]:,} steps each)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
