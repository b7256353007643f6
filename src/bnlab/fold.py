"""Inference BN folded into neighbouring layers: Algorithm 2, step 11.

At inference BN is the fixed per-channel affine map
y = scale * x + shift with scale = gamma / sqrt(Var[x] + eps) and
shift = beta - gamma * E[x] / sqrt(Var[x] + eps)
(:func:`bnlab.functional.inference_affine`). Composed with a preceding
z = W u + b it gives z' = (scale * W) u + (scale * b + shift): one layer.

:func:`fold_batchnorm` applies this to a module, to a ``torch.fx.GraphModule``
and to a ``torch.export.ExportedProgram``; the weights are folded in one place,
:func:`_fold_weights`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import operator
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.export import ExportedProgram, ExportGraphSignature
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

import bnlab.functional as BF
import bnlab.nn.batchnorm as bnlab_bn
from bnlab.graph import LINEAR_LAYERS, calls_per_module, is_batchnorm, is_sequential_tree, trace
from bnlab.nn.batchnorm_act import _BatchNormAct
from bnlab.nn.convert import refuse_fused_subclasses, split_fused_layer, unfuse_batchnorm_act

__all__ = [
    "BatchNormNotFoldedWarning",
    "ChannelAffine",
    "UnfoldedBatchNorm",
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
            x = x - BF.channel_view(self.center, x)
        return torch.addcmul(BF.channel_view(self.shift, x), x, BF.channel_view(self.scale, x))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


@dataclasses.dataclass
class UnfoldedBatchNorm:
    """A BN that :func:`fold_batchnorm` could not compose into a Linear/ConvNd.

    Attributes:
        node: the graph node (for a bnlab BN in an exported graph, the node that
            gives its output); for a module folded directly, its qualified name.
        module: qualified name of the BN module, where the graph records it.
        reason: why it could not be folded.
    """

    node: str
    module: str | None
    reason: str

    def __str__(self) -> str:
        where = f"'{self.node}'" + (f" (module '{self.module}')" if self.module else "")
        return f"{where}: {self.reason}"


class BatchNormNotFoldedWarning(UserWarning):
    """Some BN of a graph stayed an inference BN or a ChannelAffine (listed with reasons)."""


def _check_running_stats(bn: nn.Module) -> None:
    if bn.running_mean is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False, so it normalizes with batch "
            "statistics even in eval mode and is no fixed map; it cannot be folded"
        )


def _affine_of(bn: nn.Module) -> tuple[Tensor, Tensor]:
    _check_running_stats(bn)
    return BF.inference_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    linear: bool,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Weights and bias of a Linear/ConvNd followed by inference BN: Algorithm 2, step 11.

    W' = scale * W and b' = scale * (b - E[x]) + beta with scale = gamma / sqrt(Var[x] +
    eps) (:func:`bnlab.functional.inference_affine`). The bias subtracts the mean before
    scaling, as torch's fusion computes it, so a layer whose bias carries a large mean
    (|mean| >> std) keeps its precision; scale * b + (beta - scale * E[x]) would cancel.
    Every route of :func:`fold_batchnorm` folds through here.

    Returns:
        ``(W', b')`` in ``weight``'s dtype.
    """
    scale, _ = BF.inference_affine(running_mean, running_var, gamma, beta, eps)
    rm = running_mean.detach()
    centered = -rm if bias is None else bias.detach().to(rm.dtype) - rm
    beta = torch.zeros_like(rm) if beta is None else beta.detach()
    fold = fold_linear_bn_weights if linear else fold_conv_bn_weights
    w, b = fold(weight.detach(), centered, scale.detach(), beta)
    return w.to(weight.dtype), b.to(weight.dtype)


def _with_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    # requires_grad as torch's fuse_conv_bn_weights sets it: the layer's own flags,
    # and False for a bias the layer did not have.
    has_bias = layer.bias is not None
    new.weight = nn.Parameter(weight, layer.weight.requires_grad)
    new.bias = nn.Parameter(bias, has_bias and layer.bias.requires_grad)
    return new


def _fused(layer: nn.Module, bn: nn.Module) -> nn.Module:
    _check_running_stats(bn)
    w, b = _fold_weights(
        layer.weight,
        layer.bias,
        isinstance(layer, nn.Linear),
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        bn.eps,
    )
    return _with_weights(layer, w, b)


