"""fold_batchnorm on graphs: torch.export ExportedPrograms and torch.fx GraphModules
(Algorithm 2, step 11, in a recorded graph; pytorch#141116 and pytorch#122070).

Each folded graph must give the original's eval output (float64: max error <= 1e-12
relative to the output's largest value; float32: <= 1e-5), keep no batch-norm op or
module where one was foldable, report the others with a reason, refuse training-mode
BN, and leave its input unchanged. ``pytest -s`` prints the largest error per route.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnlab
import bnlab.nn as bnn
from bnlab.fold import BATCH_NORM_CALLS, BatchNormNotFoldedWarning, UnfoldedBatchNorm
from bnlab.graph import is_batchnorm, trace

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 1e-5}  # max |folded - original| / max |original|
ERRORS: dict[tuple[str, str], float] = {}  # (route, dtype): the largest error measured


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    print("\nfold_batchnorm on graphs, max relative error against the original eval output:")
    for (route, dtype), err in sorted(ERRORS.items()):
        print(f"  {route:7s} {dtype:8s} {err:.2e}")


def _warm(net: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (non-trivial), then eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if is_batchnorm(m):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(0.3, 3)
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
    return net.eval()


class ConvNet(nn.Module):
    def __init__(self, bn, bias=True, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups)
        self.bn = bn(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class MLP(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.fc1, self.bn1, self.fc2 = nn.Linear(16, 5), bn(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.bn1(self.fc1(x.flatten(1)))))


class Residual(nn.Module):
    """conv1 -> bn1 -> ReLU, then conv2 -> bn2 added to its input: both foldable."""

    def __init__(self, bn):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), bn(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), bn(4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + h)


class Unfoldable(nn.Module):
    """Three BN that cannot be folded: on the graph input, on a conv output the
    shortcut reads too, and after a ReLU; and one that can (bn_ok)."""

    def __init__(self, bn):
        super().__init__()
        self.bn_in, self.conv, self.bn_shared = bn(4), nn.Conv2d(4, 4, 1), bn(4)
        self.bn_relu, self.conv_ok, self.bn_ok = bn(4), nn.Conv2d(4, 4, 1), bn(4)

    def forward(self, x):
        y = self.conv(self.bn_in(x))
        z = self.bn_shared(y) + y
        return self.bn_ok(self.conv_ok(self.bn_relu(torch.relu(z))))


class Functional(nn.Module):
    """BN as a torch.nn.functional.batch_norm call on the module's own tensors."""

    def __init__(self, bn=None, training=False):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.register_buffer("mean", torch.randn(6) * 2)
        self.register_buffer("var", torch.rand(6) + 0.3)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.beta = nn.Parameter(torch.randn(6))
        self.training_arg = training

    def forward(self, x):
        z = self.conv(x)
        return F.batch_norm(
            z, self.mean, self.var, self.gamma, self.beta, self.training_arg, 0.1, 1e-3
        )


MODELS = {
    "conv": lambda bn: ConvNet(bn),
    "conv-nobias": lambda bn: ConvNet(bn, bias=False),
    "conv-groups": lambda bn: ConvNet(bn, groups=2),
    "mlp": MLP,
    "residual": Residual,
    "functional": Functional,
}
BNS = {"torch": (nn.BatchNorm2d, nn.BatchNorm1d), "bnlab": (bnn.BatchNorm2d, bnn.BatchNorm1d)}


