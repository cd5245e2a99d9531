"""Bounds of config values: one table per config (``etrm.bounds.BOUNDS``, ``thresholds.DOCTOR_BOUNDS``), one check,
one error format (``NAME=VALUE is not valid; allowed: ...``).

A field is checked against its table entry for type (an int field takes ints, a float field ints or floats, never
bools), finiteness and range. Light on purpose (no pandas, no torch): ``etrm.config`` imports it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, get_type_hints


class BoundError(ValueError):
    """A value outside its bounds; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Bound:
    """Inclusive range ``lo..hi`` (``lo_open``: ``lo`` itself excluded; ``hi`` = inf: any finite value above)."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False

    def holds(self, value: float) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def allowed(self, integer: bool) -> str:
        low = f"{'an integer' if integer else 'a finite number'} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return low if self.hi == math.inf else f"{low} and <= {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _fmt(value: Any) -> str:
    return repr(value)


def check_value(name: str, value: Any, bound: Bound, integer: bool, error: type[Exception] = BoundError) -> None:
    """Raise ``error`` unless ``value`` is a number of the right kind, finite and within ``bound``."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value)) and bound.holds(value)  # ints: any size, finite
    if not ok:
        raise error(f"{name}={_fmt(value)} is not valid; allowed: {bound.allowed(integer)}")


@functools.lru_cache(maxsize=None)
def _numeric_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    hints = get_type_hints(cls)
    return tuple((f.name, hints[f.name] is int) for f in fields(cls) if hints[f.name] in (int, float))


def numeric_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """``(name, is_int)`` for each int or float field of dataclass ``cls``."""
    return _numeric_fields(cls)


def check_fields(obj: Any, bounds: Mapping[str, Bound], prefix: str = "",
                 error: type[Exception] = BoundError) -> None:
    """Check every numeric field of dataclass ``obj`` against ``bounds[prefix + name]``; a numeric field without an
    entry is a programming error (every key gets a bound: adding a key means adding its entry)."""
    for name, integer in _numeric_fields(type(obj)):
        key = prefix + name
        if key not in bounds:
            raise KeyError(f"no bound declared for config key {key!r}; add it to the bounds table")
        check_value(key, getattr(obj, name), bounds[key], integer, error)
