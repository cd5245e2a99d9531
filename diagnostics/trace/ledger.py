"""The per-sample ACT ledger: one record per sample that left its slot, and the exact per-task aggregates.

One definition of every ledger fact lives here (pure, no I/O): the record's columns (``RECORD_COLUMNS``), the halt
reasons, how puzzle ids fold into tasks, which records the store keeps raw (every ``k``-th, by a hash of sample id
and exit step, so the rate is known and the choice survives a resume), the per-task increments a batch of records
adds (counts, sums, the halting-step histogram and calibration bins of q-halt probability vs exact at exit), and the
task-level figures read from them (exact rate, mean halting step, q-halt share, calibration error). The probe
(``diagnostics.probes.ledger``) makes records, the writer (``diagnostics.trace.writer``) keeps them, the reader
(``diagnostics.trace.records``), the doctor's ledger findings and the dashboard's Samples tab read the figures from
here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pandas only where frames are made (the store imports this module)
    import pandas as pd

# A record, in this order (``LedgerProbe.flush`` rows, the ``ledger`` table's columns)
RECORD_COLUMNS = ("sample_id", "puzzle_id", "task", "slot", "rank", "enter_step", "exit_step", "steps_used", "reason",
                  "vetoes", "exact", "token_correct", "token_count", "q_halt_logit", "q_continue_logit",
                  "encoder_grad_steps")
# Why a sample left: before the maximum ACT step (the Q-head halted it), or at it (whatever the Q-head said)
Q_HALT, MAX_STEP = 1, 2
REASONS = {Q_HALT: "q_halt", MAX_STEP: "max_step"}
CAL_BINS = 10          # calibration bins of sigmoid(q_halt_logit) at exit, [i/10, (i+1)/10)
RECORDS_PER_STEP = 64  # the automatic raw-record budget: keep about this many exits per step (``sample_every``)
UNKNOWN_ENTER = -1     # enter_step of a sample already in flight when tracing began (a resume restores the carry)


def sample_every(batch_size: int, every: int = 0) -> int:
    """Keep every ``k``-th raw record: ``every`` when set (> 0), else about ``RECORDS_PER_STEP`` exits per step at
    most (every exit for a batch up to that size). The rate ``1 / k`` is stored so that estimates scale."""
    if every > 0:
        return int(every)
    return max(1, math.ceil(batch_size / RECORDS_PER_STEP))


def kept(sample_id: np.ndarray, exit_step: np.ndarray, every: int) -> np.ndarray:
    """Which records the store keeps raw: a hash of (sample id, exit step) is 0 mod ``every`` (all when 1).
    Stateless, so a resumed run keeps the same choice, and unrelated to halting or correctness."""
    if every <= 1:
        return np.ones(len(sample_id), dtype=bool)
    x = (np.asarray(sample_id, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ \
        (np.asarray(exit_step, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    return (x % np.uint64(every)) == 0


def fold_tasks(puzzle_id: np.ndarray, task_of_puzzle: np.ndarray | None) -> np.ndarray:
    """Each puzzle id's task (the base task, augmentations folded); the puzzle id itself without a map or past it."""
    pid = np.asarray(puzzle_id, dtype=np.int64)
    if task_of_puzzle is None or len(task_of_puzzle) == 0:
        return pid
    table = np.asarray(task_of_puzzle, dtype=np.int64)
    inside = (pid >= 0) & (pid < len(table))
    return np.where(inside, table[np.clip(pid, 0, len(table) - 1)], pid)


def q_halt_probability(logit: np.ndarray) -> np.ndarray:
    """sigmoid(q_halt_logit): the Q-head's estimate that the answer at this step is exact (its BCE target)."""
    x = np.asarray(logit, dtype=float)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def cal_bin(prob: np.ndarray) -> np.ndarray:
    """The calibration bin of each probability (0..CAL_BINS-1; NaN logits go to bin 0)."""
    p = np.nan_to_num(np.asarray(prob, dtype=float), nan=0.0)
    return np.clip((p * CAL_BINS).astype(np.int64), 0, CAL_BINS - 1)


# Per-task sums (the ``ledger_tasks`` table's value columns) and histogram kinds (``ledger_bins.kind``)
TASK_SUMS = ("samples", "steps_sum", "exact", "token_correct", "token_count", "q_halts", "vetoes",
             "encoder_grad_steps", "q_prob_sum")
