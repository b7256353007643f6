"""Swap PyTorch's BN modules for bnlab's and back, keeping all state; convert BN
to Batch Renorm or ghost batch normalization; fuse BN with the activation after it
(:class:`bnlab.nn.BatchNormAct2d`) and back.

A fused layer is a BN layer to ``isinstance`` (a subclass of :class:`bnlab.nn.BatchNorm2d`)
but also applies its activation, so a converter that swapped it for a plain BN class
would silently drop the activation. The converters here that build another BN class
(:func:`revert_batchnorm`, :func:`convert_to_batch_renorm`,
:func:`convert_to_ghost_batchnorm`, and :func:`bnlab.nn.convert_sync_batchnorm`) refuse
a model holding a fused layer, naming the fix (:func:`unfuse_batchnorm_act` first);
:func:`replace_batchnorm` leaves fused layers as they are (they are bnlab's already).
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnlab.core import INVERTIBLE_ACTIVATIONS
from bnlab.functional import MEMORY_MODES
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.batchnorm_act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    _BatchNormAct,
    activation_of,
)
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "convert_to_batch_renorm",
    "convert_to_ghost_batchnorm",
    "fuse_batchnorm_act",
    "map_modules",
    "replace_batchnorm",
    "revert_batchnorm",
    "swap_module_class",
    "unfuse_batchnorm_act",
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
SWAP_HOOKS: list[Callable[[nn.Module, nn.Module], None]] = []


def swap_module_class(module: nn.Module, cls: type, **extra_kwargs) -> nn.Module:
    """A new BN module of class ``cls`` with ``module``'s settings, state and mode.

    Parameters and buffers are shared with ``module`` (not copied), so the
    swap costs no memory and optimizers holding the parameters keep working.
    A SyncBatchNorm target keeps ``module``'s ``process_group`` when it has one, and
    a frozen ``module`` (:func:`bnlab.freeze_batchnorm`) gives a frozen layer.

    Raises:
        TypeError: ``module`` is a fused BN + activation layer
            (:class:`bnlab.nn.BatchNormAct2d`): the new layer would lose its activation;
            unfuse it first (:func:`unfuse_batchnorm_act`).
    """
    if isinstance(module, _BatchNormAct):
        raise TypeError(
            f"swap_module_class: {type(module).__name__} is a BN layer fused with its "
            f"activation ({type(module.act).__name__}); a {cls.__name__} would drop the "
            "activation. Unfuse first: bnlab.nn.unfuse_batchnorm_act(model)"
        )
    return _swap(module, cls, **extra_kwargs)


def _swap(module: nn.Module, cls: type, **extra_kwargs) -> nn.Module:
    """:func:`swap_module_class` without its refusal of fused layers (for unfusing)."""
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
    _share_state(module, new)
    new.train(module.training)
    _finish_swap(module, new)
    return new


def _share_state(module: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the parameters and buffers of ``module`` (the same tensors)."""
    with torch.no_grad():
        if module.affine:
            new.weight = module.weight
            if module.bias is not None:
                new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked


def _finish_swap(module: nn.Module, new: nn.Module) -> None:
    """What every swap carries over besides the state: ``qconfig``, the swap hooks."""
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    for hook in SWAP_HOOKS:
        hook(module, new)


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


