"""Files in upstream TRM's formats, written here from its documented layout (not by our own export): a data folder
as upstream's dataset builders write it, and a checkpoint with upstream's state-dict names and shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# A small folder: 3 groups; group 0 holds puzzles 1 and 2 (2 examples each), group 1 puzzle 3 (1 example), group 2
# puzzle 4 (3 examples): 8 examples in 4 puzzles, mean 2.0 examples per puzzle, as upstream's builder counts them.
PUZZLE_EXAMPLES = (2, 2, 1, 3)
PUZZLE_GROUP = (0, 0, 1, 2)
SEQ, VOCAB = 9, 12


def write_split(d: Path, examples: Sequence[int], groups: Sequence[int], first_id: int, seed: int) -> None:
    """One split (``train/`` or ``test/``): ``all__*.npy`` and ``dataset.json`` with upstream's keys."""
    d.mkdir(parents=True)
    n = int(sum(examples))
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (n, SEQ))
    y = rng.integers(1, VOCAB, (n, SEQ))
    pidx = np.concatenate([[0], np.cumsum(examples)])
    gidx = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [len(groups)]])
    for name, arr, dtype in (("inputs", x, np.uint8), ("labels", y, np.uint8),
                             ("puzzle_identifiers", np.arange(first_id, first_id + len(examples)), np.int32),
                             ("puzzle_indices", pidx, np.int32), ("group_indices", gidx, np.int32)):
        np.save(d / f"all__{name}.npy", np.asarray(arr, dtype))
    meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": VOCAB, "seq_len": SEQ,
            "num_puzzle_identifiers": 8, "total_groups": len(gidx) - 1,
            "mean_puzzle_examples": float(np.mean(examples)), "total_puzzles": len(examples), "sets": ["all"]}
    (d / "dataset.json").write_text(json.dumps(meta))


def write_folder(root: Path) -> Path:
    """The train split above and a test split of 2 puzzles (2 and 1 examples, ids 5 and 6)."""
    write_split(root / "train", PUZZLE_EXAMPLES, PUZZLE_GROUP, 1, 0)
    write_split(root / "test", (2, 1), (0, 1), 5, 1)
    return root


# Upstream's names under the loss head (``model.inner.``); a compiled model saves them under ``_orig_mod.``.
INNER = "model.inner."


def upstream_state(hidden: int, expansion: float, layers: int, vocab: int, num_ids: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """An upstream TRM state dict (names and shapes of ``models/recursive_reasoning/trm.py``): each block's fused
    ``qkv_proj`` holds q rows of value ``10 * block + 1``, k rows ``10 * block + 2``, v rows ``10 * block + 3`` (plus
    a small random part), so a wrong split shows; every other tensor is random."""
    g = torch.Generator().manual_seed(seed)
    inter = _swiglu_size(hidden, expansion)
    state = {"embed_tokens.embedding_weight": torch.randn(vocab, hidden, generator=g),
             "lm_head.weight": torch.randn(vocab, hidden, generator=g),
             "q_head.weight": torch.randn(2, hidden, generator=g), "q_head.bias": torch.randn(2, generator=g),
             "puzzle_emb.weights": torch.randn(num_ids, hidden, generator=g),
             "H_init": torch.randn(hidden, generator=g), "L_init": torch.randn(hidden, generator=g)}
    for i in range(layers):
        pre = f"L_level.layers.{i}."
        qkv = torch.cat([torch.full((hidden, hidden), 10.0 * i + part) for part in (1, 2, 3)])
        state[pre + "self_attn.qkv_proj.weight"] = qkv + 0.01 * torch.randn(3 * hidden, hidden, generator=g)
        state[pre + "self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        state[pre + "mlp.gate_up_proj.weight"] = torch.randn(2 * inter, hidden, generator=g)
        state[pre + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
    return {INNER + k: v for k, v in state.items()}


def _swiglu_size(hidden: int, expansion: float) -> int:
    """Upstream's SwiGLU width: ``round(expansion * hidden * 2 / 3)`` up to a multiple of 256."""
    inter = round(expansion * hidden * 2 / 3)
    return (inter + 255) // 256 * 256