HALT_STEP, Q_PROB = "halt_step", "q_prob"
BIN_SUMS = ("n", "exact", "prob_sum")


@dataclass
class Increments:
    """What a batch of records adds: per task its sums (``TASK_SUMS`` order), and per (task, kind, bin) its count,
    exact count and sum of q-halt probabilities (``BIN_SUMS``)."""

    tasks: dict[int, list[float]]
    bins: dict[tuple[int, str, int], list[float]]


def increments(records: Sequence[Sequence[float]]) -> Increments:
    """The per-task aggregate increments of ``records`` (rows in ``RECORD_COLUMNS`` order)."""
    tasks: dict[int, list[float]] = {}
    bins: dict[tuple[int, str, int], list[float]] = {}
    if not records:
        return Increments(tasks, bins)
    a = np.asarray(records, dtype=float)
    c = {name: a[:, i] for i, name in enumerate(RECORD_COLUMNS)}
    task = c["task"].astype(np.int64)
    prob = q_halt_probability(c["q_halt_logit"])
    grad = np.nan_to_num(c["encoder_grad_steps"], nan=0.0)
    values = np.stack([np.ones(len(a)), c["steps_used"], c["exact"], c["token_correct"], c["token_count"],
                       (c["reason"] == Q_HALT).astype(float), c["vetoes"], grad, np.nan_to_num(prob, nan=0.0)], 1)
    uniq, inv = np.unique(task, return_inverse=True)
    sums = np.zeros((len(uniq), values.shape[1]))
    np.add.at(sums, inv, values)
    tasks = {int(t): s.tolist() for t, s in zip(uniq, sums)}
    for kind, b in ((HALT_STEP, c["steps_used"].astype(np.int64)), (Q_PROB, cal_bin(prob))):
        keys = np.stack([inv, b], 1)
        uk, kinv = np.unique(keys, axis=0, return_inverse=True)
        kinv = kinv.reshape(-1)
        n = np.bincount(kinv, minlength=len(uk)).astype(float)
        ex = np.bincount(kinv, weights=c["exact"], minlength=len(uk))
        ps = np.bincount(kinv, weights=values[:, -1], minlength=len(uk))
        for (ti, bi), cnt, e, p in zip(uk, n, ex, ps):
            bins[(int(uniq[ti]), kind, int(bi))] = [float(cnt), float(e), float(p)]
    return Increments(tasks, bins)


# ------------------------------------------------------------------------------------------------------------------
# Task-level figures (one definition: the reader, the doctor and the dashboard read them from here)

def calibration_table(bins: pd.DataFrame) -> pd.DataFrame:
    """The calibration diagram's points from ``q_prob`` bins (columns kind, bin, n, exact, prob_sum; any tasks
    summed): per bin its count, mean predicted probability and the exact rate at exit (NaN for an empty bin)."""
    import pandas as pd

    q = bins[bins["kind"] == Q_PROB] if len(bins) else bins
    g = q.groupby("bin")[list(BIN_SUMS)].sum() if len(q) else pd.DataFrame(columns=list(BIN_SUMS), dtype=float)
    g = g.reindex(range(CAL_BINS), fill_value=0.0).astype(float)
    n = g["n"].to_numpy()
    safe = np.where(n > 0, n, 1.0)
    return pd.DataFrame({"bin": np.arange(CAL_BINS), "n": n,
                         "predicted": np.where(n > 0, g["prob_sum"].to_numpy() / safe, np.nan),
                         "exact_rate": np.where(n > 0, g["exact"].to_numpy() / safe, np.nan)})


def calibration_error(n: np.ndarray, exact: np.ndarray, prob_sum: np.ndarray) -> float:
    """Expected calibration error over bins: sum over bins of |mean probability - exact rate| weighted by count
    (``prob_sum``: the bins' sums of probabilities); NaN without records."""
    n, exact, prob_sum = (np.asarray(x, dtype=float) for x in (n, exact, prob_sum))
    total = n.sum()
    if total <= 0:
        return math.nan
    return float(np.abs(prob_sum - exact).sum() / total)


