"""Build the train and held-out datasets a config asks for, in the view its model needs (TRM or ETRM)."""

from __future__ import annotations

from etrm.config import Config
from etrm.data.dataset import GridDataset
from etrm.data.fewshot import FewShotConfig, build_fewshot
from etrm.errors import UserError
from etrm.model.act import ModelShape


def build_datasets(cfg: Config) -> tuple[GridDataset, GridDataset, ModelShape]:
    """(train dataset, held-out dataset, model shape) for ``cfg``; bad data settings are a UserError."""
    view = "trm" if cfg.model == "trm" else "etrm"
    try:
        train_ds, eval_ds, info = build_fewshot(FewShotConfig.from_data_config(cfg.data), view)
    except (ValueError, KeyError) as exc:
        raise UserError(f"data settings are not valid: {exc}") from None
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise UserError("the data settings produce an empty train or held-out set; raise data.train_tasks or "
                        "data.heldout_tasks")
    return train_ds, eval_ds, ModelShape(info.vocab_size, info.seq_len, info.num_puzzle_ids)
