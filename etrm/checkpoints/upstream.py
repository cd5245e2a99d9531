"""Open a TRM checkpoint for evaluation: ours (``checkpoint.pt``, EMA or raw weights) or upstream TRM's.

Upstream saves ``torch.save(model.state_dict())`` (a file ``step_N`` per evaluation, beside ``all_config.yaml``); a
fork saves ``{"model": state_dict, "optimizers": ..., "step": N}``. Its names sit under the loss head's
``model.inner.`` (the ACT wrapper's ``inner.``), and under ``_orig_mod.`` when the model was compiled. Our model
matches upstream's weight for weight, so the mapping is a table of names (``NAMES``, ``BLOCK_NAMES``) plus one split:
upstream fuses each block's q, k and v projections into ``qkv_proj`` (rows q, then k, then v), where we keep
``q_proj`` and ``kv_proj`` (rows k, then v). The puzzle table moves down by one row where our data reader shifted
identifiers (``id_shift``: upstream's Sudoku and Maze use identifier 0, our padding's blank id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from etrm.errors import UserError
from etrm.train.checkpoint import read_torch_file

Tensor = torch.Tensor
ORIG_MOD = "_orig_mod."  # torch.compile's wrapper
INNER_PREFIXES = ("model.inner.", "inner.")  # loss head -> ACT wrapper -> inner; the ACT wrapper saved alone
# Upstream's inner names -> ours.
NAMES = {
    "embed_tokens.embedding_weight": "core.embed_tokens",
    "lm_head.weight": "core.lm_head.weight",
    "q_head.weight": "core.q_head.weight",
    "q_head.bias": "core.q_head.bias",
    "H_init": "core.H_init",
    "L_init": "core.L_init",
    "puzzle_emb.weights": "puzzle_emb.weights",
}
# Per block ``L_level.layers.<i>.<name>`` -> ``core.blocks.<i>.<ours>``; the fused ``QKV`` is split.
BLOCK_NAMES = {
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_up_proj.weight": "mlp.gate_up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
QKV = "self_attn.qkv_proj.weight"
Q_OURS, KV_OURS = "attn.q_proj.weight", "attn.kv_proj.weight"
_BLOCK = re.compile(r"^L_level\.layers\.(\d+)\.(.+)$")
ETRM, UPSTREAM = "etrm", "upstream"
FORMATS = ("an etrm checkpoint (a dict with step, model and config)",
           "an upstream TRM state dict (model.inner.* keys, optionally under _orig_mod.)",
           "an upstream training state (a dict whose 'model' is such a state dict)")


@dataclass
class Opened:
    """A checkpoint read and recognised: ``kind`` (``etrm`` or ``upstream``), its training step when known, the
    weights (ours: the model's state dict; upstream: its inner names, prefixes removed), and for ours the EMA
    shadow and the run's config."""

    path: Path
    kind: str
    step: int | None
    weights: dict[str, Tensor]
    ema: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def read(path: Path) -> Opened:
    """Read ``path`` (on the CPU, ``weights_only``) and recognise its format; anything else is one UserError that
    says which formats were tried."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint file, a run directory or a folder of "
                        "upstream step_N files")
    data = read_torch_file(path, "pass a whole checkpoint file")
    if isinstance(data, dict) and {"step", "model", "config"} <= data.keys() and isinstance(data["model"], dict):
        return Opened(path, ETRM, int(data["step"]), dict(data["model"]), dict(data.get("ema") or {}),
                      data["config"])
    for candidate, step in ((data, None), (data.get("model") if isinstance(data, dict) else None,
                                           data.get("step") if isinstance(data, dict) else None)):
        inner = upstream_inner(candidate)
        if inner is not None:
            return Opened(path, UPSTREAM, int(step) if isinstance(step, int) else _name_step(path), inner)
    raise UserError(f"checkpoint {path} is in no format this reads; tried {'; '.join(FORMATS)}")


def _name_step(path: Path) -> int | None:
    m = re.search(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def upstream_inner(state: Any) -> dict[str, Tensor] | None:
    """Upstream's inner state dict from a saved one (``_orig_mod.`` and ``model.inner.``/``inner.`` removed), or
    None when ``state`` is not one (no key of upstream's inner model)."""
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        return None
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len(ORIG_MOD):] if key.startswith(ORIG_MOD) else key
        for prefix in INNER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if not isinstance(value, Tensor):
            return None
        out[name] = value
    known = [k for k in out if k in NAMES or _BLOCK.match(k)]
    return out if known else None


def to_ours(inner: Mapping[str, Tensor], template: Mapping[str, Tensor], id_shift: int = 0,
            source: str = "checkpoint", arch: str = "") -> dict[str, Tensor]:
    """Upstream's inner weights as our model's state dict (``template``: the model's own state dict, for names
    and shapes). A key with no place here, a missing one or a shape that does not fit is one UserError naming the
    first such key (and both shapes); ``arch`` says where the architecture came from."""
    out: dict[str, Tensor] = {}
    for key, value in inner.items():
        m = _BLOCK.match(key)
        if key in NAMES:
            ours = NAMES[key]
            if key == "puzzle_emb.weights" and id_shift:
                value = _shift_rows(value, id_shift)
            _fit(ours, value, template, source, arch, key)
            out[ours] = value
        elif m and m.group(2) == QKV:
            pre = f"core.blocks.{m.group(1)}."
            if pre + Q_OURS not in template or pre + KV_OURS not in template:
                _fit(pre + Q_OURS, value, template, source, arch, key)  # no such block: names the key
            q_shape, kv_shape = template[pre + Q_OURS].shape, template[pre + KV_OURS].shape
            fused = torch.empty(q_shape[0] + kv_shape[0], q_shape[1])  # the fused shape this block needs
            _fit(pre + "qkv", value, {pre + "qkv": fused}, source, arch, key)
            out[pre + Q_OURS], out[pre + KV_OURS] = value[:q_shape[0]].clone(), value[q_shape[0]:].clone()
        elif m and m.group(2) in BLOCK_NAMES:
            ours = f"core.blocks.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}"
            _fit(ours, value, template, source, arch, key)
            out[ours] = value
        elif key.startswith(("rotary_emb.", "puzzle_emb.local_")):  # caches, not weights
            continue
        else:
            raise UserError(f"{source} holds {key!r}, which this TRM has no place for (an upstream variant this "
                            f"reader does not map{_from(arch)})")
    missing = [k for k in template if k not in out]
    if missing:
        raise UserError(f"{source} lacks the weights of {missing[0]!r} ({len(missing)} missing): it holds fewer "
                        f"layers or parts than the architecture{_from(arch)}; give the architecture it was "
                        "trained with")
    return out


def check_fits(state: Mapping[str, Tensor], template: Mapping[str, Tensor], source: str, arch: str = "") -> None:
    """Our own checkpoint against the model it is loaded into: the first key that is missing, extra or mis-shaped
    is one UserError."""
    for key, value in state.items():
        _fit(key, value, template, source, arch, key)
    missing = [k for k in template if k not in state]
    if missing:
        raise UserError(f"{source} lacks {missing[0]!r} ({len(missing)} missing){_from(arch)}")


def _fit(ours: str, value: Tensor, template: Mapping[str, Tensor], source: str, arch: str, key: str) -> None:
    if ours not in template:
        raise UserError(f"{source} holds {key!r}, which the model{_from(arch)} has no place for; give the "
                        "architecture it was trained with")
    want = tuple(template[ours].shape)
    if tuple(value.shape) != want:
        raise UserError(f"{source} does not fit the architecture{_from(arch)}: {key!r} has shape "
                        f"{list(value.shape)} in the checkpoint, {list(want)} in the model; give the architecture "
                        "it was trained with (--preset, --config, arch.*=..., or its all_config.yaml)")


def _from(arch: str) -> str:
    return f" (from {arch})" if arch else ""


def _shift_rows(table: Tensor, shift: int) -> Tensor:
    """Upstream's puzzle table with ``shift`` blank rows in front (our reader shifted the identifiers by it)."""
    if table.ndim != 2:
        return table
    return torch.cat([table.new_zeros(shift, table.shape[1]), table])


def load_weights(model: torch.nn.Module, opened: Opened, weights: str, id_shift: int = 0, arch: str = "") -> None:
    """Load ``opened`` into ``model``: ours with its ``ema`` shadow over the raw weights (``weights="ema"``) or the
    raw weights alone; upstream's through ``to_ours``."""
    template = model.state_dict()
    source = f"checkpoint {opened.path}"
    if opened.kind == UPSTREAM:
        state = to_ours(opened.weights, template, id_shift, source, arch)
    else:
        check_fits(opened.weights, template, source, arch)
        state = dict(opened.weights)
        if weights == "ema":
            if not opened.ema:
                raise UserError(f"{source} holds no EMA weights (trained with train.ema=false); pass --weights raw")
            for name, value in opened.ema.items():
                _fit(name, value, template, source, arch, name)
                state[name] = value
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------------------------
# upstream's all_config.yaml

ALL_CONFIG = "all_config.yaml"
ARCH_KEYS = ("hidden_size", "num_heads", "expansion", "L_layers", "H_cycles", "L_cycles", "puzzle_emb_len",
             "rope_theta")


def all_config_settings(path: Path) -> dict[str, Any]:
    """Our config's settings (``model``, ``arch``, ``act``, ``train.ema``) from upstream's ``all_config.yaml``
    (the resolved Hydra config; ``arch.*`` holds the model's keys). Variants our model does not have (learned
    positions, the MLP-mixer ``mlp_t``, a puzzle table wider than one token) are one UserError."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path} is not a readable YAML file ({str(exc).splitlines()[0][:120]}); fix it or give "
                        "the architecture with --preset/--config") from None
    arch = data.get("arch") if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise UserError(f"{path} has no arch section; give the architecture with --preset/--config")
    bad = [(k, arch[k]) for k, ok in (("pos_encodings", "rope"), ("mlp_t", False)) if k in arch and arch[k] != ok]
    ndim, hidden = arch.get("puzzle_emb_ndim"), arch.get("hidden_size")
    if ndim not in (None, hidden):
        bad.append(("puzzle_emb_ndim", ndim))
    if bad:
        k, v = bad[0]
        raise UserError(f"{path}: arch.{k}={v!r} is an upstream variant our TRM does not have (it has rope "
                        "positions, attention blocks and a puzzle table one token wide)")
    out: dict[str, Any] = {"model": "trm", "arch": {k: arch[k] for k in ARCH_KEYS if k in arch}, "act": {}}
    for key in ("halt_max_steps", "halt_exploration_prob"):
        if key in arch:
            out["act"][key] = arch[key]
    if "no_ACT_continue" in arch:
        out["act"]["q_continue"] = not bool(arch["no_ACT_continue"])
    if isinstance(data.get("ema"), bool):
        out["train"] = {"ema": data["ema"]}
    return out