def check_module(module: object, tool: str) -> None:
    """Raise TypeError naming ``tool`` unless ``module`` is an nn.Module (shared with
    bnlab.insert and bnlab.freeze; not in __all__)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{tool} expects an nn.Module, got {type(module).__name__}")


def _convert(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    def swap(m: nn.Module) -> nn.Module | None:
        cls = mapping.get(type(m))
        return None if cls is None else swap_module_class(m, cls)

    return map_modules(module, swap)


def _refuse_fused(module: nn.Module, tool: str, then: str | None = None) -> None:
    """Refuse a model holding a fused BN + activation layer, before changing anything."""
    for name, m in module.named_modules():
        if isinstance(m, _BatchNormAct):
            where = f"'{name}'" if name else "the model"
            then = then or f"bnlab.nn.{tool}(model)"
            raise TypeError(
                f"{tool}: {where} is a {type(m).__name__}, a BN layer fused with its "
                f"activation ({type(m.act).__name__}), which {tool} has no form of: it "
                "would drop the activation or leave the layer unconverted. Unfuse first: model = "
                "bnlab.nn.unfuse_batchnorm_act(model) (each fused layer becomes "
                "nn.Sequential(BN, activation), its names '<name>.0' and '<name>.1'), then "
                f"{then}"
            )


def replace_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in ``module`` by bnlab's.

    Children are replaced in place; the (possibly new) root is returned, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Parameters,
    running statistics, ``num_batches_tracked`` and train/eval mode are kept.
    Fused BN + activation layers (:class:`bnlab.nn.BatchNormAct2d`) are bnlab's
    already and stay as they are, activation included.

    Example:
        >>> model = replace_batchnorm(torchvision_model)
    """
    check_module(module, "replace_batchnorm")
    return _convert(module, _TO_BNLAB)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """The reverse of :func:`replace_batchnorm`: bnlab BN modules become PyTorch's.

    Raises:
        TypeError: the model holds a fused BN + activation layer
            (:class:`bnlab.nn.BatchNormAct2d`), which has no torch counterpart:
            ``revert_batchnorm(unfuse_batchnorm_act(model))`` reverts its BN part and keeps
            its activation (see :func:`unfuse_batchnorm_act` for the new names).
    """
    check_module(module, "revert_batchnorm")
    _refuse_fused(module, "revert_batchnorm")
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
        TypeError: a SyncBatchNorm (not supported), an unknown keyword, or a fused BN +
            activation layer (:class:`bnlab.nn.BatchNormAct2d`: Batch Renorm has no fused
            form; ``convert_to_batch_renorm(unfuse_batchnorm_act(model))`` converts its BN
            part and keeps its activation).

    Example:
        >>> model = convert_to_batch_renorm(model, warmup_steps=1000, rmax_steps=8000)
    """

    check_module(module, "convert_to_batch_renorm")
    _refuse_fused(module, "convert_to_batch_renorm")
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
        TypeError: a SyncBatchNorm (not supported), or a fused BN + activation layer
            (:class:`bnlab.nn.BatchNormAct2d`: ghost BN has no fused form;
            ``convert_to_ghost_batchnorm(unfuse_batchnorm_act(model), ...)`` converts its
            BN part and keeps its activation).
    """

    check_module(module, "convert_to_ghost_batchnorm")
    _refuse_fused(
        module, "convert_to_ghost_batchnorm", "bnlab.nn.convert_to_ghost_batchnorm(model, ...)"
    )
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


# --------------------------------------------------------------------------
# BN + activation: fuse into BatchNormAct1d/2d/3d, and back
# --------------------------------------------------------------------------

# Exact types: SyncBatchNorm, ghost BN, Batch Renorm and the fused layers themselves are
# subclasses whose forward is not plain BN.
_TO_FUSED: dict[type, type] = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}
_TO_UNFUSED: dict[type, type] = {
    BatchNormAct1d: BatchNorm1d,
    BatchNormAct2d: BatchNorm2d,
    BatchNormAct3d: BatchNorm3d,
}

