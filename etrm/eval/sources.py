"""What ``etrm-eval`` evaluates: the checkpoint series a source names, and the config to build the model and data.

A source is a checkpoint file (ours, or upstream's ``step_N``), a run directory of ours (its kept
``checkpoint_step_N.pt`` in step order, or ``checkpoint.pt`` when it kept none) or a folder of upstream's ``step_N``
files (upstream's ``checkpoint_path``, in step order).
"""

from __future__ import annotations

import re
from pathlib import Path

from etrm.cli import _merge
from etrm.checkpoints.upstream import ALL_CONFIG, ETRM, Opened, all_config_settings
from etrm.config import Config, apply_overrides, load_toml
from etrm.errors import UserError
from etrm.presets import load_preset
from etrm.train.checkpoint import CHECKPOINT_NAME
from etrm.train.retention import kept_steps
from etrm.train.rundir import CONFIG_NAME

_UPSTREAM_STEP = re.compile(r"^step_(\d+)$")


def series(source: Path) -> list[Path]:
    """The checkpoints of ``source``, in step order."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise UserError(f"{source} does not exist; pass a checkpoint file, a run directory or a folder of upstream "
                        "step_N files")
    if (source / CONFIG_NAME).is_file():  # a run of ours
        kept = [p for _, p in kept_steps(source)]
        if kept:
            return kept
        if (source / CHECKPOINT_NAME).is_file():
            return [source / CHECKPOINT_NAME]
    steps = sorted((int(m.group(1)), p) for p in source.iterdir() if (m := _UPSTREAM_STEP.match(p.name)) and p.is_file())
    if not steps:
        raise UserError(f"{source} holds no checkpoint ({CHECKPOINT_NAME}, checkpoint_step_N.pt or upstream's "
                        "step_N files); pass a checkpoint file or a run directory")
    return [p for _, p in steps]


def source_dir(source: Path) -> Path:
    """The run a source belongs to (what ``--out`` must stay out of): the directory itself, or a checkpoint file's
    run (a directory with our ``config.toml`` or upstream's ``all_config.yaml``); a loose file is its own."""
    source = Path(source)
    if source.is_dir():
        return source
    if (source.parent / CONFIG_NAME).is_file() or (source.parent / ALL_CONFIG).is_file():
        return source.parent
    return source


def resolve_config(first: Opened, preset: str | None, config_file: str | None, overrides: list[str],
                   data: str | None) -> tuple[Config, str]:
    """The config to evaluate under, and where its architecture came from (named in shape errors).

    Ours: the checkpoint's own config. Upstream's: ``--preset`` and/or ``--config``, else ``all_config.yaml``
    beside the checkpoint (its ``arch``); always ``model = trm``. Then ``--config``, ``key=value`` overrides and
    ``--data DIR`` (an upstream-built data folder) over it."""
    if first.kind == ETRM:
        base, arch = dict(first.config or {}), f"the config stored in {first.path}"
    else:
        beside = first.path.parent / ALL_CONFIG
        if preset is not None:
            base, arch = load_preset(preset), f"--preset {preset}"
        elif config_file is None and beside.is_file():
            base, arch = all_config_settings(beside), str(beside)
        elif config_file is not None:
            base, arch = {}, f"--config {config_file}"
        else:
            raise UserError(f"{first.path} is an upstream checkpoint with no {ALL_CONFIG} beside it; give its "
                            "architecture with --preset NAME (e.g. arc1) or --config FILE")
        base = _merge(base, {"model": "trm"})
    if config_file is not None:
        base = _merge(base, load_toml(config_file))
    extra = list(overrides)
    if overrides:
        arch += " with " + " ".join(overrides)
    if data is not None:
        extra += ['data.dataset="trm-folder"', f'data.path="{data}"']
    elif first.kind != ETRM and base.get("data", {}).get("dataset") != "trm-folder":
        raise UserError(f"{first.path} is an upstream checkpoint: pass its data folder with --data DIR (the folder "
                        "upstream's dataset builder wrote, with train/ and test/)")
    return Config.from_dict(apply_overrides(base, extra)), arch
