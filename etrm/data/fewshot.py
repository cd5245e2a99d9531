"""Generated few-shot grid tasks and the two ways of turning them into datasets (ETRM's and upstream TRM's).

A task is one rule of one family shown through K demo pairs and a few query pairs. Training tasks may get augmented
variants (a dihedral transform and a permutation of colours 1-9, applied to every grid of the task), each with its own
puzzle id, as upstream ARC does. Held-out tasks are fresh instances whose input grids never occur in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from etrm.data.dataset import GridDataset
from etrm.data.families import FAMILY_NAMES, NUM_DIHEDRAL, Family, Rule, dihedral, get_family
from etrm.data.tokens import VOCAB_SIZE, encode_grid, labels_from_tokens

Pair = tuple[np.ndarray, np.ndarray]
_TRAIN, _HELDOUT, _AUG = 0, 1, 2  # RNG stream tags
_MAX_TRIES = 200


@dataclass(frozen=True)
class Augmentation:
    """A dihedral transform id (0..7) and a colour permutation (``perm[c]`` is the new colour; ``perm[0] == 0``)."""

    tid: int
    perm: tuple[int, ...]

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """Transform one grid."""
        return dihedral(np.asarray(self.perm, dtype=np.uint8)[grid], self.tid)


@dataclass
class Task:
    """One few-shot task: a family's rule, its K demo pairs and its query pairs, under one puzzle id."""

    family: str
    rule: Rule
    demos: list[Pair]
    queries: list[Pair]
    puzzle_id: int = 0
    group: int = 0  # index of the base task; a task and its augmented variants share it
    aug: Augmentation | None = None  # set on augmented variants

    @property
    def pairs(self) -> list[Pair]:
        """Demos then queries."""
        return self.demos + self.queries


@dataclass
class FewShotConfig:
    """What to generate; field names match ``etrm.config.DataConfig`` so one can be built from the other."""

    seed: int = 0
    train_tasks: int = 256
    heldout_tasks: int = 64
    num_demos: int = 3
    num_queries: int = 2
    canvas: int = 8
    min_grid: int = 3
    max_grid: int = 6
    families: tuple[str, ...] = ()  # () = every family
    heldout_families: tuple[str, ...] = ()  # families whose tasks appear only in the held-out set
    num_aug: int = 0  # augmented variants per training task

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        self.heldout_families = tuple(self.heldout_families)
        for name in self.families + self.heldout_families:
            get_family(name)
        for name in ("train_tasks", "heldout_tasks", "num_aug"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_demos", "num_queries", "canvas", "min_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.min_grid <= self.max_grid <= self.canvas:
            raise ValueError(f"need min_grid <= max_grid <= canvas, got min_grid={self.min_grid}, "
                             f"max_grid={self.max_grid}, canvas={self.canvas}")
        if self.train_tasks and not self.train_family_names():
            raise ValueError("every family is held out, so there is nothing to draw training tasks from")

    @classmethod
    def from_data_config(cls, data: Any) -> "FewShotConfig":
        """Build from any object with this config's field names as attributes (e.g. ``etrm.config.DataConfig``)."""
        return cls(**{name: getattr(data, name) for name in cls.__dataclass_fields__})

    def all_family_names(self) -> tuple[str, ...]:
        """Families of held-out tasks: the chosen ones (default all) plus the held-out-only ones."""
        chosen = self.families or FAMILY_NAMES
        return chosen + tuple(f for f in self.heldout_families if f not in chosen)

    def train_family_names(self) -> tuple[str, ...]:
        """Families of training tasks: the chosen ones minus the held-out-only ones."""
        return tuple(f for f in (self.families or FAMILY_NAMES) if f not in self.heldout_families)


@dataclass
class FewShotInfo:
    """What a model needs to know about the generated data."""

    num_puzzle_ids: int  # max id + 1; id 0 is the blank id
    seq_len: int
    vocab_size: int
    num_demos: int
    view: str = "etrm"
    num_train_tasks: int = 0  # base tasks plus augmented variants
    num_heldout_tasks: int = 0


def _key(grid: np.ndarray) -> bytes:
    return np.asarray(grid.shape, dtype=np.int64).tobytes() + np.ascontiguousarray(grid, dtype=np.uint8).tobytes()


def _pairs_key(pairs: list[Pair]) -> bytes:
    return b"|".join(_key(a) + b"/" + _key(b) for a, b in pairs)


def _draw_pair(family: Family, rule: Rule, rng: np.random.Generator, cfg: FewShotConfig, seen: set[bytes]) -> Pair:
    """A pair whose input is unseen so far, preferring one whose output differs from its input."""
    fallback: Pair | None = None
    for _ in range(_MAX_TRIES):
        inp, out = family.sample_pair(rng, rule, cfg.canvas, cfg.min_grid, cfg.max_grid)
        if _key(inp) in seen:
            continue
        if inp.shape != out.shape or not np.array_equal(inp, out):
            return inp, out
        fallback = fallback or (inp, out)
    if fallback is None:
        raise ValueError(f"could not draw a new input grid for family {family.name!r} in {_MAX_TRIES} tries; "
                         "allow larger grids (max_grid) or fewer tasks")
    return fallback


def _make_task(family_name: str, rng: np.random.Generator, cfg: FewShotConfig, seen: set[bytes]) -> Task:
    family = get_family(family_name)
    rule = family.sample_rule(rng)
    pairs = []
    for _ in range(cfg.num_demos + cfg.num_queries):
        pair = _draw_pair(family, rule, rng, cfg, seen)
        seen.add(_key(pair[0]))
        pairs.append(pair)
    return Task(family_name, rule, pairs[:cfg.num_demos], pairs[cfg.num_demos:])


def _augment(task: Task, rng: np.random.Generator, num_aug: int) -> list[Task]:
    """Up to ``num_aug`` distinct variants of ``task`` (none equal to it), as upstream's builder."""
    keys = {_pairs_key(task.pairs)}
    variants: list[Task] = []
    for _ in range(num_aug * 10):
        if len(variants) == num_aug:
            break
        perm = (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, 10)))
        aug = Augmentation(int(rng.integers(NUM_DIHEDRAL)), perm)
        demos = [(aug.apply(a), aug.apply(b)) for a, b in task.demos]
        queries = [(aug.apply(a), aug.apply(b)) for a, b in task.queries]
        key = _pairs_key(demos + queries)
        if key in keys:
            continue
        keys.add(key)
        variants.append(Task(task.family, task.rule, demos, queries, group=task.group, aug=aug))
    return variants


