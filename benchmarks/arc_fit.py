"""How many ARC tasks (every grid of the task) fit square canvases; `python benchmarks/arc_fit.py [arc1|arc2]`."""

from __future__ import annotations

import sys

from etrm.data.arc import count_fitting, load_arc_tasks


def main() -> None:
    version = sys.argv[1] if len(sys.argv) > 1 else "arc1"
    train, evaluation = load_arc_tasks(version)
    print(f"{version}: {len(train)} training, {len(evaluation)} evaluation tasks")
    print(f"{'canvas':>6} {'training':>10} {'evaluation':>10}")
    for canvas in (10, 15, 30):
        print(f"{canvas:>6} {count_fitting(train, canvas):>10} {count_fitting(evaluation, canvas):>10}")


if __name__ == "__main__":
    main()