def _features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return type(layer) in LINEAR_LAYERS and _features(layer) == bn.num_features


def _to_affine(bn: nn.Module) -> ChannelAffine:
    scale, _ = _affine_of(bn)
    beta = torch.zeros_like(scale) if bn.bias is None else bn.bias
    return ChannelAffine(scale, beta, bn.running_mean)


def _parts(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]``; for a fused BN + activation layer, its BN part (under its
    name), then its drop layer and activation, which stay after the folded BN."""
    if not isinstance(module, _BatchNormAct):
        return [(name, module)]
    bn, *rest = split_fused_layer(module)
    return [(name, bn), *((f"{name}.{i}", m) for i, m in enumerate(rest, 1))]


def _fold_sequential(
    module: nn.Module, report: list[UnfoldedBatchNorm], prefix: str = ""
) -> nn.Module:
    if isinstance(module, _BatchNormAct):  # a lone fused layer: BN, then its activation
        bn, *rest = split_fused_layer(module)
        return nn.Sequential(_fold_sequential(bn, report, prefix or type(module).__name__), *rest)
    if is_batchnorm(module):
        name = prefix or type(module).__name__
        why = "no Linear/ConvNd directly before it; now a ChannelAffine"
        report.append(UnfoldedBatchNorm(name, name, why))
        return _to_affine(module)
    if not isinstance(module, nn.Sequential):
        return module
    out: list[nn.Module] = []
    for name, child in module.named_children():
        for part_name, part in _parts(f"{prefix}.{name}" if prefix else name, child):
            if is_batchnorm(part) and out and _foldable(out[-1], part):
                out[-1] = _fused(out[-1], part)
            else:
                out.append(_fold_sequential(part, report, part_name))
    return nn.Sequential(*out)


# --------------------------------------------------------------------------
# Graphs: torch.fx GraphModules and torch.export ExportedPrograms
# --------------------------------------------------------------------------

aten = torch.ops.aten

# Batch-norm calls in a graph: torch.nn.functional.batch_norm (torch.fx) and the ATen
# ops torch.export records (aten.batch_norm before decomposition, the others after).
# True: the op returns a tuple whose element 0 is the output.
BATCH_NORM_CALLS: dict[Callable, bool] = {
    F.batch_norm: False,
    aten.batch_norm.default: False,
    aten._native_batch_norm_legit_no_training.default: True,
    aten._native_batch_norm_legit_functional.default: True,
    aten._native_batch_norm_legit.default: True,
    aten._native_batch_norm_legit.no_stats: True,
    aten.native_batch_norm.default: True,
}

# Wu (+ b) calls whose output BN may be folded into: (input, weight, bias, ...) for all.
# True: a linear layer (weight (out, in)); False: a ConvNd (weight (out, in/groups, *k)).
LAYER_CALLS: dict[Callable, bool] = {
    F.linear: True,
    aten.linear.default: True,
    F.conv1d: False,
    F.conv2d: False,
    F.conv3d: False,
    aten.conv1d.default: False,
    aten.conv2d.default: False,
    aten.conv3d.default: False,
    aten.conv1d.padding: False,
    aten.conv2d.padding: False,
    aten.conv3d.padding: False,
    aten.convolution.default: False,
}

# What bnlab's eval BN is made of in an exported graph (its pure ATen path): the affine
# map gamma * (x - E[x]) * rsqrt(Var[x] + eps) + beta, and dtype casts and reshapes.
_INFERENCE_MAP_OPS = frozenset(
    {
        aten._assert_tensor_metadata.default,
        aten.to.dtype,
        aten.to.dtype_layout,
        aten._to_copy.default,
        aten.clone.default,
        aten.alias.default,
        aten.reshape.default,
        aten.view.default,
        aten.unsqueeze.default,
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.addcmul.default,
        aten.rsqrt.default,
        aten.sqrt.default,
        aten.reciprocal.default,
    }
)
_NO_STATS = (
    "it keeps no running statistics (track_running_stats=False), so it normalizes with "
    "batch statistics even in eval mode and is no fixed map"
)
_CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default})


class _ModuleConsts:
    """The constant tensors of a GraphModule: attributes read by ``get_attr`` nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.mutated: set[str] = set()

    def name(self, node: object) -> str | None:
        return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None

    def value(self, node: object) -> Tensor | None:
        name = self.name(node)
        if name is None:
            return None
        parent, _, attr = name.rpartition(".")
        value = getattr(self.gm.get_submodule(parent), attr, None)
        return value if isinstance(value, Tensor) else None

    def set(self, node: fx.Node, value: Tensor) -> None:
        parent, _, attr = node.target.rpartition(".")
        owner = self.gm.get_submodule(parent)
        old = getattr(owner, attr)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(value, old.requires_grad))
        elif attr in owner._buffers:
            owner._buffers[attr] = value  # keeps the buffer's persistence
        else:
            setattr(owner, attr, value)

    def add(self, weight: fx.Node, value: Tensor, before: fx.Node) -> fx.Node:
        """A new parameter beside ``weight`` (the bias a layer did not have)."""
        parent, _, _ = weight.target.rpartition(".")
        owner = self.gm.get_submodule(parent)
        attr, i = "bias", 0
        while hasattr(owner, attr):
            i += 1
            attr = f"bias_folded_{i}"
        owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(f"{parent}.{attr}" if parent else attr)

    def drop(self, node: fx.Node) -> None:
        """Erase an unused ``get_attr`` node, and its tensor when nothing else reads it."""
        name = node.target
        self.gm.graph.erase_node(node)
        graph = self.gm.graph
        if any(self.name(n) == name for n in graph.nodes) or any(
            n.op == "call_module" and name.startswith(f"{n.target}.") for n in graph.nodes
        ):
            return
        parent, _, attr = name.rpartition(".")
        delattr(self.gm.get_submodule(parent), attr)