# Activation calls of a traced graph a fused layer can take over: the function, and the
# module that computes the same (built from the call's arguments).
_ACT_FUNCTIONS: dict[Callable, Callable[..., nn.Module]] = {
    F.relu: lambda input, inplace=False: nn.ReLU(),
    torch.relu: lambda input: nn.ReLU(),
    F.leaky_relu: lambda input, negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope),
    F.silu: lambda input, inplace=False: nn.SiLU(),
    torch.sigmoid: lambda input: nn.Sigmoid(),
    F.sigmoid: lambda input: nn.Sigmoid(),
}
_ACT_METHODS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own (a fused layer would not run them as they were)."""
    return any(
        getattr(m, attr, None)
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
    )


def _fusable_activation(act: object) -> tuple[str, float] | None:
    """``(name, slope)`` of an activation worth fusing (not the identity), or None."""
    if not isinstance(act, nn.Module) or _has_hooks(act):
        return None
    found = activation_of(act)
    return None if found is None or found[0] == "identity" else found


def _layer_memory(activation: str, slope: float, memory: str) -> str:
    """``memory`` where the activation is invertible, else ``"standard"``."""
    invertible = activation in INVERTIBLE_ACTIVATIONS and (activation != "leaky_relu" or slope > 0)
    return memory if invertible else "standard"


def _fused_layer(bn: nn.Module, act: nn.Module, memory: str) -> nn.Module:
    """A ``BatchNormAct*d`` with ``bn``'s settings, state (shared) and mode, and a copy of
    ``act``."""
    activation, slope = activation_of(act)
    ref = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = _TO_FUSED[type(bn)](
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        act_layer=None,
        memory=_layer_memory(activation, slope, memory),
        **factory,
    )
    new.act = copy.deepcopy(act)
    if bn.affine and bn.bias is None:  # torch's BN(..., bias=False): gamma only
        new.bias = None
    _share_state(bn, new)
    new.training = bn.training  # the flag only: the copied activation keeps its own
    _finish_swap(bn, new)
    return new


def _fuse_in_sequentials(model: nn.Module, memory: str, report: list[str]) -> None:
    """Fuse, in place, every BN directly followed by a fusable activation in the same
    ``nn.Sequential`` (exact type) of ``model``, at any depth."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for prefix, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        keys = [k for k, m in seq._modules.items() if m is not None]
        for key, next_key in zip(keys, keys[1:]):
            bn, act = seq._modules[key], seq._modules[next_key]
            if type(bn) not in _TO_FUSED or uses[id(bn)] > 1 or _has_hooks(bn):
                continue
            if _fusable_activation(act) is None:
                continue
            setattr(seq, key, _fused_layer(bn, act, memory))
            setattr(seq, next_key, nn.Identity())
            report.append(f"{prefix}.{key}" if prefix else key)


def _graph_activation(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> nn.Module | None:
    """The activation module ``node`` computes from ``src`` alone, or None."""
    if not node.args or node.args[0] is not src or src in node.args[1:]:
        return None
    if src in node.kwargs.values():
        return None
    if node.op == "call_module":
        act = gm.get_submodule(node.target)
        ok = len(node.args) == 1 and not node.kwargs and _fusable_activation(act)
        return act if ok else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        make = _ACT_FUNCTIONS[node.target]
        try:
            bound = inspect.signature(make).bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        rest = [v for k, v in bound.arguments.items() if k != "input"]
        if any(isinstance(v, fx.Node) for v in rest):
            return None  # a computed slope or flag: not a constant activation
        slope = bound.arguments.get("negative_slope", 0.01)
        if isinstance(slope, bool) or not isinstance(slope, int | float):
            return None
        return make(*node.args, **node.kwargs)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target]() if len(node.args) == 1 and not node.kwargs else None
    return None


def _module_calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def _fuse_graph(gm: fx.GraphModule, memory: str, report: list[str]) -> None:
    """Fuse, in place, each BN call of ``gm`` whose only user is an activation."""
    calls = _module_calls(gm)
    uses = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        bn = gm.get_submodule(node.target)
        if type(bn) not in _TO_FUSED or calls[node.target] != 1 or uses[id(bn)] > 1:
            continue
        if _has_hooks(bn):
            continue
        user = next(iter(node.users))
        act = _graph_activation(gm, user, node)
        if act is None:
            continue
        _set_submodule(gm, node.target, _fused_layer(bn, act, memory))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        if user.op == "call_module":
            calls[user.target] -= 1
            if not calls[user.target]:  # called nowhere else: the Sequential path's Identity
                _set_submodule(gm, user.target, nn.Identity())
        report.append(node.target)
    gm.graph.lint()
    gm.recompile()


