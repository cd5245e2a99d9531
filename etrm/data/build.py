"""Build the train and held-out datasets a config asks for, in the view its model needs (TRM or ETRM)."""

from __future__ import annotations

from etrm.config import Config
from etrm.data.dataset import GridDataset
from etrm.data.fewshot import FewShotConfig, build_fewshot
from etrm.errors import UserError
from etrm.model.act import ModelShape


def build_datasets(cfg: Config) -> tuple[GridDataset, GridDataset, ModelShape]:
    """(train dataset, held-out dataset, model shape) for ``cfg``; bad data settings are a UserError.

    A one-line summary of how the data was built (ARC: tasks kept and left out) is in ``train_ds.info["line"]``.
    """
    view = cfg.model  # the data view: TRM's (puzzle ids) or ETRM's (demo pairs)
    d = cfg.data
    if d.dataset in ("sudoku", "maze", "trm-folder") and view == "etrm":
        raise UserError(f"data.dataset={d.dataset} has no demo pairs, and model=etrm reads each task from its demos; "
                        "use model=trm")
    try:
        if d.dataset == "fewshot":
            train_ds, eval_ds, info = build_fewshot(FewShotConfig.from_data_config(d), view)
            shape = ModelShape(info.vocab_size, info.seq_len, info.num_puzzle_ids)
        elif d.dataset in ("arc1", "arc2"):
            from etrm.data.arc import build_arc, load_arc_tasks
            train_tasks, eval_tasks = load_arc_tasks(d.dataset)
            train_ds, eval_ds, arc_info = build_arc(
                train_tasks, eval_tasks, d.canvas, view, num_aug=d.num_aug, seed=d.seed, translate=d.translate,
                strict=d.strict, max_train_tasks=d.max_train_tasks, max_eval_tasks=d.max_eval_tasks,
                max_demos=d.max_demos)
            train_ds.info = {"line": arc_info.line(d.dataset, d.canvas), "left_out_train": arc_info.left_out_train,
                             "left_out_eval": arc_info.left_out_eval, "train_tasks": arc_info.train_tasks,
                             "eval_tasks": arc_info.eval_tasks}
            shape = ModelShape(arc_info.vocab_size, arc_info.seq_len, arc_info.num_puzzle_ids)
        elif d.dataset == "sudoku":
            from etrm.data.sudoku import SUDOKU_SEQ, SUDOKU_VOCAB, build_sudoku
            train_ds, eval_ds, info = build_sudoku(d.train_tasks, d.heldout_tasks, d.givens, d.num_aug, d.seed)
            train_ds.info = info
            shape = ModelShape(SUDOKU_VOCAB, SUDOKU_SEQ, 2)
        elif d.dataset == "maze":
            from etrm.data.maze import MAZE_PUZZLE_ID, MAZE_VOCAB, MazeSpec, build_maze, hard_min_path
            spec = MazeSpec(side=d.canvas, min_path=d.min_path or hard_min_path(d.canvas), train=d.train_tasks,
                            test=d.heldout_tasks, seed=d.seed)
            train_ds, eval_ds, info = build_maze(spec, d.num_aug)
            train_ds.info = info
            shape = ModelShape(MAZE_VOCAB, d.canvas * d.canvas, MAZE_PUZZLE_ID + 1)
        elif d.dataset == "trm-folder":
            from etrm.data.trm_folder import read_trm_folder
            train_ds, eval_ds, info = read_trm_folder(d.path)
            train_ds.info = info
            shape = ModelShape(info["vocab_size"], info["seq_len"], info["num_puzzle_ids"])
        else:  # pragma: no cover - DataConfig validates the name
            raise UserError(f"unknown dataset {d.dataset!r}")
    except (ValueError, KeyError) as exc:
        raise UserError(f"data settings are not valid: {exc}") from None
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise UserError("the data settings produce an empty train or held-out set; raise data.train_tasks or "
                        "data.heldout_tasks")
    return train_ds, eval_ds, shape
