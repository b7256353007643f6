"""Batch statistics across processes: SyncBatchNorm on torch.distributed (gloo or NCCL).

Data-parallel training gives each process a slice of the mini-batch, but
Algorithm 1 normalizes over the whole mini-batch. Each process computes its
slice's count, mean and biased variance, all processes exchange them in one
all_gather, and each merges them exactly (``bnlab.functional.merge_moments``,
exact for unequal slice sizes, and empty slices). The backward needs the two
per-channel gradient sums of the whole batch (``reduce_grad_sums``), exchanged
in one all_reduce. Unlike ``torch.nn.SyncBatchNorm`` this works on CPU (gloo).

bnlab's SyncBatchNorm is a BN layer to every tool that looks for torch's
``torch.nn.modules.batchnorm._BatchNorm`` (it subclasses bnlab's and so torch's
``_BatchNorm``), but it is *not* a ``torch.nn.SyncBatchNorm``:
``isinstance(m, torch.nn.SyncBatchNorm)`` is False. torch's
``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm`` on CPU ("SyncBatchNorm
layers only work with GPU modules", a check meant for torch's CUDA-only kernel), and
every engine (torchrun scripts, Lightning, Accelerate, Ray Train) wraps with torch's
DDP, so a subclass could not be used on CPU where people train. The price: code that
looks for torch's class by ``isinstance`` does not see ours: reverters such as
Lightning's ``TorchSyncBatchNorm.revert`` and mmcv's ``revert_sync_batchnorm`` leave our
layers in place (use :func:`revert_sync_batchnorm`), and
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` treats ours as a plain BN layer (it
replaces it by torch's SyncBatchNorm, as it would a BatchNorm2d). bnlab's own tools
(converters, population statistics) know both classes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import bnlab.functional as BF
from bnlab.autograd import batch_stats, grad_sums, input_grad, normalize_by_stats
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from bnlab.nn.convert import (
    _SYNC_CLASSES,
    _TO_BNLAB,
    _TO_TORCH,
    _refuse_fused,
    map_modules,
    swap_module_class,
)

__all__ = [
    "CollectiveError",
    "CollectiveUsageError",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "global_moments",
    "group_size",
    "revert_sync_batchnorm",
]


class CollectiveError(RuntimeError):
    """A collective across processes failed or timed out (a peer died or stalled)."""


class CollectiveUsageError(ValueError):
    """A collective was called wrongly (a bad or foreign process group): a bug, not a peer."""


# What gloo, NCCL and the TCP store say when a peer is gone or late (their errors are
# often plain RuntimeErrors, so the type alone does not tell).
_PEER_FAILURE = re.compile(
    r"time[d ]?\s?out|connection|closed|broken pipe|peer|abort", re.IGNORECASE
)


def _is_peer_failure(e: BaseException) -> bool:
    backend_errors = tuple(
        getattr(dist, n)
        for n in ("DistBackendError", "DistNetworkError", "DistStoreError")
        if hasattr(dist, n)
    )
    if isinstance(e, backend_errors):
        return True
    return isinstance(e, RuntimeError) and bool(_PEER_FAILURE.search(str(e)))


def _check_member(group: Any) -> None:
    """Refuse a process group this process is not in (torch's collectives would
    silently do nothing there, leaving the statistics unset)."""
    if dist.get_rank(group) < 0:
        raise CollectiveUsageError(
            f"SyncBatchNorm: this process (global rank {dist.get_rank()}) is not a member of "
            "the layer's process_group; give each process a group it belongs to (create every "
            "group with torch.distributed.new_group on all processes, and pass each process "
            "the one that contains it)"
        )


def _collective(name: str, fn, world: int) -> None:
    """Run one collective; tell a dead or late peer (:class:`CollectiveError`) from
    misuse such as a bad process group (:class:`CollectiveUsageError`). Other
    errors (out of memory, ...) propagate unchanged."""
    try:
        fn()
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:
        if _is_peer_failure(e):
            raise CollectiveError(
                f"SyncBatchNorm: the {name} across {world} processes did not complete ({e}). "
                "A peer process may have died or stalled, or the processes disagree on the "
                "layer (channels, dtype). The wait is bounded by the process group's timeout: "
                "set it with bnlab.distributed.init_distributed(timeout=SECONDS) or "
                "torch.distributed.init_process_group(timeout=...)"
            ) from e
        if isinstance(e, RuntimeError):
            raise
        raise CollectiveUsageError(
            f"SyncBatchNorm: the {name} was called wrongly ({type(e).__name__}: {e}). This is "
            "a usage error, not a failed peer: check the layer's process_group (a group made "
            "by torch.distributed.new_group on every process, not destroyed) and that every "
            "process of it runs the same layers"
        ) from e


def _local_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """(m, mean, biased variance) of this process's slice; zeros for an empty slice."""
    m = BF.num_values_per_channel(x)
    if m == 0:
        z = torch.zeros(x.shape[1], dtype=BF.compute_dtype(x.dtype), device=x.device)
        return 0, z, z.clone()
    mu, var = batch_stats(x)  # the compiled kernels on the CPU
    return m, mu, var


