"""The doctor's ledger findings: what the per-sample ACT ledger says that per-step counters cannot.

Run-level rules over the ledger of a stored trace (``load_ledger`` / ``load_task_stats``), beside the window rules of
``diagnostics.doctor.diagnose`` (which read the steps table). Mode-aware: the halting rules judge only modes whose
Q-head decides halting (not ``fct``). Thresholds live in ``DoctorConfig`` (``ledger_*``, ``calibration_*``,
``never_halt_*``, ``never_solved_*``); docs/diagnostics.md gives each finding's evidence and fix.

- ``q-halt-miscalibrated`` (warning): over the exits of the run's last ``ledger_late_share`` of steps, the Q-head has
  learned (at least ``q_min_tp`` exact exits, and it gives exact exits a higher mean q-halt probability than wrong
  ones) yet its probability is off the exact rate at exit by more than ``calibration_error_max`` (expected
  calibration error, 10 bins) over at least ``calibration_min_records`` records.
- ``tasks-never-halt`` (warning): tasks with at least ``never_halt_min_samples`` exits of which the Q-head halted
  none (every one ran to the maximum step), while the other such tasks' exits were Q-halts at a share of at least
  ``never_halt_others_share``.
- ``tasks-never-solved`` (info): tasks with at least ``never_solved_min_samples`` exits, none of them exact, when
  they are at least ``never_solved_min_share`` of the tasks so judged (a straggler or two is not a finding) while at
  least ``never_solved_others_share`` of them were solved (early in training, unsolved is the norm, not a list).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from diagnostics.trace import ledger
from diagnostics.doctor.findings import Finding
from diagnostics.events import Mode
from diagnostics.trace.loading import as_json_value, load_ledger, load_task_stats
from diagnostics.doctor.thresholds import DoctorConfig

LISTED = 20  # task ids named in a finding's evidence


def _adaptive(meta: Mapping[str, Any]) -> bool:
    mode = meta.get("mode")
    try:
        return Mode(mode).halts_adaptively
    except ValueError:
        return True


def late_records(records: pd.DataFrame, share: float) -> tuple[pd.DataFrame, int, int]:
    """The records whose exit lies in the last ``share`` of the traced exit steps, and that window's bounds."""
    if records.empty:
        return records, 0, 0
    hi = int(records["exit_step"].max())
    lo = int(hi - share * hi) + 1
    return records[records["exit_step"] >= lo], lo, hi


def q_halt_miscalibrated(records: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig) -> Finding | None:
    """The Q-head ranks answers (it has learned) but its probabilities are not the exact rates at exit."""
    if not _adaptive(meta) or records.empty:
        return None
    late, lo, hi = late_records(records, cfg.ledger_late_share)
    ece, n = ledger.records_calibration(late)
    if n < cfg.calibration_min_records or not np.isfinite(ece):
        return None
    prob = ledger.q_halt_probability(late["q_halt_logit"].to_numpy(dtype=float))
    exact = late["exact"].to_numpy(dtype=float) > 0
    if exact.sum() < cfg.q_min_tp or exact.all() or prob[exact].mean() <= prob[~exact].mean():
        return None  # not learned yet: halting-never-learned and the window rules speak for that
    if ece <= cfg.calibration_error_max:
        return None
    mean_p, rate = float(prob.mean()), float(exact.mean())
    side = "over" if mean_p > rate else "under"
    curve = ledger.calibration_table(pd.DataFrame({"kind": ledger.Q_PROB, "bin": ledger.cal_bin(prob), "n": 1.0,
                                                   "exact": exact.astype(float), "prob_sum": prob}))
    evidence = {"calibration_error": ece, "threshold": cfg.calibration_error_max, "records": n,
                "window": [lo, hi], "mean_q_halt_probability": mean_p, "exact_rate_at_exit": rate,
                "mean_probability_exact": float(prob[exact].mean()),
                "mean_probability_wrong": float(prob[~exact].mean()),
                "sample_rate": records.attrs.get("sample_rate"),
                "bins": [{"predicted": p, "exact_rate": e, "n": int(c)} for p, e, c in
                         curve[["predicted", "exact_rate", "n"]].itertuples(index=False) if c > 0]}
    msg = (f"the Q-head's halt probability is {side}confident: over steps {lo}..{hi} it says {mean_p:.0%} on "
           f"average where {rate:.0%} of exits are exact (calibration error {ece:.2f} > "
           f"{cfg.calibration_error_max:.2f}, {n} records) although it ranks right answers above wrong ones")
    return Finding("q-halt-miscalibrated", "warning", hi, as_json_value(evidence), msg)


