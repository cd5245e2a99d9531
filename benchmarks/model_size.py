"""Parameter counts of the paper-size TRM and ETRM, and the CPU time of one ACT step (forward + backward) of a tiny
config. Prints figures; asserts nothing.

    python benchmarks/model_size.py [--steps 30] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from etrm.config import Config
from etrm.loss import ACTLoss
from etrm.model import ACTModel, ModelShape

PAPER_ARCH = {"hidden_size": 512, "num_heads": 8, "expansion": 4.0, "L_layers": 2, "H_cycles": 3, "L_cycles": 4,
              "puzzle_emb_len": 16}
TINY_ARCH = {"hidden_size": 64, "num_heads": 4, "expansion": 2.0, "L_layers": 2, "H_cycles": 2, "L_cycles": 2,
             "puzzle_emb_len": 4}


def paper_counts() -> dict[str, int]:
    """Trainable parameters at upstream's ARC size (vocab 12, 30x30 canvas); the puzzle table is a buffer."""
    out = {}
    for model in ("trm", "etrm"):
        cfg = Config.from_dict({"model": model, "arch": PAPER_ARCH, "encoder": {"num_layers": 2, "set_layers": 1}})
        out[model] = ACTModel(cfg.model_config(), ModelShape(12, 900, 1000)).num_trainable_parameters()
    return out


def tiny_step_seconds(model: str, mode: str, steps: int, batch: int = 32, seq: int = 36, demos: int = 3) -> float:
    """Median seconds of one ACT step (forward, loss, backward) of the tiny config on CPU."""
    torch.manual_seed(0)
    cfg = Config.from_dict({"model": model, "arch": TINY_ARCH, "encoder": {"mode": mode}})
    net = ACTModel(cfg.model_config(), ModelShape(12, seq, 64))
    loss_fn = ACTLoss(cfg.loss)
    g = torch.Generator().manual_seed(0)
    b = {"inputs": torch.randint(2, 12, (batch, seq), generator=g), "labels": torch.randint(2, 12, (batch, seq), generator=g),
         "puzzle_id": torch.randint(1, 64, (batch,), generator=g), "sample_id": torch.arange(batch),
         "demo_inputs": torch.randint(0, 12, (batch, demos, seq), generator=g),
         "demo_outputs": torch.randint(0, 12, (batch, demos, seq), generator=g),
         "demo_mask": torch.ones(batch, demos, dtype=torch.bool)}
    carry = net.initial_carry(b)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        carry, out, ev = net(carry, b)
        loss, _ = loss_fn(out, ev)
        loss.backward()
        net.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = paper_counts()
    print(f"paper-size TRM  (hidden 512, H3 L4, 2 layers, 16 prefix tokens): {counts['trm']:,} trainable parameters")
    print(f"paper-size ETRM (same core + encoder 2 grid layers, 1 set layer):  {counts['etrm']:,} trainable parameters")
    print(f"tiny config (hidden 64, H2 L2, 2 layers), batch 32, 6x6 canvas, 3 demos, torch threads "
          f"{torch.get_num_threads()}:")
    for model, mode in (("trm", "reencode"), ("etrm", "reencode"), ("etrm", "cached")):
        label = "trm" if model == "trm" else f"etrm {mode}"
        sec = tiny_step_seconds(model, mode, args.steps)
        print(f"  {label:14s} one ACT step (fwd + loss + bwd): median {sec * 1e3:.1f} ms over {args.steps} steps")


if __name__ == "__main__":
    main()
