"""A whole-step audit of host read-backs (syncs), on any device, CPU included.

On a CPU a ``TorchDispatchMode`` alone cannot see most read-backs: ``.cpu()``, ``.numpy()`` or ``.tolist()`` of a CPU
tensor run no aten op. ``SyncAudit`` therefore combines two nets, both limited to tensors on the training device:

- dispatch: the ops that must read device values to finish (``READ_OPS``: ``_local_scalar_dense``, ``nonzero``,
  ``is_nonzero``, ``equal``, ``unique``, ...), boolean-mask indexing (a hidden ``nonzero``) and blocking copies from
  the device to the host;
- Python: the tensor methods that hand a value to Python (``GUARDED``: ``.cpu()``, ``.numpy()``, ``.tolist()``,
  ``.item()``, ``bool()``, ``int()``, ``float()``, ``operator.index``).

Scalars that live on the host by design (the optimizers' step counters) are exempt through ``allow``. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth (``benchmarks/gpu_check.py``); this audit is what a
CPU-only test can assert.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

READ_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.item",
            "aten._unique", "aten.unique", "aten.masked_select", "aten.allclose", "aten.bincount")
INDEX_OPS = ("aten.index.", "aten.index_put", "aten._index_put_impl_")  # a bool index hides a nonzero
GUARDED = ("cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__")
_HERE = Path(__file__).resolve()
_TORCH = Path(torch.__file__).resolve().parent


@dataclass(frozen=True)
class ReadBack:
    """One read of a device value by the host: what did it (``Tensor.item``, ``aten.nonzero``, ...), from where."""

    what: str
    site: str
    label: str = ""  # the audit's label when it happened (e.g. the step)


def _site() -> str:
    """The innermost caller outside torch and this module, as ``path:line``."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == _HERE or _TORCH in path.parents:
            continue
        return f"{frame.filename}:{frame.lineno}"
    return "?"


def optimizer_step_counters(optimizers: Iterable[Any]) -> Callable[[torch.Tensor], bool]:
    """``allow`` for the optimizers' ``step`` tensors (host scalars by design; looked up at each read, since the
    optimizers create them lazily)."""
    optimizers = list(optimizers)

    def allowed(t: torch.Tensor) -> bool:
        for opt in optimizers:
            for state in getattr(opt, "state", {}).values():
                if state.get("step") is t:
                    return True
        return False

    return allowed


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: "SyncAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        audit, name = self.audit, str(func)
        if not audit._inside:
            tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            on_device = [t for t in tensors if audit._watched(t)]
            if on_device and _reads(name, args, kwargs, tensors, audit.device):
                audit._record(name)
        return func(*args, **kwargs)


def _reads(name: str, args: tuple, kwargs: dict, tensors: list[torch.Tensor], device: torch.device) -> bool:
    if name.startswith(READ_OPS):
        return True
    if name.startswith(INDEX_OPS):
        return any(t.dtype == torch.bool for t in tensors[1:])
    if name.startswith("aten.copy_") and device.type != "cpu":  # device -> host copies (not seen on a CPU)
        dst, src = args[0], args[1]
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return dst.device.type == "cpu" and src.device.type == device.type and not (non_blocking and dst.is_pinned())
    if name.startswith("aten._to_copy") and device.type != "cpu":
        return kwargs.get("device") == torch.device("cpu") and not kwargs.get("non_blocking", False)
    return False


class SyncAudit:
    """Records every host read of a tensor on ``device`` while active (``with SyncAudit(device) as audit:``).

    ``label(name)`` tags what follows (e.g. the step), ``reads`` is everything recorded. Only one audit is active
    at a time (it patches ``torch.Tensor``'s read-back methods for its duration)."""

    _active: "SyncAudit | None" = None

    def __init__(self, device: torch.device | str, allow: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.device = torch.device(device)
        self.allow = allow or (lambda t: False)
        self.reads: list[ReadBack] = []
        self._label = ""
        self._inside = 0
        self._saved: dict[str, Any] = {}
        self._mode = _Dispatch(self)

    def _watched(self, t: torch.Tensor) -> bool:
        dev = t.device
        same = dev.type == self.device.type and (self.device.index is None or dev.index == self.device.index)
        return same and not self.allow(t)

    def _record(self, what: str) -> None:
        self.reads.append(ReadBack(what, _site(), self._label))

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Tag the reads recorded inside (``with audit.label("step 3"): ...``)."""
        previous, self._label = self._label, name
        try:
            yield
        finally:
            self._label = previous

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Reads inside are not recorded (a flush, whose read-back is by design)."""
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    def count(self, label: str | None = None) -> int:
        return sum(1 for r in self.reads if label is None or r.label == label)

    def __enter__(self) -> "SyncAudit":
        if SyncAudit._active is not None:
            raise RuntimeError("a SyncAudit is already active")
        SyncAudit._active = self
        for name in GUARDED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._guard(name, original))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        SyncAudit._active = None

    def _guard(self, name: str, original: Callable) -> Callable:
        audit = self

        def guarded(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not audit._inside and audit._watched(t):
                audit._record(f"Tensor.{name}")
            audit._inside += 1  # the ops it runs underneath are the same read
            try:
                return original(t, *args, **kwargs)
            finally:
                audit._inside -= 1

        guarded.__name__ = name
        return guarded


def format_reads(reads: Iterable[ReadBack]) -> str:
    """One line per distinct (what, site) with its count: for assertion messages."""
    counts: dict[tuple[str, str], int] = {}
    for r in reads:
        counts[(r.what, r.site)] = counts.get((r.what, r.site), 0) + 1
    return "\n".join(f"{n:>4} x {what} at {site}" for (what, site), n in sorted(counts.items()))
