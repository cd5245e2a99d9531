"""Run directories: one per run under ``runs/``, with the resolved config; never overwritten."""

from __future__ import annotations

import contextlib
import os
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


def check_run_dir_name(text: str) -> None:
    """Refuse an empty ``--run-dir`` (it would silently mean the automatic one) and a name whose parts are longer
    than the file system allows."""
    if not text.strip():
        raise UserError("--run-dir is empty; name a run directory, e.g. --run-dir runs/mine, or leave it out for an "
                        "automatic name")
    limit = 255
    with contextlib.suppress(OSError, ValueError):
        existing = next(p for p in Path(text).absolute().parents if p.exists())
        limit = os.pathconf(existing, "PC_NAME_MAX")
    long = [part for part in Path(text).parts if len(os.fsencode(part)) > limit]
    if long:
        raise UserError(f"--run-dir name {long[0][:40]}... is too long ({len(os.fsencode(long[0]))} bytes; the file "
                        f"system allows {limit}); choose a shorter --run-dir")


def check_run_dir_parent(path: Path) -> None:
    """Refuse, before anything is built, a run directory that cannot be made: one under a file (or a link to
    one), or whose nearest existing ancestor is not writable."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create run directory {path}: {parent} is a file, not a directory; choose another "
                        "--run-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run directory {path}: {parent} is not writable; choose another --run-dir")


def create_run_dir(path: Path, cfg: Config) -> Path:
    """Create ``path`` and write the resolved config; refuse a directory that already exists. A failure (e.g. under
    /proc or /sys, where even root cannot create one) is a UserError and leaves no directory behind."""
    if path.exists():
        raise UserError(f"run directory {path} already exists; pass --resume to continue it or choose another --run-dir")
    check_run_dir_parent(path)
    missing = [p for p in [path, *path.absolute().parents] if not p.exists()]
    try:
        path.mkdir(parents=True)
        write_config(path, cfg)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (path / CONFIG_NAME).unlink()
        for made in missing:  # innermost first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise UserError(f"cannot create run directory {path} ({exc.strerror or exc}); choose another "
                        "--run-dir") from None
    return path


def write_config(run_dir: Path, cfg: Config) -> Path:
    """Write the resolved config as ``run_dir/config.toml``, atomically (temp file, then rename)."""
    path = Path(run_dir) / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_toml(cfg.to_dict()))
    os.replace(tmp, path)
    return path