def generate_tasks(cfg: FewShotConfig) -> tuple[list[Task], list[Task]]:
    """Draw the training tasks (with their augmented variants) and the held-out tasks; deterministic in ``cfg.seed``.

    Puzzle ids run from 1 over training tasks (each variant right after its base task), then held-out tasks.
    No held-out input grid equals any training input grid; ``heldout_families`` appear only in held-out tasks.
    """
    seen: set[bytes] = set()
    train: list[Task] = []
    train_families = cfg.train_family_names()
    for i in range(cfg.train_tasks):
        rng = np.random.default_rng([cfg.seed, _TRAIN, i])
        base = _make_task(train_families[i % len(train_families)], rng, cfg, seen)
        base.group = i
        variants = _augment(base, np.random.default_rng([cfg.seed, _AUG, i]), cfg.num_aug) if cfg.num_aug else []
        for task in [base] + variants:
            task.puzzle_id = len(train) + 1
            seen.update(_key(a) for a, _ in task.pairs)
            train.append(task)
    heldout: list[Task] = []
    heldout_families = cfg.all_family_names()
    for i in range(cfg.heldout_tasks):
        rng = np.random.default_rng([cfg.seed, _HELDOUT, i])
        task = _make_task(heldout_families[i % len(heldout_families)], rng, cfg, seen)
        task.group = cfg.train_tasks + i
        task.puzzle_id = len(train) + len(heldout) + 1
        heldout.append(task)
    return train, heldout


def _encode_pairs(pairs: list[Pair], canvas: int) -> tuple[np.ndarray, np.ndarray]:
    s = canvas * canvas
    inputs = np.zeros((len(pairs), s), dtype=np.uint8)
    outputs = np.zeros((len(pairs), s), dtype=np.uint8)
    for i, (a, b) in enumerate(pairs):
        inputs[i], outputs[i] = encode_grid(a, canvas), encode_grid(b, canvas)
    return inputs, outputs


