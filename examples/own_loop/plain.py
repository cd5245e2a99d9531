"""The example as it was before tracing: every line with an ``etrm`` comment removed, compiled as modules.

``tests/examples/test_own_loop.py`` trains it (the marked lines are purely additive) and
``benchmarks/own_loop_overhead.py`` times it beside the traced loop.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = re.compile(r"#\s*etrm\b")
TRACED_FILES = ("act_loss.py", "pretrain.py")


def marked_lines() -> list[str]:
    """The lines tracing adds, as written (stripped of indentation), in file order."""
    return [line.strip() for name in TRACED_FILES for line in (HERE / name).read_text().splitlines()
            if MARK.search(line)]


def plain_source(name: str) -> str:
    return "\n".join(line for line in (HERE / name).read_text().splitlines() if not MARK.search(line)) + "\n"


def plain_pretrain() -> types.ModuleType:
    """``pretrain`` without its marked lines, importing a plain ``act_loss`` (both fresh modules)."""
    modules = {}
    saved = sys.modules.get("act_loss")
    try:
        for name in TRACED_FILES:
            mod = types.ModuleType(f"{name[:-3]}_plain")
            if name == "pretrain.py":
                sys.modules["act_loss"] = modules["act_loss.py"]
            exec(compile(plain_source(name), f"{name[:-3]}_plain.py", "exec"), mod.__dict__)
            modules[name] = mod
    finally:
        if saved is not None:
            sys.modules["act_loss"] = saved
        else:
            sys.modules.pop("act_loss", None)
    return modules["pretrain.py"]
