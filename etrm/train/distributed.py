"""Data-parallel training under ``torchrun``: the process group, per-rank data shards, cross-rank reductions.

Conventions (one process per device, as ``torchrun`` starts them):

* ``train.batch_size`` is the *global* batch: each rank holds ``batch_size / world_size`` carry slots, so a run's
  hyperparameters, its loss normalisation (upstream: loss / global batch; here loss / local batch, averaged by DDP)
  and its trace (counters summed over ranks) read the same at any world size. It must divide by the world size.
* Each rank has its own carry, its own halting RNG (seeded per rank) and its own sampler stream: the epoch-``e``
  permutation of all sample ids, strided by rank (rank ``r`` takes ``perm[r::world]``), so ranks never feed the same
  sample within an epoch and the shards change every epoch.
* Rank 0 alone writes files and console output. Checkpoints hold every rank's carry, sampler and RNG states
  (gathered to rank 0); on resume each rank takes its own, and the world size must be the one that wrote them.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op on a world of one.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from etrm.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: ``rank`` of ``world``, on local device ``local_rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def env_from_torchrun() -> DistEnv:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as ``torchrun`` sets them; a world of one without them."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (start the job with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not make a valid job (start it with torchrun)")
    return DistEnv(rank, world, local)


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA); a world of one joins nothing."""
    if not env.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _attempt_store(env)
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world)


def _attempt_store(env: DistEnv) -> dist.Store | None:
    """Under ``torchrun``'s agent store, the store keyed by this start's restart count. The agent keeps one store
    across ``--max-restarts``, so a restarted group would read the dead group's addresses (gloo then fails to
    connect); a prefix per attempt keeps them apart. None outside torchrun's agent store (the default then)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world, is_master=False,
                           timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"etrm/attempt_{attempt}", client)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """On CUDA, each rank on its own local GPU."""
    if device.type == "cuda" and env.enabled:
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            "use --nproc_per_node at most the GPU count")
        return torch.device("cuda", env.local_rank)
    return device


def no_buffer_sync() -> dict[str, bool]:
    """DDP's argument for "never broadcast buffers in forward" (renamed in recent torch; buffers are equal at init
    anyway: same seed, and the puzzle table starts at zero)."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def local_batch(global_batch: int, env: DistEnv, what: str = "train.batch_size") -> int:
    """Slots per rank: the global batch split evenly; an uneven split is a user error."""
    if global_batch % env.world:
        raise UserError(f"{what}={global_batch} is the global batch and must divide by the {env.world} ranks "
                        "(each rank holds an equal share of the slots)")
    return global_batch // env.world


def halt_seed(seed: int, env: DistEnv) -> int:
    """The halting RNG's seed: the config's on rank 0 (a single process is unchanged), a derived one elsewhere."""
    if env.rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, env.rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------------------------------
def shard_sampler(sampler: Any, env: DistEnv) -> Any:
    """Give ``sampler`` (refill or trm) this rank's disjoint share of every epoch; unchanged on a world of one."""
    if env.enabled:
        if sampler.num_samples < env.world:
            raise UserError(f"{sampler.num_samples} training samples cannot be shared among {env.world} ranks")
        sampler.shard(env.rank, env.world)
    return sampler


class EvalShard:
    """Rank ``r``'s share of an evaluation set: rows ``r, r + world, ...`` under local ids ``0..len-1``."""

    def __init__(self, dataset: Any, env: DistEnv) -> None:
        self.dataset, self.env = dataset, env
        self.ids = np.arange(env.rank, len(dataset), env.world, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, slot_ids: np.ndarray) -> dict[str, torch.Tensor]:
        slot_ids = np.asarray(slot_ids)
        return self.dataset.batch(np.where(slot_ids >= 0, self.ids[np.clip(slot_ids, 0, None)], -1))

    def __getattr__(self, name: str) -> Any:  # inputs, labels, ... of the whole set
        return getattr(self.dataset, name)


# ---------------------------------------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op outside a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def trace_reduce(columns: list[str], world: int):
    """The tracer's ``reduce``: counters summed over ranks; gradient norms (equal on every rank after DDP's
    all-reduce) kept as they are, by dividing their sum by the world size."""
    mean_cols = [i for i, c in enumerate(columns) if c.startswith("grad_norm")]

    def reduce(block: torch.Tensor) -> None:
        all_reduce_sum(block)
        if mean_cols:
            block[:, mean_cols] /= world

    return reduce


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (``None`` elsewhere); ``[obj]`` on a world of one."""
    if not env.enabled:
        return [obj]
    out: list[Any] | None = [None] * env.world if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself on a world of one)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
