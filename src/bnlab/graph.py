"""Shared helpers for rewriting networks: which modules are BN, linear layers,
nonlinearities, and how to trace a general module with torch.fx."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import fx, nn

import bnlab.nn.batchnorm as bnlab_bn

# Layers computing Wu (+ b) whose output BN may follow (Section 3.2), and the BN class
# that normalizes their output: per feature for Linear/Conv1d, per feature map for ConvNd.
LINEAR_LAYERS: dict[type, type] = {
    nn.Linear: bnlab_bn.BatchNorm1d,
    nn.Conv1d: bnlab_bn.BatchNorm1d,
    nn.Conv2d: bnlab_bn.BatchNorm2d,
    nn.Conv3d: bnlab_bn.BatchNorm3d,
}


def batchnorm_class_for(layer: nn.Module) -> type | None:
    """The BN class to follow ``layer``, or None if it is no Wu (+ b) layer.

    Custom layers opt in with a class attribute ``batchnorm_class`` (and expose
    ``out_features`` or ``out_channels`` and a ``bias`` that may be set to None).
    """
    return LINEAR_LAYERS.get(type(layer)) or getattr(type(layer), "batchnorm_class", None)


def out_features_of(layer: nn.Module) -> int:
    """Width of the layer's output along the channel dim 1."""
    return layer.out_features if hasattr(layer, "out_features") else layer.out_channels


NONLINEAR_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SELU,
    nn.CELU,
    nn.PReLU,
)
NONLINEAR_FUNCTIONS: tuple = (
    TF.relu,
    torch.relu,
    TF.relu6,
    torch.sigmoid,
    TF.sigmoid,
    torch.tanh,
    TF.tanh,
    TF.gelu,
    TF.silu,
    TF.elu,
    TF.leaky_relu,
    TF.softplus,
    TF.mish,
    TF.hardtanh,
    TF.hardswish,
    TF.selu,
)
NONLINEAR_METHODS: tuple[str, ...] = ("relu", "sigmoid", "tanh")

DEFAULT_NONLINEARITIES: tuple = NONLINEAR_MODULES + NONLINEAR_FUNCTIONS + NONLINEAR_METHODS


def is_batchnorm(module: nn.Module) -> bool:
    """True for PyTorch's and bnlab's BN modules (including SyncBatchNorm)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, bnlab_bn._BatchNorm))


def is_sequential_tree(module: nn.Module) -> bool:
    """True when every container in ``module`` is an nn.Sequential (no custom forward)."""
    children = list(module.children())
    if not children:
        return True
    return isinstance(module, nn.Sequential) and all(is_sequential_tree(c) for c in children)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with bnlab's BN modules kept as leaves like torch's own."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, purpose: str) -> fx.GraphModule:
    """Symbolically trace ``model``, with a clear error when it cannot be traced."""
    try:
        graph = _Tracer().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
        raise ValueError(
            f"{purpose} could not trace {type(model).__name__} with torch.fx "
            f"({type(e).__name__}: {e}). Models with data-dependent control flow are not "
            "supported; express the network as nn.Sequential, or make the offending module "
            "traceable"
        ) from e


def matches_nonlinearity(node: fx.Node, gm: fx.GraphModule, nonlinearities: tuple) -> bool:
    """Whether an fx node applies one of ``nonlinearities`` (types, functions, method names)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return any(isinstance(n, type) and isinstance(mod, n) for n in nonlinearities)
    if node.op == "call_function":
        return any(node.target is n for n in nonlinearities if not isinstance(n, (type, str)))
    if node.op == "call_method":
        return node.target in [n for n in nonlinearities if isinstance(n, str)]
    return False


def module_of(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def calls_per_module(gm: fx.GraphModule) -> dict[str, int]:
    """How many graph nodes call each submodule (shared modules are called more than once)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts
