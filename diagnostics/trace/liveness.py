"""Is a run's trainer still running? A lock file it holds for as long as it lives, checked by readers.

The trainer (rank 0) takes an exclusive ``flock`` on ``RUN/trainer.lock`` and writes its pid and host into it; the
kernel drops the lock when the process ends, however it ends (SIGKILL included). A reader on the same host tries a
shared lock without waiting: if it gets it, no trainer holds the run. On another host (a shared file system, where
``flock`` may not reach across machines) the answer is "unknown" and the heartbeat rule decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = "trainer.lock"


class LockHeld(Exception):
    """Another live process holds the run's lock (a second trainer on the same run)."""


def lock_path(path: str | Path) -> Path:
    """``RUN/trainer.lock`` for a run directory or its trace file."""
    p = Path(path)
    return (p if p.is_dir() else p.parent) / LOCK_NAME


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run's lock while the block runs (the trainer's lifetime); ``LockHeld`` if a live process has it."""
    path = lock_path(run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock(fd):
            holder = _read(path) or "another process"
            raise LockHeld(f"{Path(run_dir)} is being trained by {holder}; wait for it to end, or stop it")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, tries: int = 20) -> bool:
    """Take the exclusive lock, retrying a moment: a reader's shared lock is held only for an instant."""
    for _ in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def holder_host(path: str | Path) -> str | None:
    """The host named in the lock file, or None without one."""
    parts = _read(lock_path(path)).split()
    return parts[3] if len(parts) >= 4 and parts[2] == "host" else None


def trainer_alive(path: str | Path) -> bool | None:
    """True while a process holds the run's lock, False when it was written on this host and nobody holds it (the
    trainer is gone), None when it cannot be told here (no lock file: an older run; written on another host)."""
    lock = lock_path(path)
    if holder_host(lock) != socket.gethostname():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)  # read-only: a reader never writes to a run
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return False
