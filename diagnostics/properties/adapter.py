"""The adapter protocol: how the property suite drives any ACT model, ours or a user's.

An adapter wraps one small model and its data. The suite only ever calls the methods below, so it runs against any
model that has a carry and a way to read the carry's fields. Models that also emit ``StepEvents`` get the id-based
invariants; models that do not get the carry-only ones (see ``property_suite``).

Protocol v2 (``protocol = 2``) adds identity by content: the suite makes every sample's data itself
(``diagnostics.properties.fingerprints``), hands it to ``make_batch(ids, content)``, hooks the tables and encoder the adapter
names (``hooks``) and decodes whose data the model embedded, encoded and trained on. v1 adapters keep working with the
id-only checks; the suite lists what it skipped and why.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import dataclasses

import torch

from diagnostics.properties.capture import ContentHooks
from diagnostics.events import CarryView, StepEvents
from diagnostics.properties.fingerprints import ContentSpec, SampleContent, make_content

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
    #: ``step`` honours ``force_halt``; False: the suite passes None and overrides the carry's halted flags after
    #: the step (``set_halted``), as for upstream models that have no forced-halt argument.
    force_halt: bool = True
    #: ``evaluate(batch)``: the model's own evaluation entry point (v2).
    evaluate: bool = False
    #: ``loss_and_metrics(outputs, events, carry)`` (v2): padding, label-content and halted-metric checks.
    loss_metrics: bool = False
    #: ``feed(reset, next_id)``: the adapter's own (e.g. upstream-style) feed, drawn as a third feed.
    feed: bool = False


@dataclass
class EvalStep:
    """One step of an eval run: its events (None without events), the carry before and after it, and (optionally)
    the step's outputs (``logits``: the reference for ``evaluate()``'s per-step predictions)."""

    events: Optional[StepEvents]
    before: CarryView
    after: CarryView
    outputs: Optional[dict[str, Tensor]] = None


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
    #: Absolute floor of the re-run comparisons' tolerance (reset-from-init, permutation, metamorphic, Q target);
    #: the tolerance grows with the forward dtype and the outputs' magnitude (``suite_checks.rerun_tolerance``).
    atol: float = 1e-5
    #: The dtype the forward computes in (e.g. ``torch.bfloat16``); None: each compared output's own dtype.
    forward_dtype: Optional[torch.dtype] = None
    #: The training feed never makes a padded (partial) batch, e.g. a loader with ``drop_last``: the suite feeds no
    #: padded tail, and ``padding-adds-nothing`` is reported as skipped.
    drops_partial_batches: bool = False

    # -- protocol v2: content and declared semantics (all optional) -------------------------------------------------
    #: 1: ``make_batch(ids)`` makes its own data (id-only checks). 2: ``make_batch(ids, content)`` with suite content.
    protocol: int = 1
    #: v2: sizes of the content the suite makes (vocabulary, sequence length, demos, puzzles).
    content_spec: Optional[ContentSpec] = None
    #: v2: where content enters the model (``self.model``): token table, puzzle table, encoder module.
    hooks: ContentHooks = ContentHooks()
    #: The Q rule of a model-decided step: "q_halt>0", or "q_halt>q_continue" (with the Q-continue target).
    halt_rule: str = "q_halt>0"
    #: fct: every slot runs exactly this many steps per batch, whatever the mask or Q-head says (None: adaptive).
    fixed_steps: Optional[int] = None
    #: Training-mode encoder work: True = only reset slots (cached), False = every slot (re-encode), None = unknown.
    encoder_on_reset_only: Optional[bool] = None
    #: Output keys of the Q logits and of the bootstrapped Q-continue target (absent keys skip their checks).
    q_keys: tuple[str, str, str] = ("q_halt_logits", "q_continue_logits", "target_q_continue")
    #: Metric keys computed over halted slots only, and the one counting them.
    halted_metrics: tuple[str, ...] = ()
    halted_count_metric: Optional[str] = None
    #: Name of the halted flags in ``carry_state`` (for ``set_halted``).
    halted_key: str = "halted"

    # -- required ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_batch(self, sample_ids: Sequence[int], content: Optional[Sequence[Optional[SampleContent]]] = None) -> Any:
        """The model's batch for ``sample_ids`` (-1 = padding row), deterministic per id. v2: from ``content``
        (one ``SampleContent`` per id, None for padding), which the suite makes from ``content_spec``."""

    @abc.abstractmethod
    def initial_carry(self, batch: Any) -> Any:
        """A carry with every slot halted (so the first step loads ``batch``)."""

    @abc.abstractmethod
    def step(self, carry: Any, batch: Any, force_halt: Optional[Tensor]) -> tuple[Any, Optional[StepEvents], Outputs]:
        """One training-mode ACT step for every slot."""

    def view(self, carry: Any) -> CarryView:
        """Read the carry under the suite's names (default: ``generic_view``)."""
        return generic_view(carry)

    @abc.abstractmethod
    def batch_fields(self, batch: Any) -> dict[str, Tensor]:
        """The batch's per-slot data under ``view(...).fields`` names."""

    # -- with defaults ----------------------------------------------------------------------------------------------
    def fresh_first_step_outputs(self, sample_ids: Sequence[int],
                                 content: Optional[Sequence[Optional[SampleContent]]] = None) -> Outputs:
        """First-step outputs of a fresh carry holding only these samples (no gradient). The batch is padded to
        ``batch_size`` with padding rows, so models that only take full batches work too."""
        n = len(sample_ids)
        ids = list(sample_ids) + [-1] * (self.batch_size - n)
        batch = self.make_batch(ids) if content is None else self.make_batch(ids, list(content) + [None] * (len(ids) - n))
        force = torch.zeros(len(ids), dtype=torch.bool) if self.supports.force_halt else None
        with torch.no_grad():
            _, _, out = self.step(self.initial_carry(batch), batch, force)
        return {k: out[k][:n] for k in self.compared_outputs if k in out}

    def carry_state(self, carry: Any) -> dict[str, Tensor]:
        """Every tensor of the carry by a flat name, batch dimension first (cloned, detached). Default: dicts and
        dataclasses flattened generically (``flatten_tensors``); the structure is remembered for the inverse."""
        self._carry_template = carry
        return flatten_tensors(carry)

    def carry_from_state(self, state: dict[str, Tensor]) -> Any:
        """Inverse of ``carry_state`` (default: rebuilt on the structure of the last carry it flattened)."""
        template = getattr(self, "_carry_template", None)
        if template is None:
            raise NotImplementedError("carry_from_state needs carry_state to have been called (or an override)")
        return rebuild_tensors(template, state)

    def set_halted(self, carry: Any, halted: Tensor) -> Any:
        """The carry with its halted flags replaced (for models without a forced-halt argument)."""
        state = self.carry_state(carry)
        state[self.halted_key] = halted.to(state[self.halted_key].device, state[self.halted_key].dtype)
        return self.carry_from_state(state)

    def evaluate(self, batch: Any) -> dict[str, Tensor]:
        """The model's own evaluation of ``batch`` on a fresh carry: ``{"preds": [T, B, ...]}`` with one entry per
        step (T = max_steps); only with ``supports.evaluate``."""
        raise NotImplementedError

    def loss_and_metrics(self, outputs: Outputs, events: Optional[StepEvents], carry: Any) -> tuple[Tensor, dict]:
        """The step's scalar loss and metrics from ``outputs`` and the new ``carry`` (labels may live there);
        only with ``supports.loss_metrics``. Must not modify ``outputs``."""
        raise NotImplementedError

    def feed(self, reset: Tensor, next_id: int) -> list[int]:
        """The adapter's own feed: sample ids per slot (ids from ``next_id`` up, consecutive) given the reset mask;
        only with ``supports.feed``. Ids landing in continuing slots are dropped (counted and reported)."""
        raise NotImplementedError

    def loss(self, outputs: Outputs, events: Optional[StepEvents]) -> Tensor:
        """The training loss of one step (a scalar); only with ``supports.loss``."""
        raise NotImplementedError

    def eval_run(self, batch: Any) -> list[EvalStep]:
        """Run a fresh carry on ``batch`` in eval mode until every slot halted (at most max_steps + 1 steps), then
        restore training mode; only with ``supports.eval_run``."""
        raise NotImplementedError


