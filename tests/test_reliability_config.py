"""Config fuzz (issue 24): every key, enumerated from the config dataclasses (a key added later is covered without
editing this test), fed values of the wrong type, non-finite and out of range through the config loader; each is a
``ConfigError`` naming the key, in one line, and values that are accepted lie within the key's bounds."""

from __future__ import annotations

import dataclasses
import math
import typing
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given, strategies as st

from diagnostics.doctor.thresholds import DOCTOR_BOUNDS, DoctorConfig
from etrm.bounds import BOUNDS
from etrm.config import Config, ConfigError, apply_overrides


def _keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _keys(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint))
    return out


KEYS = _keys()
NUMERIC = [k for k, h in KEYS if h in (int, float)]


def _nested(key: str, value: Any) -> dict[str, Any]:
    *sections, name = key.split(".")
    data: dict[str, Any] = {name: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def _bad_values(key: str, hint: Any) -> list[Any]:
    if hint in (int, float):
        b = BOUNDS[key]
        out = ["text", True, [1], {"a": 1}, math.nan, math.inf, -math.inf, b.lo if b.lo_open else b.lo - 1]
        if math.isfinite(b.hi):
            out.append(b.hi + 1)
        if hint is int:
            out.append(1.5)
        return out
    if hint is bool:
        return [1, "yes", 1.0, [True]]
    if getattr(hint, "__origin__", None) is tuple:
        return [1, 1.5, [1, 2], True]
    assert hint is str or issubclass(hint, StrEnum), (key, hint)
    return [1, 1.5, True, [1], {"a": 1}]


def test_reliability_every_numeric_key_has_a_bound():
    """A numeric key without an entry in the one bounds table fails here (and on first use)."""
    assert NUMERIC and not [k for k in NUMERIC if k not in BOUNDS]
    assert not [k for k in BOUNDS if k not in NUMERIC]  # no stale entries either
    assert {f"doctor.{k}" for k in DOCTOR_BOUNDS} <= set(BOUNDS)


@pytest.mark.parametrize("key,hint", KEYS, ids=[k for k, _ in KEYS])
def test_reliability_config_fuzz_refuses_bad_values(key: str, hint: Any):
    for value in _bad_values(key, hint):
        for data in (_nested(key, value), apply_overrides({}, [f"{key}={_literal(value)}"])):
            with pytest.raises(ConfigError) as err:
                Config.from_dict(data)
            text = str(err.value)
            assert key in text and "allowed" in text and "\n" not in text, (key, value, text)


def _literal(value: Any) -> str:
    """A value as a command line writes it (TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


ANY_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                      st.booleans(), st.text(max_size=5))


@given(key=st.sampled_from(NUMERIC), value=ANY_VALUE)
def test_reliability_config_fuzz_accepts_only_values_within_bounds(key: str, value: Any):
    """Random values: either a ConfigError naming the key, or accepted, finite and within the key's bounds."""
    try:
        cfg = Config.from_dict(_nested(key, value))
    except ConfigError as exc:
        assert key.rsplit(".", 1)[-1] in str(exc)
        return
    section, name = key.rsplit(".", 1)
    stored = getattr(getattr(cfg, section), name)
    assert not isinstance(value, (bool, str)) and math.isfinite(stored) and BOUNDS[key].holds(stored)


@pytest.mark.parametrize("item", ["window=nan", "coverage_min=inf", "coverage_min=-0.5", "ema_gap=2",
                                  f"window={10 ** 30}", f"window={'9' * 400}", "halting_window=0",
                                  "ledger_late_share=0"])
def test_reliability_doctor_set_uses_the_bounds(item: str):
    """``etrm-doctor --set`` goes through the same table and message format as ``[doctor]`` in a config."""
    key = item.split("=")[0]
    with pytest.raises(ValueError) as err:
        DoctorConfig().with_overrides([item])
    assert key in str(err.value) and ("allowed" in str(err.value) or "needs" in str(err.value))