def _plain_dataset(rows: list[tuple[Pair, int]], canvas: int) -> GridDataset:
    inputs, outputs = _encode_pairs([pair for pair, _ in rows], canvas)
    ids = np.asarray([pid for _, pid in rows], dtype=np.int32).reshape(-1)
    ds = GridDataset(inputs, labels_from_tokens(outputs), ids)
    ds.validate()
    return ds


def etrm_view(tasks: list[Task], canvas: int) -> GridDataset:
    """ETRM's view: one row per query pair, carrying its task's demos (inputs and outputs as tokens) and demo mask.

    Only the queries are supervised targets; the demos are encoder input. Build the training set from training tasks
    and the eval set from held-out tasks, so held-out grids never reach training.
    """
    s = canvas * canvas
    k = max((len(t.demos) for t in tasks), default=0)
    rows = [(t, q) for t in tasks for q in t.queries]
    inputs, outputs = _encode_pairs([q for _, q in rows], canvas)
    demo_inputs = np.zeros((len(rows), k, s), dtype=np.uint8)
    demo_outputs = np.zeros((len(rows), k, s), dtype=np.uint8)
    demo_mask = np.zeros((len(rows), k), dtype=bool)
    encoded = {id(t): _encode_pairs(t.demos, canvas) for t in tasks}
    for i, (t, _) in enumerate(rows):
        di, do = encoded[id(t)]
        demo_inputs[i, :len(di)], demo_outputs[i, :len(do)], demo_mask[i, :len(di)] = di, do, True
    ids = np.asarray([t.puzzle_id for t, _ in rows], dtype=np.int32).reshape(-1)
    ds = GridDataset(inputs, labels_from_tokens(outputs), ids, demo_inputs, demo_outputs, demo_mask)
    ds.validate()
    return ds


def trm_views(train_tasks: list[Task], heldout_tasks: list[Task], canvas: int) -> tuple[GridDataset, GridDataset]:
    """Upstream TRM's split: train on every pair of every training task AND on the held-out tasks' demo pairs.

    Only the held-out queries form the eval set, under the same puzzle ids as their demos. Training on the held-out
    demos is what trains those puzzle ids' embedding rows, and so what lets TRM answer held-out tasks at all.
    """
    train_rows = [(pair, t.puzzle_id) for t in train_tasks for pair in t.pairs]
    train_rows += [(pair, t.puzzle_id) for t in heldout_tasks for pair in t.demos]
    eval_rows = [(pair, t.puzzle_id) for t in heldout_tasks for pair in t.queries]
    return _plain_dataset(train_rows, canvas), _plain_dataset(eval_rows, canvas)


def puzzle_tasks(tasks: list[Task], num_ids: int) -> np.ndarray:
    """The base task (``group``, +1; 0 for the blank id) of every puzzle id: augmented variants fold into their task."""
    out = np.zeros(num_ids, dtype=np.int64)
    for t in tasks:
        out[t.puzzle_id] = t.group + 1
    return out


def build_fewshot(cfg: FewShotConfig, view: Literal["etrm", "trm"]) -> tuple[GridDataset, GridDataset, FewShotInfo]:
    """Generate the tasks and return (train dataset, eval dataset, info) in the requested view."""
    train_tasks, heldout_tasks = generate_tasks(cfg)
    if view == "etrm":
        train_ds, eval_ds = etrm_view(train_tasks, cfg.canvas), etrm_view(heldout_tasks, cfg.canvas)
    elif view == "trm":
        train_ds, eval_ds = trm_views(train_tasks, heldout_tasks, cfg.canvas)
    else:
        raise ValueError(f"view must be 'etrm' or 'trm', got {view!r}")
    max_id = max((t.puzzle_id for t in train_tasks + heldout_tasks), default=0)
    task_of = puzzle_tasks(train_tasks + heldout_tasks, max_id + 1)
    train_ds.puzzle_task, eval_ds.puzzle_task = task_of, task_of
    info = FewShotInfo(num_puzzle_ids=max_id + 1, seq_len=cfg.canvas * cfg.canvas, vocab_size=VOCAB_SIZE,
                       num_demos=cfg.num_demos, view=view, num_train_tasks=len(train_tasks),
                       num_heldout_tasks=len(heldout_tasks))
    return train_ds, eval_ds, info
