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
:func:`sync_running_stats` makes per-process running statistics agree before
evaluation (PyTorch issue 30718).

The model is wrapped in torch's own ``torch.nn.parallel.DistributedDataParallel``:
bnlab's SyncBatchNorm is not a ``torch.nn.SyncBatchNorm`` (see :mod:`bnlab.nn.sync`),
so torch's DDP takes it on CPU, as every engine built on torch's DDP needs.
``bnlab.distributed.DistributedDataParallel`` remains only as a deprecated name for it.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import bnlab.functional as BF
from bnlab.graph import is_batchnorm
from bnlab.nn.sync import convert_sync_batchnorm, group_size

__all__ = [
    "DistInfo",
    "decided_on_main",
    "init_distributed",
    "prepare_model",
    "shard",
    "sync_running_stats",
]

SYNC_OPS = ("mean", "broadcast")

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


def decided_on_main(decide: Callable[[], Any], info: DistInfo) -> Any:
    """``decide()`` run by rank 0 alone; every rank returns its result, or raises its
    ValueError (with rank 0's message).

    For decisions taken from shared state that rank 0 also changes, such as a run
    folder it creates and writes: a peer that looked for itself a moment later would
    see a folder no longer empty, refuse it, and kill the job ("Connection reset by
    peer" on rank 0). One look, shared by a broadcast, also keeps the ranks from
    disagreeing on a file system that only some of them see. A single process just
    calls ``decide()``.
    """
    outcome: list = [None, None]  # [result, error message]
    if info.is_main:
        try:
            outcome[0] = decide()
        except ValueError as e:
            outcome[1] = str(e)
    if info.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ValueError(outcome[1])
    return outcome[0]


def shard(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous part of n items; parts differ by at most one item."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def prepare_model(model: nn.Module, info: DistInfo, stats: str = "sync") -> nn.Module:
    """Move to the device, use global ("sync") or per-process ("ghost") BN statistics,
    and wrap in torch's DistributedDataParallel when there is more than one process."""
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    model = model.to(info.device)
    if info.world_size == 1:
        return model
    if stats == "sync":
        model = convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def __getattr__(name: str) -> Any:
    # bnlab.distributed.DistributedDataParallel: once a subclass of torch's DDP that let
    # bnlab's SyncBatchNorm through on CPU; torch's own DDP takes it now.
    if name == "DistributedDataParallel":
        warnings.warn(
            "bnlab.distributed.DistributedDataParallel is deprecated: it is now torch's "
            "torch.nn.parallel.DistributedDataParallel, which accepts bnlab's SyncBatchNorm "
            "on CPU; use that",
            DeprecationWarning,
            stacklevel=2,
        )
        return nn.parallel.DistributedDataParallel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sync_running_stats(
    model: nn.Module, op: str = "mean", group: Any = None, src: int = 0
) -> nn.Module:
    """Make every BN layer's running statistics the same on all processes, in place.

    Data-parallel training with per-process ("ghost") statistics, or with
    plain BN under DDP, leaves each process with its own running statistics,
    so evaluation depends on the rank (PyTorch issue 30718).

    * ``op="mean"``: each process's running statistics describe an equal share
      of the data, so the whole has the mixture's moments:
      ``mean = 1/R sum_r mean_r`` and
      ``var = 1/R sum_r (var_r + (mean_r - mean)^2)``, the average variance
      plus the spread of the rank means (``functional.merge_moments`` with
      equal counts; one all_gather for all layers). ``num_batches_tracked``
      becomes the largest count of any process.
    * ``op="broadcast"``: every process takes process ``src``'s statistics
      and ``num_batches_tracked``.

    Every process of ``group`` must call this, with the same model structure.
    Outside torch.distributed, or with one process, nothing changes.

    Args:
        model: the network (its BN layers with running statistics are synced).
        op: ``"mean"`` or ``"broadcast"``.
        group: the process group (default: the world).
        src: the global rank whose statistics ``"broadcast"`` copies.

    Returns:
        ``model``.

    Example:
        >>> sync_running_stats(model.module)  # before evaluating on every rank
    """
    if op not in SYNC_OPS:
        raise ValueError(f"op must be one of {SYNC_OPS}, got {op!r}")
    bns = [m for m in model.modules() if is_batchnorm(m) and m.running_mean is not None]
    world = group_size(group)
    if world == 1 or not bns:
        return model
    device = bns[0].running_mean.device
    # One flat float64 vector for every layer: [means..., variances...].
    means = torch.cat([m.running_mean.detach().to(device, torch.float64) for m in bns])
    variances = torch.cat([m.running_var.detach().to(device, torch.float64) for m in bns])
    counts = torch.stack([_count(m, device) for m in bns])
    with torch.no_grad():
        if op == "broadcast":
            flat = torch.cat([means, variances])
            dist.broadcast(flat, src, group=group)
            dist.broadcast(counts, src, group=group)
            means, variances = flat.chunk(2)
        else:
            local = torch.cat([means, variances])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local, group=group)
            g = torch.stack(gathered)  # (R, 2 * sum C)
            n = means.numel()
            ones = torch.ones(world, dtype=torch.float64, device=device)
            _, means, variances = BF.merge_moments(ones, g[:, :n], g[:, n:])
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        start = 0
        for m, count in zip(bns, counts):
            c = m.running_mean.numel()
            m.running_mean.copy_(means[start : start + c])
            m.running_var.copy_(variances[start : start + c])
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(count)
            start += c
    return model


def _count(m: nn.Module, device: torch.device) -> torch.Tensor:
    nbt = m.num_batches_tracked
    return torch.tensor(0 if nbt is None else int(nbt), dtype=torch.long, device=device)