def group_size(process_group: Any = None) -> int:
    """Processes in ``process_group`` (default: the world); 1 outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def global_moments(x: Tensor, group: Any = None, world_size: int | None = None):
    """(m, mean, biased variance) per channel of the union of every process's slice of x.

    Each process contributes its slice's count, mean and biased variance in one
    all_gather; the merge is exact for unequal and empty slices. Every process of
    ``group`` must call this. Raises ValueError when the whole batch has a single
    value per channel; ``total`` is 0 when every slice is empty.
    """
    world_size = dist.get_world_size(group) if world_size is None else world_size
    c = x.shape[1]
    m, mu, var = _local_moments(x)
    local = torch.cat([torch.tensor([float(m)], dtype=mu.dtype, device=mu.device), mu, var])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    _collective(
        "all_gather of batch statistics",
        lambda: dist.all_gather(gathered, local, group=group),
        world_size,
    )
    g = torch.stack(gathered)  # (world, 1 + 2C): count, mean, biased variance per process
    total, mean, biased_var = BF.merge_moments(g[:, 0], g[:, 1 : c + 1], g[:, c + 1 :])
    total = int(total.item())
    if total == 1:  # total 0: every slice is empty, an empty output as in torch
        raise ValueError(
            f"Expected more than 1 value per channel across all {world_size} processes when "
            f"training, got {total}; use larger per-process batches"
        )
    return total, mean, biased_var


class SyncBatchNormFunction(torch.autograd.Function):
    """Algorithm 1 over the union of every process's slice, with explicit backward.

    The backward is differentiable once only (``once_differentiable``): second
    derivatives would need the global statistics re-derived through
    differentiable collectives, so asking for them (``create_graph=True`` and
    then differentiating the gradient) raises instead of being silently wrong.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):
        total, mean, biased_var = global_moments(x, group, world_size)
        inv_std = torch.rsqrt(biased_var + eps)
        y = normalize_by_stats(x, mean, biased_var, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.total, ctx.group, ctx.world_size = total, group, world_size
        ctx.mark_non_differentiable(mean, biased_var)
        return y, mean, biased_var, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _gm, _gv, _gt):
        x, weight, mean, inv_std = ctx.saved_tensors
        c = x.shape[1]
        sum_dy, sum_dy_xmu, scratch = grad_sums(grad_y, x, mean)
        # This process's share of dl/dgamma and dl/dbeta: DDP sums/averages them itself.
        grad_w = (sum_dy_xmu * inv_std).to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        sums = torch.cat([sum_dy, sum_dy_xmu])  # one collective for both sums
        _collective(
            "all_reduce of gradient sums",
            lambda: dist.all_reduce(sums, group=ctx.group),
            ctx.world_size,
        )
        grad_x = input_grad(
            grad_y, x, weight, mean, inv_std, sums[:c], sums[c:], ctx.total, scratch
        )
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            None,
            None,
            None,
        )