class _ProgramConsts:
    """The constant tensors of an ExportedProgram: parameters, buffers and lifted constants
    enter its graph as placeholders, and the graph signature names the tensor of each."""

    def __init__(self, ep: ExportedProgram, gm: fx.GraphModule):
        self.ep, self.gm = ep, gm
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        # The copy of the graph may rename nodes (a placeholder "input" becomes "input_1"):
        # the specs follow the copy's names, by position.
        self.renamed = {
            old.name: new.name
            for old, new in zip(ep.graph.nodes, gm.graph.nodes, strict=True)
            if old.name != new.name
        }
        self.specs = {s.arg.name: s for s in map(self._renamed, ep.graph_signature.input_specs)}
        self.mutated = set(ep.graph_signature.buffers_to_mutate.values())

    def _renamed(self, spec):
        if isinstance(spec.arg, TensorArgument) and spec.arg.name in self.renamed:
            return dataclasses.replace(spec, arg=TensorArgument(self.renamed[spec.arg.name]))
        return spec

    def _spec(self, node: object) -> InputSpec | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        spec = self.specs.get(node.name)
        if spec is None or spec.kind not in (
            InputKind.PARAMETER,
            InputKind.BUFFER,
            InputKind.CONSTANT_TENSOR,
        ):
            return None
        return spec

    def _store(self, spec: InputSpec) -> dict:
        in_state = spec.kind == InputKind.PARAMETER or (
            spec.kind == InputKind.BUFFER and spec.persistent
        )
        return self.state_dict if in_state else self.constants

    def name(self, node: object) -> str | None:
        spec = self._spec(node)
        return None if spec is None else spec.target

    def value(self, node: object) -> Tensor | None:
        spec = self._spec(node)
        if spec is None:
            return None
        value = self._store(spec).get(spec.target)
        return value if isinstance(value, Tensor) else None

    def set(self, node: fx.Node, value: Tensor) -> None:
        spec = self._spec(node)
        old = self._store(spec)[spec.target]
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, old.requires_grad)
        self._store(spec)[spec.target] = value

    def add(self, weight: fx.Node, value: Tensor, before: fx.Node) -> fx.Node:
        """A new parameter placeholder beside ``weight``'s (the bias a layer did not have)."""
        parent, _, _ = self._spec(weight).target.rpartition(".")
        target, i = f"{parent}.bias" if parent else "bias", 0
        while target in self.state_dict or target in self.constants:
            i += 1
            target = f"{parent}.bias_folded_{i}" if parent else f"bias_folded_{i}"
        # After the last parameter placeholder: the signature lists parameters first.
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        params = [n for n in placeholders if self.specs[n.name].kind == InputKind.PARAMETER]
        where = self.gm.graph.inserting_after(params[-1]) if params else None
        with where or self.gm.graph.inserting_before(placeholders[0]):
            node = self.gm.graph.placeholder("p_" + target.replace(".", "_"))
        node.target = node.name  # as torch's lift_constants_pass names placeholders
        node.meta["val"] = weight.meta["val"].fake_mode.from_tensor(value, static_shapes=True)
        self.specs[node.name] = InputSpec(
            InputKind.PARAMETER, TensorArgument(node.name), target, persistent=None
        )
        self.state_dict[target] = nn.Parameter(value, requires_grad=False)
        return node

    def drop(self, node: fx.Node) -> None:
        """Erase an unused placeholder, its spec, and its tensor when nothing else reads it."""
        spec = self.specs.pop(node.name)
        self.gm.graph.erase_node(node)
        if all(s.target != spec.target for s in self.specs.values()):
            self._store(spec).pop(spec.target, None)

    def program(self) -> ExportedProgram:
        placeholders = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        # The output specs follow the output node by position: a folded BN's output is now
        # its layer's.
        outputs = self.gm.graph.output_node().args[0]
        signature = ExportGraphSignature(
            input_specs=[self.specs[name] for name in placeholders],
            output_specs=[
                dataclasses.replace(s, arg=TensorArgument(n.name))
                if isinstance(s.arg, TensorArgument) and isinstance(n, fx.Node)
                else s
                for s, n in zip(self.ep.graph_signature.output_specs, outputs, strict=True)
            ],
        )
        return ExportedProgram(
            root=self.gm,
            graph=self.gm.graph,
            graph_signature=signature,
            state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.ep.range_constraints),
            module_call_graph=_deepcopy(self.ep.module_call_graph),
            example_inputs=self.ep.example_inputs,
            constants=self.constants,
            verifiers=self.ep.verifiers,
        )


