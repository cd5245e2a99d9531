"""Where a command may write: new paths outside run directories, written atomically (temp file, then rename).

Only the process that owns a run directory writes into it, so an export may not name a file in one (a directory
holding ``trace.sqlite`` or ``trainer.lock``), not even with ``--force``; outside run directories an existing file is
replaced only with ``--force``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from diagnostics.trace.liveness import LOCK_NAME
from diagnostics.trace.schema import TRACE_NAME

RUN_MARKERS = (TRACE_NAME, LOCK_NAME)  # a directory holding one of these is a run's: only its owner writes there


class OutputRefused(ValueError):
    """An output path that would destroy or touch a run, or replace a file without ``--force``."""


def is_run_dir(path: Path) -> bool:
    """True for a run directory (it holds a trace or a trainer lock)."""
    return any((Path(path) / name).exists() for name in RUN_MARKERS)


def check_output(path: str | Path, force: bool = False, flag: str = "--export") -> Path:
    """Refuse ``path`` unless it is a new file (or ``force``) outside every run directory; returns it."""
    p = Path(path)
    parent = p.absolute().parent
    if p.name in ("", ".", "..") or p.is_dir():
        raise OutputRefused(f"{flag} {str(path)!r} is a directory; name a new file")
    if is_run_dir(parent.resolve() if parent.exists() else parent):
        raise OutputRefused(f"{flag} {str(path)!r} is inside the run directory {parent}; only its trainer writes "
                            "there: choose a path outside it")
    if not parent.is_dir():
        raise OutputRefused(f"{flag} {str(path)!r}: {parent} is not an existing directory; create it first")
    if (p.exists() or p.is_symlink()) and not force:
        raise OutputRefused(f"{flag} {str(path)!r} already exists; choose a new file, or pass --force to replace it")
    return p


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``, so that a failure leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
