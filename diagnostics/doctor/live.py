"""The doctor inside a trainer: the step rules fed flush by flush, same codes and first steps as ``diagnose``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from diagnostics.doctor.diagnose import RULES
from diagnostics.doctor.findings import Finding, earliest_per_code
from diagnostics.doctor.scan import Rule, ScanState
from diagnostics.doctor.thresholds import DoctorConfig
from diagnostics.trace import figures


class LiveDoctor:
    """The doctor inside a trainer: feed it each flush's rows; it returns the findings that hold for the first time.

    Cheap: per rule it keeps only the last window of its features, running totals and a latch, so memory and time
    per flush do not grow with the run. Its findings have the same code and first step as ``diagnose`` on the stored
    steps table; their evidence is over the steps seen so far.

        doctor = LiveDoctor(meta)                 # the meta written to the trace (model, mode, max_steps_per_sample)
        for f in doctor.update(tracer.flush()):   # rows: dicts of counter -> value, with "step"
            reporter.warn(f"{f.code}: {f.message}")
            tracer.submit(f.store)
    """

    def __init__(self, meta: Mapping[str, Any], cfg: DoctorConfig | None = None,
                 rules: Sequence[Rule] | None = None) -> None:
        self.meta = dict(meta)
        self.cfg = cfg or DoctorConfig()
        self.rules = [r for r in (RULES if rules is None else rules) if r.applies(self.meta)]
        self.states = {id(r): ScanState() for r in self.rules}
        self.findings: list[Finding] = []
        self.pending: dict[str, Finding] = {}  # single-step findings their windowed rule has not confirmed yet
        self.alignment: list[dict[str, Any]] = []
        self.last_step: int | None = None

    def update(self, rows: Sequence[Mapping[str, float]],
               alignment: Sequence[Sequence[int] | Mapping[str, Any]] | None = None) -> list[Finding]:
        """Consume rows (ascending steps; steps at or before the last one seen are ignored); new findings only."""
        if alignment:
            keys = ("step", "slot", "sample_id", "label_sample_id", "demo_sample_id")
            room = self.cfg.first_samples - len(self.alignment)
            for r in list(alignment)[:max(room, 0)]:
                self.alignment.append(dict(r) if isinstance(r, Mapping) else dict(zip(keys, r)))
        rows = sorted((r for r in rows if self.last_step is None or r["step"] > self.last_step),
                      key=lambda r: r["step"])
        if not rows:
            return []
        self.last_step = int(rows[-1]["step"])
        steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
        names = set().union(*(r.keys() for r in rows)) - {"step"}
        cols = {c: np.array([_float(r.get(c)) for r in rows]) for c in names}
        fired = {f.code for f in self.findings}
        new: list[Finding] = []
        for rule in self.rules:
            if rule.code in fired or any(c not in cols for c in rule.needs(self.meta, list(cols))):
                continue
            f = rule.scan(steps, cols, self.cfg, self.meta, self.states[id(rule)],
                          {"alignment_samples": self.alignment})
            if f is not None:
                new.append(f)
        new = earliest_per_code(new, self.pending)
        self.findings.extend(new)
        return new

    def replay(self, df: pd.DataFrame) -> list[Finding]:
        """Feed a stored steps table (``load_run`` of the run being resumed) so windows and latches continue across
        the resume; returns the findings that held in it (already reported, not to be warned about again)."""
        if not len(df):
            return []
        stored = [c for c in df.columns if c not in figures.REGISTRY and c != "step"]
        frame = df[stored].sort_index()
        rows = [{"step": int(s), **dict(zip(stored, vals))}
                for s, vals in zip(frame.index, frame.itertuples(index=False, name=None))]
        align = df.attrs.get("alignment_samples") or None
        return self.update(rows, alignment=align)


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")