def _make(name: str, bn_kind: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    bn2d, bn1d = BNS[bn_kind]
    net = MODELS[name](bn1d if name == "mlp" else bn2d)
    x = torch.randn(3, 4, 2, 2) if name == "mlp" else torch.randn(3, 4, 6, 6)
    return _warm(net.to(dtype)), (x * 2 + 1).to(dtype)


def _route(net: nn.Module, x: torch.Tensor, route: str):
    if route == "export":
        return torch.export.export(net, (x,))
    # torch.fx.symbolic_trace keeps torch's BN as a leaf but cannot trace bnlab's (its
    # input checks read the tensor); bnlab's tracer keeps both as leaves.
    has_bnlab = any(isinstance(m, bnn.BatchNorm2d | bnn.BatchNorm1d) for m in net.modules())
    return trace(net, "test") if has_bnlab else fx.symbolic_trace(net)


def _run(graph, x):
    with torch.no_grad():
        return (graph.module() if isinstance(graph, torch.export.ExportedProgram) else graph)(x)


def _gm(graph) -> fx.GraphModule:
    return graph.graph_module if isinstance(graph, torch.export.ExportedProgram) else graph


def _bn_count(graph) -> int:
    """Batch-norm modules, calls and ops, and nodes recorded inside a BN module."""
    gm, n = _gm(graph), 0
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if node.op == "call_module":
            n += is_batchnorm(gm.get_submodule(node.target))
        elif node.op == "call_function" and node.target in BATCH_NORM_CALLS:
            n += 1
        elif stack and "BatchNorm" in str(list(stack.values())[-1][1]):
            n += 1
    return n


def _snapshot(graph) -> tuple[str, dict]:
    sd = graph.state_dict if isinstance(graph, torch.export.ExportedProgram) else graph.state_dict()
    return _gm(graph).code, {k: v.clone() for k, v in sd.items()}


def _check_unchanged(graph, snapshot):
    code, state = snapshot
    now_code, now = _snapshot(graph)
    assert now_code == code and now.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0)


def _rel_error(got, ref) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("route", ["export", "fx"])
@pytest.mark.parametrize(
    ("name", "bn_kind"),  # F.batch_norm is torch's function: no bnlab module kind
    [(n, k) for n in MODELS for k in ("torch", "bnlab") if (n, k) != ("functional", "bnlab")],
)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_folded_graph_equals_original(name, bn_kind, route, dtype):
    net, x = _make(name, bn_kind, dtype)
    with torch.no_grad():
        ref = net(x)
    graph = _route(net, x, route)
    assert _bn_count(graph) > 0
    before = _snapshot(graph)
    folded, report = bnlab.fold_batchnorm(graph, return_report=True)
    assert isinstance(folded, torch.export.ExportedProgram if route == "export" else fx.GraphModule)
    assert report == []
    assert _bn_count(folded) == 0
    err = _rel_error(_run(folded, x), ref)
    assert err <= TOL[dtype]
    key = (route, str(dtype).removeprefix("torch."))
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    _check_unchanged(graph, before)
    if route == "export":  # no BN statistics left among the program's tensors
        assert not any("running" in k or k in ("mean", "var") for k in folded.state_dict)


@pytest.mark.parametrize("route", ["export", "fx"])
@pytest.mark.parametrize("bn_kind", ["torch", "bnlab"])
def test_unfoldable_bn_reported_with_reason(bn_kind, route):
    _, x = _make("conv", bn_kind, F64)
    net = _warm(Unfoldable(BNS[bn_kind][0]).double())
    with torch.no_grad():
        ref = net(x)
    graph = _route(net, x, route)
    before = _snapshot(graph)
    with pytest.warns(BatchNormNotFoldedWarning, match="could not fold 3 BN") as w:
        folded = bnlab.fold_batchnorm(graph)
    message = str(w[0].message)
    assert "graph input" in message and "other users" in message and "not a Linear" in message
    _, report = bnlab.fold_batchnorm(graph, return_report=True)
    assert all(isinstance(r, UnfoldedBatchNorm) for r in report)
    modules = {r.module: r.reason for r in report}
    assert set(modules) == {"bn_in", "bn_shared", "bn_relu"}
    assert "graph input" in modules["bn_in"]
    assert "other users" in modules["bn_shared"]
    assert "relu" in modules["bn_relu"]
    # The three stay: ChannelAffine in a GraphModule, inference BN in the program.
    if route == "fx":
        assert _bn_count(folded) == 0
        assert sum(type(m).__name__ == "ChannelAffine" for m in folded.modules()) == 3
    else:
        assert 0 < _bn_count(folded) < _bn_count(graph)
        owners = {k.partition(".")[0] for k in folded.state_dict}
        assert {"bn_in", "bn_shared", "bn_relu"} <= owners and "bn_ok" not in owners
    assert _rel_error(_run(folded, x), ref) <= 1e-12
    _check_unchanged(graph, before)


