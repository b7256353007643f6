"""BN layers that stay in inference mode when a parent calls ``.train()``.

Fine-tuning with small batches usually wants BN frozen at its population
statistics (Algorithm 2, step 11), but ``model.train()`` switches every BN back
to batch statistics and moving-average updates. A frozen BN ignores that switch:
it keeps normalizing with E[x] and Var[x] and never updates them.

The freeze is a ``train`` override on the layer itself, so it works on torch's BN
classes as on bnlab's, and every bnlab converter carries it to the layer it builds
(``replace_batchnorm`` / ``revert_batchnorm``, ``convert_sync_batchnorm`` /
``revert_sync_batchnorm``, Batch Renorm, ghost BN), in both directions, with the
``train_affine`` setting (the parameters are shared, so are their ``requires_grad``)
and the flags :func:`unfreeze_batchnorm` restores. torch's own
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` builds unfrozen layers: use
``bnlab.nn.convert_sync_batchnorm``, or freeze after converting.

A fused BN + activation layer (:class:`bnlab.nn.BatchNormAct2d`) freezes as a BN layer:
its normalization stays in inference mode with fixed gamma and beta, while its
submodules (``act``, and a ``drop`` layer) are no BN: they keep following ``.train()``
and ``.eval()``, and their parameters (an ``nn.PReLU``'s, say) are not touched.
:func:`bnlab.nn.fuse_batchnorm_act` and :func:`bnlab.nn.unfuse_batchnorm_act` keep
frozen layers frozen.
"""

from __future__ import annotations

from torch import nn

from bnlab.graph import is_batchnorm
from bnlab.nn.convert import SWAP_HOOKS, check_module

__all__ = ["freeze_batchnorm", "is_frozen", "unfreeze_batchnorm"]

_FLAG = "_bnlab_frozen"


class _StayInEval:
    """Replaces a frozen BN's ``train``: any mode request leaves it in eval mode.

    Only the BN layer itself: its submodules (a fused layer's ``act`` and ``drop``) take
    the requested mode. A module-level class (not a closure) so frozen models still
    deep-copy and pickle.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze_batchnorm` froze this BN layer."""
    return hasattr(module, _FLAG)


def _freeze_layer(m: nn.Module, saved_requires_grad: dict[str, bool]) -> None:
    """Keep ``m`` in eval mode; ``saved_requires_grad`` is what unfreezing restores."""
    setattr(m, _FLAG, dict(saved_requires_grad))
    m.train = _StayInEval(m)
    m.training = False  # the layer only: a fused layer's act and drop keep their modes


def _carry_freeze(old: nn.Module, new: nn.Module) -> None:
    """A layer that a converter builds from a frozen one is frozen too."""
    if is_frozen(old):
        _freeze_layer(new, getattr(old, _FLAG))


SWAP_HOOKS.append(_carry_freeze)


def freeze_batchnorm(model: nn.Module, train_affine: bool = False) -> nn.Module:
    """Freeze every BN layer of ``model`` in inference mode, in place.

    Frozen layers normalize with their running statistics (the fixed affine map
    of Algorithm 2, step 11) and never update them, even after ``model.train()``.
    gamma and beta get ``requires_grad=False`` too, unless ``train_affine=True``:
    then they (and nothing else of the BN: the running statistics are buffers
    that stay fixed) still receive gradients. Other layers are not touched.
    Freezing twice is harmless; :func:`unfreeze_batchnorm` restores the
    ``requires_grad`` flags from before the first freeze. bnlab's converters
    keep frozen layers frozen (see the module docstring).

    Args:
        model: the network; modified in place and returned.
        train_affine: keep gamma and beta trainable.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: the model has no BN layer with running statistics.

    Example:
        >>> freeze_batchnorm(bn_net, train_affine=True)
        >>> bn_net.train()            # Linear/Dropout train; BN stays in eval mode
    """
    check_module(model, "freeze_batchnorm")
    bns = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    if not bns:
        raise ValueError(
            f"{type(model).__name__} has no BN layer with running statistics to freeze "
            "(BN with track_running_stats=False always uses batch statistics)"
        )
    for m in bns:
        saved = getattr(m, _FLAG, None)
        if saved is None:  # the first freeze: remember the flags unfreezing restores
            # The layer's own gamma and beta (recurse=False: not a fused layer's act).
            saved = {n: p.requires_grad for n, p in m.named_parameters(recurse=False)}
        _freeze_layer(m, saved)
        for p in m.parameters(recurse=False):
            p.requires_grad_(train_affine)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm`, in place: BN layers follow ``.train()`` again.

    Each unfrozen layer takes the mode of ``model`` and its gamma and beta get back
    the ``requires_grad`` they had before freezing. Layers never frozen are untouched.

    Returns:
        ``model``.
    """
    check_module(model, "unfreeze_batchnorm")
    for m in model.modules():
        if not is_frozen(m):
            continue
        saved = getattr(m, _FLAG)
        del m.train  # the class's train() again
        for n, p in m.named_parameters(recurse=False):
            p.requires_grad_(saved.get(n, True))
        delattr(m, _FLAG)
        m.train(model.training)
    return model
