"""What the session needs to trace a fork as it is (diagnostics.session uses it; docs/own-loop.md documents it).

- ``ContextPicker``: the context tensor inside whatever the watched encoder returns (a tensor, tuple, dict or
  dataclass), by a documented rule or an explicit selector, checked at ``trace_run`` against the encoder's return
  annotation when it has one;
- ``LossHeadCatch``: upstream's ``ACTLossHead`` shape as is: a forward hook on the ACT model catches the carry in,
  the batch, the new carry and the outputs; a wrapper on the loss head's ``loss_fn`` catches the labels the loss read;
- ``next_free_run_dir``: a rerun goes to the next numbered sibling, never into a trace that exists.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

Tensor = torch.Tensor
CONTEXT_FIELD = "context"  # the field (key, attribute) the rule picks from a dict or a dataclass output
Selector = Union[None, str, int, Callable[[Any], Tensor]]


def _type_name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def _pick(output: Any, selector: Selector) -> Any:
    """The item the rule or ``selector`` names (``KeyError``/``IndexError``/``AttributeError`` when missing)."""
    if callable(selector):
        return selector(output)
    if isinstance(output, Tensor) and selector is None:
        return output
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return output[0 if selector is None else selector]
    key = CONTEXT_FIELD if selector is None else selector
    if isinstance(output, Mapping):
        return output[key]
    if isinstance(key, int):
        return output[key]
    return getattr(output, key)


class ContextPicker:
    """Picks the context rows out of an encoder's output. The rule: a tensor as is; a tuple or list, its first item;
    a dict, key ``context``; a dataclass (or any object), attribute ``context``. ``select`` overrides it: a key or
    attribute name, an index, or a callable ``output -> tensor``. The picked item must be a tensor."""

    def __init__(self, select: Selector = None) -> None:
        if select is not None and not isinstance(select, (str, int)) and not callable(select):
            raise ValueError(f"encoder_select must be a key or attribute name, an index or a callable, not "
                             f"{_type_name(select)}")
        self.select = select

    def rows(self, output: Any) -> Optional[Tensor]:
        """The context tensor in ``output``; None when the rule or selector finds none."""
        try:
            got = _pick(output, self.select)
        except (KeyError, IndexError, AttributeError, TypeError):
            return None
        return got if isinstance(got, Tensor) else None

    def problem(self, output: Any) -> Optional[str]:
        """None when ``output`` gives a tensor, else the one-line reason (the type found, the selector to pass)."""
        if self.rows(output) is not None:
            return None
        how = "the rule" if self.select is None else f"encoder_select={self.select!r}"
        return (f"the watched encoder returns {_type_name(output)}{_fields_of(output)} and {how} found no tensor "
                f"in it; pass trace_run(..., encoder_select=NAME) naming the field that holds the context rows "
                f"(a key, attribute or index), or a callable output -> tensor")

    def check_module(self, module: nn.Module) -> None:
        """At ``trace_run``: when the module's ``forward`` annotates its return type, check the rule or selector
        finds a tensor there (a ``ValueError`` in one line if not); unannotated outputs are checked at the first
        step (outside the user's forward)."""
        try:
            ret = typing.get_type_hints(type(module).forward).get("return")
        except Exception:  # unresolvable annotations: checked at the first step instead
            return
        if ret is None or callable(self.select) or ret is Tensor:
            return
        fields = _annotated_fields(ret)
        if fields is None:
            return
        key = CONTEXT_FIELD if self.select is None else self.select
        if isinstance(key, int) and isinstance(fields, list):
            ok = -len(fields) <= key < len(fields) and _is_tensor_type(fields[key])
        else:
            ok = isinstance(fields, dict) and key in fields and _is_tensor_type(fields[key])
        if not ok:
            names = f" (fields: {', '.join(map(str, fields))})" if isinstance(fields, dict) else ""
            how = "the rule" if self.select is None else f"encoder_select={self.select!r}"
            raise ValueError(f"{type(module).__name__}.forward returns {_type_name(ret)}{names} and {how} finds no "
                             f"tensor field {key!r} in it; pass trace_run(..., encoder_select=NAME) naming the field "
                             "that holds the context rows, or a callable output -> tensor")


def _fields_of(output: Any) -> str:
    if dataclasses.is_dataclass(output):
        return f" (fields: {', '.join(f.name for f in dataclasses.fields(output))})"
    if isinstance(output, Mapping):
        return f" (keys: {', '.join(map(str, output))})"
    return ""


def _is_tensor_type(tp: Any) -> bool:
    return tp is Tensor or (isinstance(tp, type) and issubclass(tp, Tensor))


def _annotated_fields(tp: Any) -> Optional[Union[dict, list]]:
    """Field name -> type of a dataclass or TypedDict/NamedTuple annotation; item types of a ``tuple[...]``; None when
    the annotation says nothing checkable."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(tp)}
    if isinstance(tp, type) and (hasattr(tp, "__annotations__") and (hasattr(tp, "_fields") or
                                                                     hasattr(tp, "__total__"))):
        return dict(typing.get_type_hints(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return None if not args or args[-1] is Ellipsis else list(args)
    if isinstance(tp, type) and not issubclass(tp, (tuple, list, Mapping)):
        return {}  # a plain class with no declared fields: the rule's attribute cannot be checked as a tensor
    return None


def carry_and_batch(module: nn.Module) -> Callable[[tuple, dict], tuple[Any, Any]]:
    """(carry, batch) of a call of ``module`` from a forward hook's ``args``/``kwargs``: its first two parameters,
    passed by position or by name (upstream's loss head calls ``model(carry=..., batch=...)``)."""
    params = list(inspect.signature(module.forward).parameters)[:2]

    def pick(args: tuple, kwargs: dict) -> tuple[Any, Any]:
        bound = dict(zip(params, args), **kwargs)
        return bound.get(params[0]), bound.get(params[1]) if len(params) > 1 else None

    return pick


class LossHeadCatch:
    """Upstream's ``ACTLossHead`` shape, traced as is: ``model``'s training forwards with grad are caught (carry in,
    batch, new carry, outputs) and so are the labels passed to ``loss_head.loss_fn`` (the ones the loss read).
    ``take()`` hands over one step's catch and clears it; ``remove()`` undoes the hook and the wrapper."""

    def __init__(self, model: nn.Module, loss_head: nn.Module) -> None:
        fn = getattr(loss_head, "loss_fn", None)
        if not callable(fn):
            raise ValueError(f"{type(loss_head).__name__} has no loss_fn attribute to read the labels from; trace it "
                             "with run.step(before, after, batch, outputs, loss, labels=...) instead")
        self.loss_head, self.original = loss_head, fn
        self.calls: list[tuple[Any, Any, Any, Any]] = []
        self.labels: list[Tensor] = []
        pick = carry_and_batch(model)

        def model_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if mod.training and torch.is_grad_enabled():
                self.calls.append((*pick(args, kwargs), output[0], output[1]))

        def caught_loss_fn(logits: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Any:
            if loss_head.training and torch.is_grad_enabled():
                self.labels.append(labels)
            return fn(logits, labels, *args, **kwargs)

        self.handles = [model.register_forward_hook(model_hook, with_kwargs=True)]
        if isinstance(fn, nn.Module):  # a loss module (say nn.CrossEntropyLoss): its input hook sees the labels
            def module_hook(mod: nn.Module, args: tuple) -> None:
                if loss_head.training and torch.is_grad_enabled():
                    self.labels.append(args[1])
            self.handles.append(fn.register_forward_pre_hook(module_hook))
        else:
            self.own = "loss_fn" in vars(loss_head)
            loss_head.loss_fn = caught_loss_fn

    def take(self) -> tuple[Any, Any, Any, Any, Tensor]:
        """(before, batch, after, outputs, labels) of the one model call and loss call since the last take."""
        calls, labels = self.calls, self.labels
        self.calls, self.labels = [], []
        if len(calls) != 1 or len(labels) != 1:
            raise ValueError(f"run.record saw {len(calls)} model call(s) and {len(labels)} loss call(s) since the "
                             "last step, not one of each; call it once after each loss-head call (training mode, "
                             "with grad)")
        before, batch, after, outputs = calls[0]
        return before, batch, after, outputs, labels[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if not isinstance(self.original, nn.Module):
            if self.own:
                self.loss_head.loss_fn = self.original
            else:  # it was the class's method: drop the instance's wrapper
                del self.loss_head.loss_fn


def next_free_run_dir(run_dir: Path, marker: str) -> Path:
    """``run_dir`` when it holds no ``marker`` file (the trace), else the first ``run_dir-N`` (N = 1, 2, ...) that
    holds none: a rerun never writes into an existing trace."""
    if not (run_dir / marker).exists():
        return run_dir
    n = 1
    while (run_dir.with_name(f"{run_dir.name}-{n}") / marker).exists():
        n += 1
    return run_dir.with_name(f"{run_dir.name}-{n}")