_Consts = _ModuleConsts | _ProgramConsts


def _deepcopy(obj):
    with warnings.catch_warnings():
        # Copying pytree TreeSpecs (a graph's in/out specs) makes torch warn about its own
        # use of a deprecated isinstance; nothing the caller can act on.
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        return copy.deepcopy(obj)


@dataclasses.dataclass
class _GraphBatchNorm:
    """One BN found in a graph, as :func:`_fold_graph` needs it."""

    node: str  # the node named in the report
    module: str | None  # the BN module's qualified name, where known
    input: object  # the node BN normalizes
    output: fx.Node | None  # the node whose uses the folded layer takes over
    nodes: list[fx.Node]  # every node of the BN, in graph order
    stats: tuple | None = None  # (running_mean, running_var, gamma, beta, eps)
    consts: list[fx.Node] = dataclasses.field(default_factory=list)  # its parameters and buffers
    submodule: nn.Module | None = None  # a call_module BN
    why_not: str | None = None  # why it cannot be folded whatever precedes it


def _module_fqn(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _call_arguments(node: fx.Node) -> dict:
    """The arguments of a call_function node by parameter name (no defaults filled in)."""
    if isinstance(node.target, torch._ops.OpOverload):
        names = [a.name for a in node.target._schema.arguments]
    else:
        names = list(inspect.signature(node.target).parameters)
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def _mutates(node: fx.Node) -> bool:
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return True
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def _stats_of(
    consts: _Consts, nodes: list[object], eps: float
) -> tuple[tuple | None, list[fx.Node], str | None]:
    """(running_mean, running_var, gamma, beta, eps), the const nodes, or why not."""
    values = [None if n is None else consts.value(n) for n in nodes]
    missing = [str(n) for n, v in zip(nodes, values, strict=True) if n is not None and v is None]
    if missing:
        why = f"its statistics or affine parameters {missing} are not constants of the graph"
        return None, [], why + " (graph inputs or computed tensors)"
    if values[0] is None or values[1] is None:
        return None, [], _NO_STATS
    own = [n for n in nodes if n is not None]
    name = consts.name(nodes[0])
    if name is not None:  # the module's step counter, which inference does not read
        counter = f"{name.rpartition('.')[0]}.num_batches_tracked".lstrip(".")
        own += [n for n in nodes[0].graph.nodes if consts.name(n) == counter and not n.users]
    return (*values, float(eps)), own, None


def _call_module_batchnorm(gm: fx.GraphModule, node: fx.Node) -> _GraphBatchNorm:
    bn = gm.get_submodule(node.target)
    why = _NO_STATS if bn.running_mean is None else None
    stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return _GraphBatchNorm(
        node.name, node.target, node.args[0], node, [node], stats, submodule=bn, why_not=why
    )


def _call_function_batchnorm(
    consts: _Consts, node: fx.Node, training: list[str]
) -> _GraphBatchNorm | None:
    args = _call_arguments(node)
    tensors = [args.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    if args.get("training", False) and tensors[0] is not None:
        training.append(node.name)
    bn = _GraphBatchNorm(node.name, _module_fqn(node), args["input"], node, [node])
    if BATCH_NORM_CALLS[node.target]:  # a tuple: take element 0, the others must be unused
        items = [u for u in node.users if u.target is operator.getitem]
        outputs = [u for u in items if u.args[1] == 0]
        if len(items) != len(node.users) or len(outputs) > 1:
            bn.why_not = "the batch-norm op's output is used other than through getitem"
        elif any(u.users for u in items if u.args[1] != 0):
            bn.why_not = "the batch-norm op's saved statistics (outputs 1 and up) are used"
        bn.output = outputs[0] if outputs else None
        bn.nodes = [node, *items]
    if bn.output is None:
        return None  # its output is unused: nothing to fold
    bn.stats, bn.consts, why = _stats_of(consts, tensors, args.get("eps", 1e-5))
    bn.why_not = bn.why_not or why
    return bn


def _module_class(entry: object) -> type | None:
    """The class an ``nn_module_stack`` entry names (a class, or its qualified name)."""
    if isinstance(entry, type):
        return entry
    module, _, name = str(entry).rpartition(".")
    if not module.startswith("bnlab."):
        return None  # only bnlab's BN needs this; torch's records a batch-norm op
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _bnlab_regions(gm: fx.GraphModule) -> list[tuple[str, type, list[fx.Node]]]:
    """Nodes recorded inside one call of a bnlab BN module (by ``nn_module_stack``),
    where that call produced no batch-norm op: its pure ATen path."""
    regions: dict[str, tuple[str, type, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        key, (fqn, entry) = list(stack.items())[-1]
        cls = _module_class(entry)
        if cls is not None and issubclass(cls, bnlab_bn._BatchNorm):
            regions.setdefault(key, (fqn, cls, []))[2].append(node)
    return [r for r in regions.values() if not any(n.target in BATCH_NORM_CALLS for n in r[2])]


def _eps_in(nodes: list[fx.Node], running_var: fx.Node) -> float | None:
    """eps of ``rsqrt(Var[x] + eps)``: the scalar added to the (cast) running variance."""
    derived = {running_var}
    for n in nodes:
        if n.target in _CASTS and n.args[0] in derived:
            derived.add(n)
        elif n.target is aten.add.Tensor and n.args[0] in derived:
            if isinstance(n.args[1], int | float):
                return float(n.args[1])
    return None


def _region_batchnorm(
    consts: _Consts, fqn: str, cls: type, nodes: list[fx.Node], training: list[str]
) -> _GraphBatchNorm:
    inside = set(nodes)
    external: dict[fx.Node, None] = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg not in inside:
                external[arg] = None
    prefix = f"{fqn}." if fqn else ""
    own: dict[str, fx.Node] = {}
    inputs = []
    for arg in external:
        name = consts.name(arg)
        if name is not None and name.startswith(prefix) and "." not in name[len(prefix) :]:
            own[name[len(prefix) :]] = arg
        else:
            inputs.append(arg)
    # A cast to the input's own dtype returns the input itself, and export then records
    # later reads of that tensor (a shortcut) as reads of the cast: such aliases are the
    # input, not outputs of the BN.
    aliases: set[fx.Node] = set()
    for n in nodes:
        if n.target in _CASTS and n.args[0] in {*inputs[:1], *aliases} and len(inputs) == 1:
            aliases.add(n)
    leaked = [n.name for n in aliases if any(u not in inside for u in n.users)]
    outputs = [n for n in nodes if n not in aliases and any(u not in inside for u in n.users)]
    if any(_mutates(n) for n in nodes) or any(
        f"{prefix}{b}" in consts.mutated for b in ("running_mean", "running_var")
    ):
        training.append(f"{fqn} ({cls.__name__})")
    bn = _GraphBatchNorm(
        outputs[-1].name if outputs else nodes[-1].name,
        fqn,
        inputs[0] if len(inputs) == 1 else None,
        outputs[0] if len(outputs) == 1 else None,
        nodes,
    )
    unknown = sorted({str(n.target) for n in nodes} - {str(t) for t in _INFERENCE_MAP_OPS})
    eps = _eps_in(nodes, own["running_var"]) if "running_var" in own else None
    if len(inputs) != 1 or len(outputs) != 1:
        bn.why_not = (
            f"bnlab {cls.__name__} was recorded with {len(inputs)} inputs and {len(outputs)} "
            "outputs (one call of one module expected)"
        )
    elif leaked:
        bn.why_not = (
            f"the output of '{inputs[0]}' has other users besides this BN (through "
            f"{leaked}); folding would change what they see"
        )
    elif "running_mean" not in own or "running_var" not in own:
        bn.why_not = _NO_STATS
    elif unknown and issubclass(cls, _BatchNormAct):
        bn.why_not = (
            f"bnlab {cls.__name__} (BN fused with its activation) was recorded with its "
            f"activation ({unknown}), which folding would drop; fold the module before "
            "export, which keeps the activation: "
            "torch.export.export(bnlab.fold_batchnorm(model.eval()), args)"
        )
    elif unknown or eps is None:
        bn.why_not = (
            f"bnlab {cls.__name__} was recorded as ATen ops that are not the plain inference "
            f"map{f' ({unknown})' if unknown else ''}; fold the module before export: "
            "torch.export.export(bnlab.fold_batchnorm(model.eval()), args)"
        )
    else:
        tensors = [own.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
        bn.stats, bn.consts, bn.why_not = _stats_of(consts, tensors, eps)
    return bn


def _find_batchnorms(gm: fx.GraphModule, consts: _Consts) -> list[_GraphBatchNorm]:
    """Every BN of the graph; raises if one is in training mode."""
    found: list[_GraphBatchNorm] = []
    training: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_batchnorm(gm.get_submodule(node.target)):
            if gm.get_submodule(node.target).training:
                training.append(node.target)
            found.append(_call_module_batchnorm(gm, node))
        elif node.op == "call_function" and node.target in BATCH_NORM_CALLS:
            bn = _call_function_batchnorm(consts, node, training)
            if bn is not None:
                found.append(bn)
    for fqn, cls, nodes in _bnlab_regions(gm):
        found.append(_region_batchnorm(consts, fqn, cls, nodes, training))
    if training:
        raise ValueError(
            f"fold_batchnorm needs BN in eval mode, but {training[:3]} are in training mode "
            "in the graph (training=True: BN would use batch statistics and update its "
            "running ones, not a fixed map); call model.eval() before torch.export.export "
            "or tracing"
        )
    return found


def _sole_reader(consts: _Consts, node: fx.Node, user: fx.Node) -> bool:
    """Whether ``node``'s tensor is read only by ``user`` (so it may be overwritten)."""
    name = consts.name(node)
    readers = [n for n in user.graph.nodes if consts.name(n) == name]
    return readers == [node] and set(node.users) == {user}


def _fold_into_layer(gm: fx.GraphModule, consts: _Consts, bn: _GraphBatchNorm) -> str | None:
    """Compose ``bn`` into the Linear/ConvNd before it; returns why not where it cannot."""
    src = bn.input
    if not isinstance(src, fx.Node):
        return "its input is no node of the graph"
    if src.op == "placeholder" and consts.name(src) is None:
        return f"its input is the graph input '{src.name}', not a Linear/ConvNd output"
    others = [u.name for u in src.users if u not in bn.nodes]
    if src.op == "call_module" and type(gm.get_submodule(src.target)) in LINEAR_LAYERS:
        layer = gm.get_submodule(src.target)
        linear = isinstance(layer, nn.Linear)
        weight, bias = layer.weight, layer.bias
        if calls_per_module(gm)[src.target] != 1:
            return f"the layer '{src.target}' is called more than once (a shared module)"
    elif src.op == "call_function" and src.target in LAYER_CALLS:
        linear = LAYER_CALLS[src.target]
        w_node = src.args[1] if len(src.args) > 1 else src.kwargs.get("weight")
        b_node = src.args[2] if len(src.args) > 2 else src.kwargs.get("bias")
        weight = consts.value(w_node)
        bias = None if b_node is None else consts.value(b_node)
        if src.target is aten.convolution.default and src.args[6]:
            return f"'{src.name}' is a transposed convolution (weight dim 1 is its output)"
        if weight is None or (b_node is not None and bias is None):
            return (
                f"the weight or bias of '{src.name}' is not a constant of the graph "
                "(a graph input or a computed tensor)"
            )
        if not _sole_reader(consts, w_node, src) or (
            b_node is not None and not _sole_reader(consts, b_node, src)
        ):
            return f"the weight or bias of '{src.name}' is shared with other nodes"
    else:
        what = src.target if src.op == "call_module" else getattr(src.target, "__name__", src.op)
        return f"it follows '{src.name}' ({what}), not a Linear/ConvNd"
    if others:
        return (
            f"the output of '{src.name}' has other users besides this BN ({others}); "
            "folding would change what they see"
        )
    running_mean, running_var, gamma, beta, eps = bn.stats
    if weight.shape[0] != running_mean.numel():
        return (
            f"'{src.name}' has {weight.shape[0]} output channels but the BN normalizes "
            f"{running_mean.numel()}"
        )
    w, b = _fold_weights(weight, bias, linear, running_mean, running_var, gamma, beta, eps)
    if src.op == "call_module":
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, _with_weights(layer, w, b))
    else:
        consts.set(w_node, w)
        if b_node is not None:
            consts.set(b_node, b)
        elif len(src.args) >= 2 and "bias" not in src.kwargs:  # bias positional (or absent)
            src.args = (*src.args[:2], consts.add(w_node, b, src), *src.args[3:])
        else:
            src.kwargs = {**src.kwargs, "bias": consts.add(w_node, b, src)}
    bn.output.replace_all_uses_with(src)
    for node in reversed(bn.nodes):
        gm.graph.erase_node(node)
    for node in bn.consts:
        if not node.users and node.graph is gm.graph:
            consts.drop(node)
    return None


def _fold_graph(gm: fx.GraphModule, consts: _Consts) -> list[UnfoldedBatchNorm]:
    """Fold every BN of ``gm`` (edited in place) that it can; report the others."""
    report = []
    if isinstance(consts, _ModuleConsts):
        # A fused BN + activation call becomes calls of its BN ('<name>.0') and activation
        # ('<name>.1'): the BN folds like any other, the activation stays after the layer.
        unfuse_batchnorm_act(gm)
    for bn in _find_batchnorms(gm, consts):
        why = bn.why_not or _fold_into_layer(gm, consts, bn)
        if why is None:
            continue
        if bn.submodule is not None and bn.submodule.running_mean is not None:
            why += "; now a ChannelAffine"
            parent, _, name = bn.module.rpartition(".")
            setattr(gm.get_submodule(parent), name, _to_affine(bn.submodule))
        report.append(UnfoldedBatchNorm(bn.node, bn.module, why))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return report


def _fold_module(model: nn.Module) -> tuple[nn.Module, list[UnfoldedBatchNorm]]:
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
    for m in model.modules():
        if is_batchnorm(m):
            _check_running_stats(m)
    refuse_fused_subclasses(model, "fold_batchnorm")
    model = copy.deepcopy(model)
    report: list[UnfoldedBatchNorm] = []
    with torch.no_grad():
        if is_sequential_tree(model):
            new = _fold_sequential(model, report)
        else:
            new = trace(model, "fold_batchnorm")
            report = _fold_graph(new, _ModuleConsts(new))
    return new.eval(), report


def fold_batchnorm(
    model: nn.Module | fx.GraphModule | ExportedProgram, *, return_report: bool = False
):
    """A new inference model with every BN folded away (Algorithm 2, step 11).

    Each eval-mode BN directly after a Linear or ConvNd (with or without bias,
    any ``groups``) is composed into that layer's weights and bias
    (W' = scale * W, b' = scale * (b - E[x]) + beta, scale = gamma / sqrt(Var[x] + eps)).
    The input is never changed. In float64 the result's output equals the
    original's eval output to rounding (about 1e-15 relative).

    ``model`` may be:

    * an ``nn.Module`` (bnlab's or PyTorch's BN): nested ``nn.Sequential`` is
      rewritten directly, other models through ``torch.fx``; any BN not directly
      after a Linear/ConvNd becomes a :class:`ChannelAffine`. Returns a module in
      eval mode.
    * a ``torch.fx.GraphModule`` (``torch.fx.symbolic_trace``, bnlab's
      :func:`bnlab.graph.trace`, ``ExportedProgram.module()``): BN as a module call,
      as a ``torch.nn.functional.batch_norm`` call or as an ATen batch-norm op is
      folded into a Linear/ConvNd module call, ``F.linear``/``F.convNd`` call or ATen
      ``linear``/``convNd``/``convolution`` op whose weight and bias are attributes
      (``get_attr``). Returns a new GraphModule; an unfoldable BN module becomes a
      :class:`ChannelAffine`, an unfoldable op stays.
    * a ``torch.export.ExportedProgram`` (``torch.export.export(model.eval(), args)``):
      the same in its ATen graph, where weights are parameter placeholders.
      Returns a new ExportedProgram (same inputs, outputs, dynamic shapes): the
      layer's parameters hold the folded values under their names (a layer without
      bias gets a ``<layer>.bias`` parameter), the BN's parameters and buffers are
      gone; an unfoldable BN stays an inference batch-norm op.

    torch's BN exports as ``aten.batch_norm`` (``_native_batch_norm_legit_no_training``
    after ``run_decompositions()``). bnlab's BN exports as its own ATen math
    (``rsqrt(Var[x] + eps)``, ``x - E[x]``, ``addcmul``), which is recognized by the
    module it was recorded in (``nn_module_stack``) and folded when it is that plain
    inference map. Where it is not, fold the module first:
    ``torch.export.export(bnlab.fold_batchnorm(model.eval()), args)``.

    A fused BN + activation layer (:class:`bnlab.nn.BatchNormAct2d`) folds its BN part
    and keeps its activation (and ``drop`` layer) after the folded layer: in a module or a
    GraphModule it is split first as :func:`bnlab.nn.unfuse_batchnorm_act` splits it (in
    a graph its BN is the node of module ``<name>.0``, its activation ``<name>.1``); where
    its BN cannot be folded it becomes a :class:`ChannelAffine` followed by the
    activation. In an ExportedProgram, whose graph records the fused activation inside the
    layer's ops, such a layer is not folded and is reported (fold the module before
    export).

    A BN of a graph that cannot be folded (its input is no Linear/ConvNd output, that
    output has other users, the layer's weight is not a constant or is shared, no
    running statistics, ...) is reported with the reason: a
    :class:`BatchNormNotFoldedWarning` listing every such node, or the report returned
    with ``return_report=True``.

    Args:
        model: the eval-mode model, GraphModule or ExportedProgram.
        return_report: return ``(folded, report)``, ``report`` a list of
            :class:`UnfoldedBatchNorm` (also for modules), instead of warning.

    Returns:
        The folded model, GraphModule or ExportedProgram; with ``return_report``,
        ``(folded, report)``.

    Raises:
        TypeError: ``model`` is none of the three.
        ValueError: a BN is in training mode (``training=True`` in the graph), a BN module
            keeps no running statistics, or a module cannot be traced.

    Example:
        >>> inference_net = fold_batchnorm(bn_net.eval())
        >>> ep = fold_batchnorm(torch.export.export(bn_net.eval(), (x,)))
    """
    if isinstance(model, ExportedProgram):
        gm = _deepcopy(model.graph_module)
        consts = _ProgramConsts(model, gm)
        with torch.no_grad():
            report = _fold_graph(gm, consts)
        new = consts.program()
    elif isinstance(model, fx.GraphModule):
        refuse_fused_subclasses(model, "fold_batchnorm")
        new = _deepcopy(model)
        with torch.no_grad():
            report = _fold_graph(new, _ModuleConsts(new))
    elif isinstance(model, nn.Module):
        new, report = _fold_module(model)
    else:
        raise TypeError(
            "fold_batchnorm expects an nn.Module, a torch.fx.GraphModule or a "
            f"torch.export.ExportedProgram, got {type(model).__name__}"
        )
    if return_report:
        return new, report
    if report and isinstance(model, fx.GraphModule | ExportedProgram):
        warnings.warn(
            f"fold_batchnorm could not fold {len(report)} BN into a Linear/ConvNd; they stay "
            "(an inference BN, or a ChannelAffine for a BN module): "
            + "; ".join(str(r) for r in report),
            BatchNormNotFoldedWarning,
            stacklevel=2,
        )
    return new
