"""Inference BN folded into neighbouring layers: Algorithm 2, step 11.

At inference BN is the fixed per-channel affine map
y = scale * x + shift with scale = gamma / sqrt(Var[x] + eps) and
shift = beta - gamma * E[x] / sqrt(Var[x] + eps)
(:func:`bnlab.functional.inference_affine`). Composed with a preceding
z = W u + b it gives z' = (scale * W) u + (scale * b + shift): one layer.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from bnlab import functional as F
from bnlab.graph import LINEAR_LAYERS, calls_per_module, is_batchnorm, is_sequential_tree, trace

__all__ = [
    "ChannelAffine",
    "fold_batchnorm",
    "fold_conv_bn_weights",
    "fold_linear_bn_weights",
]


def fold_linear_bn_weights(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Weights of Linear followed by the affine map ``scale * z + shift``.

    Shape:
        weight (out, in), bias (out,) or None, scale/shift (out,).

    Returns:
        ``(scale[:, None] * weight, scale * bias + shift)``.
    """
    new_bias = shift if bias is None else scale * bias + shift
    return weight * scale.unsqueeze(1), new_bias


def fold_conv_bn_weights(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Weights of ConvNd (any groups) followed by ``scale * z + shift`` per out channel.

    Shape:
        weight (out, in/groups, *kernel); dim 0 is the output channel for every
        ``groups``, so one scale per filter.
    """
    new_bias = shift if bias is None else scale * bias + shift
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), new_bias


class ChannelAffine(nn.Module):
    """A fixed per-channel affine map y = scale * (x - center) + shift (channel dim 1).

    What an inference BN becomes when it has no layer to fold into: scale =
    gamma / sqrt(Var[x] + eps), center = E[x], shift = beta. Subtracting the
    center before scaling keeps the precision that scale * x + (beta - scale *
    E[x]) loses to cancellation when |E[x]| >> std. Without ``center`` (and
    its buffer) it is y = scale * x + shift.
    """

    def __init__(self, scale: Tensor, shift: Tensor, center: Tensor | None = None):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        if center is not None:
            self.register_buffer("center", center.detach().clone())
        else:
            self.center = None

    def forward(self, x: Tensor) -> Tensor:
        if self.center is not None:
            x = x - F.channel_view(self.center, x)
        return torch.addcmul(F.channel_view(self.shift, x), x, F.channel_view(self.scale, x))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def _affine_of(bn: nn.Module) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False, so it normalizes with batch "
            "statistics even in eval mode and is no fixed map; it cannot be folded"
        )
    return F.inference_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _fused(layer: nn.Module, bn: nn.Module) -> nn.Module:
    scale, _ = _affine_of(bn)
    fold = fold_linear_bn_weights if isinstance(layer, nn.Linear) else fold_conv_bn_weights
    # Bias b' = scale * (b - E[x]) + beta, as torch's fusion computes it: the mean is
    # subtracted before scaling, so a layer whose bias carries a large mean (|mean| >>
    # std) keeps its precision; scale * b + (beta - scale * E[x]) would cancel.
    rm = bn.running_mean.detach()
    centered = -rm if layer.bias is None else layer.bias.detach().to(rm.dtype) - rm
    beta = torch.zeros_like(rm) if bn.bias is None else bn.bias.detach()
    w, b = fold(layer.weight.detach(), centered, scale.detach(), beta)
    new = copy.deepcopy(layer)
    # requires_grad as torch's fuse_conv_bn_weights sets it: the layer's own flags,
    # and False for a bias the layer did not have.
    has_bias = layer.bias is not None
    new.weight = nn.Parameter(w.to(layer.weight.dtype), layer.weight.requires_grad)
    new.bias = nn.Parameter(b.to(layer.weight.dtype), has_bias and layer.bias.requires_grad)
    return new


def _features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return type(layer) in LINEAR_LAYERS and _features(layer) == bn.num_features


def _to_affine(bn: nn.Module) -> ChannelAffine:
    scale, _ = _affine_of(bn)
    beta = torch.zeros_like(scale) if bn.bias is None else bn.bias
    return ChannelAffine(scale, beta, bn.running_mean)


def _fold_sequential(module: nn.Module) -> nn.Module:
    if is_batchnorm(module):
        return _to_affine(module)
    if not isinstance(module, nn.Sequential):
        return module
    out: list[nn.Module] = []
    for child in module.children():
        if is_batchnorm(child) and out and _foldable(out[-1], child):
            out[-1] = _fused(out[-1], child)
        else:
            out.append(_fold_sequential(child))
    return nn.Sequential(*out)


def _fold_fx(model: nn.Module) -> fx.GraphModule:
    gm = trace(model, "fold_batchnorm")
    calls = calls_per_module(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0]
        layer = gm.get_submodule(src.target) if src.op == "call_module" else None
        if (
            layer is not None
            and _foldable(layer, bn)
            and len(src.users) == 1
            and calls[src.target] == 1
        ):
            parent, _, name = src.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, _fused(layer, bn))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, _to_affine(bn))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A new inference model with every BN folded away (Algorithm 2, step 11).

    Each eval-mode BN directly after a Linear or ConvNd (with or without bias,
    any ``groups``) is composed into that layer's weights and bias; any other BN
    becomes a :class:`ChannelAffine`. Works for bnlab's and PyTorch's BN, for
    nested ``nn.Sequential`` directly and for other models through ``torch.fx``.
    The original model is left untouched. In float64 the folded model's output
    equals the original's eval output to rounding (about 1e-15 relative).

    Raises:
        ValueError: the model or one of its BN layers is in training mode, a BN keeps
            no running statistics, or the model cannot be traced.

    Example:
        >>> inference_net = fold_batchnorm(bn_net.eval())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    training = [
        n or type(model).__name__
        for n, m in model.named_modules()
        if m.training and (is_batchnorm(m) or m is model)
    ]
    if training:
        raise ValueError(
            f"fold_batchnorm needs a model in eval mode, but {training[:3]} are in training "
            "mode (BN would use batch statistics, not a fixed map); call model.eval() first"
        )
    model = copy.deepcopy(model)
    with torch.no_grad():
        if is_sequential_tree(model):
            new = _fold_sequential(model)
        else:
            new = _fold_fx(model)
    return new.eval()
