"""Data-parallel training across processes, launched with ``torchrun``.

Each process takes a slice of every global mini-batch; BN statistics are those
of the whole global batch (bnlab's SyncBatchNorm, the default) or of each
process's slice ("ghost" statistics, Hoffer et al. 2017). Gradients are
all-reduced by DistributedDataParallel, and the loss is scaled so that the
update equals single-process training on the global batch, even when slices
differ in size. Logging and checkpoints come from rank 0 only.

    torchrun --nproc-per-node 2 -m bnlab.cli train-ddp --steps 2000

The training loop itself is :func:`bnlab.train.loop.train`, shared by every
experiment; :func:`bnlab.train.loop.train_distributed` trains one network.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bnlab.nn.sync import convert_sync_batchnorm

__all__ = ["DistInfo", "init_distributed", "shard", "prepare_model"]

STATS = ("sync", "ghost")


@dataclass
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout: float = 120.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Without torchrun's variables (RANK, WORLD_SIZE) this is a single process and
    nothing is initialized. ``timeout`` bounds every collective: a peer that dies
    or stalls ends the job with an error after that many seconds instead of a hang.

    Args:
        backend: "gloo" (CPU) or "nccl" (GPU); default NCCL when CUDA is available.
        timeout: seconds a collective may wait for its peers.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return DistInfo(rank, world, local_rank, device)


def shard(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous part of n items; parts differ by at most one item."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def prepare_model(model: nn.Module, info: DistInfo, stats: str = "sync") -> nn.Module:
    """Move to the device, use global ("sync") or per-process ("ghost") BN statistics,
    and wrap in DistributedDataParallel when there is more than one process."""
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    model = model.to(info.device)
    if info.world_size == 1:
        return model
    if stats == "sync":
        model = convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
