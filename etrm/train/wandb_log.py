"""``--wandb``: a run's figures, evals, findings and resolved config in Weights & Biases, where TRM users look.

Fed at flush time only (never from the training step), on rank 0: each flush's trace figures (ratios of the
flushed rows' sums) and every eval become W&B history at their step; the resolved config is the W&B config; at the
end the live doctor's findings become a ``findings`` table and the run summary (``finding_codes``, one
``finding/<code>`` first step each, and how the run ended). Without a login (``wandb.mode=auto``) the run is
written offline under ``RUN_DIR/wandb`` (``wandb sync`` uploads it later). The W&B run id is kept in
``RUN_DIR/wandb-id`` so that ``--resume`` continues the same W&B run.
"""

from __future__ import annotations

import math
import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from diagnostics.trace import figures as registry
from etrm.errors import UserError
from etrm.train.instruments import Doctor, Instrument, Rows

if TYPE_CHECKING:
    from etrm.train.trainer import Trainer

INSTALL_HINT = "--wandb needs the wandb package, which is not installed; pip install 'etrm[wandb]' (or pip install wandb)"
ID_FILE = "wandb-id"
FINDING_COLUMNS = ("code", "severity", "first_step", "message", "evidence")


def require_wandb() -> Any:
    """The ``wandb`` module, or a UserError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return wandb


def flush_figures(rows: Sequence[Mapping[str, float]], mode: str | None = None) -> dict[str, float]:
    """The trace's figures over one flush, under ``trace/<name>``: every registered figure of the run's mode
    (``diagnostics.trace.figures``, the ratio of the rows' sums, exact for those steps) whose denominator is not 0."""
    return {f"trace/{name}": v for name, v in registry.of_rows(rows, mode).items() if math.isfinite(v)}


def _new_id() -> str:
    """A W&B run id: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def resolve_mode(mode: str, wandb: Any) -> str:
    """``online``/``offline`` as asked; ``auto``: ``WANDB_MODE`` when set, else online only with a stored login."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class WandB(Instrument):
    """One W&B run per etrm run (rank 0): history at each flush and eval, findings and summary at the end."""

    def __init__(self, run: Any, wandb: Any, doctor: Doctor | None, mode: str | None = None) -> None:
        self.run, self.wandb, self.doctor, self.mode = run, wandb, doctor, mode
        self.finished = False

    def on_flush(self, rows: Rows, step: int) -> None:
        figures = flush_figures(rows, self.mode)
        if figures and not self.finished:
            self.run.log(figures, step=step)

    def on_eval(self, step: int, values: Mapping[str, float]) -> None:
        clean = {f"eval/{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if not self.finished:
            self.run.log(clean, step=step)

    def on_end(self, step: int, status: str, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        findings = self.doctor.findings if self.doctor is not None else []
        table = self.wandb.Table(columns=list(FINDING_COLUMNS), data=[
            [f.code, f.severity, f.first_step, f.message, str(f.to_dict()["evidence"])] for f in findings])
        self.run.log({"findings": table}, step=step)
        summary = self.run.summary
        summary["finding_codes"] = ", ".join(f.code for f in findings) or "none"
        for f in findings:
            summary[f"finding/{f.code}"] = f.first_step
        summary["status"], summary["final_step"] = status, step
        if detail:
            summary["status_detail"] = detail
        self.run.finish(exit_code=1 if status == "crashed" else 0)

    def summary(self) -> dict[str, str]:
        where = getattr(self.run, "dir", "") or ""
        return {"wandb": f"{self.run.project}/{self.run.name} ({Path(where).parent if where else ''})"}


def add_wandb(trainer: "Trainer") -> WandB | None:
    """Start (or, resumed, continue) the W&B run of ``trainer`` on rank 0; call after the trace's instruments."""
    wandb = require_wandb()
    if not trainer.dist.is_main:
        return None
    wc = trainer.cfg.wandb
    id_file = trainer.run_dir / ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else _new_id()
    id_file.write_text(run_id + "\n")
    run = wandb.init(project=wc.project, name=wc.name or trainer.run_dir.name, id=run_id, resume="allow",
                     dir=str(trainer.run_dir), mode=resolve_mode(wc.mode, wandb), config=trainer.cfg.to_dict(),
                     settings=wandb.Settings(console="off"))
    return trainer.add(WandB(run, wandb, trainer.instruments.find(Doctor), str(trainer.cfg.mode)))
