"""BN followed by an activation in one fused layer: ``BatchNormAct1d/2d/3d``.

Almost every CNN runs BN and then an activation. Fused, the training forward is one
statistics pass and one output pass that applies the activation, and the backward two
passes that recompute z = BN(x) per value (:class:`bnlab.autograd.BatchNormActFunction`):
no z and no dl/dz tensor is written. ``memory="save"`` (InPlace-ABN, Rota Bulo et al.
2018) keeps only the layer's output for the backward and recomputes x from it, for
invertible activations (identity; leaky_relu with a positive slope).

Names, arguments and state-dict keys are timm's ``BatchNormAct2d``
(``timm.layers.norm_act``): the layer is a BN subclass whose activation is the submodule
``act`` (and an optional ``drop`` between them), so checkpoints of timm's layers, and of
torch's BN followed by an activation, load as they are. The activation is read from
``act`` at every call: one of ``nn.Identity``, ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``,
``nn.Sigmoid`` runs fused; any other module put there (or a ``drop`` layer) runs after
an unfused BN, with the same result.

:func:`fuse_batchnorm_act` turns BN layers followed by an activation into these layers,
and :func:`unfuse_batchnorm_act` turns them back (see :mod:`bnlab.nn.convert`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

import bnlab.functional as BF
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "activation_of"]

# The activation modules a fused layer runs, by the name bnlab.core.ACTIVATIONS gives them.
_ACT_MODULES: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}
_ALIASES = {"swish": "silu", "none": "identity", "": "identity", "linear": "identity"}


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """``(name, negative_slope)`` of an activation module a fused layer runs, or None.

    Exact types only: a subclass of ``nn.ReLU`` may compute something else.
    """
    for name, cls in _ACT_MODULES.items():
        if type(module) is cls:
            return name, float(getattr(module, "negative_slope", 0.01))
    return None


def _make_act(act_layer: Any, act_kwargs: dict | None, inplace: bool) -> nn.Module:
    """The ``act`` submodule from a name, an activation class, or None (identity)."""
    kwargs = dict(act_kwargs or {})
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        name = _ALIASES.get(act_layer.lower(), act_layer.lower())
        if name not in _ACT_MODULES:
            raise ValueError(
                f"act_layer={act_layer!r} is not an activation a fused BN layer applies; use "
                f"one of {', '.join(_ACT_MODULES)} (a name or the torch.nn class)"
            )
        act_layer = _ACT_MODULES[name]
    if not (isinstance(act_layer, type) and issubclass(act_layer, nn.Module)):
        raise TypeError(
            f"act_layer must be a name or an nn.Module class (e.g. nn.ReLU), got "
            f"{type(act_layer).__name__}"
        )
    if act_layer in (nn.ReLU, nn.LeakyReLU, nn.SiLU):
        kwargs.setdefault("inplace", inplace)
    return act_layer(**kwargs)


class _BatchNormAct(_BatchNorm):
    """BN followed by an activation (shared code of ``BatchNormAct1d/2d/3d``).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`bnlab.nn.BatchNorm2d`.
        apply_act: apply the activation (False: ``act`` is the identity).
        act_layer: the activation: a name (``"relu"``, ``"leaky_relu"``, ``"silu"``
            or ``"swish"``, ``"sigmoid"``, ``"identity"``) or a torch.nn class;
            default ReLU, as timm.
        act_kwargs: keyword arguments of ``act_layer`` (``{"negative_slope": 0.2}``).
        inplace: passed to the activation (timm's argument; the fused path never
            writes its input).
        drop_layer: a module class applied between BN and the activation (timm's
            DropBlock, say); the layer then runs unfused.
        bias: (keyword-only, as in PyTorch) learn beta; False keeps gamma only.
        memory: ``"standard"`` keeps the input for the backward; ``"save"`` keeps only
            the output (InPlace-ABN) and needs an invertible activation.

    Tools that find BN layers by ``isinstance`` and swap them for another class see
    the BN part only. bnlab's own converters handle fused layers or refuse them with the
    fix (:func:`bnlab.nn.unfuse_batchnorm_act` first); torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` and swaps to ``FrozenBatchNorm2d``
    (timm, detectron2) drop the activation, as they do for timm's own layer: unfuse
    before calling them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        memory: str = "standard",
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer if apply_act else None, act_kwargs, inplace)
        fused = activation_of(self.act)
        if memory != "standard" and fused is None:
            raise ValueError(
                f"memory={memory!r} needs an activation the layer fuses; "
                f"{type(self.act).__name__} is not one"
            )
        if fused is not None:
            BF.check_activation(fused[0], fused[1], memory)
        else:
            BF.check_activation("identity", 0.01, memory)  # the memory argument alone
        self.memory = memory

    def extra_repr(self) -> str:
        memory = "" if self.memory == "standard" else f", memory={self.memory!r}"
        return super().extra_repr() + memory

    def _forward(self, input: Tensor) -> Tensor:
        fused = activation_of(self.act) if type(self.drop) is nn.Identity else None
        if fused is None:  # another activation, or a drop layer: BN, then them
            return self.act(self.drop(super()._forward(input)))
        activation, slope = fused
        memory = self.memory
        if memory == "save" and activation == "leaky_relu" and not slope > 0:
            memory = "standard"  # act was changed after construction: not invertible now
        weight, bias, running_mean, running_var, use_batch_stats = self._checked_state(input)
        y, mu_b, biased_var_b, skipped = BF._dispatch_act(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            activation,
            slope,
            memory,
            self._buffers.get("num_batches_tracked"),
        )
        self._warn_once_if_skipped(mu_b, biased_var_b, skipped)
        return y


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """:class:`bnlab.nn.BatchNorm1d` followed by an activation, fused; (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """:class:`bnlab.nn.BatchNorm2d` followed by an activation, fused; (N, C, H, W).

    Example::

        >>> import torch, bnlab.nn
        >>> layer = bnlab.nn.BatchNormAct2d(8, act_layer="leaky_relu", memory="save")
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """:class:`bnlab.nn.BatchNorm3d` followed by an activation, fused; (N, C, D, H, W)."""
