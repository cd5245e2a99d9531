"""How fast etrm-dash draws a large run: first render of a 1M-step trace, each tab, a zoom, and a live refresh.

Writes a synthetic trace (``dashboards.synthetic``, stored with ``TraceWriter`` as a trainer's would be: every probe
counter, 8 phase timings per step, evals, the live doctor's findings), then times what the app's callbacks do,
without a browser: load the run (meta, status, findings), build the run view's figures (bucketed min/max SQL over
the visible range, then the figure dicts) and serialise them as Dash sends them. A live refresh appends one trainer
flush (20 rows) and times reading only the new rows plus redrawing the overview. Prints figures; asserts nothing.

    python benchmarks/dash_load.py                       # 1M steps in a temporary directory
    python benchmarks/dash_load.py --steps 200000 --keep /tmp/dash-bench   # reuse the trace next time
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import plotly.utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards import app as A  # noqa: E402
from dashboards.runs import RunCache, Runs  # noqa: E402
from diagnostics.reader import connect, step_columns as _columns  # noqa: E402
from dashboards.synthetic import write_synthetic  # noqa: E402
from diagnostics.store import TRACE_NAME, TraceWriter  # noqa: E402

TARGET_S = 2.0
NAME = "bench"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def serialise(figs: dict) -> int:
    return len(json.dumps(figs, cls=plotly.utils.PlotlyJSONEncoder))


def first_render(root: Path) -> tuple[float, float, int, RunCache]:
    """A fresh app's first view of the run: load it, draw the header and the overview tab, serialise."""
    runs = Runs(root)

    def go():
        cache = runs.get(NAME)
        header = A.run_header(NAME, cache)
        figs = A.tab_figures(cache, "overview")
        return cache, header, figs

    (cache, header, figs), build = timed(go)
    size, ser = timed(lambda: serialise(figs))
    return build, ser, size, cache


def append_flush(run: Path, rows: int = 20) -> None:
    """One trainer flush: ``rows`` new steps (copies of the last row) and a heartbeat."""
    conn = connect(run)
    cols = _columns(conn)
    last = conn.execute("SELECT * FROM steps ORDER BY step DESC LIMIT 1").fetchone()
    conn.close()
    w = TraceWriter(run / TRACE_NAME)
    first = int(last[0]) + 1
    w.write_steps(cols, [(s, *last[1:]) for s in range(first, first + rows)])
    w.write_timings([(s, 0, "inner", 0.03) for s in range(first, first + rows)])
    w.heartbeat(first + rows - 1)
    w.commit()
    w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--keep", type=Path, help="directory to keep (and reuse) the synthetic trace in")
    p.add_argument("--refreshes", type=int, default=5)
    args = p.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dash-bench-"))
    run = root / NAME
    try:
        meta_ok = (run / TRACE_NAME).is_file()
        if meta_ok:
            conn = connect(run)
            meta_ok = (conn.execute("SELECT MAX(step) FROM steps").fetchone()[0] or 0) >= args.steps
            conn.close()
        if not meta_ok:
            shutil.rmtree(run, ignore_errors=True)
            _, t = timed(lambda: write_synthetic(run, args.steps, finished=False))
            print(f"wrote a synthetic {args.steps:,}-step trace in {t:.1f} s "
                  f"({(run / TRACE_NAME).stat().st_size / 2**20:.0f} MiB)")
        else:
            print(f"reusing the {args.steps:,}-step trace in {run}")
        build, ser, size, cache = first_render(root)
        print(f"\nfirst render of the run view (load + header + overview figures): {build:.3f} s"
              f" + serialise {ser:.3f} s = {build + ser:.3f} s  (target < {TARGET_S:.0f} s; {size / 1024:.0f} KiB)")
        print(f"  mode: {'raw' if cache.raw is not None else 'bucketed SQL'}, "
              f"{cache.info.last_step:,} steps")
        for tab in ("coverage", "halting", "alignment", "timing"):
            figs, t = timed(lambda: A.tab_figures(cache, tab))
            print(f"  tab {tab:<10} first render {t:.3f} s")
        figs, t = timed(lambda: A.tab_figures(cache, "overview"))
        print(f"  overview again (cached overview frame)   {t:.3f} s")
        mid = args.steps // 2
        figs, t = timed(lambda: A.tab_figures(cache, "overview", [mid, mid + 10_000]))
        print(f"  zoom to 10,000 steps (bucketed)           {t:.3f} s")
        figs, t = timed(lambda: A.tab_figures(cache, "overview", [mid, mid + 500]))
        print(f"  zoom to 500 steps (every step)            {t:.3f} s")
        body, t = timed(lambda: A.compare_body(Runs(root), [NAME], "coverage"))
        print(f"  compare page, this run alone (cold)       {t:.3f} s")
        reads, draws = [], []
        for _ in range(args.refreshes):
            append_flush(run)
            grew, t_read = timed(cache.refresh)
            assert grew
            _, t_draw = timed(lambda: A.tab_figures(cache, "overview"))
            reads.append(t_read)
            draws.append(t_draw)
        print(f"\nlive refresh (a 20-row flush; median of {args.refreshes}): read new rows "
              f"{statistics.median(reads):.3f} s + redraw overview {statistics.median(draws):.3f} s = "
              f"{statistics.median(reads) + statistics.median(draws):.3f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
