"""Run directories: one per run under ``runs/``, with the resolved config; never overwritten."""

from __future__ import annotations

import time
from pathlib import Path

from etrm.config import Config, Fault, dump_toml
from etrm.errors import UserError

CONFIG_NAME = "config.toml"


def auto_name(cfg: Config, preset: str | None) -> str:
    """A readable name: preset (or model), mode, fault when set, and a timestamp."""
    parts = [preset or str(cfg.model), str(cfg.mode)]
    if cfg.fault != Fault.NONE:
        parts.append(str(cfg.fault))
    parts.append(time.strftime("%Y%m%d-%H%M%S"))
    return "-".join(dict.fromkeys(parts))


def create_run_dir(path: Path, cfg: Config) -> Path:
    """Create ``path`` and write the resolved config; refuse a directory that already exists."""
    if path.exists():
        raise UserError(f"run directory {path} already exists; pass --resume to continue it or choose another --run-dir")
    path.mkdir(parents=True)
    (path / CONFIG_NAME).write_text(dump_toml(cfg.to_dict()))
    return path