class SyncBatchNorm(_BatchNorm):
    """Batch Normalization with statistics over all processes of a group.

    Same constructor and state-dict keys as ``torch.nn.SyncBatchNorm``; accepts
    2-D to 5-D input. In training, with torch.distributed initialized and more
    than one process in the group, mean and variance are those of the whole
    global mini-batch (exact for unequal or empty per-process slices) and the
    running statistics (unbiased global variance) are identical on every process.
    Otherwise (eval mode, not distributed, world size 1) it is plain local BN.

    A subclass of torch's ``_BatchNorm`` (tools that look for BN layers find it), not
    of ``torch.nn.SyncBatchNorm``, so torch's own ``DistributedDataParallel`` accepts
    it on CPU (see the module docstring for the trade-off). Its classmethod
    ``convert_sync_batchnorm`` makes bnlab SyncBatchNorm layers; torch's classmethod,
    called on ``torch.nn.SyncBatchNorm``, still makes torch's.

    Args:
        process_group: the group to synchronize over (default: the whole world).
    """

    _expected_dims = (2, 3, 4, 5)
    _shape_names = ("2-D to 5-D (N, C, *)",)
    _hint = "an input with batch and channel dimensions"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group
        self._revert_class: type | None = None

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """bnlab's :func:`convert_sync_batchnorm` (torch's classmethod would build
        ``torch.nn.SyncBatchNorm`` layers, whose forward is not ours)."""
        return convert_sync_batchnorm(module, process_group)

    def forward(self, input: Tensor) -> Tensor:
        world = group_size(self.process_group) if self.training else 1
        if world == 1:
            return super().forward(input)  # local BN
        self._check_input_dim(input)
        self._check_state_sizes()
        if not input.is_floating_point():
            BF.check_batch_norm_input(input, training=False)  # the dtype error
        BF.check_eps(self.eps, training=True)
        _check_member(self.process_group)
        # The collective first, the state after: a failed all_gather changes nothing.
        y, mean, biased_var, total = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group, world
        )
        if self._updates_running_stats():
            self._update_running_stats(mean, biased_var, total)
        return y


# replace_batchnorm / revert_batchnorm cover SyncBatchNorm too, and the converters know
# ours as a synchronized layer although it is no torch.nn.SyncBatchNorm. Registered here
# because this module imports bnlab.nn.convert, not the other way round.
_TO_BNLAB[nn.SyncBatchNorm] = SyncBatchNorm
_TO_TORCH[SyncBatchNorm] = nn.SyncBatchNorm
_SYNC_CLASSES.append(SyncBatchNorm)

_BN_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BN (bnlab's or PyTorch's, incl. torch's SyncBatchNorm) by bnlab's
    SyncBatchNorm, sharing parameters and buffers; children in place, root returned.

    Raises:
        TypeError: the model holds a fused BN + activation layer
            (:class:`bnlab.nn.BatchNormAct2d`): SyncBatchNorm has no fused form, and
            leaving the layer would keep its statistics per process.
            ``convert_sync_batchnorm(unfuse_batchnorm_act(model))`` converts its BN part
            and keeps its activation (see :func:`bnlab.nn.unfuse_batchnorm_act`).
    """
    _refuse_fused(module, "convert_sync_batchnorm")

    def to_sync(m: nn.Module) -> nn.Module | None:
        if type(m) not in _BN_TYPES:
            return None
        new = swap_module_class(m, SyncBatchNorm, process_group=process_group)
        new._revert_class = type(m)
        return new

    return map_modules(module, to_sync)


def revert_sync_batchnorm(module: nn.Module, cls: type | None = None) -> nn.Module:
    """The reverse of :func:`convert_sync_batchnorm`.

    Each SyncBatchNorm becomes the class it was converted from, or ``cls`` (for
    example ``bnlab.nn.BatchNorm2d``) when it was built directly. Other layers, fused
    BN + activation layers (:class:`bnlab.nn.BatchNormAct2d`) included, stay as they are.

    Raises:
        ValueError: a SyncBatchNorm of unknown origin and no ``cls`` given.
    """

    def to_local(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, SyncBatchNorm):
            return None
        target = m._revert_class or cls
        if target is None:
            raise ValueError(
                "revert_sync_batchnorm: this SyncBatchNorm was not made by "
                "convert_sync_batchnorm, so its original class is unknown; pass cls="
                "bnlab.nn.BatchNorm1d/2d/3d"
            )
        return swap_module_class(m, target)

    return map_modules(module, to_local)
