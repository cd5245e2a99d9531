"""The tracer: runs the probes on every step into a device buffer, reads it back only at a flush.

``on_step`` (a trainer step hook, after the loss and before backward) and ``after_backward`` add no host sync:
every counter is written into a preallocated [capacity, columns] device tensor. ``flush`` does the one read-back
(summed across ranks under DDP first) and hands the rows to a writer thread that stores them in SQLite.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from diagnostics.events import PhaseClock, StepEvents
from diagnostics.trace.killpoints import kill_point
from diagnostics.probes.base import Probe
from diagnostics.probes.ledger import TABLE as LEDGER_TABLE
from diagnostics.trace.writer import TraceWriter

Tensor = torch.Tensor


class _Row:
    """One step's row: values set now are stacked into the buffer at ``commit``; ``later`` writes in place."""

    def __init__(self, tracer: "Tracer", index: int, step: int = 0) -> None:
        self.tracer, self.index, self.step = tracer, index, step  # step: the optimizer step the row completes
        self.cols: list[int] = []
        self.values: list[Tensor] = []

    def set(self, name: str, value: Tensor | float) -> None:
        t = self.tracer
        col = t.col[name]
        self.cols.append(col)
        if isinstance(value, Tensor):
            if value.requires_grad:
                value = value.detach()
            if value.dtype != torch.float32 or value.device != t.device:
                value = value.to(device=t.device, dtype=torch.float32)
            self.values.append(value if value.dim() == 0 else value.reshape(()))  # each check skips a dispatch
        else:  # a fill kernel, not a host-to-device copy (which would wait for the GPU)
            self.values.append(torch.full((), float(value), dtype=torch.float32, device=t.device))

    def later(self, name: str) -> Callable[[Tensor], None]:
        buf_row, col = self.tracer.buffer[self.index], self.tracer.col[name]

        def write(value: Tensor) -> None:
            buf_row[col] = value.detach().to(torch.float32)

        return write

    def commit(self) -> None:
        if self.values:
            idx = self.tracer.column_index(tuple(self.cols))
            self.tracer.buffer[self.index].index_copy_(0, idx, torch.stack(self.values))


class _Writer(threading.Thread):
    """Stores flushed rows off the training thread; ``drain`` waits until everything queued is committed."""

    def __init__(self, writer: TraceWriter) -> None:
        super().__init__(daemon=True, name="etrm-trace-writer")
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.rows_written = 0

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                job(self.writer)
                self.writer.commit()
            except BaseException as exc:  # keep the trainer alive; report at the next drain
                self.error = exc
            finally:
                self.jobs.task_done()

    def drain(self) -> None:
        self.jobs.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"trace writer failed: {err}") from err


