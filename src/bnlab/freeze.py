"""BN layers that stay in inference mode when a parent calls ``.train()``.

Fine-tuning with small batches usually wants BN frozen at its population
statistics (Algorithm 2, step 11), but ``model.train()`` switches every BN back
to batch statistics. A frozen BN ignores that switch.
"""

from __future__ import annotations

import types

from torch import nn

from bnlab.graph import is_batchnorm

__all__ = ["freeze_batchnorm", "unfreeze_batchnorm"]

_FLAG = "_bnlab_frozen"


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batchnorm(model: nn.Module, train_affine: bool = False) -> nn.Module:
    """Freeze every BN layer of ``model`` in inference mode, in place.

    Frozen layers normalize with their running statistics and never update them,
    even after ``model.train()``. gamma and beta are frozen too unless
    ``train_affine=True``, in which case they still receive gradients.

    Args:
        model: the network; modified in place and returned.
        train_affine: keep gamma and beta trainable.

    Raises:
        ValueError: the model has no BN layer with running statistics.
    """
    bns = [m for m in model.modules() if is_batchnorm(m)]
    if not any(m.track_running_stats for m in bns):
        raise ValueError(
            f"{type(model).__name__} has no BN layer with running statistics to freeze"
        )
    for m in bns:
        if not m.track_running_stats:
            continue  # no population statistics: freezing would change nothing
        if not getattr(m, _FLAG, False):
            setattr(m, _FLAG, {n: p.requires_grad for n, p in m.named_parameters()})
        m.train = types.MethodType(_stay_in_eval, m)
        nn.Module.train(m, False)
        for p in m.parameters():
            p.requires_grad_(train_affine)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm`: BN layers follow ``.train()`` again, in place.

    Each layer takes the mode of the model and the parameters get back the
    ``requires_grad`` they had before freezing.
    """
    for m in model.modules():
        saved = getattr(m, _FLAG, None)
        if not saved:
            continue
        del m.train  # the class's train() again
        for n, p in m.named_parameters():
            p.requires_grad_(saved.get(n, True))
        delattr(m, _FLAG)
        m.train(model.training)
    return model