AdapterFactory = Callable[[], ACTAdapter]


def check_adapter(adapter: ACTAdapter) -> None:
    """Quick contract checks with a clear message, before the state machine (which would fail more obscurely)."""
    for attr in ("batch_size", "max_steps"):
        if not isinstance(getattr(adapter, attr, None), int) or getattr(adapter, attr) < 1:
            raise AssertionError(f"adapter.{attr} must be a positive int, got {getattr(adapter, attr, None)!r}")
    for meth in ("make_batch", "initial_carry", "step", "view", "batch_fields"):
        if not callable(getattr(adapter, meth, None)):
            raise AssertionError(f"adapter has no method {meth}()")
    b = adapter.batch_size
    ids = list(range(b - 1)) + [-1]
    if getattr(adapter, "protocol", 1) >= 2:
        spec = adapter.content_spec
        if spec is None:
            raise AssertionError("adapter protocol 2 needs content_spec (a diagnostics.properties.fingerprints.ContentSpec)")
        spec.validate()
        content = [make_content(spec, i) if i >= 0 else None for i in ids]
        b1, b2 = adapter.make_batch(ids, content), adapter.make_batch(ids, content)
    else:
        b1, b2 = adapter.make_batch(ids), adapter.make_batch(ids)
    f1, f2 = adapter.batch_fields(b1), adapter.batch_fields(b2)
    for k in f1:
        if not torch.equal(f1[k], f2[k]):
            raise AssertionError(f"adapter.make_batch is not deterministic per sample id (field {k!r})")
        if f1[k].shape[0] != b:
            raise AssertionError(f"batch field {k!r} has {f1[k].shape[0]} rows, expected batch_size={b}")
    view = adapter.view(adapter.initial_carry(b1))
    if view.steps.shape != (b,) or view.halted.shape != (b,):
        raise AssertionError(f"view().steps and .halted must be [{b}], got {tuple(view.steps.shape)} and "
                             f"{tuple(view.halted.shape)}")
    if view.halted.dtype != torch.bool:
        raise AssertionError(f"view().halted must be bool, got {view.halted.dtype}")
    if adapter.supports.loss and not adapter.supports.events:
        raise AssertionError("supports.loss needs supports.events (coverage reads the encoder output from events)")
    sig = inspect.signature(adapter.step)
    if len(sig.parameters) < 3:
        raise AssertionError("adapter.step must take (carry, batch, force_halt)")


