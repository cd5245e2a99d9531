"""The trace schema: one SQLite database per run (WAL mode), so a live reader can follow a writing trainer.

Its tables, versions and names live here; ``diagnostics.trace.writer`` writes them (``rollups`` keeps the
multi-resolution summaries), ``diagnostics.trace.connection`` opens a trace read-only.

Schema policy: versions are additive (a version only adds tables or columns), readers accept every version from 1
to ``SCHEMA_VERSION``, and docs/diagnostics.md lists what each version added. ``meta.schema_version`` is the
trace's version; a writer of a later version resuming an older trace adds what its version adds (the rollups of the
rows already there) and records ``upgraded_from``.

Version 2 adds the rollups: ``rollup_64``, ``rollup_4096``, ``rollup_262144``, one row per
bucket of that many steps (``bucket`` = (step - 1) // width): ``n`` rows, ``step_lo``/``step_hi``, the sum of every
counter column (NULL counts 0), and ``<figure>__min``/``<figure>__max`` of every registered figure's per-step value.
They are written in the same transaction as their rows, and kept equal to the sums of their rows across a resume's
truncation. A view of any step range then reads on the order of a thousand rows whatever the run's length.

Version 3 adds (issue 14, evaluation audits; ``TABLES_V3_EVAL_AUDITS``): ``eval_audits(step, weights, config_hash,
halt_rule, count, halt_exact, halt_token, halt_step)``, one row per evaluation and weights (``ema``/``raw``), and
``eval_act_steps(step, weights, act_step, exact, token, halt_share)``, one row per evaluation, weights and ACT step
(``diagnostics.trace.eval_audits``).

Version 3 also adds ``rollup_512`` and ``rollup_32768`` (so that a view's finest usable level is at most 8x finer than
its buckets: a view reads at most about 8 rows per bucket) and the timing rollups: ``timing_rollup_<width>`` for
every width of ``ROLLUP_WIDTHS``, one row per (bucket, phase):
``n`` timing rows (steps x ranks) and the sum of their ``seconds``, kept equal to the sums of their rows at every
commit (updated by each flush, recomputed after a truncation or a rewritten step).

Version 3 also adds the per-sample ACT ledger (``LEDGER_TABLES``; ``diagnostics.trace.ledger`` defines the columns):
- ``ledger(<RECORD_COLUMNS>)``: the raw records kept (every ``meta.ledger_sample_every``-th exit, chosen by a hash of
  sample id and exit step; ``meta.ledger_sample_rate`` = 1 / that), one per sample that left its slot.
- ``ledger_tasks(task, seg, <TASK_SUMS>)``: exact per-task sums over every exit, kept or not; ``seg`` 0 holds the
  exits up to the last checkpoint (``meta.ledger_checkpoint_step``), 1 those after, so a resume from that checkpoint
  drops exactly the exits it re-runs.
- ``ledger_bins(task, seg, kind, bin, n, exact, prob_sum)``: per task the halting-step histogram (``halt_step``, bin =
  ACT steps used) and the calibration bins of sigmoid(q-halt logit) at exit (``q_prob``, 10 bins).

Version 1 (``meta.schema_version``):
- ``meta(key, value)``: schema version, run description (model, mode, preset, max_steps, trace_every, config JSON).
- ``counters(name, probe, description)``: the per-step columns, self-describing; probes may add columns.
- ``steps(step, <counter columns>)``: one row per training step; counts are stored as numerator and denominator
  columns (``*_num``/``*_den``) summed across ranks, so any re-bucketing stays exact.
- ``timings(step, rank, phase, seconds)``: per-rank phase timings.
- ``evals(step, name, value)``: evaluation results.
- ``findings(code, severity, first_step, evidence, message)``: the doctor's findings.
- ``alignment_samples(step, slot, sample_id, label_sample_id, demo_sample_id)``: first offending slots.
- ``markers(time, kind, step, detail)``: start / resume / end / stopped / crashed, and ``heartbeat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diagnostics.trace.ledger import BIN_SUMS, RECORD_COLUMNS, TASK_SUMS

SCHEMA_VERSION = 3
ROLLUP_WIDTHS = (64, 512, 4096, 32768, 262144)  # version 2 wrote 64, 4096, 262144; 3 adds the rest
ROLLUP_BATCH = 1024  # the writer stores finest buckets once this many rows wait (a reader's raw edge stays small)
TRACE_NAME = "trace.sqlite"

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, probe TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS timings (step INTEGER NOT NULL, rank INTEGER NOT NULL, phase TEXT NOT NULL,
                                    seconds REAL NOT NULL, PRIMARY KEY (step, rank, phase));
CREATE TABLE IF NOT EXISTS evals (step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
                                  PRIMARY KEY (step, name));
CREATE TABLE IF NOT EXISTS findings (code TEXT PRIMARY KEY, severity TEXT NOT NULL, first_step INTEGER,
                                     evidence TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alignment_samples (step INTEGER NOT NULL, slot INTEGER NOT NULL, sample_id INTEGER,
                                              label_sample_id INTEGER, demo_sample_id INTEGER);
CREATE TABLE IF NOT EXISTS markers (time REAL NOT NULL, kind TEXT NOT NULL, step INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 0), time REAL NOT NULL,
                                      step INTEGER NOT NULL);
"""

