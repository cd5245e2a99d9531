"""The `make demo` story: train the demo presets in every encoder mode, traced; print each run's doctor verdict;
serve the dashboard on them.

Runs go to ``runs/demo-<timestamp>/<mode>`` (modes: reencode, cached, fct, demo-trm). Each training is an
``etrm-train`` subprocess with one torch thread; ``DEMO_JOBS`` of them run side by side (2 by default, one per core
of a small machine), their logs beside the runs (``<mode>.log``), their progress read from the traces.

Settings, from the environment:
  DEMO_STEPS=N     optimizer steps per run (default 500)
  DEMO_ARGS="..."  extra etrm-train arguments for every run, e.g. key=value overrides that shrink the model
  DEMO_JOBS=N      trainings side by side (default 2)
  DEMO_DIR=PATH    where the runs go (default runs/demo-<timestamp>; must not exist)
  DEMO_SERVE=0     skip the dashboard (tests, CI)
  DEMO_PORT=N      dashboard port (default 8050)

Exit status: 0 when every run trained and its verdict is the expected one (cached: gradient-starvation, exit 1;
the others: healthy, exit 0), 1 otherwise, 2 on a bad setting; with the server, the dashboard's exit status.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from diagnostics.trace.connection import read_only_uri

# name -> (etrm-train arguments, the doctor's expected exit status)
RUNS: dict[str, tuple[list[str], int]] = {
    "reencode": (["--preset", "demo"], 0),
    "cached": (["--preset", "demo", "encoder.mode=cached"], 1),
    "fct": (["--preset", "demo", "encoder.mode=fct"], 0),
    "demo-trm": (["--preset", "demo-trm"], 0),
}
DEFAULT_STEPS = 500
# Launch order, longest first (fct runs every ACT step; cached is the cheapest), so that two at a time finish
# together (measured: fct and reencode take longest, cached least). Verdicts print in RUNS order.
LAUNCH_ORDER = ("fct", "reencode", "demo-trm", "cached")


def _bin(name: str) -> str:
    """The console script beside this interpreter (the venv's), else whatever is on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


@dataclass
class Job:
    name: str
    args: list[str]
    expect: int
    run_dir: Path
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    rc: int | None = None
    capped: bool = False
    verdict: dict = field(default_factory=dict)


def traced_step(run_dir: Path) -> int:
    """Last step flushed to the run's trace (0 before the first flush); read-only, never blocks the trainer."""
    db = run_dir / "trace.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(read_only_uri(db), uri=True, timeout=0.2) as conn:
            row = conn.execute("SELECT MAX(step) FROM steps").fetchone()
        return int(row[0] or 0)
    except sqlite3.Error:
        return 0


def halting_tail(run_dir: Path, last: int = 100) -> dict[str, float] | None:
    """Halting over the run's last ``last`` traced steps: mean halt step, the share of halts before the maximum step
    and that maximum (from the ``halt_at_k`` columns); None when nothing halted or the trace is missing."""
    db = run_dir / "trace.sqlite"
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
        ks = sorted(int(r[1][len("halt_at_"):]) for r in conn.execute("PRAGMA table_info(steps)")
                    if r[1].startswith("halt_at_") and r[1][len("halt_at_"):].isdigit())
        if not ks:
            return None
        top = ks[-1]
        row = conn.execute(f"SELECT SUM(halted_steps), SUM(halted_count), SUM(halt_at_{top}) FROM steps "
                           "WHERE step > (SELECT MAX(step) FROM steps) - ?", (last,)).fetchone()
    steps, halts, at_max = (float(v or 0) for v in row)
    if not halts:
        return None
    return {"mean_halt_step": steps / halts, "early_share": 1.0 - at_max / halts, "max_steps": float(top)}


def cpu_seconds(job: Job) -> float:
    """CPU time the job's trainer has used (all its threads; Linux /proc), else its wall time: a cap in CPU time
    means the same on a shared machine as on idle cores, where a one-thread trainer's CPU time is its wall time."""
    try:
        fields = Path(f"/proc/{job.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - job.started


def train_all(jobs: list[Job], steps: int, parallel: int, extra: list[str], cap_s: float | None = None) -> None:
    """Run the jobs, ``parallel`` at a time; with ``cap_s``, a job still training after that many seconds of its own
    CPU time gets Ctrl-C (SIGINT): it stops at its next step, saves a checkpoint and exits 0 (``--resume`` continues
    it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(jobs), []
    live = sys.stdout.isatty()
    last_print = 0.0
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            cmd = [_bin("etrm-train"), *job.args, "--trace", "--max-steps", str(steps), "--run-dir",
                   str(job.run_dir), *extra]
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as log:
                log.write("$ " + shlex.join(cmd) + "\n")
                log.flush()
                job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            job.started = time.perf_counter()
            running.append(job)
            print(f"  started {job.name:<9} etrm-train {shlex.join(job.args)} --trace --max-steps {steps}"
                  + (" $DEMO_ARGS" if extra else ""), flush=True)
        time.sleep(1.0)
        for job in list(running):
            # the cap: Ctrl-C once the trainer has flushed a step (its handler is installed by then)
            if cap_s is not None and not job.capped and cpu_seconds(job) > cap_s \
                    and (at := traced_step(job.run_dir)) > 0:
                job.capped = True
                job.proc.send_signal(signal.SIGINT)
                print(f"  {job.name:<9} reached the {cap_s / 60:g}-minute cap at step {at} "
                      f"({time.perf_counter() - job.started:.0f} s wall): stopping it (it saves a checkpoint; "
                      "--resume continues it)", flush=True)
            rc = job.proc.poll()
            if rc is not None:
                job.rc, job.seconds = rc, time.perf_counter() - job.started
                running.remove(job)
                state = "done" if rc == 0 else f"FAILED (exit {rc}; see {job.log})"
                if live:
                    print("\r\033[K", end="")
                print(f"  {job.name:<9} {state} in {job.seconds:.0f} s", flush=True)
        now = time.perf_counter()
        if running and (live or now - last_print >= 15):
            parts = [f"{j.name} {traced_step(j.run_dir)}/{steps}" for j in running]
            waiting = f" | waiting: {', '.join(j.name for j in pending)}" if pending else ""
            text = "  training: " + " | ".join(parts) + waiting
            print(("\r\033[K" + text) if live else text, end="" if live else "\n", flush=True)
            last_print = now


def doctor(job: Job) -> None:
    """Exit status and first finding of ``etrm-doctor RUN --json``."""
    out = subprocess.run([_bin("etrm-doctor"), str(job.run_dir), "--json"], capture_output=True, text=True)
    job.verdict = {"rc": out.returncode, "first": None, "summary": {}}
    if out.returncode in (0, 1):
        report = json.loads(out.stdout)
        job.verdict["summary"] = report.get("summary", {})
        if report["findings"]:
            f = report["findings"][0]
            job.verdict["first"] = f"{f['severity']} {f['code']} (step {f['first_step']}): {f['message']}"
    else:
        job.verdict["first"] = (out.stderr.strip().splitlines() or ["no output"])[-1]


def _minutes(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        value = 0
    if value < 1:
        print(f"demo: {name} must be a whole number of at least 1, not {raw!r}", file=sys.stderr)
        raise SystemExit(2)
    return value


def main() -> int:
    steps = _int_env("DEMO_STEPS", DEFAULT_STEPS)
    extra = shlex.split(os.environ.get("DEMO_ARGS", ""))
    parallel = _int_env("DEMO_JOBS", 2)
    serve = os.environ.get("DEMO_SERVE", "1") != "0"
    port = _int_env("DEMO_PORT", 8050)
    root = Path(os.environ.get("DEMO_DIR") or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists():
        print(f"demo: {root} already exists; set DEMO_DIR to a new path", file=sys.stderr)
        return 2
    jobs = [Job(name, args, expect, root / name, root / f"{name}.log") for name, (args, expect) in RUNS.items()]

    print(f"demo: training {len(jobs)} runs x {steps} steps into {root} ({parallel} at a time, 1 torch thread "
          "each; logs beside the runs)", flush=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        train_all(sorted(jobs, key=lambda j: LAUNCH_ORDER.index(j.name)), steps, parallel, extra)
    except KeyboardInterrupt:
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    print(f"demo: trained in {time.perf_counter() - t0:.0f} s\n", flush=True)

    print("doctor verdicts (etrm-doctor RUN: exit status, first finding)")
    ok = True
    for job in jobs:
        if job.rc != 0:
            ok = False
            print(f"  {job.name:<9} training failed (exit {job.rc}); last lines of {job.log}:")
            for line in job.log.read_text(errors="replace").splitlines()[-5:]:
                print(f"      {line}")
            continue
        doctor(job)
        v = job.verdict
        s = v["summary"]
        word = {0: "healthy", 1: "ERROR"}.get(v["rc"], "bad input")
        good = v["rc"] == job.expect
        ok &= good
        cov = (s.get("figures") or {}).get("coverage")
        ev = s.get("last_eval") or {}
        halt = halting_tail(job.run_dir)
        facts = (f"coverage {cov:.3f}" if cov is not None else "coverage n/a") + (
            f", held-out exact {ev['exact']:.3f}" if "exact" in ev else "") + (
            f", last 100 steps: mean halt step {halt['mean_halt_step']:.2f} of {halt['max_steps']:.0f}, "
            f"{halt['early_share']:.0%} of halts early" if halt else "")
        print(f"  {job.name:<9} exit {v['rc']} {word:<8} ({facts}){'' if good else '  <- UNEXPECTED'}")
        print(f"      {v['first'] or 'no findings'}")
    print(f"  details: etrm-doctor {root}/<run>; the training logs are {root}/<run>.log", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"demo: done in {_minutes(time.perf_counter() - t0)} on {os.cpu_count()} CPU cores (load average "
          f"{load_start:.1f} at the start, {load:.1f} now)\n", flush=True)

    if not serve:
        return 0 if ok else 1
    url = f"http://127.0.0.1:{port}/"
    print(f"demo: dashboard at {url} (compare: {url}compare?runs={','.join(RUNS)}); Ctrl-C ends it", flush=True)
    try:
        return subprocess.call([_bin("etrm-dash"), "--runs", str(root), "--port", str(port)])
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