def records_calibration(records: pd.DataFrame) -> tuple[float, int]:
    """Calibration error of raw records (exact per record, q-halt logit) and how many records it is over."""
    if records.empty:
        return math.nan, 0
    prob = q_halt_probability(records["q_halt_logit"].to_numpy(dtype=float))
    b = cal_bin(prob)
    exact = records["exact"].to_numpy(dtype=float)
    n = np.bincount(b, minlength=CAL_BINS)
    e = np.bincount(b, weights=exact, minlength=CAL_BINS)
    p = np.bincount(b, weights=np.nan_to_num(prob), minlength=CAL_BINS)
    return calibration_error(n, e, p), int(len(records))


def ratios(sums: pd.DataFrame) -> pd.DataFrame:
    """The task figures of rows of summed aggregates (``TASK_SUMS``), added as columns: ``exact_rate``,
    ``token_acc``, ``mean_halt_step``, ``q_halt_share`` (share of exits the Q-head decided), ``mean_q_prob``; NaN
    where the denominator is 0. One definition for a task's row and for any group of tasks (``pooled``)."""
    t = sums.copy()
    n = t["samples"].where(t["samples"] > 0)
    t["exact_rate"] = t["exact"] / n
    t["token_acc"] = t["token_correct"] / t["token_count"].where(t["token_count"] > 0)
    t["mean_halt_step"] = t["steps_sum"] / n
    t["q_halt_share"] = t["q_halts"] / n
    t["mean_q_prob"] = t["q_prob_sum"] / n
    return t


def pooled(tasks: pd.DataFrame) -> Mapping[str, float]:
    """The task figures of a group of tasks taken together (ratios of their summed aggregates)."""
    import pandas as pd

    return {k: float(v) for k, v in ratios(pd.DataFrame([totals(tasks)])).iloc[0].items()}


def task_stats(tasks: pd.DataFrame, bins: pd.DataFrame) -> pd.DataFrame:
    """One row per task from the summed aggregates: the sums, ``exact_rate``, ``token_acc``, ``mean_halt_step``,
    ``q_halt_share`` (share of exits the Q-head decided), ``mean_q_prob`` and ``calibration_error`` (the task's
    calibration error over its q-halt probability bins, ``calibration_error``)."""
    import pandas as pd

    cols = ["task", *TASK_SUMS]
    t = tasks.groupby("task")[list(TASK_SUMS)].sum().reset_index() if len(tasks) else pd.DataFrame(columns=cols)
    t = ratios(t.astype(float))
    t["task"] = t["task"].astype("int64")
    t["calibration_error"] = _task_calibration(t["task"].to_numpy(), bins)
    t["never_solved"] = (t["samples"] > 0) & (t["exact"] == 0)
    return t.sort_values("task").reset_index(drop=True)


def _task_calibration(task_ids: np.ndarray, bins: pd.DataFrame) -> np.ndarray:
    """Per task: the calibration error of its q_prob bins (``calibration_error``)."""
    out = np.full(len(task_ids), np.nan)
    if bins.empty:
        return out
    q = bins[bins["kind"] == Q_PROB].groupby(["task", "bin"])[list(BIN_SUMS)].sum().reset_index()
    ece = {int(t): calibration_error(g["n"], g["exact"], g["prob_sum"]) for t, g in q.groupby("task")}
    return np.array([ece.get(int(t), np.nan) for t in task_ids])


def halt_histogram(bins: pd.DataFrame) -> pd.DataFrame:
    """Samples per halting step (all tasks): columns step, n, exact."""
    import pandas as pd

    h = bins[bins["kind"] == HALT_STEP] if len(bins) else bins
    if h.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "n": pd.Series(dtype=float),
                             "exact": pd.Series(dtype=float)})
    g = h.groupby("bin")[["n", "exact"]].sum().reset_index().rename(columns={"bin": "step"})
    return g


def reason_names(codes: Iterable[float]) -> list[str]:
    """Stored reason codes as names (``REASONS``)."""
    return [REASONS.get(int(c), "unknown") if c == c else "unknown" for c in codes]


def as_frame(records: Sequence[Sequence[float]], columns: Sequence[str] = RECORD_COLUMNS) -> pd.DataFrame:
    """Records as a frame, ``reason`` as names."""
    import pandas as pd

    df = pd.DataFrame.from_records(list(records), columns=list(columns))
    if "reason" in df.columns:
        df["reason"] = reason_names(df["reason"].to_numpy())
    return df


def totals(tasks: pd.DataFrame) -> Mapping[str, float]:
    """Whole-run sums of the per-task aggregates."""
    return {k: float(tasks[k].sum()) if k in tasks.columns else 0.0 for k in TASK_SUMS}
