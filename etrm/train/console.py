"""Console output: a rich progress bar on a terminal, plain log lines otherwise, and an end-of-run table."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from etrm.data.maze import VALID_PATH_KEY


SEVERITY_STYLE = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}


class Reporter:
    """Shows training progress; ``live`` picks the rich bar (terminal) or plain lines (pipes, CI, tests)."""

    def __init__(self, total: int, start: int = 0, live: bool | None = None) -> None:
        self.console = Console(highlight=False)
        self.live = sys.stdout.isatty() if live is None else live
        self.total = total
        self.t0 = time.perf_counter()
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, stats="")
            self.progress.start()

    def step(self, step: int, stats: dict[str, float]) -> None:
        text = (f"loss {stats['loss']:.3f}  exact {stats['exact']:.3f}  {stats['steps_per_s']:.1f} steps/s  "
                f"{stats['samples_per_s']:.0f} samples/s")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=text)
        else:
            self.console.print(f"step {step}/{self.total}  {text}")

    def line(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text)

    def warn(self, text: str, severity: str = "warning") -> None:
        """A line labelled with its severity (``error``, ``warning`` or ``info``; a finding's own)."""
        self.line(f"[{SEVERITY_STYLE.get(severity, 'bold yellow')}]{severity}:[/] {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, title: str, rows: dict[str, str]) -> None:
        table = Table(title=title, show_header=False)
        for key, value in rows.items():
            table.add_row(key, value)
        self.console.print(table)


def format_eval(step: int, res: dict[str, float], base: dict[str, float]) -> str:
    """One line: held-out exact/token accuracy at max steps and at the would-halt step, beside the baselines."""
    return (f"eval @ {step}: exact {res['exact']:.3f} token {res['token']:.3f} | at would-halt step "
            f"(mean {res['halt.step']:.2f}) exact {res['halt.exact']:.3f} | baselines: copy-input exact "
            f"{base['copy_input.exact']:.3f}, common-output exact {base['common_output.exact']:.3f} "
            f"(n={int(res['count'])})" + (f" | ARC pass@1 {res['arc.pass@1']:.3f} pass@2 {res['arc.pass@2']:.3f} over "
                                          f"{int(res['arc.tasks'])} tasks" if "arc.pass@1" in res else "")
            + (f" | maze valid shortest path {res[VALID_PATH_KEY]:.3f} (at halt {res['halt.' + VALID_PATH_KEY]:.3f})"
               if VALID_PATH_KEY in res else ""))


def format_raw_eval(step: int, raw: dict[str, float], ema: dict[str, float]) -> str:
    """One line: the raw weights' held-out exact accuracy (at max steps and at the would-halt step) beside the EMA's."""
    gap, halt_gap = ema["exact"] - raw["exact"], ema["halt.exact"] - raw["halt.exact"]
    return (f"eval @ {step} raw weights: exact {raw['exact']:.3f} (EMA - raw {gap:+.3f}) | at would-halt step "
            f"exact {raw['halt.exact']:.3f} (EMA - raw {halt_gap:+.3f})")