def tasks_never_halt(tasks: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig,
                     last_step: int | None) -> Finding | None:
    """Tasks the Q-head never halts (always the maximum step) while it halts the other tasks."""
    if not _adaptive(meta) or tasks.empty:
        return None
    judged = tasks[tasks["samples"] >= cfg.never_halt_min_samples]
    never = judged[judged["q_halts"] == 0]
    others = judged[judged["q_halts"] > 0]
    if never.empty or others.empty:
        return None
    share = ledger.pooled(others)["q_halt_share"]
    if share < cfg.never_halt_others_share:
        return None
    evidence = {"tasks": int(len(never)), "judged_tasks": int(len(judged)),
                "task_ids": never["task"].astype(int).tolist()[:LISTED],
                "their_exits": int(never["samples"].sum()), "their_exact_rate": float(never["exact_rate"].mean()),
                "others_q_halt_share": share, "threshold": cfg.never_halt_others_share,
                "min_samples": cfg.never_halt_min_samples}
    msg = (f"{len(never)} of {len(judged)} tasks never halted by the Q-head ({int(never['samples'].sum())} exits, "
           f"all at the maximum step) while the other tasks' exits were Q-halts {share:.0%} of the time")
    return Finding("tasks-never-halt", "warning", last_step, as_json_value(evidence), msg)


def tasks_never_solved(tasks: pd.DataFrame, meta: Mapping[str, Any], cfg: DoctorConfig,
                       last_step: int | None) -> Finding | None:
    """Tasks seen often enough whose answer was never exact at exit (info: which tasks training does not crack)."""
    if tasks.empty:
        return None
    judged = tasks[tasks["samples"] >= cfg.never_solved_min_samples]
    never = judged[judged["exact"] == 0]
    solved = len(judged) - len(never)
    if never.empty or len(never) < cfg.never_solved_min_share * len(judged) or \
            solved < cfg.never_solved_others_share * len(judged):
        return None  # none, a straggler, or a run that does not solve most tasks yet (its exact curve says so)
    evidence = {"tasks": int(len(never)), "judged_tasks": int(len(judged)), "min_share": cfg.never_solved_min_share,
                "solved_tasks": int(solved),
                "task_ids": never["task"].astype(int).tolist()[:LISTED],
                "their_exits": int(never["samples"].sum()),
                "their_token_acc": ledger.pooled(never)["token_acc"],
                "min_samples": cfg.never_solved_min_samples}
    msg = (f"{len(never)} of {len(judged)} tasks seen at least {cfg.never_solved_min_samples} times were never "
           f"solved exactly ({', '.join(str(t) for t in evidence['task_ids'][:5])}"
           f"{', ...' if len(never) > 5 else ''})")
    return Finding("tasks-never-solved", "info", last_step, as_json_value(evidence), msg)


def diagnose_ledger(records: pd.DataFrame, tasks: pd.DataFrame, meta: Mapping[str, Any],
                    cfg: DoctorConfig | None = None, last_step: int | None = None) -> list[Finding]:
    """Every ledger finding that holds (none for a trace without a ledger)."""
    cfg = cfg or DoctorConfig()
    if last_step is None and len(records):
        last_step = int(records["exit_step"].max())
    found = [q_halt_miscalibrated(records, meta, cfg), tasks_never_halt(tasks, meta, cfg, last_step),
             tasks_never_solved(tasks, meta, cfg, last_step)]
    return [f for f in found if f is not None]


def diagnose_run(run: Any, meta: Mapping[str, Any], cfg: DoctorConfig | None = None,
                 last_step: int | None = None) -> list[Finding]:
    """The ledger findings of a stored run (its trace read-only)."""
    return diagnose_ledger(load_ledger(run), load_task_stats(run), meta, cfg, last_step)
