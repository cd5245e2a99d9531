"""The adapter protocol: how the property suite drives any ACT model, ours or a user's.

An adapter wraps one small model and its data. The suite only ever calls the methods below, so it runs against any
model that has a carry, a halting mask it can be forced to follow, and a way to read the carry's fields. Models that
also emit ``StepEvents`` get every invariant; models that do not get the carry-only ones (see ``property_suite``).
"""

from __future__ import annotations

import abc
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from diagnostics.events import CarryView, StepEvents

Tensor = torch.Tensor
Outputs = dict[str, Tensor]


@dataclass(frozen=True)
class Supports:
    """What an adapter can do beyond the required methods; the suite skips the checks that need a missing one.

    ``events``: ``step`` returns ``StepEvents`` (label/demo alignment, encoder work, coverage need them).
    ``loss``: ``loss(outputs, events)`` gives a scalar whose backward feeds the coverage check (needs ``events``).
    ``eval_run``: ``eval_run(batch)`` runs a fresh carry in eval mode (the eval-isolation check).
    ``checkpoint``: ``carry_state``/``carry_from_state`` exist (checkpoint-restore and slot-permutation checks).
    """

    events: bool = False
    loss: bool = False
    eval_run: bool = False
    checkpoint: bool = True


@dataclass
class EvalStep:
    """One step of an eval run: its events (None without events) and the carry before and after it."""

    events: Optional[StepEvents]
    before: CarryView
    after: CarryView


class ACTAdapter(abc.ABC):
    """Drives one ACT model for the property suite. Subclass it (or duck-type it) for your model.

    Contract, per slot of a batch of ``batch_size`` slots:
    - ``make_batch(ids)``: the model's input batch for those sample ids, deterministic per id; -1 is a padding row.
    - ``initial_carry(batch)``: the carry before the first step; every slot halted, so step 1 loads the batch.
    - ``step(carry, batch, force_halt)``: one ACT step in training mode. ``force_halt`` ([B] bool) replaces the
      model's own Q decision (max steps still halts, exploration does not apply); None lets the model decide.
      Returns ``(new_carry, events_or_None, outputs)``, ``outputs`` a dict of per-slot tensors (first dim B).
    - ``view(carry)``: a ``CarryView`` of the fields the model has (steps and halted at least).
    - ``batch_fields(batch)``: the batch's per-slot data under the same names as ``view(...).fields``.
    - ``fresh_first_step_outputs(ids)``: ``compared_outputs`` of a fresh carry's first step on those samples alone
      (same weights, training mode, no gradient); the reset-from-init check compares reset slots against it.
    """

    #: Slots per batch (the suite draws halting masks of this size).
    batch_size: int
    #: ACT steps at which a slot must halt.
    max_steps: int
    #: Output keys the reset-from-init check compares (those fixed by the sample and the init state).
    compared_outputs: tuple[str, ...] = ("logits",)
    #: Optional abilities (see ``Supports``).
    supports: Supports = Supports()
    #: Absolute tolerance of the reset-from-init and slot-permutation comparisons.
    atol: float = 1e-5

    # -- required ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_batch(self, sample_ids: Sequence[int]) -> Any:
        """The model's batch for ``sample_ids`` (-1 = padding row), deterministic per id."""

    @abc.abstractmethod
    def initial_carry(self, batch: Any) -> Any:
        """A carry with every slot halted (so the first step loads ``batch``)."""

    @abc.abstractmethod
    def step(self, carry: Any, batch: Any, force_halt: Optional[Tensor]) -> tuple[Any, Optional[StepEvents], Outputs]:
        """One training-mode ACT step for every slot."""

    @abc.abstractmethod
    def view(self, carry: Any) -> CarryView:
        """Read the carry under the suite's names."""

    @abc.abstractmethod
    def batch_fields(self, batch: Any) -> dict[str, Tensor]:
        """The batch's per-slot data under ``view(...).fields`` names."""

    # -- with defaults ----------------------------------------------------------------------------------------------
    def fresh_first_step_outputs(self, sample_ids: Sequence[int]) -> Outputs:
        """First-step outputs of a fresh carry holding only these samples (no gradient)."""
        batch = self.make_batch(list(sample_ids))
        with torch.no_grad():
            _, _, out = self.step(self.initial_carry(batch), batch, torch.zeros(len(sample_ids), dtype=torch.bool))
        return {k: out[k] for k in self.compared_outputs if k in out}

    def carry_state(self, carry: Any) -> dict[str, Tensor]:
        """Every tensor of the carry by a flat name, batch dimension first (cloned, detached)."""
        raise NotImplementedError

    def carry_from_state(self, state: dict[str, Tensor]) -> Any:
        """Inverse of ``carry_state``."""
        raise NotImplementedError

    def loss(self, outputs: Outputs, events: Optional[StepEvents]) -> Tensor:
        """The training loss of one step (a scalar); only with ``supports.loss``."""
        raise NotImplementedError

    def eval_run(self, batch: Any) -> list[EvalStep]:
        """Run a fresh carry on ``batch`` in eval mode until every slot halted (at most max_steps + 1 steps), then
        restore training mode; only with ``supports.eval_run``."""
        raise NotImplementedError


AdapterFactory = Callable[[], ACTAdapter]


# --------------------------------------------------------------------------------------------------------------------
# Helpers adapters often need


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    """Nested dicts of tensors to ``{"a.b": tensor}`` (detached clones); None leaves are dropped."""
    out: dict[str, Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_tensors(value, f"{prefix}{key}."))
    elif isinstance(tree, Tensor):
        out[prefix[:-1]] = tree.detach().clone()
    elif tree is not None:
        raise TypeError(f"cannot flatten {type(tree).__name__} at {prefix[:-1]!r}; expected dicts of tensors")
    return out


def unflatten_tensors(flat: dict[str, Tensor]) -> dict[str, Any]:
    """Inverse of ``flatten_tensors`` (clones, so the result never aliases ``flat``)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.clone()
    return out


@dataclass
class Loaded:
    """A factory named by ``module:function`` and where it came from."""

    spec: str
    factory: AdapterFactory = field(repr=False)


def load_factory(spec: str, search: Sequence[str | Path] = ()) -> Loaded:
    """Import ``module:function`` (the function may be dotted); ``search`` dirs are tried if the import fails.

    Raises ``ValueError`` with a one-line message naming the spec on any problem.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not valid; expected MODULE:FACTORY, e.g. mypkg.models:make_adapter")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise
            sys.path[:0] = [str(p) for p in search if str(p) not in sys.path]
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{spec!r}: cannot import {module_name} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{spec!r}: module {module_name} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"{spec!r}: {attr} is not callable")
    return Loaded(spec, obj)
