"""Batch-normalize a network: Algorithm 2, steps 1-2, with the placement of Section 3.2.

A layer z = g(Wu + b) becomes z = g(BN(Wu)): BN goes on the pre-activation,
immediately before the nonlinearity g, and the bias b is dropped because the
mean subtraction cancels it (beta takes its role).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

from torch import fx, nn

from bnlab.graph import (
    DEFAULT_NONLINEARITIES,
    batchnorm_class_for,
    calls_per_module,
    is_sequential_tree,
    matches_nonlinearity,
    module_of,
    out_features_of,
    trace,
)

__all__ = ["Insertion", "format_summary", "insert_batchnorm", "insertion_summary"]

_SUMMARY_ATTR = "bn_insertions"


@dataclass(frozen=True)
class Insertion:
    """One BN layer added by :func:`insert_batchnorm`."""

    layer: str  # qualified name of the Linear/ConvNd in the new model
    batchnorm: str  # qualified name of the inserted BN
    bn_type: str
    num_features: int
    nonlinearity: str
    bias_dropped: bool


def _make_bn(layer: nn.Module, momentum: float | None, eps: float) -> nn.Module:
    bn_cls = batchnorm_class_for(layer)
    w = layer.weight
    return bn_cls(
        out_features_of(layer), eps=eps, momentum=momentum, device=w.device, dtype=w.dtype
    )


def _drop_bias(layer: nn.Module) -> bool:
    had_bias = layer.bias is not None
    layer.bias = None  # beta replaces it (Section 3.2)
    return had_bias


def _nonlinearity_name(n) -> str:
    if isinstance(n, nn.Module):
        return type(n).__name__
    if isinstance(n, str):
        return f".{n}()"
    return getattr(n, "__name__", str(n))


def _is_nonlinear_module(module: nn.Module, nonlinearities: tuple) -> bool:
    return any(isinstance(n, type) and isinstance(module, n) for n in nonlinearities)


def _insert_sequential(
    seq: nn.Module, prefix: str, nonlinearities: tuple, momentum, eps, out: list[Insertion]
) -> nn.Module:
    if not isinstance(seq, nn.Sequential):
        return seq
    children = list(seq.children())
    new_children: list[nn.Module] = []
    for i, child in enumerate(children):
        if isinstance(child, nn.Sequential):
            child = _insert_sequential(
                child, f"{prefix}{len(new_children)}.", nonlinearities, momentum, eps, out
            )
        new_children.append(child)
        nxt = children[i + 1] if i + 1 < len(children) else None
        if (
            batchnorm_class_for(child) is not None
            and nxt is not None
            and _is_nonlinear_module(nxt, nonlinearities)
        ):
            layer_name = f"{prefix}{len(new_children) - 1}"
            bn = _make_bn(child, momentum, eps)
            new_children.append(bn)
            out.append(
                Insertion(
                    layer_name,
                    f"{prefix}{len(new_children) - 1}",
                    type(bn).__name__,
                    bn.num_features,
                    _nonlinearity_name(nxt),
                    _drop_bias(child),
                )
            )
    new = nn.Sequential(*new_children)
    new.train(seq.training)
    return new


def _insert_fx(
    model: nn.Module, nonlinearities: tuple, momentum, eps, out: list[Insertion]
) -> fx.GraphModule:
    gm = trace(model, "insert_batchnorm")
    calls = calls_per_module(gm)
    for node in list(gm.graph.nodes):
        if not matches_nonlinearity(node, gm, nonlinearities) or not node.args:
            continue
        src = node.args[0]
        layer = module_of(src, gm) if isinstance(src, fx.Node) else None
        if layer is None or batchnorm_class_for(layer) is None:
            continue
        if len(src.users) != 1 or calls[src.target] != 1:
            raise ValueError(
                f"insert_batchnorm: the output of '{src.target}' ({type(layer).__name__}) is "
                "used by more than the nonlinearity, or the layer is called more than once; "
                "dropping its bias would change the other uses. Restructure the model so "
                "the layer feeds only its nonlinearity"
            )
        bn = _make_bn(layer, momentum, eps)
        bn_name = "bn_" + src.target.replace(".", "_")
        gm.add_submodule(bn_name, bn)
        with gm.graph.inserting_after(src):
            bn_node = gm.graph.call_module(bn_name, (src,))
        node.replace_input_with(src, bn_node)
        nl = module_of(node, gm) if node.op == "call_module" else node.target
        out.append(
            Insertion(
                src.target,
                bn_name,
                type(bn).__name__,
                bn.num_features,
                _nonlinearity_name(nl),
                _drop_bias(layer),
            )
        )
    gm.graph.lint()
    gm.recompile()
    return gm


def insert_batchnorm(
    model: nn.Module,
    nonlinearities: tuple = DEFAULT_NONLINEARITIES,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> nn.Module:
    """Return a batch-normalized copy of ``model`` (Algorithm 2, steps 1-2; Section 3.2).

    Every nonlinearity whose input comes directly from a Linear or ConvNd layer
    gets a bnlab BN layer in between (BatchNorm1d after Linear and Conv1d,
    BatchNorm2d after Conv2d, BatchNorm3d after Conv3d), and that layer's bias
    is dropped since beta replaces it. The original model is not modified; the
    copy keeps its weights, so a BN network and its plain twin can start from
    the same initial weights.

    Custom layers take part by a ``batchnorm_class`` class attribute (see
    :func:`bnlab.graph.batchnorm_class_for`). Nested ``nn.Sequential`` models are
    rewritten directly (the result is an ``nn.Sequential``); any other module is
    traced with ``torch.fx`` (residual blocks, functional activations such as
    ``F.relu``), giving a GraphModule.

    Args:
        model: the network N.
        nonlinearities: what counts as a nonlinearity: module types (``nn.Sigmoid``),
            functions (``torch.sigmoid``, ``F.relu``) and tensor method names (``"relu"``).
        momentum, eps: passed to the new BN layers.

    Returns:
        The BN network N_tr. :func:`insertion_summary` lists what was inserted.

    Raises:
        ValueError: the model cannot be traced, a layer's output feeds more than its
            nonlinearity, or there is no Linear/ConvNd -> nonlinearity pair at all.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.Sigmoid(), nn.Linear(100, 10))
        >>> bn_net = insert_batchnorm(net)  # Flatten, Linear(no bias), BatchNorm1d, Sigmoid, Linear
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert_batchnorm expects an nn.Module, got {type(model).__name__}")
    inserted: list[Insertion] = []
    if is_sequential_tree(model):
        new = _insert_sequential(
            copy.deepcopy(model), "", tuple(nonlinearities), momentum, eps, inserted
        )
    else:
        new = _insert_fx(copy.deepcopy(model), tuple(nonlinearities), momentum, eps, inserted)
    if not inserted:
        raise ValueError(
            f"insert_batchnorm found no nonlinearity fed directly by a Linear/ConvNd layer in "
            f"{type(model).__name__}; pass the nonlinearities your model uses with "
            "nonlinearities=(...)"
        )
    setattr(new, _SUMMARY_ATTR, inserted)
    if any(isinstance(m, (nn.Dropout,)) for m in new.modules()):
        warnings.warn(
            "the model has Dropout; Section 4.2.1 removes it from BN networks", stacklevel=2
        )
    return new


def insertion_summary(model: nn.Module) -> list[Insertion]:
    """The BN layers :func:`insert_batchnorm` added to ``model`` (empty if none)."""
    return list(getattr(model, _SUMMARY_ATTR, []))


def format_summary(insertions: list[Insertion]) -> str:
    """A human-readable table of insertions, as the CLI prints it."""
    if not insertions:
        return "no BN layers inserted"
    rows = [("layer", "BN inserted", "type", "features", "before", "bias dropped")]
    rows += [
        (
            i.layer,
            i.batchnorm,
            i.bn_type,
            str(i.num_features),
            i.nonlinearity,
            "yes" if i.bias_dropped else "no (had none)",
        )
        for i in insertions
    ]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{len(insertions)} BN layer(s) inserted (Algorithm 2, step 2):\n" + "\n".join(lines)
