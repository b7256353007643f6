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
    has_submodule,
    is_batchnorm,
    is_sequential_tree,
    matches_nonlinearity,
    module_of,
    out_features_of,
    trace,
)
from bnlab.nn.convert import check_module

__all__ = [
    "Insertion",
    "format_summary",
    "insert_batchnorm",
    "insertion_summary",
]

_SUMMARY_ATTR = "bn_insertions"


@dataclass(frozen=True)
class Insertion:
    """One BN layer added by :func:`insert_batchnorm`.

    Attributes:
        layer: qualified name of the Linear/ConvNd in the new model.
        batchnorm: qualified name of the inserted BN in the new model.
        bn_type: class name of the BN (``BatchNorm1d``, ``BatchNorm2d``, ...).
        num_features: C, the channels it normalizes.
        nonlinearity: the nonlinearity it feeds (a class, function or method name).
        bias_dropped: whether the layer had a bias that was removed (Section 3.2).
    """

    layer: str
    batchnorm: str
    bn_type: str
    num_features: int
    nonlinearity: str
    bias_dropped: bool


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_nonlinearities(nonlinearities) -> tuple:
    if isinstance(nonlinearities, (str, type)) or callable(nonlinearities):
        nonlinearities = (nonlinearities,)
    try:
        items = tuple(nonlinearities)
    except TypeError:
        raise TypeError(
            "nonlinearities must be a tuple of module types (nn.ReLU), functions "
            f"(F.relu) or tensor method names ('relu'), got {type(nonlinearities).__name__}"
        ) from None
    for n in items:
        ok = isinstance(n, str) or (isinstance(n, type) and issubclass(n, nn.Module))
        if not ok and (isinstance(n, type) or not callable(n)):
            raise TypeError(
                f"nonlinearities entries must be nn.Module subclasses (nn.ReLU), functions "
                f"(F.relu) or tensor method names ('relu'); got {n!r}"
            )
    if not items:
        raise ValueError("nonlinearities is empty; pass e.g. (nn.ReLU, nn.Sigmoid)")
    return items


def _make_bn(layer: nn.Module, momentum: float | None, eps: float) -> nn.Module:
    bn_cls = batchnorm_class_for(layer)
    w = layer.weight
    bn = bn_cls(out_features_of(layer), eps=eps, momentum=momentum, device=w.device, dtype=w.dtype)
    return bn.train(layer.training)


def _drop_bias(layer: nn.Module) -> bool:
    had_bias = getattr(layer, "bias", None) is not None
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


def _leaves(seq: nn.Sequential) -> list[tuple[nn.Sequential, nn.Module]]:
    """(container, module) for every non-Sequential module, in execution order."""
    out = []
    for child in seq:
        if type(child) is nn.Sequential:
            out += _leaves(child)
        else:
            out.append((seq, child))
    return out


# --------------------------------------------------------------------------
# The two rewriters
# --------------------------------------------------------------------------


def _insert_sequential(model: nn.Module, nonlinearities: tuple, momentum, eps) -> list[tuple]:
    """Insert in place into a tree of nn.Sequential; returns (layer, bn, nonlinearity)."""
    if type(model) is not nn.Sequential:  # a lone leaf module: nothing feeds anything
        return []
    leaves = _leaves(model)
    uses: dict[int, int] = {}
    for _, m in leaves:
        uses[id(m)] = uses.get(id(m), 0) + 1
    planned = []
    # Consecutive leaves, across nested Sequential boundaries: Sequential(Sequential(Linear),
    # Sigmoid) feeds the Linear straight into the Sigmoid too.
    for (container, layer), (_, nxt) in zip(leaves, leaves[1:]):
        if batchnorm_class_for(layer) is None or not _is_nonlinear_module(nxt, nonlinearities):
            continue
        if uses[id(layer)] > 1:
            raise ValueError(
                f"insert_batchnorm: the {type(layer).__name__} before {type(nxt).__name__} "
                "appears more than once in the model (a shared module); dropping its bias "
                "would change its other uses. Use separate modules"
            )
        planned.append((container, layer, nxt))
    inserted = []
    for container, layer, nxt in planned:
        bn = _make_bn(layer, momentum, eps)
        index = next(i for i, c in enumerate(container) if c is layer)
        container.insert(index + 1, bn)
        inserted.append((layer, bn, _nonlinearity_name(nxt)))
    return inserted


