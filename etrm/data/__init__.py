"""Generated few-shot grid tasks, their ETRM and TRM dataset views, and the samplers that feed ACT slots."""

from etrm.data.dataset import BLANK_PUZZLE_ID, GridDataset
from etrm.data.families import FAMILIES, FAMILY_NAMES, Family, dihedral, get_family, inverse_dihedral
from etrm.data.fewshot import (
    Augmentation,
    FewShotConfig,
    FewShotInfo,
    Task,
    build_fewshot,
    etrm_view,
    generate_tasks,
    trm_views,
)
from etrm.data.samplers import Fill, RefillSampler, Sampler, TRMSampler, build_sampler
from etrm.data.tokens import EOS, IGNORE_LABEL, PAD, VOCAB_SIZE, decode_grid, encode_grid, labels_from_tokens

__all__ = [
    "BLANK_PUZZLE_ID", "GridDataset",
    "FAMILIES", "FAMILY_NAMES", "Family", "dihedral", "get_family", "inverse_dihedral",
    "Augmentation", "FewShotConfig", "FewShotInfo", "Task", "build_fewshot", "etrm_view", "generate_tasks",
    "trm_views",
    "Fill", "RefillSampler", "Sampler", "TRMSampler", "build_sampler",
    "EOS", "IGNORE_LABEL", "PAD", "VOCAB_SIZE", "decode_grid", "encode_grid", "labels_from_tokens",
]
