"""``--resume`` safety: odd run paths, config drift refused with the differing keys, the resume allow-list, and what
is printed on resume (the step resumed from; how to extend a finished run)."""

from __future__ import annotations

from pathlib import Path

from diagnostics.loading import load_run
from etrm.cli import main


def test_traced_run_with_odd_path_resumes(tmp_path: Path, tiny) -> None:
    """Train, then ``--resume``, a traced run whose directory holds ``#`` and ``?``: no traceback, no stray file."""
    run = tmp_path / "a#b?c d"
    assert main(["--preset", "demo", "--run-dir", str(run), "--max-steps", "2", "--device", "cpu", "--trace",
                 *tiny]) == 0
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--resume", "--run-dir", str(run), "--max-steps", "4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == outside
    df = load_run(run)
    assert list(df.index) == [1, 2, 3, 4]
