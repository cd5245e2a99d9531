"""The bounds of every numeric config key, in one table: type, finite, range (``diagnostics.doctor.bounds``).

Each section's ``__post_init__`` checks its fields against this table, so a preset, a ``--config`` file, a
``key=value`` override and a resumed run's ``config.toml`` are all refused the same way, with one format. Adding a
numeric key means adding its entry here (a key without one fails on first use, and the config fuzz test). Sizes go
up to ``MAX_SIZE`` (above it nothing could fit); within that the memory estimate (``etrm.train.memory``) decides.
"""

from __future__ import annotations

import math

from diagnostics.doctor.bounds import Bound
from diagnostics.doctor.thresholds import DOCTOR_BOUNDS

MAX_SIZE = 2 ** 40          # batch sizes, widths, task counts: a bound far above any machine's memory
MAX_STEPS = 10 ** 9         # optimizer steps and cadences (train.max_steps, train.*_every)
MAX_ACT_STEPS = 1024        # ACT steps per sample (act.halt_max_steps, fct.steps); upstream uses 16
MAX_DEPTH = 1024            # layers, cycles, heads, demos
MAX_SEED = 2 ** 32 - 1      # seeds: what every RNG (torch, numpy, Python) accepts

_SIZE, _DEPTH, _STEPS = Bound(1, MAX_SIZE), Bound(1, MAX_DEPTH), Bound(1, MAX_STEPS)
_UNIT, _NONNEG, _SEED = Bound(0.0, 1.0), Bound(0.0), Bound(0, MAX_SEED)

BOUNDS: dict[str, Bound] = {
    "arch.hidden_size": _SIZE, "arch.num_heads": _DEPTH, "arch.expansion": Bound(0.25, 1024.0),
    "arch.L_layers": _DEPTH, "arch.H_cycles": _DEPTH, "arch.L_cycles": _DEPTH, "arch.puzzle_emb_len": _DEPTH,
    "arch.rope_theta": Bound(1.0, 1e12), "arch.q_init_bias": Bound(-20.0, 20.0),
    "encoder.num_layers": _DEPTH, "encoder.set_layers": _DEPTH,
    "act.halt_max_steps": Bound(1, MAX_ACT_STEPS), "act.halt_exploration_prob": _UNIT,
    "fct.steps": Bound(1, MAX_ACT_STEPS),
    "loss.q_weight": _NONNEG,
    "data.canvas": _DEPTH, "data.min_grid": _DEPTH, "data.max_grid": _DEPTH, "data.num_demos": _DEPTH,
    "data.num_queries": _DEPTH, "data.train_tasks": _SIZE, "data.heldout_tasks": _SIZE,
    "data.num_aug": Bound(0, 10 ** 6), "data.seed": _SEED, "data.max_train_tasks": Bound(0, MAX_SIZE),
    "data.max_eval_tasks": Bound(0, MAX_SIZE), "data.givens": Bound(0, 81), "data.max_demos": Bound(0, MAX_DEPTH),
    "data.min_path": Bound(0, MAX_DEPTH * MAX_DEPTH),
    "train.batch_size": _SIZE, "train.max_steps": _STEPS, "train.lr": _NONNEG, "train.lr_warmup_steps":
        Bound(0, MAX_STEPS), "train.lr_min_ratio": _UNIT, "train.beta1": _UNIT, "train.beta2": _UNIT,
    "train.weight_decay": _NONNEG, "train.grad_clip": _NONNEG, "train.puzzle_emb_lr": _NONNEG,
    "train.puzzle_emb_weight_decay": _NONNEG, "train.encoder_lr_scale": _NONNEG, "train.ema_rate": _UNIT,
    "train.eval_every": _STEPS, "train.eval_batch_size": _SIZE, "train.eval_raw_every": Bound(0, MAX_STEPS),
    "train.checkpoint_every": _STEPS, "train.trace_every": _STEPS, "train.diversity_every": _STEPS,
    "train.ledger_every": Bound(0, MAX_STEPS), "train.seed": _SEED, "train.epochs": Bound(0, MAX_STEPS),
    "train.eval_every_epochs": Bound(0, MAX_STEPS),
    "profile.wait": Bound(0, 10 ** 6), "profile.warmup": Bound(0, 10 ** 6), "profile.active": Bound(1, 10 ** 6),
    "profile.repeat": Bound(0, 10 ** 6),
    **{f"doctor.{name}": bound for name, bound in DOCTOR_BOUNDS.items()},
}
assert all(math.isfinite(b.lo) for b in BOUNDS.values())