# ---- schema version 3: evaluation audits (issue 14, item 2; diagnostics.trace.eval_audits) ----------------------------
TABLES_V3_EVAL_AUDITS = """
CREATE TABLE IF NOT EXISTS eval_audits (step INTEGER NOT NULL, weights TEXT NOT NULL, config_hash TEXT NOT NULL,
                                        halt_rule TEXT NOT NULL, count REAL, halt_exact REAL, halt_token REAL,
                                        halt_step REAL, PRIMARY KEY (step, weights));
CREATE TABLE IF NOT EXISTS eval_act_steps (step INTEGER NOT NULL, weights TEXT NOT NULL, act_step INTEGER NOT NULL,
                                           exact REAL, token REAL, halt_share REAL,
                                           PRIMARY KEY (step, weights, act_step));
"""
EVAL_AUDIT_TABLES = ("eval_audits", "eval_act_steps")
# ---- end of schema version 3: evaluation audits ------------------------------------------------------------------


# -- schema version 3: the per-sample ACT ledger (issue 14a; one block, additive) --------------------------------------
LEDGER_TABLES = f"""
CREATE TABLE IF NOT EXISTS ledger ({", ".join(c + " INTEGER" if c not in ("q_halt_logit", "q_continue_logit")
                                              else c + " REAL" for c in RECORD_COLUMNS)});
CREATE INDEX IF NOT EXISTS ledger_exit ON ledger (exit_step);
CREATE TABLE IF NOT EXISTS ledger_tasks (task INTEGER NOT NULL, seg INTEGER NOT NULL,
                                         {", ".join(c + " REAL NOT NULL DEFAULT 0" for c in TASK_SUMS)},
                                         PRIMARY KEY (task, seg)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_bins (task INTEGER NOT NULL, seg INTEGER NOT NULL, kind TEXT NOT NULL,
                                        bin INTEGER NOT NULL, {", ".join(c + " REAL NOT NULL DEFAULT 0" for c in BIN_SUMS)},
                                        PRIMARY KEY (task, seg, kind, bin)) WITHOUT ROWID;
"""
# -- end of schema version 3's ledger block (its writer: ``diagnostics.trace.writer.LedgerStore``) ------------------


def readable(version: Any) -> bool:
    """Whether this etrm reads a trace of schema ``version``: every version from 1 to the current one (versions are
    additive, so a reader of version N reads what any version up to N wrote)."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        return False
    return 1 <= v <= SCHEMA_VERSION


class TraceError(Exception):
    """A trace that is missing, corrupt or of an unknown schema; the message says what to do."""


def safe_name(name: str) -> str:
    """A counter name as a quoted SQL column; anything but letters, digits, '_' or '.' is refused (no injection)."""
    if not name.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"counter name {name!r} must be letters, digits, '_' or '.'")
    return '"' + name + '"'


def sql_name(name: str) -> str:
    """Any column name as a quoted SQL identifier (a reader's; quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def add_real_columns(conn: Any, table: str, names: list[str]) -> list[str]:
    """Add the ``names`` a table lacks as REAL columns; the ones added. An empty table is rebuilt with all of them
    in one statement (an ALTER per column re-reads the whole schema: hundreds of columns took a second to start a
    trace); a table with rows gets one ALTER per column."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    missing = [n for n in dict.fromkeys(names) if n not in have]
    if not missing:
        return []
    empty = conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None
    create = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    indexed = conn.execute("SELECT 1 FROM sqlite_master WHERE type != 'table' AND tbl_name = ? AND sql IS NOT NULL",
                           (table,)).fetchone()
    if empty and create and not indexed and len(missing) > 1:
        sql = create[0]
        cut = sql.rindex(")")
        columns = ", ".join(f"{safe_name(n)} REAL" for n in missing)
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"{sql[:cut]}, {columns}{sql[cut:]}")
    else:
        for n in missing:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {safe_name(n)} REAL")
    return missing


def rollup_table(width: int) -> str:
    return f"rollup_{int(width)}"


def timing_rollup_table(width: int) -> str:
    return f"timing_rollup_{int(width)}"


def schema_version(value: Any, db: Path) -> int:
    """``meta.schema_version`` as an int; anything else is a TraceError naming the file."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TraceError(f"trace {db} has schema_version {value!r}, not a number: it is not an etrm trace (or it "
                         "was edited); re-run with --trace") from None