def test_non_constant_weight_and_no_running_stats_are_reported():
    class InputWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x, w):
            return self.bn(F.conv2d(x, w))

    net = _warm(InputWeight().double())
    x, w = torch.randn(2, 4, 5, 5, dtype=F64), torch.randn(6, 4, 3, 3, dtype=F64)
    ep = torch.export.export(net, (x, w))
    folded, report = bnlab.fold_batchnorm(ep, return_report=True)
    assert len(report) == 1 and "not a constant" in report[0].reason
    torch.testing.assert_close(folded.module()(x, w), net(x, w), rtol=0, atol=0)

    no_stats = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False))
    ep = torch.export.export(no_stats.eval(), (x.float(),))
    with pytest.warns(BatchNormNotFoldedWarning, match="track_running_stats=False"):
        folded = bnlab.fold_batchnorm(ep)
    torch.testing.assert_close(folded.module()(x.float()), no_stats(x.float()))


@pytest.mark.parametrize("bn_kind", ["torch", "bnlab"])
def test_training_mode_graphs_refused(bn_kind):
    net, x = _make("conv", bn_kind, F32)
    net.train()
    for graph in (torch.export.export(net, (x,)), _route(net, x, "fx")):
        before = _snapshot(graph)
        with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\) before"):
            bnlab.fold_batchnorm(graph)
        _check_unchanged(graph, before)
    functional = Functional(training=True).train()
    for graph in (torch.export.export(functional, (x,)), fx.symbolic_trace(functional)):
        with pytest.raises(ValueError, match="training=True"):
            bnlab.fold_batchnorm(graph)


def test_exported_program_keeps_dynamic_batch_and_decomposes():
    net, x = _make("conv-nobias", "torch", F32)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}})
    folded = bnlab.fold_batchnorm(ep)
    assert "conv.bias" in folded.state_dict  # the bias the conv did not have
    decomposed = bnlab.fold_batchnorm(ep.run_decompositions())
    assert _bn_count(decomposed) == 0
    for n in (1, 5):
        xn = torch.randn(n, 4, 6, 6)
        with torch.no_grad():
            ref = net(xn)
        for program in (folded, decomposed, folded.run_decompositions()):
            torch.testing.assert_close(program.module()(xn), ref, rtol=1e-5, atol=1e-5)


def test_graph_module_of_an_exported_program():
    """``ExportedProgram.module()``: ATen ops on get_attr weights."""
    net, x = _make("residual", "bnlab", F64)
    gm = torch.export.export(net, (x,)).module()
    folded = bnlab.fold_batchnorm(gm)
    assert _bn_count(folded) == 0
    assert _rel_error(folded(x), net(x)) <= 1e-12


def test_wrong_type_names_the_accepted_ones():
    with pytest.raises(TypeError, match="ExportedProgram"):
        bnlab.fold_batchnorm(copy.deepcopy)


def test_module_routes_return_the_same_report():
    net = nn.Sequential(nn.Linear(3, 3), bnn.BatchNorm1d(3), nn.Sequential(bnn.BatchNorm1d(3)))
    folded, report = bnlab.fold_batchnorm(net.eval(), return_report=True)
    assert [(r.module, "ChannelAffine" in r.reason) for r in report] == [("2.0", True)]
    assert isinstance(folded, nn.Module) and not folded.training
