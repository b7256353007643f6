"""Batch statistics across processes: SyncBatchNorm on torch.distributed (gloo or NCCL).

Data-parallel training gives each process a slice of the mini-batch, but
Algorithm 1 normalizes over the whole mini-batch. Each process computes its
slice's count, mean and biased variance, all processes exchange them in one
all_gather, and each merges them exactly (``bnlab.functional.merge_moments``,
exact for unequal slice sizes, and empty slices). The backward needs the two
per-channel gradient sums of the whole batch (``reduce_grad_sums``), exchanged
in one all_reduce. Unlike ``torch.nn.SyncBatchNorm`` this works on CPU (gloo).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from bnlab.nn.convert import map_modules, swap_module_class

__all__ = [
    "CollectiveError",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "global_moments",
    "group_size",
    "revert_sync_batchnorm",
]


class CollectiveError(RuntimeError):
    """A collective across processes failed or timed out (a peer died or stalled)."""


def _collective(name: str, fn, group) -> None:
    try:
        fn()
    except (RuntimeError, dist.DistError) as e:
        world = dist.get_world_size(group)
        raise CollectiveError(
            f"SyncBatchNorm: the {name} across {world} processes did not complete ({e}). A peer "
            "process may have died or stalled. The wait is bounded by the process group's "
            "timeout: set it with bnlab.distributed.init_distributed(timeout=SECONDS) or "
            "torch.distributed.init_process_group(timeout=...)"
        ) from e


def _local_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """(m, mean, biased variance) of this process's slice; zeros for an empty slice."""
    m = F.num_values_per_channel(x)
    if m == 0:
        z = torch.zeros(x.shape[1], dtype=F.compute_dtype(x.dtype), device=x.device)
        return 0, z, z.clone()
    mu, var = F.compute_batch_stats(x)
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
    value per channel.
    """
    world_size = dist.get_world_size(group) if world_size is None else world_size
    c = x.shape[1]
    m, mu, var = _local_moments(x)
    local = torch.cat([torch.tensor([float(m)], dtype=mu.dtype, device=mu.device), mu, var])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    _collective(
        "all_gather of batch statistics",
        lambda: dist.all_gather(gathered, local, group=group),
        group,
    )
    g = torch.stack(gathered)  # (world, 1 + 2C): count, mean, biased variance per process
    total, mean, biased_var = F.merge_moments(g[:, 0], g[:, 1 : c + 1], g[:, c + 1 :])
    total = int(total.item())
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel across all {world_size} processes when "
            f"training, got {total}; use larger per-process batches"
        )
    return total, mean, biased_var


class SyncBatchNormFunction(torch.autograd.Function):
    """Algorithm 1 over the union of every process's slice, with explicit backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):
        total, mean, biased_var = global_moments(x, group, world_size)
        inv_std = torch.rsqrt(biased_var + eps)
        y = F.normalize(x, mean, inv_std, weight, bias)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.total, ctx.group = total, group
        ctx.mark_non_differentiable(mean, biased_var)
        return y, mean, biased_var, total

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gt):
        x, weight, mean, inv_std = ctx.saved_tensors
        c = x.shape[1]
        sum_dy, sum_dy_xmu, scratch = F.reduce_grad_sums(grad_y, x, mean)
        # This process's share of dl/dgamma and dl/dbeta: DDP sums/averages them itself.
        grad_w = (sum_dy_xmu * inv_std).to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        sums = torch.cat([sum_dy, sum_dy_xmu])  # one collective for both sums
        _collective(
            "all_reduce of gradient sums", lambda: dist.all_reduce(sums, group=ctx.group), ctx.group
        )
        grad_x = F.input_grad(
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

    def forward(self, input: Tensor) -> Tensor:
        world = group_size(self.process_group) if self.training else 1
        if world == 1:
            return super().forward(input)  # local BN
        self._check_input_dim(input)
        if not input.is_floating_point():
            F.check_batch_norm_input(input, training=False)  # the dtype error
        momentum = self._momentum_for_step()
        y, mean, biased_var, total = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group, world
        )
        if self.track_running_stats:
            F.update_running_stats(
                self.running_mean, self.running_var, mean, biased_var, total, momentum
            )
        return y


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
    SyncBatchNorm, sharing parameters and buffers; children in place, root returned."""

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
    example ``bnlab.nn.BatchNorm2d``) when it was built directly.

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
