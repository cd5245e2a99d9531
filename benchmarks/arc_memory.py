"""Memory of an augmented ARC training set: base grids + variant table (what the device holds) vs the materialised rows.

`python benchmarks/arc_memory.py [--version arc1] [--aug 1000] [--tasks 100] [--canvas 30] [--view trm|etrm]`

Builds the training set as ``etrm-train`` does (``build_arc``: de-duplicated variants, translation on), puts it on
the CPU device as the device data path does (``ArcDeviceData``) and prints the bytes it holds there (measured from
its tensors) beside the bytes the materialised set would hold (``ArcTrainSet.materialised_bytes``: uint8 inputs,
int16 labels, int32 ids, ETRM's demo pool; its arithmetic is checked against real arrays in
tests/data/test_arc_device.py), the build time and the process's peak resident memory. ``--tasks 0``: every task.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from etrm.data.arc import build_arc, load_arc_tasks
from etrm.data.arc_device import ArcDeviceData
from etrm.data.device_data import dataset_bytes


def mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="arc1", choices=("arc1", "arc2"))
    parser.add_argument("--aug", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100, help="training and evaluation tasks each (0: all)")
    parser.add_argument("--canvas", type=int, default=30)
    parser.add_argument("--view", default="trm", choices=("trm", "etrm"))
    args = parser.parse_args()
    train, evaluation = load_arc_tasks(args.version)
    start = time.perf_counter()
    ds, eval_ds, info = build_arc(train, evaluation, args.canvas, args.view, num_aug=args.aug, seed=0,
                                  translate=True, max_train_tasks=args.tasks, max_eval_tasks=args.tasks)
    built = time.perf_counter() - start
    data = ArcDeviceData(ds, torch.device("cpu"))
    held, full = data.nbytes(), ds.materialised_bytes()
    print(info.line(args.version, args.canvas))
    print(f"{args.view} view, num_aug={args.aug}: {len(ds):,} training rows from {len(ds.arc_variants.grids):,} base "
          f"grids, built in {built:.1f} s")
    print(f"device data path holds {mib(held)} (base grids + variant table; {held / len(ds):.1f} B/row)")
    print(f"materialised rows would hold {mib(full)} ({full / len(ds):.1f} B/row): {full / held:.0f}x more")
    print(f"peak resident memory of this process {mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} "
          f"(includes the {len(eval_ds):,}-row evaluation set, encoded: {mib(dataset_bytes(eval_ds))})")


if __name__ == "__main__":
    main()
