"""What a model actually consumed in one step: the rows it looked up in named tables and the inputs of named modules.

The adapter (protocol v2) names where its content enters: the token-embedding table (``inputs_table``), the puzzle
table (``puzzle_table``, TRM) and the demo encoder module (``encoder``). ``Capture`` records, during one forward,
every integer index used to look up a named table (``F.embedding``, ``table[idx]``, ``index_select``), and the
positional arguments of every call of the named module. A table cast or copied inside the forward (upstream's
``CastedEmbedding`` looks up ``weight.to(bfloat16)``) is followed: the cast tensor counts as the table. With
``keep_encoder_outputs`` the encoder's outputs are kept undetached (the coverage check differentiates the loss by
them). Nothing is recorded outside the ``with`` block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor


@dataclass(frozen=True)
class ContentHooks:
    """Where the model reads its content; names are ``model.get_submodule``/``get_parameter``/``get_buffer`` paths.

    ``encoder_demo_args``: positions of (demo inputs, demo outputs) among the encoder module's arguments."""

    inputs_table: Optional[str] = None
    puzzle_table: Optional[str] = None
    encoder: Optional[str] = None
    encoder_demo_args: tuple[int, int] = (0, 1)


def resolve_tensor(model: nn.Module, name: str) -> Tensor:
    """A parameter, a buffer, or a module's ``weight`` by dotted name."""
    for get in (model.get_parameter, model.get_buffer):
        try:
            return get(name)
        except AttributeError:
            pass
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise AttributeError(f"{name!r} is neither a tensor nor a module with a weight")
    return weight


@dataclass
class Consumed:
    """Index tensors looked up per table name, and the argument tuples of each encoder call (detached copies)."""

    lookups: dict[str, list[Tensor]] = field(default_factory=dict)
    encoder_calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    #: per encoder call, the output tensors whose first dimension is the call's rows (kept with their graph)
    encoder_outputs: list[list[Tensor]] = field(default_factory=list)


#: Tensor methods that make a cast or copy of a table; the result is looked up as the table itself.
_CASTS = (Tensor.to, Tensor.type, Tensor.bfloat16, Tensor.half, Tensor.float, Tensor.double, Tensor.clone,
          Tensor.contiguous, Tensor.detach)


class _Lookups(TorchFunctionMode):
    def __init__(self, tables: dict[str, Tensor], out: Consumed) -> None:
        super().__init__()
        self.tables: list[tuple[str, Tensor]] = list(tables.items())  # the named tables and their casts
        self.out = out

    def _name(self, table: Any) -> Optional[str]:
        return next((name for name, t in self.tables if table is t), None)

    def _record(self, table: Any, idx: Any) -> None:
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.dtype == torch.bool:
            return
        name = self._name(table)
        if name is not None:
            self.out.lookups.setdefault(name, []).append(idx.detach().clone())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CASTS and args and self._name(args[0]) is not None:
            result = func(*args, **kwargs)
            if isinstance(result, Tensor) and result is not args[0]:
                self.tables.append((self._name(args[0]), result))
            return result
        if func in (F.embedding, torch.embedding) and len(args) >= 2:
            a, b = args[0], args[1]
            self._record(b, a) if func is F.embedding else self._record(a, b)
        elif func is Tensor.__getitem__ and len(args) == 2:
            self._record(args[0], args[1])
        elif func in (torch.index_select, Tensor.index_select) and len(args) >= 3:
            self._record(args[0], args[2])
        return func(*args, **kwargs)


class Capture:
    """``with Capture(model, hooks) as got: model(...)`` fills ``got`` (a ``Consumed``)."""

    def __init__(self, model: nn.Module, hooks: ContentHooks, keep_encoder_outputs: bool = False) -> None:
        self.model, self.hooks, self.keep = model, hooks, keep_encoder_outputs
        self.tables = {role: resolve_tensor(model, name) for role, name in
                       (("inputs", hooks.inputs_table), ("puzzle", hooks.puzzle_table)) if name}
        self.encoder = model.get_submodule(hooks.encoder) if hooks.encoder else None
        self.got = Consumed()
        self._mode: Optional[_Lookups] = None
        self._handles: list = []

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        i, o = self.hooks.encoder_demo_args
        self.got.encoder_calls.append((args[i].detach().clone(), args[o].detach().clone()))

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        rows = args[self.hooks.encoder_demo_args[0]].shape[0]
        self.got.encoder_outputs.append([t for t in tensors_of(output) if t.dim() and t.shape[0] == rows])

    def __enter__(self) -> Consumed:
        self.got = Consumed()
        if self.encoder is not None:
            self._handles.append(self.encoder.register_forward_pre_hook(self._pre_hook))
            if self.keep:
                self._handles.append(self.encoder.register_forward_hook(self._post_hook))
        self._mode = _Lookups(self.tables, self.got)
        self._mode.__enter__()
        return self.got

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tensors_of(output: Any) -> list[Tensor]:
    """The tensors of a module's output: a tensor, a tuple/list, a dict or a dataclass of them (one level deep)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return []
    return [v for v in values if isinstance(v, Tensor)]
