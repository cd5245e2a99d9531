"""The trace writer's rows/s with and without the rollups (trace schemas 2 and 3), side by side in one run.

Writes the default probes' counters (max 16 ACT steps, about 70 columns) in flushes of ``--flush`` rows, one commit
per flush as the tracer's writer thread does, into a fresh trace each round; alternates the two variants and prints
medians. Asserts nothing.

    python benchmarks/trace_writer.py --rows 20000 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.synthetic import _chunk, counter_names  # noqa: E402
from diagnostics.trace.writer import TraceWriter  # noqa: E402


def write(path: Path, names: list[str], rows: list[tuple], flush: int, rollups: bool) -> float:
    """Seconds to store ``rows`` in flushes of ``flush`` rows."""
    w = TraceWriter(path, {"mode": "cached"})
    w.add_counters((n, "bench", n) for n in names)
    if not rollups:
        w.rollups.add = lambda *a, **k: None  # the version-1 writer: rows only
    t0 = time.perf_counter()
    for i in range(0, len(rows), flush):
        w.write_steps(names, rows[i:i + flush])
        w.heartbeat(int(rows[min(i + flush, len(rows)) - 1][0]))
        w.commit()
    elapsed = time.perf_counter() - t0
    w.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--flush", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    names = counter_names(16)
    c = _chunk(np.random.default_rng(0), 1, args.rows, args.rows, 64, 16, "cached")
    rows = list(zip(c["steps"].tolist(), *(np.asarray(c[n], dtype=float).tolist() for n in names)))
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for rollups in (False, True):
                path = Path(tmp) / f"{r}-{rollups}.sqlite"
                times[rollups].append(write(path, names, rows, args.flush, rollups))
    without, with_ = (args.rows / statistics.median(times[k]) for k in (False, True))
    print(f"trace writer, {args.rows} rows of {len(names)} counters in flushes of {args.flush} (median of "
          f"{args.rounds}, load average {os.getloadavg()[0]:.2f}):")
    print(f"  without rollups {without:,.0f} rows/s, with rollups {with_:,.0f} rows/s, ratio {with_ / without:.2f}x")


if __name__ == "__main__":
    main()
