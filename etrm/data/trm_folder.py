"""Read a data folder that upstream's builders wrote (``build_arc_dataset.py``, ``build_sudoku_dataset.py``, ...).

Layout (reference notes 4.1): ``DIR/train/`` and ``DIR/test/``, each with ``dataset.json`` and, per set name listed in
it (``sets``, usually ``["all"]``), ``{set}__inputs.npy`` [N, S], ``{set}__labels.npy`` [N, S],
``{set}__puzzle_identifiers.npy`` [P], ``{set}__puzzle_indices.npy`` [P+1] and ``{set}__group_indices.npy`` [G+1].
Labels equal to ``ignore_label_id`` become -100. Identifier 0 is our padding rows' blank id: when a folder gives real
puzzles identifier 0 (upstream's Sudoku and Maze do), every identifier is shifted up by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from etrm.data.dataset import GridDataset
from etrm.data.tokens import IGNORE_LABEL

FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
META_KEYS = ("vocab_size", "seq_len", "num_puzzle_identifiers")


class FolderError(ValueError):
    """The folder is missing, incomplete or inconsistent; the message names the file and what is wrong."""


def _read_meta(split_dir: Path) -> dict:
    path = split_dir / "dataset.json"
    if not path.is_file():
        raise FolderError(f"{path} is missing; a TRM data folder has train/ and test/, each with dataset.json")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FolderError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FolderError(f"{path} must hold a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise FolderError(f"{path} lacks {', '.join(missing)}")
    return meta


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FolderError(f"{path} is missing")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FolderError(f"{path} is not a readable .npy file ({exc})") from None


def read_split(split_dir: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(metadata, inputs [N, S] int64, labels [N, S] int64 with -100, puzzle identifier per row [N] int64)."""
    meta = _read_meta(split_dir)
    seq_len, vocab = int(meta["seq_len"]), int(meta["vocab_size"])
    ignore = meta.get("ignore_label_id")
    xs, ys, ids = [], [], []
    for name in meta.get("sets", ["all"]):
        arrs = {f: _load(split_dir / f"{name}__{f}.npy") for f in FIELDS}
        x, y, pid, pidx = arrs["inputs"], arrs["labels"], arrs["puzzle_identifiers"], arrs["puzzle_indices"]
        where = f"{split_dir}/{name}__*.npy"
        if x.ndim != 2 or x.shape[1] != seq_len:
            raise FolderError(f"{where}: inputs have shape {x.shape}, expected [N, seq_len={seq_len}]")
        if y.shape != x.shape:
            raise FolderError(f"{where}: labels shape {y.shape} differs from inputs {x.shape}")
        if pid.ndim != 1 or pidx.shape != (len(pid) + 1,):
            raise FolderError(f"{where}: puzzle_indices must have one more entry than puzzle_identifiers "
                              f"({pidx.shape} vs {pid.shape})")
        if len(pidx) and (pidx[0] != 0 or pidx[-1] != len(x) or np.any(np.diff(pidx) < 0)):
            raise FolderError(f"{where}: puzzle_indices must rise from 0 to the number of examples ({len(x)})")
        x64, y64 = x.astype(np.int64), y.astype(np.int64)
        if ignore is not None:
            y64[y == int(ignore)] = IGNORE_LABEL
        if x64.size and (x64.min() < 0 or x64.max() >= vocab):
            raise FolderError(f"{where}: inputs hold tokens outside 0..{vocab - 1}")
        bad = (y64 != IGNORE_LABEL) & ((y64 < 0) | (y64 >= vocab))
        if bad.any():
            raise FolderError(f"{where}: labels hold {int(bad.sum())} values outside 0..{vocab - 1}")
        xs.append(x64)
        ys.append(y64)
        ids.append(np.repeat(pid.astype(np.int64), np.diff(pidx)))
    if not xs:
        raise FolderError(f"{split_dir}/dataset.json lists no sets")
    return meta, np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def read_trm_folder(path: str | Path) -> tuple[GridDataset, GridDataset, dict]:
    """(train dataset, test dataset, info with vocab_size, seq_len, num_puzzle_ids and a summary line)."""
    root = Path(path)
    if not root.is_dir():
        raise FolderError(f"data folder {str(root)!r} does not exist; point data.path at a folder with train/ and "
                          "test/")
    meta_tr, x_tr, y_tr, id_tr = read_split(root / "train")
    meta_te, x_te, y_te, id_te = read_split(root / "test")
    for key in ("seq_len", "vocab_size"):
        if int(meta_tr[key]) != int(meta_te[key]):
            raise FolderError(f"{root}: train and test disagree on {key} ({meta_tr[key]} vs {meta_te[key]})")
    vocab = int(meta_tr["vocab_size"])
    if vocab > 256:
        raise FolderError(f"{root}: vocab_size {vocab} is over 256; this reader stores tokens as uint8")
    num_ids = max(int(meta_tr["num_puzzle_identifiers"]), int(meta_te["num_puzzle_identifiers"]))
    shift = int((id_tr.size and id_tr.min() == 0) or (id_te.size and id_te.min() == 0))
    top = max(int(id_tr.max(initial=0)), int(id_te.max(initial=0)))
    if top >= num_ids:
        raise FolderError(f"{root}: a puzzle identifier ({top}) is >= num_puzzle_identifiers ({num_ids})")

    def dataset(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> GridDataset:
        ds = GridDataset(x.astype(np.uint8), y.astype(np.int16), (ids + shift).astype(np.int32))
        ds.validate(vocab)
        return ds

    train, test = dataset(x_tr, y_tr, id_tr), dataset(x_te, y_te, id_te)
    line = (f"data trm-folder {root}: {len(train)} train and {len(test)} test examples, seq {meta_tr['seq_len']}, "
            f"vocab {vocab}, {num_ids} puzzle ids")
    if shift:
        line += " (shifted by 1: id 0 is our padding id)"
    info = {"vocab_size": vocab, "seq_len": int(meta_tr["seq_len"]), "num_puzzle_ids": num_ids + shift, "line": line,
            "id_shift": shift}
    info.update({k: meta_tr[k] for k in ("total_groups", "mean_puzzle_examples") if k in meta_tr})  # the epoch
    return train, test, info
