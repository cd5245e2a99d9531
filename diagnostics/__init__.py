"""Diagnostics for recurrent ACT training; works with any model that emits ``StepEvents`` (never imports etrm).

The names below load lazily, so that importing a light submodule (the auto-loaded pytest plugin) does not import
torch into every pytest run.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EVENTS_VERSION", "CarryShape", "CarryView", "PhaseClock", "RunSpec", "StepEvents", "TracedRun",
           "build_events", "load_eval_audits", "load_ledger", "load_run", "load_task_stats", "trace_run"]
_HOME = {"load_run": "diagnostics.trace.loading", "load_eval_audits": "diagnostics.trace.loading",
         "load_ledger": "diagnostics.trace.loading", "load_task_stats": "diagnostics.trace.loading",
         **{name: "diagnostics.session" for name in ("CarryShape", "RunSpec", "TracedRun", "build_events", "trace_run")}}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(_HOME.get(name, "diagnostics.events")), name)
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
