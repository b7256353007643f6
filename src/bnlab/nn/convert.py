"""Swap PyTorch's BN modules for bnlab's and back, keeping all state."""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["map_modules", "replace_batchnorm", "revert_batchnorm", "swap_module_class"]

_TO_BNLAB: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {v: k for k, v in _TO_BNLAB.items()}


def swap_module_class(module: nn.Module, cls: type, **extra_kwargs) -> nn.Module:
    """A new BN module of class ``cls`` with ``module``'s settings, state and mode.

    Parameters and buffers are shared with ``module`` (not copied), so the
    swap costs no memory and optimizers holding the parameters keep working.
    A SyncBatchNorm target keeps ``module``'s ``process_group`` when it has one.
    """
    if issubclass(cls, nn.SyncBatchNorm) and "process_group" not in extra_kwargs:
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
    return _convert(module, _TO_BNLAB)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """The reverse of :func:`replace_batchnorm`: bnlab BN modules become PyTorch's."""
    return _convert(module, _TO_TORCH)
