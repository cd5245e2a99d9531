"""What a resumed run may change: its config must be the checkpoint's, but for a short allow-list of settings.

The allow-list (``RESUMABLE``) holds what does not change what is trained, only for how long and how often it is
looked at: ``train.max_steps`` (also ``--max-steps``), the eval, checkpoint and trace cadence, and the device. They
may be given as ``key=value`` with ``--resume``, or edited in the run's ``config.toml``; each change is printed. Any
other difference between the run's config and the checkpoint's is refused, naming the differing keys.
"""

from __future__ import annotations

from typing import Any

from etrm.config import Config, ConfigError, parse_override
from etrm.errors import UserError

RESUMABLE = ("train.max_steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.keep_best", "train.best_metric", "train.trace_every", "train.diversity_every", "train.device")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as ``{"section.key": value}`` (lists and tuples compared as lists)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _normal(data: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, types settled (a config.toml and a checkpoint's dict of the same config compare equal)."""
    try:
        return flatten(Config.from_dict(data).to_dict())
    except ConfigError:
        return flatten(data)


def check_overrides(overrides: list[str]) -> None:
    """``--resume`` takes ``key=value`` for the allow-list only."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in RESUMABLE:
            raise UserError(f"--resume keeps the run's config; {key} cannot change on resume (allowed: "
                            f"{', '.join(RESUMABLE)}); start a new run to change it")


def compare(run: dict[str, Any], checkpoint: dict[str, Any], source: str) -> list[str]:
    """Refuse any difference outside ``RESUMABLE`` between ``run`` (the config to continue with, from ``source``)
    and ``checkpoint``'s config; returns one line per allowed change (``train.max_steps: 4 -> 8``)."""
    new, old = _normal(run), _normal(checkpoint)
    keys = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
    refused = [k for k in keys if k not in RESUMABLE]
    if refused:
        shown = ", ".join(f"{k} ({old.get(k)!r} in the checkpoint, {new.get(k)!r} in {source})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise UserError(f"{source} differs from the checkpoint's config in {shown}{more}; restore it (only "
                        f"{', '.join(RESUMABLE)} may change on resume) or start a new run")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def finished_message(run_dir: Any, step: int, max_steps: int) -> str:
    """What resuming a run that already reached its ``max_steps`` says: how to extend it."""
    return (f"run {run_dir} already finished at step {step} (train.max_steps={max_steps}); nothing to do. To train "
            f"it further: etrm-train --resume --run-dir {run_dir} --max-steps {step + max(step, 1)} (any number "
            f"above {step})")
