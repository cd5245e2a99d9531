"""Test-only kill points: ``ETRM_KILL_AT=NAME:STEP[:RANK],...`` makes the process SIGKILL itself at that point.

They let tests kill a trainer at an exact place instead of after a guessed time:

- ``step:N``: during optimizer step N+1 (after N steps), on every rank or only ``RANK``;
- ``checkpoint-tmp:N``: after the checkpoint of step N is written to its temporary file, before the rename;
- ``flush-commit:N``: after the rows of a flush ending at step N are written to the trace, before the commit.

Only the first start fires them: under ``torchrun --max-restarts`` a restarted group (``TORCHELASTIC_RESTART_COUNT``
above 0) runs on. Unset, each point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ETRM_KILL_AT"


def kill_point(name: str, step: int, rank: int | None = None) -> None:
    """SIGKILL this process if ``ETRM_KILL_AT`` names this point at ``step`` (and ``rank``, when it gives one)."""
    spec = os.environ.get(ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    here = int(os.environ.get("RANK", "0")) if rank is None else rank
    for item in spec.split(","):
        parts = item.strip().split(":")
        if parts[0] == name and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == here):
            os.kill(os.getpid(), signal.SIGKILL)


def step_hook(step: int, _events: object = None, _metrics: object = None) -> None:
    """A trainer step hook (called during step ``step + 1``, before backward) for the ``step`` kill point."""
    kill_point("step", step)