class Tracer:
    """Collects probe counters per step on the device; ``flush`` reads them back and queues them for storage.

    ``reduce`` (e.g. a DDP all-reduce of the buffer) runs before the read-back so stored counts are global;
    ``gather`` (under DDP) collects every rank's phase timings on the rank that stores them (``None`` elsewhere).
    """

    def __init__(self, probes: list[Probe], writer: TraceWriter | None, device: torch.device,
                 capacity: int = 20, rank: int = 0, reduce: Callable[[Tensor], None] | None = None,
                 gather: Callable[[list[tuple]], list[list[tuple]] | None] | None = None) -> None:
        self.probes = probes
        self.device = torch.device(device)
        self.columns = [name for p in probes for name, _ in p.counters]
        self.col = {name: i for i, name in enumerate(self.columns)}
        self.capacity = capacity
        self.buffer = torch.zeros(capacity, len(self.columns), dtype=torch.float32, device=self.device)
        self.steps: list[int] = []
        self.clocks: list[PhaseClock | None] = []
        self.rows: list[_Row] = []
        self.rank = rank
        self.reduce = reduce
        self.gather = gather
        self.writer = writer
        self.thread: _Writer | None = None
        self.last_alignment: list[tuple] = []
        self.last_timings: list[tuple] = []  # the phase timings of the last flush: (step, rank, phase, seconds)
        self.last_ledger: list[tuple] = []  # the ledger records of the last flush (diagnostics.trace.ledger.RECORD_COLUMNS)
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        if writer is not None:
            writer.add_counters((name, p.name, desc) for p in probes for name, desc in p.counters)
            self.thread = _Writer(writer)
            self.thread.start()

    # -- the traced path: no host sync ---------------------------------------------------------------------
    def on_step(self, step: int, events: StepEvents, metrics: dict[str, Tensor],
                clock: PhaseClock | None = None) -> None:
        """Run every probe on one step's events (after the loss, before backward); ``clock``: the step's phase
        timings when the caller keeps them (default: ``events.clock``)."""
        if len(self.steps) == self.capacity:
            self._grow()
        row = _Row(self, len(self.steps), step + 1)
        self.buffer[row.index].zero_()
        for probe in self.probes:
            probe.observe(events, metrics, row)
        row.commit()
        self.rows.append(row)
        self.steps.append(step + 1)  # rows are numbered by the optimizer step they complete (1-based)
        self.clocks.append(clock if clock is not None else events.clock)

    def column_index(self, cols: tuple[int, ...]) -> Tensor:
        """Device index tensor of a column list, made once per distinct list (probes write in a fixed order)."""
        idx = self._index_cache.get(cols)
        if idx is None:
            idx = self._index_cache[cols] = torch.tensor(cols, device=self.device)
        return idx

    def after_backward(self) -> None:
        """Probes that read gradients (norms) before the optimizer step."""
        if not self.rows:
            return
        row = _Row(self, self.rows[-1].index, self.steps[-1])
        for probe in self.probes:
            probe.after_backward(row)
        row.commit()

    def _grow(self) -> None:
        more = torch.zeros_like(self.buffer)
        self.buffer = torch.cat([self.buffer, more])
        self.capacity = self.buffer.shape[0]

    # -- the flush: one read-back --------------------------------------------------------------------------
    def flush(self) -> list[dict[str, float]]:
        """Read the buffered rows back (one sync), queue them for the store, and return them."""
        n = len(self.steps)
        if n == 0:
            return []
        block = self.buffer[:n]
        if self.reduce is not None:
            block = block.clone()
            self.reduce(block)
        values = block.cpu().tolist()
        steps = self.steps
        timings = [(s, self.rank, phase, sec) for s, c in zip(steps, self.clocks) if c is not None
                   for phase, sec in c.seconds().items()]
        if self.gather is not None:
            parts = self.gather(timings)
            timings = [t for part in parts for t in part] if parts is not None else []
        extras: dict[str, list[tuple]] = {}
        for probe in self.probes:
            for table, rows in probe.flush(steps).items():
                extras.setdefault(table, []).extend(rows)
        if self.gather is not None and LEDGER_TABLE in extras:  # every rank's samples, stored by rank 0
            parts = self.gather(extras[LEDGER_TABLE])
            extras[LEDGER_TABLE] = [r for part in parts for r in part] if parts is not None else []
        self.steps, self.clocks, self.rows = [], [], []
        self.last_timings = timings
        self.last_alignment = extras.get("alignment_samples", [])
        self.last_ledger = extras.get(LEDGER_TABLE, [])
        records = [dict(zip(self.columns, v)) for v in values]
        if self.thread is not None:
            names = list(self.columns)
            step_rows = [(s, *v) for s, v in zip(steps, values)]

            def job(w: TraceWriter) -> None:
                w.write_steps(names, step_rows)
                w.write_timings(timings)
                if extras.get("alignment_samples"):
                    w.write_alignment(extras["alignment_samples"])
                if extras.get(LEDGER_TABLE):
                    w.write_ledger(extras[LEDGER_TABLE])
                w.heartbeat(steps[-1])
                kill_point("flush-commit", steps[-1])  # tests: rows written, not committed

            self.thread.rows_written += len(step_rows)
            self.thread.jobs.put(job)
        for rec, s in zip(records, steps):
            rec["step"] = s
        return records

    def submit(self, job: Callable[[TraceWriter], Any]) -> None:
        """Queue any other store write (evals, findings, markers) on the writer thread."""
        if self.thread is not None:
            self.thread.jobs.put(job)

    def drain(self) -> None:
        """Wait until everything queued is committed to disk."""
        if self.thread is not None:
            self.thread.drain()

    def close(self) -> None:
        if self.thread is not None:
            self.thread.drain()
            self.thread.jobs.put(None)
            self.thread.join()
            self.thread = None
            if self.writer is not None:
                self.writer.close()