def fuse_batchnorm_act(
    model: nn.Module,
    memory: str = "standard",
    *,
    trace: bool = False,
    return_report: bool = False,
):
    """Replace each BN layer followed by its activation by one fused ``BatchNormAct*d``.

    A BN layer (torch's or bnlab's ``BatchNorm1d/2d/3d``, exact types: SyncBatchNorm,
    ghost BN, Batch Renorm and fused layers are left alone) directly followed by an
    ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU`` or ``nn.Sigmoid`` (exact types) becomes a
    :class:`bnlab.nn.BatchNormAct1d`/``2d``/``3d`` whose ``act`` is a copy of that
    activation, and the activation's place gets an ``nn.Identity()``: the model computes
    the same, with one fused layer instead of two. The new layer keeps the BN's settings
    (eps, momentum, affine, track_running_stats), mode, device and dtype, and shares its
    parameters and buffers (not copied, as :func:`swap_module_class`: optimizers keep
    working, ``requires_grad`` and ``num_batches_tracked`` are kept, state-dict keys
    are unchanged); a frozen BN (:func:`bnlab.freeze_batchnorm`) gives a frozen layer.

    Where the pairs are found:

    * ``nn.Sequential`` (exact type), at any nesting: the BN at index i and the
      activation at index i + 1 of the same Sequential.
    * ``torch.fx.GraphModule``: a BN module call whose only user is an activation module
      call, or a ``F.relu``/``torch.relu``/``F.leaky_relu`` (constant slope)/``F.silu``/
      ``torch.sigmoid`` call, or ``.relu()``/``.sigmoid()``; the graph is rewritten and
      recompiled (the activation node is removed; an activation module no other node
      calls becomes ``nn.Identity()``).
    * any other module: only inside the ``nn.Sequential`` containers it holds, which
      assumes each is called as a whole (a model that calls ``seq[i]`` itself must not be
      fused this way); or, with ``trace=True``, by tracing it with torch.fx
      (:func:`bnlab.graph.trace`), which returns a new GraphModule (the model is not
      changed, the GraphModule shares its parameters and buffers).

    Left unfused (the model still computes the same): a BN module used in more than one
    place or called more than once, a BN whose output has other users, a BN or an
    activation with hooks of its own, and activations of another type (subclasses,
    ``nn.GELU``, ...).

    Args:
        model: the network; changed in place (except with ``trace=True``).
        memory: ``"standard"`` or ``"save"``. ``"save"`` (InPlace-ABN: keep only the
            output for the backward) applies to layers whose activation is invertible,
            ``nn.LeakyReLU`` with a positive slope; the other layers of the same model
            (ReLU, SiLU, Sigmoid) get ``memory="standard"``.
        trace: fuse a model that is neither an ``nn.Sequential`` nor a GraphModule by
            tracing it with torch.fx.
        return_report: return ``(model, names)``, the qualified names of the fused layers
            (where the BN layers were), instead of the model alone.

    Returns:
        The model (the same object, except with ``trace=True``), or ``(model, names)``.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: an unknown ``memory``, or ``trace=True`` and the model cannot be traced.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = fuse_batchnorm_act(net)   # Conv2d, BatchNormAct2d(act=ReLU), Identity
    """
    check_module(model, "fuse_batchnorm_act")
    if memory not in MEMORY_MODES:
        raise ValueError(
            f"memory={memory!r}: use 'standard' (keep the input for the backward) or 'save' "
            "(keep only the output, for layers with an invertible activation)"
        )
    report: list[str] = []
    if isinstance(model, fx.GraphModule):
        _fuse_graph(model, memory, report)
    elif trace and type(model) is not nn.Sequential:
        from bnlab.graph import trace as fx_trace  # bnlab.graph imports bnlab.nn

        model = fx_trace(model, "fuse_batchnorm_act")
        _fuse_graph(model, memory, report)
    else:
        _fuse_in_sequentials(model, memory, report)
    return (model, report) if return_report else model


