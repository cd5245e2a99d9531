"""Probes: one small class per quantity. ``default_probes`` is the set ``etrm-train --trace`` uses."""

from __future__ import annotations

import numpy as np
import torch

from diagnostics.probes.alignment import AlignmentProbe
from diagnostics.probes.base import Probe
from diagnostics.probes.coverage import CoverageProbe, GradNormProbe
from diagnostics.probes.diversity import EVERY as DIVERSITY_EVERY
from diagnostics.probes.diversity import ContextDiversityProbe
from diagnostics.probes.encoder_work import EncoderWorkProbe
from diagnostics.probes.halting import HaltingProbe
from diagnostics.probes.ledger import LedgerProbe
from diagnostics.probes.losses import LossProbe
from diagnostics.probes.resets import ResetProbe


def default_probes(max_steps: int, groups: dict[str, list[torch.nn.Parameter]] | None = None,
                   diversity_every: int = DIVERSITY_EVERY, task_of_puzzle: np.ndarray | None = None,
                   rank: int = 0) -> list[Probe]:
    """Every built-in probe; gradient norms when the parameter groups are given; the context-diversity probe
    measures every ``diversity_every``-th step. ``task_of_puzzle`` folds puzzle ids into tasks for the ledger (None:
    each puzzle id its own task); ``rank`` names this process in its records."""
    probes: list[Probe] = [CoverageProbe(), ResetProbe(), EncoderWorkProbe(), AlignmentProbe(),
                           HaltingProbe(max_steps), LossProbe(), ContextDiversityProbe(diversity_every),
                           LedgerProbe(task_of_puzzle, rank)]
    if groups is not None:
        probes.append(GradNormProbe(groups))
    return probes


__all__ = ["DIVERSITY_EVERY", "AlignmentProbe", "ContextDiversityProbe", "CoverageProbe", "EncoderWorkProbe",
           "GradNormProbe", "HaltingProbe", "LedgerProbe", "LossProbe", "Probe", "ResetProbe", "default_probes"]
