"""Named presets: TOML files shipped in ``etrm/presets/``, resolved through the one config system."""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from etrm.errors import UserError


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[:-5] for p in resources.files("etrm.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's settings as nested dicts; an unknown name lists the known ones."""
    names = preset_names()
    if name not in names:
        raise UserError(f"unknown preset {name!r}; available presets: {', '.join(names)}")
    return tomllib.loads(resources.files("etrm.presets").joinpath(f"{name}.toml").read_text())