# split_fused_layer and refuse_fused_subclasses are shared with bnlab.fold (which
# folds a fused layer's BN part and keeps its activation); not in __all__.
def split_fused_layer(m: nn.Module) -> nn.Sequential:
    """``nn.Sequential(bn, [drop,] act)`` computing what the fused layer ``m`` computes."""
    parts = [_swap(m, _TO_UNFUSED[type(m)])]
    if type(m.drop) is not nn.Identity:
        parts.append(m.drop)
    parts.append(m.act)
    seq = nn.Sequential(*parts)
    seq.training = m.training
    return seq


def refuse_fused_subclasses(model: nn.Module, tool: str) -> None:
    """Refuse a subclass of a fused layer (before changing anything): its forward may
    compute something other than BN followed by its activation."""
    for name, m in model.named_modules():
        if isinstance(m, _BatchNormAct) and type(m) not in _TO_UNFUSED:
            where = f"'{name}'" if name else "the model"
            raise TypeError(
                f"{tool}: {where} is a {type(m).__name__}, a subclass of a fused BN + "
                "activation layer; its forward may differ from BN followed by its "
                "activation, so it is not split into the two"
            )


def _unfuse_modules(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Sequential]]:
    """Every fused layer of ``model`` replaced (in place) by its
    :func:`split_fused_layer`; the root, and the new Sequentials by the id of the fused
    layer they replace."""
    made: dict[int, nn.Sequential] = {}

    def split(m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _BatchNormAct):
            return None
        if id(m) not in made:  # a layer used in two places: one Sequential for both
            made[id(m)] = split_fused_layer(m)
        return made[id(m)]

    return map_modules(model, split), made


def _split_graph_calls(gm: fx.GraphModule, made: dict[int, nn.Sequential]) -> None:
    """Each call of a Sequential in ``made`` becomes calls of its parts, in order."""
    new = {id(s) for s in made.values()}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or id(gm.get_submodule(node.target)) not in new:
            continue
        seq = gm.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs:
            continue  # left calling the Sequential, which computes the same
        out = node.args[0]
        with gm.graph.inserting_before(node):
            for key in seq._modules:
                out = gm.graph.call_module(f"{node.target}.{key}", (out,))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def unfuse_batchnorm_act(model: nn.Module) -> nn.Module:
    """The inverse of :func:`fuse_batchnorm_act`: each fused layer becomes BN, then its activation.

    Each :class:`bnlab.nn.BatchNormAct1d`/``2d``/``3d`` is replaced, where it was, by
    ``nn.Sequential(bn, act)`` (``nn.Sequential(bn, drop, act)`` when it has a ``drop``
    layer): ``bn`` a :class:`bnlab.nn.BatchNorm1d`/``2d``/``3d`` with the fused layer's
    settings, mode and state (parameters and buffers shared, not copied; frozen stays
    frozen), ``act`` and ``drop`` the fused layer's own modules. Module names change:
    the layer ``name`` becomes ``name.0`` (its BN: state-dict keys ``name.0.weight``, ...)
    and ``name.1`` (its activation; ``name.2`` after a drop layer). In a
    ``torch.fx.GraphModule`` the call of the fused layer becomes a call of each part (the
    nodes ``name.0``, ``name.1``), so graph tools see a plain BN module call; the graph is
    recompiled. An ``nn.Identity`` that :func:`fuse_batchnorm_act` left in the
    activation's place stays. Changed in place; the (possibly new) root is returned.

    Raises:
        TypeError: ``model`` is not an nn.Module, or holds a subclass of a fused layer
            (whose forward may compute something else).
    """
    check_module(model, "unfuse_batchnorm_act")
    refuse_fused_subclasses(model, "unfuse_batchnorm_act")
    model, made = _unfuse_modules(model)
    if isinstance(model, fx.GraphModule) and made:
        _split_graph_calls(model, made)
    return model
