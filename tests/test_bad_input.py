"""Bad input across ``etrm-train``, ``etrm-doctor`` and ``etrm-dash``, table-driven and as real processes: each
case exits 2 with one line on stderr naming what is wrong, no traceback, no URL printed, and leaves the working
directory (run directories included) byte-identical."""

from __future__ import annotations

import os
import resource
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

PROGS = {"etrm-train": "etrm.cli", "etrm-doctor": "diagnostics.cli", "etrm-dash": "dashboards.cli"}
TINY = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.expansion=1.0",
        "arch.puzzle_emb_len=2", "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.num_demos=2",
        "data.train_tasks=8", "data.heldout_tasks=2", "train.batch_size=8", "train.eval_batch_size=8",
        "--device", "cpu", "--max-steps", "2"]


def _trace(tmp: Path, schema: str, steps: bool) -> None:
    run = tmp / "runs" / "run"
    run.mkdir(parents=True)
    with sqlite3.connect(run / "trace.sqlite") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (schema,))
        conn.execute("CREATE TABLE markers (time REAL NOT NULL, kind TEXT NOT NULL, step INTEGER, detail TEXT)")
        if steps:
            conn.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY)")
    conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (program, args, needles in the one line, setup(tmp) run before)
Setup = Callable[[Path], None]
CASES: dict[str, tuple[str, list[str], list[str], Setup | None]] = {
    "lr-nan": ("etrm-train", ["--preset", "demo", "--run-dir", "run", "train.lr=nan", *TINY], ["train.lr=nan"], None),
    "lr-inf": ("etrm-train", ["--preset", "demo", "--run-dir", "run", "train.lr=inf", *TINY], ["train.lr=inf"], None),
    "run-dir-under-a-file": ("etrm-train", ["--run-dir", "afile/run", *TINY], ["afile", "is a file"],
                             lambda t: (t / "afile").write_text("x")),
    "run-dir-under-proc": ("etrm-train", ["--run-dir", "/proc/etrm-bad-input/run", *TINY], ["/proc/etrm-bad-input"],
                           None),
    "run-dir-under-sys": ("etrm-train", ["--run-dir", "/sys/etrm-bad-input", *TINY], ["/sys/etrm-bad-input"], None),
    "batch-size-huge": ("etrm-train", ["--run-dir", "run", *TINY, "train.batch_size=1000000000000"],
                        ["GiB", "train.batch_size"], None),
    "hidden-size-huge": ("etrm-train", ["--run-dir", "run", *TINY, f"arch.hidden_size={2 ** 40}"],
                         ["GiB", "arch.hidden_size"], None),
    "eval-batch-huge": ("etrm-train", ["--run-dir", "run", *TINY, "train.eval_batch_size=100000000000"],
                        ["GiB", "train.eval_batch_size"], None),
    "empty-preset": ("etrm-train", ["--preset", "", "--run-dir", "run", *TINY], ["unknown preset ''", "demo"], None),
    "doctor-meta-without-steps": ("etrm-doctor", ["runs/run"], ["runs/run", "no such table: steps"],
                                  lambda t: _trace(t, "1", steps=False)),
    "doctor-schema-abc": ("etrm-doctor", ["runs/run"], ["trace.sqlite", "schema_version 'abc'"],
                          lambda t: _trace(t, "abc", steps=True)),
    "dash-port-in-use": ("etrm-dash", ["--runs", "runs", "--port", "{busy}"], ["{busy}", "in use"],
                         lambda t: (t / "runs").mkdir()),
    "dash-host-not-here": ("etrm-dash", ["--runs", "runs", "--host", "203.0.113.7", "--port", "{free}"],
                           ["203.0.113.7", "--host"], lambda t: (t / "runs").mkdir()),
    "dash-host-unknown": ("etrm-dash", ["--runs", "runs", "--host", "no-such-host.invalid", "--port", "{free}"],
                          ["no-such-host.invalid", "unknown host"], lambda t: (t / "runs").mkdir()),
    "dash-no-runs-dir": ("etrm-dash", ["--runs", "missing"], ["missing"], None),
}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_prog(prog: str, args: list[str], cwd: Path, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")

    def limit() -> None:
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run([sys.executable, "-m", PROGS[prog], *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, preexec_fn=limit)


def assert_one_line(proc: subprocess.CompletedProcess, prog: str, needles: list[str]) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, tmp_path: Path) -> None:
    prog, args, needles, setup = CASES[case]
    if setup is not None:
        setup(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = {"busy": str(busy.getsockname()[1]), "free": str(_free_port())}
    args = [a.format(**ports) for a in args]
    needles = [n.format(**ports) for n in needles]
    before = snapshot(tmp_path)
    try:
        proc = run_prog(prog, args, tmp_path)
    finally:
        busy.close()
    assert_one_line(proc, prog, needles)
    assert "serving" not in proc.stdout and "http://" not in proc.stdout  # no URL before failing
    assert snapshot(tmp_path) == before
    for target in ("/proc/etrm-bad-input", "/sys/etrm-bad-input"):
        assert not os.path.exists(target)


def test_out_of_memory_removes_the_half_made_run(tmp_path: Path) -> None:
    """Sizes that pass the up-front estimate but do not fit (here: an address-space limit) fail when evaluation
    allocates: one line with the estimate, exit 2, and the run directory made for this run is gone."""
    before = snapshot(tmp_path)
    proc = run_prog("etrm-train", ["--preset", "demo", "--run-dir", "run", *TINY, "train.eval_batch_size=200000",
                                   "train.eval_every=1"], tmp_path, memory_limit=3 << 30)
    line = assert_one_line(proc, "etrm-train", ["out of memory", "GiB", "train.eval_batch_size", "was removed"])
    assert "run" in line
    assert snapshot(tmp_path) == before