def eval_steps(model: torch.nn.Module, carry: Any, one_step: Callable[[Any], tuple[Any, Any, Any]],
               view: Callable[[Any], CarryView], max_steps: int) -> list[EvalStep]:
    """An ``eval_run`` body: ``model`` in eval mode without gradient, ``one_step(carry) -> (carry, events, outputs)``
    from ``carry`` until every slot halted (at most ``max_steps + 1`` steps), then the mode restored."""
    was_training = model.training
    model.eval()
    run: list[EvalStep] = []
    try:
        with torch.no_grad():
            for _ in range(max_steps + 1):
                before = view(carry)
                carry, events, outputs = one_step(carry)
                after = view(carry)
                run.append(EvalStep(events, before, after, outputs))
                if bool(after.halted.all()):
                    break
    finally:
        model.train(was_training)
    return run


# --------------------------------------------------------------------------------------------------------------------
# Helpers adapters often need


def _children(tree: Any) -> Optional[dict[str, Any]]:
    """The named children of a dict or dataclass instance; None for a leaf."""
    if isinstance(tree, dict):
        return dict(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    return None


def leaf_tensors(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    """Nested dicts/dataclasses of tensors to ``{"a.b": tensor}`` (the tensors themselves); None leaves dropped."""
    out: dict[str, Tensor] = {}
    kids = _children(tree)
    if kids is not None:
        for key, value in kids.items():
            out.update(leaf_tensors(value, f"{prefix}{key}."))
    elif isinstance(tree, Tensor):
        out[prefix[:-1]] = tree
    elif tree is not None:
        raise TypeError(f"cannot flatten {type(tree).__name__} at {prefix[:-1]!r}; expected dicts/dataclasses of "
                        "tensors")
    return out


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, Tensor]:
    """``leaf_tensors`` as detached clones (a carry's state for checkpoints and comparisons)."""
    return {k: v.detach().clone() for k, v in leaf_tensors(tree, prefix).items()}


def rebuild_tensors(template: Any, flat: dict[str, Tensor], prefix: str = "") -> Any:
    """``template``'s structure (dicts, dataclasses) with its tensors taken from ``flat`` (clones). An optional
    field (None in one carry, a tensor in another) follows ``flat``: absent there, it is None; present, a tensor."""
    kids = _children(template)
    if kids is None:
        name = prefix[:-1]
        if isinstance(template, Tensor) or (template is None and name in flat):
            return flat[name].clone() if name in flat else None
        return template
    new = {k: rebuild_tensors(v, flat, f"{prefix}{k}.") for k, v in kids.items()}
    if isinstance(template, dict):
        return new
    return dataclasses.replace(template, **new)


def _pick(tree: Any, names: Sequence[str]) -> Any:
    kids = _children(tree) or {}
    return next((kids[n] for n in names if n in kids), None)


def generic_view(carry: Any, data_keys: Sequence[str] = ("current_data", "data"),
                 state_keys: Sequence[str] = ("inner_carry", "state")) -> CarryView:
    """A ``CarryView`` of an upstream-shaped carry (dict or dataclass): ``steps``, ``halted``, the per-sample data
    dict (``current_data``), the recurrent state (``inner_carry``, flattened)."""
    steps, halted = _pick(carry, ("steps",)), _pick(carry, ("halted",))
    if steps is None or halted is None:
        raise TypeError("generic_view needs a carry with 'steps' and 'halted'; override ACTAdapter.view")
    data = _pick(carry, data_keys) or {}
    state = _pick(carry, state_keys)
    fields = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    return CarryView(steps=steps, halted=halted, sample_id=fields.pop("sample_id", None),
                     puzzle_id=fields.pop("puzzle_id", None), fields=fields,
                     state={} if state is None else leaf_tensors(state))


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