def _insert_fx(
    model: nn.Module, nonlinearities: tuple, momentum, eps
) -> tuple[fx.GraphModule, list[tuple]]:
    gm = trace(model, "insert_batchnorm")
    calls = calls_per_module(gm)
    inserted = []
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
        while has_submodule(gm, bn_name):
            bn_name += "_"
        gm.add_submodule(bn_name, bn)
        with gm.graph.inserting_after(src):
            bn_node = gm.graph.call_module(bn_name, (src,))
        node.replace_input_with(src, bn_node)
        nl = module_of(node, gm) if node.op == "call_module" else node.target
        inserted.append((layer, bn, _nonlinearity_name(nl)))
    gm.graph.lint()
    gm.recompile()
    return gm, inserted


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
    is dropped since beta replaces it: z = g(Wu + b) becomes z = g(BN(Wu)).
    Layers that feed anything else (the output layer, a residual addition) are
    left alone. The original model is not modified; the copy keeps its weights
    and each module's train/eval mode, so a BN network and its plain twin can
    start from the same initial weights.

    Nested ``nn.Sequential`` models are deep-copied and the copy is rewritten
    without tracing (the result is an ``nn.Sequential`` with the same nesting;
    a Linear at the end of an inner Sequential that feeds a nonlinearity of the
    outer one counts too).
    Any other module is traced with ``torch.fx`` (residual blocks, functional
    activations such as ``F.relu``), giving an ``fx.GraphModule``; the new BN
    layers are its submodules ``bn_<layer name>``. Custom layers take part by a
    ``batchnorm_class`` class attribute (see :func:`bnlab.graph.batchnorm_class_for`).

    Args:
        model: the network N.
        nonlinearities: what counts as a nonlinearity: module types (``nn.Sigmoid``),
            functions (``torch.sigmoid``, ``F.relu``; traced models only) and tensor
            method names (``"relu"``; traced models only). The default covers the
            common activations.
        momentum: of the new BN layers (PyTorch's convention,
            ``running = (1 - momentum) * running + momentum * batch``; None for a
            cumulative average).
        eps: of the new BN layers.

    Returns:
        The BN network N_tr. :func:`insertion_summary` lists what was inserted and
        :func:`format_summary` prints it.

    Raises:
        TypeError: ``model`` is not an nn.Module or a nonlinearity entry is invalid.
        ValueError: the model cannot be traced (the message names the module), a
            layer's output feeds more than its nonlinearity (or the layer is shared),
            or there is no Linear/ConvNd -> nonlinearity pair at all.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.Sigmoid(), nn.Linear(100, 10))
        >>> bn_net = insert_batchnorm(net)  # Flatten, Linear(no bias), BatchNorm1d, Sigmoid, Linear
        >>> [i.batchnorm for i in insertion_summary(bn_net)]
        ['2']
    """
    check_module(model, "insert_batchnorm")
    nonlinearities = _check_nonlinearities(nonlinearities)
    if is_sequential_tree(model):
        new = copy.deepcopy(model)
        inserted = _insert_sequential(new, nonlinearities, momentum, eps)
    else:
        new, inserted = _insert_fx(copy.deepcopy(model), nonlinearities, momentum, eps)
    if not inserted:
        has_bn = [n or type(model).__name__ for n, m in model.named_modules() if is_batchnorm(m)]
        if has_bn:
            raise ValueError(
                f"insert_batchnorm found nothing to do: {type(model).__name__} already has BN "
                f"({len(has_bn)} layer(s), e.g. {has_bn[0]!r}) and no Linear/ConvNd layer that "
                "feeds a nonlinearity directly; it is already a BN network"
            )
        raise ValueError(
            f"insert_batchnorm found no nonlinearity fed directly by a Linear/ConvNd layer in "
            f"{type(model).__name__}; pass the nonlinearities your model uses with "
            "nonlinearities=(...)"
        )
    names = {id(m): n for n, m in new.named_modules()}
    summary = [
        Insertion(
            names[id(layer)],
            names[id(bn)],
            type(bn).__name__,
            bn.num_features,
            nl,
            _drop_bias(layer),
        )
        for layer, bn, nl in inserted
    ]
    summary.sort(key=lambda i: list(names.values()).index(i.batchnorm))
    setattr(new, _SUMMARY_ATTR, summary)
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in new.modules()):
        warnings.warn(
            "the model has Dropout; Section 4.2.1 reduces or removes it in BN networks, "
            "since BN regularizes",
            stacklevel=2,
        )
    return new


def insertion_summary(model: nn.Module) -> list[Insertion]:
    """The BN layers :func:`insert_batchnorm` added to ``model`` (empty if none)."""
    return list(getattr(model, _SUMMARY_ATTR, []))


def format_summary(insertions: list[Insertion] | nn.Module) -> str:
    """A human-readable table of insertions, as the CLI prints it.

    Args:
        insertions: :func:`insertion_summary`'s list, or the model returned by
            :func:`insert_batchnorm`.
    """
    if isinstance(insertions, nn.Module):
        insertions = insertion_summary(insertions)
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
