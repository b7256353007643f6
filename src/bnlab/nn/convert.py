"""Swap PyTorch's BN modules for bnlab's and back, keeping all state; convert BN
to Batch Renorm or ghost batch normalization."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "convert_to_batch_renorm",
    "convert_to_ghost_batchnorm",
    "map_modules",
    "replace_batchnorm",
    "revert_batchnorm",
    "swap_module_class",
]

_TO_BNLAB: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {v: k for k, v in _TO_BNLAB.items()}

# Classes with synchronized statistics (a ``process_group``). bnlab.nn.sync adds its
# SyncBatchNorm, which is not a torch.nn.SyncBatchNorm (so that torch's DDP takes it on CPU).
_SYNC_CLASSES: list[type] = [nn.SyncBatchNorm]

# Called as ``hook(old, new)`` by every swap, after the state is moved over: how layer
# settings that live outside the constructor survive a conversion. bnlab.freeze adds
# the one that keeps a frozen layer frozen (registered there, as that module imports
# this one).
_SWAP_HOOKS: list[Callable[[nn.Module, nn.Module], None]] = []


def swap_module_class(module: nn.Module, cls: type, **extra_kwargs) -> nn.Module:
    """A new BN module of class ``cls`` with ``module``'s settings, state and mode.

    Parameters and buffers are shared with ``module`` (not copied), so the
    swap costs no memory and optimizers holding the parameters keep working.
    A SyncBatchNorm target keeps ``module``'s ``process_group`` when it has one, and
    a frozen ``module`` (:func:`bnlab.freeze_batchnorm`) gives a frozen layer.
    """
    if issubclass(cls, tuple(_SYNC_CLASSES)) and "process_group" not in extra_kwargs:
        extra_kwargs["process_group"] = getattr(module, "process_group", None)
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        bias=getattr(module, "bias", None) is not None or not module.affine,
        **extra_kwargs,
    )
    with torch.no_grad():
        if module.affine:
            new.weight = module.weight
            if module.bias is not None:
                new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    for hook in _SWAP_HOOKS:
        hook(module, new)
    return new


def map_modules(module: nn.Module, fn) -> nn.Module:
    """Replace, top-down, each module for which ``fn(module)`` returns a new one.

    Children are replaced in place (their subtrees are not visited further); the
    possibly new root is returned.
    """
    new = fn(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        new_child = map_modules(child, fn)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _check_module(module: object, tool: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{tool} expects an nn.Module, got {type(module).__name__}")


def _convert(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    def swap(m: nn.Module) -> nn.Module | None:
        cls = mapping.get(type(m))
        return None if cls is None else swap_module_class(m, cls)

    return map_modules(module, swap)


def replace_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in ``module`` by bnlab's.

    Children are replaced in place; the (possibly new) root is returned, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Parameters,
    running statistics, ``num_batches_tracked`` and train/eval mode are kept.

    Example:
        >>> model = replace_batchnorm(torchvision_model)
    """
    _check_module(module, "replace_batchnorm")
    return _convert(module, _TO_BNLAB)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """The reverse of :func:`replace_batchnorm`: bnlab BN modules become PyTorch's."""
    _check_module(module, "revert_batchnorm")
    return _convert(module, _TO_TORCH)


# Exact types: subclasses (Batch Renorm, ghost BN, SyncBatchNorm) are not plain BN.
_TO_RENORM: dict[type, type] = {
    nn.BatchNorm1d: BatchRenorm1d,
    nn.BatchNorm2d: BatchRenorm2d,
    nn.BatchNorm3d: BatchRenorm3d,
    BatchNorm1d: BatchRenorm1d,
    BatchNorm2d: BatchRenorm2d,
    BatchNorm3d: BatchRenorm3d,
}
_TO_GHOST: dict[type, type] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
    BatchNorm1d: GhostBatchNorm1d,
    BatchNorm2d: GhostBatchNorm2d,
    BatchNorm3d: GhostBatchNorm3d,
}


def _refuse_sync(m: nn.Module, target: str) -> None:
    if isinstance(m, tuple(_SYNC_CLASSES)):
        raise TypeError(
            f"cannot convert {type(m).__name__} to {target}: synchronized statistics are not "
            f"implemented for it. Convert the model to {target} before (instead of) "
            "convert_sync_batchnorm, or revert_sync_batchnorm first"
        )


def convert_to_batch_renorm(module: nn.Module, **schedule) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's or bnlab's) in ``module`` by Batch Renorm.

    Parameters, running statistics and ``num_batches_tracked`` are shared with
    the replaced layer (not copied, as :func:`replace_batchnorm` does), and
    train/eval mode is kept. The warm-up schedule continues from the layer's
    ``num_batches_tracked``: a freshly built model starts in the warm-up, a
    trained one (whose moving statistics are already good) past it. To start
    the warm-up anew, zero each new layer's ``num_batches_tracked``.
    Children are replaced in place; the (possibly new) root is returned.

    Args:
        module: the model.
        **schedule: keyword arguments of the Batch Renorm modules: ``rmax``,
            ``dmax``, ``warmup_steps``, ``rmax_steps``, ``dmax_steps``.

    Raises:
        ValueError: a BN layer with ``track_running_stats=False`` (Batch
            Renorm needs moving statistics), or an invalid schedule.
        TypeError: a SyncBatchNorm (not supported), or an unknown keyword.

    Example:
        >>> model = convert_to_batch_renorm(model, warmup_steps=1000, rmax_steps=8000)
    """

    _check_module(module, "convert_to_batch_renorm")
    for m in module.modules():  # refuse before changing anything: no half-converted model
        _refuse_sync(m, "Batch Renorm")
        if type(m) in _TO_RENORM and not m.track_running_stats:
            raise ValueError(
                f"cannot convert {m!r} to Batch Renorm: it has track_running_stats=False, and "
                "Batch Renorm needs moving statistics (r and d compare the batch statistics "
                "with them). Build the layer with track_running_stats=True"
            )

    def swap(m: nn.Module) -> nn.Module | None:
        cls = _TO_RENORM.get(type(m))
        return None if cls is None else swap_module_class(m, cls, **schedule)

    return map_modules(module, swap)


def convert_to_ghost_batchnorm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's or bnlab's) in ``module`` by ghost BN.

    Parameters, running statistics and ``num_batches_tracked`` are shared with
    the replaced layer, train/eval mode is kept; eval outputs are unchanged.
    Children are replaced in place; the (possibly new) root is returned.

    Args:
        module: the model.
        virtual_batch_size: samples per ghost batch (see :class:`bnlab.nn.GhostBatchNorm2d`).

    Raises:
        ValueError: an invalid ``virtual_batch_size``.
        TypeError: a SyncBatchNorm (not supported).
    """

    _check_module(module, "convert_to_ghost_batchnorm")
    for m in module.modules():  # refuse before changing anything: no half-converted model
        _refuse_sync(m, "ghost batch normalization")
        if type(m) in _TO_GHOST:
            _TO_GHOST[type(m)].check_virtual_batch_size(virtual_batch_size)

    def swap(m: nn.Module) -> nn.Module | None:
        cls = _TO_GHOST.get(type(m))
        return (
            None
            if cls is None
            else swap_module_class(m, cls, virtual_batch_size=virtual_batch_size)
        )

    return map_modules(module, swap)
