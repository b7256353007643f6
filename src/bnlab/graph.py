"""Shared helpers for rewriting networks: which modules are BN, linear layers,
nonlinearities, and how to trace a general module with torch.fx."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.softplus,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.selu,
)
NONLINEAR_METHODS: tuple[str, ...] = ("relu", "sigmoid", "tanh")

DEFAULT_NONLINEARITIES: tuple = NONLINEAR_MODULES + NONLINEAR_FUNCTIONS + NONLINEAR_METHODS


def is_batchnorm(module: nn.Module) -> bool:
    """True for PyTorch's and bnlab's BN modules (including SyncBatchNorm)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, bnlab_bn._BatchNorm))


def is_sequential_tree(module: nn.Module) -> bool:
    """Every container is an nn.Sequential, so execution order is the child order.

    A BN layer is a leaf, even one with submodules (a fused BN + activation layer,
    :class:`bnlab.nn.BatchNormAct2d`, holds its ``act`` and ``drop``).
    """
    children = list(module.children())
    if not children or is_batchnorm(module):
        return not isinstance(module, nn.ModuleList | nn.ModuleDict)
    return type(module) is nn.Sequential and all(is_sequential_tree(c) for c in children)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with bnlab's BN modules kept as leaves like torch's own, and
    custom layers that declare a ``batchnorm_class`` (they stand for a Linear/ConvNd,
    e.g. :class:`bnlab.models.mlp.SeedBatchedLinear`, whose forward fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        custom_layer = getattr(type(m), "batchnorm_class", None) is not None
        return is_batchnorm(m) or custom_layer or super().is_leaf_module(m, qualname)


class _LocatingTracer(_Tracer):
    """bnlab's tracer that remembers which submodule was being traced when it failed."""

    def __init__(self) -> None:
        super().__init__()
        self._stack: list[str] = []
        self.failed_in: list[str] | None = None

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m) if m is not self.root else ""
        self._stack.append(f"'{name}' ({type(m).__name__})" if name else type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self._stack)
            raise
        finally:
            self._stack.pop()


def trace(model: nn.Module, purpose: str) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx, BN modules kept as leaves.

    Args:
        model: the module to trace.
        purpose: the caller's name, for the error message.

    Returns:
        A GraphModule with ``model``'s submodules, parameters, buffers and mode.

    Raises:
        ValueError: the model cannot be traced (for example data-dependent control
            flow); the message names the innermost submodule being traced.
    """
    tracer = _LocatingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ...
        where = type(model).__name__
        if tracer.failed_in:
            where = f"{tracer.failed_in[-1]} inside {type(model).__name__}"
        raise ValueError(
            f"{purpose} could not trace {where} with torch.fx "
            f"({type(e).__name__}: {e}). Models with data-dependent control flow are not "
            "supported; express the network as nn.Sequential, or make that module "
            "traceable (no Python control flow on tensor values)"
        ) from e
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.train(model.training)
    for name, sub in model.named_modules():  # keep each submodule's own mode
        if name and has_submodule(gm, name):
            gm.get_submodule(name).training = sub.training
    return gm


def has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


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
