"""The writer's multi-resolution summaries of a trace (schema versions 2 and 3): ``Rollups`` of the step rows (sums
and figure envelopes per bucket) and ``TimingRollups`` of the phase timings, each kept equal to the sums of its rows
at every commit (the layout: ``diagnostics.trace.schema``)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from diagnostics.trace.schema import (ROLLUP_BATCH, ROLLUP_WIDTHS, add_real_columns, rollup_table, safe_name,
                                      timing_rollup_table)


@dataclass
class Buckets:
    """Consecutive rollup buckets of one width as arrays: key, rows ``n``, step bounds, the sum of every counter
    column ``[m, columns]`` and the min/max of every envelope ``[m, figures]`` (NaN: no finite value)."""

    key: np.ndarray
    n: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sums: np.ndarray
    mn: np.ndarray
    mx: np.ndarray

    def __len__(self) -> int:
        return len(self.key)

    def cat(self, other: "Buckets") -> "Buckets":
        return Buckets(*(np.concatenate([a, b]) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[np.ndarray, ...]:
        return self.key, self.n, self.lo, self.hi, self.sums, self.mn, self.mx

    def group(self, keys: np.ndarray) -> "Buckets":
        """Runs of equal ``keys`` (ascending) merged into one bucket each: sums added, bounds and envelopes
        reduced."""
        at = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return Buckets(keys[at], np.add.reduceat(self.n, at), np.minimum.reduceat(self.lo, at),
                       np.maximum.reduceat(self.hi, at), np.add.reduceat(self.sums, at, axis=0),
                       np.fmin.reduceat(self.mn, at, axis=0), np.fmax.reduceat(self.mx, at, axis=0))

    def take(self, a: int, b: int | None = None) -> "Buckets":
        return Buckets(*(f[a:b] for f in self.fields()))


class Rollups:
    """The writer's multi-resolution summaries of ``steps`` (schema versions 2 and 3).

    A bucket's row is written once, when the bucket is complete (a row of a later bucket has arrived), in the
    transaction of the flush that stores it; finest buckets are stored once ``ROLLUP_BATCH`` rows wait, and the open
    bucket of each width lives in memory (readers read what is not stored from finer buckets and, at the very edge,
    at most ``ROLLUP_BATCH + ROLLUP_WIDTHS[0]`` rows). The finest buckets are made from rows and coarser ones are sums
    of finest buckets, each in one vectorised pass and one ``executemany`` per width. So every stored bucket equals
    the sum of its rows at every commit. ``rebuild`` recomputes the buckets from a step on (a truncation, a
    rewritten step); ``sync`` restores the open buckets when a writer opens an existing trace.
    """

    def __init__(self, conn: sqlite3.Connection, columns: list[str]) -> None:
        from diagnostics.trace import figures  # the registry's per-step values give the min/max envelopes

        self.conn = conn
        self.envelopes = [f for f in figures.REGISTRY.values() if not f.sqrt]
        for w in ROLLUP_WIDTHS:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {rollup_table(w)} (bucket INTEGER PRIMARY KEY, "
                         "n INTEGER NOT NULL, step_lo INTEGER NOT NULL, step_hi INTEGER NOT NULL)")
        self.columns: list[str] | None = None
        self.open: dict[int, Buckets | None] = {w: None for w in ROLLUP_WIDTHS}  # coarser widths' open buckets
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # rows not in a stored bucket yet, as flushed
        self.waiting = 0
        self.add_columns(columns)

    def add_columns(self, columns: list[str]) -> None:
        """Sum columns for every counter and envelope columns for every figure, in every rollup table."""
        if list(columns) == self.columns:
            return
        wanted = list(columns) + [f"{f.name}__{m}" for f in self.envelopes for m in ("min", "max")]
        for w in ROLLUP_WIDTHS:
            add_real_columns(self.conn, rollup_table(w), wanted)
        self.columns = list(columns)
        self.index = {c: i for i, c in enumerate(self.columns)}
        self.env = [(f, [self.index[t] for t in f.num], [self.index[t] for t in f.den]) for f in self.envelopes
                    if all(t in self.index for t in f.terms)]
        # the envelopes' numerators and denominators: a gather of each one's first term plus its few other terms
        # (much cheaper than a product with a 0/1 matrix); a per-step figure divides by 1
        self.per_step = np.array([not den for _, _, den in self.env], dtype=bool)
        self.num_idx = np.array([num[0] for _, num, _ in self.env], dtype=np.int64)
        self.den_idx = np.array([den[0] if den else 0 for _, _, den in self.env], dtype=np.int64)
        self.num_more = [(j, c) for j, (_, num, _) in enumerate(self.env) for c in num[1:]]
        self.den_more = [(j, c) for j, (_, _, den) in enumerate(self.env) for c in den[1:]]
        names = ["bucket", "n", "step_lo", "step_hi", *self.columns,
                 *(f"{f.name}__{m}" for f, _, _ in self.env for m in ("min", "max"))]
        self.insert = {w: f"INSERT OR REPLACE INTO {rollup_table(w)} ({', '.join(safe_name(c) for c in names)}) "
                          f"VALUES ({', '.join('?' * len(names))})" for w in ROLLUP_WIDTHS}
        self.sync()

    def _values(self, names: list[str], values: np.ndarray) -> np.ndarray:
        """Values [k, columns] in this writer's column order (absent columns 0); NaN stays (``_complete`` counts it
        0, as a NULL)."""
        if names == self.columns:
            return values
        vals = np.zeros((len(values), len(self.columns)))
        vals[:, [self.index[n] for n in names]] = values
        return vals

    def _envelopes(self, vals: np.ndarray) -> np.ndarray:
        """Each envelope figure's per-step value [k, figures] (NaN where its denominator is 0)."""
        if not self.env:
            return np.zeros((len(vals), 0))
        finite = vals if np.isfinite(vals).all() else np.where(np.isfinite(vals), vals, 0.0)
        a, b = finite[:, self.num_idx], finite[:, self.den_idx]
        for j, c in self.num_more:
            a[:, j] += finite[:, c]
        for j, c in self.den_more:
            b[:, j] += finite[:, c]
        b[:, self.per_step] = 1.0
        return a / np.where(b == 0, np.nan, b)

    def _complete(self, steps: np.ndarray, vals: np.ndarray) -> None:
        """Rows that fill finest buckets completely: those buckets in one vector pass, written, folded up.
        ``vals`` is the writer's own copy: NaN (a NULL) is set to 0 in place, so it counts 0."""
        vals[np.isnan(vals)] = 0.0
        env = self._envelopes(vals)
        fw, k = ROLLUP_WIDTHS[0], len(steps)
        keys = (steps - 1) // fw
        if k % fw == 0 and (steps[0] - 1) % fw == 0 and steps[-1] - steps[0] == k - 1:  # whole buckets (usual)
            m = k // fw
            fine = Buckets(keys[::fw], np.full(m, fw), steps[::fw], steps[fw - 1::fw],
                           vals.reshape(m, fw, -1).sum(1), np.fmin.reduce(env.reshape(m, fw, -1), 1),
                           np.fmax.reduce(env.reshape(m, fw, -1), 1))
        else:  # a partial bucket (the first after a resume or a gap)
            one = np.ones(k, dtype=np.int64)
            fine = Buckets(steps, one, steps, steps, vals, env, env).group(keys)
        self._write(ROLLUP_WIDTHS[0], fine)
        for w in ROLLUP_WIDTHS[1:]:
            self._fold(w, fine)

    def _fold(self, w: int, fine: Buckets) -> None:
        """Fold complete finer buckets into width ``w``: every coarse bucket a later one follows is written, the
        last stays open (in memory)."""
        if not len(fine):
            return
        acc = self.open[w]
        keys = (fine.lo - 1) // w
        if acc is not None and keys[0] == keys[-1] == acc.key[0]:  # all inside the open bucket: in place
            acc.n += fine.n.sum()
            acc.hi[0] = max(acc.hi[0], fine.hi[-1])
            acc.sums += fine.sums.sum(0)
            np.fmin(acc.mn, np.fmin.reduce(fine.mn, 0), out=acc.mn)
            np.fmax(acc.mx, np.fmax.reduce(fine.mx, 0), out=acc.mx)
            return
        both = fine if acc is None else acc.cat(fine)
        coarse = both.group((both.lo - 1) // w)
        if len(coarse) > 1:
            self._write(w, coarse.take(0, -1))
        self.open[w] = coarse.take(-1)

    def _write(self, w: int, b: Buckets) -> None:
        env = np.empty((len(b), 2 * b.mn.shape[1]))
        env[:, 0::2], env[:, 1::2] = b.mn, b.mx
        bad = ~np.isfinite(env)
        if bad.any():  # no finite value: NULL
            env = env.astype(object)
            env[bad] = None
        cells = env.tolist()
        self.conn.executemany(self.insert[w], [(k, n, lo, hi, *s, *e) for k, n, lo, hi, s, e in zip(
            b.key.tolist(), b.n.tolist(), b.lo.tolist(), b.hi.tolist(), b.sums.tolist(), cells)])

    def add(self, names: list[str], steps: np.ndarray, values: np.ndarray) -> None:
        """Take new step rows (``steps`` [k], ``values`` [k, names]; later than every row already counted). The
        rows wait in memory until ``ROLLUP_BATCH`` of them do; then every finest bucket a later row completes is
        written, in the caller's transaction (so a stored bucket always equals the sum of its stored rows)."""
        if not len(steps):
            return
        steps = np.asarray(steps, dtype=np.int64)
        self.pending.append((steps, self._values(names, np.asarray(values, dtype=float).reshape(len(steps), -1))))
        self.waiting += len(steps)
        if self.waiting < ROLLUP_BATCH:
            return  # stored once ``ROLLUP_BATCH`` rows wait: fewer, larger writes
        self.store_complete()

    def store_complete(self) -> None:
        """Store every finest bucket that a later row completes (and fold it up); the open one's rows wait."""
        fine = ROLLUP_WIDTHS[0]
        steps = np.concatenate([b[0] for b in self.pending])
        vals = np.concatenate([b[1] for b in self.pending])  # a copy: the writer's own
        if (np.diff(steps) < 0).any():
            order = np.argsort(steps, kind="stable")
            steps, vals = steps[order], vals[order]
        keys = (steps - 1) // fine
        done = int(np.searchsorted(keys, keys[-1], side="left"))
        if done:
            self._complete(steps[:done], vals[:done])
        self.pending = [(steps[done:], vals[done:])]
        self.waiting = len(steps) - done

    def sync(self, chunk: int = 65_536) -> None:
        """Restore the open buckets from what is stored: the coarser widths' from the finest buckets past their
        last stored bucket, then the rows past the last finest bucket (writing any bucket those complete), read in
        chunks so that upgrading a long version-1 trace stays in bounded memory."""
        fine = ROLLUP_WIDTHS[0]
        self.pending, self.waiting = [], 0
        self.open = {w: None for w in ROLLUP_WIDTHS}
        env_cols = "".join(f", {safe_name(f'{f.name}__{m}')}" for f, _, _ in self.env for m in ("min", "max"))
        sum_cols = "".join(", " + safe_name(c) for c in self.columns)
        k = len(self.columns)
        for w in ROLLUP_WIDTHS[1:]:
            last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(w)}").fetchone()[0]
            first_fine = 0 if last is None else (int(last) + 1) * (w // fine)
            got = self.conn.execute(f"SELECT bucket, n, step_lo, step_hi{sum_cols}{env_cols} FROM "
                                    f"{rollup_table(fine)} WHERE bucket >= ? ORDER BY bucket",
                                    (first_fine,)).fetchall()
            if got:
                a = np.array(got, dtype=float)  # NULL -> NaN: sums count it 0, envelopes ignore it
                ints = a[:, :4].astype(np.int64)
                self._fold(w, Buckets(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3],
                                      np.nan_to_num(a[:, 4:4 + k], nan=0.0, posinf=np.inf, neginf=-np.inf),
                                      a[:, 4 + k::2], a[:, 5 + k::2]))
        last = self.conn.execute(f"SELECT MAX(bucket) FROM {rollup_table(fine)}").fetchone()[0]
        start = 1 if last is None else (int(last) + 1) * fine + 1
        cur = self.conn.execute(f"SELECT step{sum_cols} FROM steps WHERE step >= ? ORDER BY step", (start,))
        while rows := cur.fetchmany(chunk):
            steps, values = step_matrix(rows, k)
            self.add(self.columns, steps, values)
        if self.pending:
            self.store_complete()

    def rebuild(self, lo: int) -> None:
        """Recompute every bucket holding a step at or after ``lo`` from the rows now stored."""
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"DELETE FROM {rollup_table(w)} WHERE bucket >= ?", ((lo - 1) // w,))
        self.sync()


def step_matrix(rows: list[tuple] | list[list], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Step rows (step, ``width`` values) as steps [k] (int) and values [k, width] (float; None as NaN)."""
    try:
        data = np.array(rows, dtype=float)
    except (TypeError, ValueError):
        data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    if data.ndim != 2 or data.shape[1] != width + 1:
        raise ValueError(f"step rows must be (step, {width} values); got shape {data.shape}")
    return data[:, 0].astype(np.int64), data[:, 1:]


class TimingRollups:
    """The writer's sums of timing rows per (bucket, phase) at every width of ``ROLLUP_WIDTHS``: ``n`` timing rows
    (steps x ranks) and their ``seconds``, updated by each flush, recomputed after a truncation or a rewritten step."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {timing_rollup_table(w)} (bucket INTEGER NOT NULL, "
                              "phase TEXT NOT NULL, n INTEGER NOT NULL, seconds REAL NOT NULL, "
                              "PRIMARY KEY (bucket, phase)) WITHOUT ROWID")
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS timing_delta (bucket INTEGER, phase TEXT, n INTEGER, "
                          "seconds REAL)")  # a flush's timing sums on their way into the rollups

    def add_range(self, lo: int, hi: int) -> None:
        """Add the timing rows of steps [lo, hi] (new: not counted yet): their sums per (finest bucket, phase)
        once, in SQL, then folded into every width."""
        self.conn.execute("DELETE FROM temp.timing_delta")
        self.conn.execute(f"INSERT INTO temp.timing_delta SELECT (step - 1) / {ROLLUP_WIDTHS[0]}, phase, COUNT(*), "
                          "TOTAL(seconds) FROM timings WHERE step BETWEEN ? AND ? GROUP BY 1, 2", (lo, hi))
        self._fold()

    def add_sums(self, rows: list[tuple[int, str, int, float]]) -> None:
        """Add (finest bucket, phase, rows, seconds) sums of timing rows just stored."""
        self.conn.execute("DELETE FROM temp.timing_delta")
        self.conn.executemany("INSERT INTO temp.timing_delta VALUES (?, ?, ?, ?)", rows)
        self._fold()

    def _fold(self) -> None:
        fine = ROLLUP_WIDTHS[0]
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"INSERT INTO {timing_rollup_table(w)} (bucket, phase, n, seconds) "
                              f"SELECT bucket / {w // fine}, phase, SUM(n), SUM(seconds) FROM temp.timing_delta "
                              "WHERE 1 GROUP BY 1, 2 ON CONFLICT (bucket, phase) DO UPDATE SET n = n + excluded.n, "
                              "seconds = seconds + excluded.seconds")

    def rebuild(self, lo: int) -> None:
        """Recompute every timing bucket holding a step at or after ``lo``: the finest from the rows, coarser ones
        from the finest."""
        fine = ROLLUP_WIDTHS[0]
        for w in ROLLUP_WIDTHS:
            self.conn.execute(f"DELETE FROM {timing_rollup_table(w)} WHERE bucket >= ?", ((lo - 1) // w,))
        self.conn.execute(f"INSERT INTO {timing_rollup_table(fine)} SELECT (step - 1) / {fine}, phase, COUNT(*), "
                          "TOTAL(seconds) FROM timings WHERE step >= ? GROUP BY 1, 2", ((lo - 1) // fine * fine + 1,))
        for w in ROLLUP_WIDTHS[1:]:
            self.conn.execute(f"INSERT INTO {timing_rollup_table(w)} SELECT bucket / {w // fine}, phase, SUM(n), "
                              f"SUM(seconds) FROM {timing_rollup_table(fine)} WHERE bucket >= ? GROUP BY 1, 2",
                              ((lo - 1) // w * (w // fine),))
