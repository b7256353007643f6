"""Export routes of eval-mode models holding bnlab BN: ``torch.export.export`` (with a
dynamic batch dim), ``torch.onnx.export`` (dynamo exporter, run in onnxruntime) and
``torch.jit.trace``.

Each route must give what eager gives (float32, max abs error <= 1e-5 on outputs of
order 1) at several batch sizes, and record inference BN (Algorithm 2, step 11): no
buffer mutated, no in-place op, no bnlab custom op, and ``training=False`` on any
batch-norm op (only torch's BN, the reference row, emits one; bnlab's is its own ATen
math). ``pytest -s`` prints the table of errors. ``torch.jit.script`` refuses bnlab BN
with the fix (tests/test_trace_script.py). The ONNX tests skip without onnxruntime,
onnx and onnxscript (the ``dev`` extra).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import bnlab.nn as bnn

BATCH = 4  # the example batch of every export; the dynamic ones are run at BATCHES
BATCHES = (1, 3, 16)
TOL = 1e-5

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SPATIAL = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}

# name: (constructor of a BN over C channels, spatial dims of its input)
MODULES = {
    "BatchNorm1d": (bnn.BatchNorm1d, 1),
    "BatchNorm2d": (bnn.BatchNorm2d, 2),
    "BatchNorm3d": (bnn.BatchNorm3d, 3),
    "SyncBatchNorm": (bnn.SyncBatchNorm, 2),  # local BN outside torch.distributed
    "BatchRenorm1d": (bnn.BatchRenorm1d, 1),
    "BatchRenorm2d": (bnn.BatchRenorm2d, 2),
    "GhostBatchNorm1d": (functools.partial(bnn.GhostBatchNorm1d, virtual_batch_size=2), 1),
    "GhostBatchNorm2d": (functools.partial(bnn.GhostBatchNorm2d, virtual_batch_size=2), 2),
    "torch BatchNorm2d": (nn.BatchNorm2d, 2),  # the reference row
}
NETS = ("conv", "residual")
ROUTES = ("torch.export", "onnxruntime", "jit.trace")

# ATen batch-norm ops and the position of their ``training`` argument (None: inference
# by definition).
BN_OPS = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit.default: 5,
    torch.ops.aten._native_batch_norm_legit_functional.default: 5,
    torch.ops.aten.native_batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit_no_training.default: None,
}


class ConvNet(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU, pool, Linear; for 1-D BN also a BN on the (N, C) output."""

    def __init__(self, make_bn, d: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            CONV[d](3, 6, 3, padding=1),
            make_bn(6),
            nn.ReLU(),
            CONV[d](6, 6, 3, stride=2, bias=False),
            make_bn(6),
            nn.ReLU(),
            POOL[d](1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(6, 5), *([make_bn(5)] if d == 1 else []))

    def forward(self, x):
        return self.head(self.features(x))


class ResidualNet(nn.Module):
    """A stem conv and one basic block: relu(x + BN(conv(relu(BN(conv(x))))))."""

    def __init__(self, make_bn, d: int, c: int = 6) -> None:
        super().__init__()
        self.stem = CONV[d](3, c, 1)
        self.conv1, self.bn1 = CONV[d](c, c, 3, padding=1, bias=False), make_bn(c)
        self.conv2, self.bn2 = CONV[d](c, c, 3, padding=1, bias=False), make_bn(c)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _model(name: str, net: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The eval-mode net with random gamma, beta and running statistics, and its input
    shape without the batch dim."""
    make_bn, d = MODULES[name]
    torch.manual_seed(0)
    model = (ConvNet if net == "conv" else ResidualNet)(make_bn, d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.num_batches_tracked.fill_(100)
    return model.eval(), (3, *SPATIAL[d])


def _inputs(shape: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(n, *shape) * 2 + 0.5 for n in BATCHES]


def _max_error(model: nn.Module, run, xs: list[torch.Tensor]) -> float:
    """Max abs difference between ``run(x)`` and eager over the inputs."""
    with torch.no_grad():
        return max((torch.as_tensor(run(x)) - model(x)).abs().max().item() for x in xs)


@pytest.fixture(scope="module")
def table():
    """Max error against eager per (module, net) and route; printed at the end (-s)."""
    errors: dict[tuple[str, str], dict[str, float]] = {}
    yield errors
    if not errors:
        return
    width = max(len(m) + len(n) for m, n in errors) + 3
    lines = [
        "",
        "max |exported - eager| (float32, batches " + ", ".join(map(str, BATCHES)) + ")",
        f"{'module / net':<{width}}" + "".join(f"{r:>14}" for r in ROUTES),
    ]
    for (module, net), row in errors.items():
        cells = "".join(f"{row[r]:>14.1e}" if r in row else f"{'-':>14}" for r in ROUTES)
        lines.append(f"{f'{module} / {net}':<{width}}{cells}")
    print("\n".join(lines))


def _record(table, name: str, net: str, route: str, err: float) -> None:
    table.setdefault((name, net), {})[route] = err
    assert err <= TOL, f"{name} in the {net} net, {route}: {err:.2e} off eager"


def _assert_inference_program(ep: torch.export.ExportedProgram) -> None:
    """No state mutated, no bnlab custom op, training=False on every batch-norm op."""
    signature = ep.graph_signature
    assert not signature.buffers_to_mutate, signature.buffers_to_mutate
    assert not signature.user_inputs_to_mutate, signature.user_inputs_to_mutate
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        assert node.target.namespace != "bnlab", f"custom op in the graph: {node.format_node()}"
        assert not node.target._schema.is_mutable, f"in-place op: {node.format_node()}"
        if node.target in BN_OPS and BN_OPS[node.target] is not None:
            assert node.args[BN_OPS[node.target]] is False, node.format_node()


DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)  # as users write it: 0 to inf


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", list(MODULES))
def test_torch_export_with_dynamic_batch_equals_eager(name, net, table):
    model, shape = _model(name, net)
    # Under no_grad, as users export for inference: where that recorded the kernels'
    # custom op (bnlab::bn_eval), ONNX conversion failed.
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(BATCH, *shape),), dynamic_shapes=DYNAMIC_BATCH)
    _assert_inference_program(ep)
    x_name = ep.graph_signature.user_inputs[0]
    x_node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == x_name)
    assert isinstance(x_node.meta["val"].shape[0], torch.SymInt), "batch dim specialized"
    _record(table, name, net, "torch.export", _max_error(model, ep.module(), _inputs(shape)))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", list(MODULES))
def test_onnx_export_runs_in_onnxruntime_equal_to_eager(name, net, table):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter is built on it
    model, shape = _model(name, net)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        program = torch.onnx.export(
            model,
            (torch.randn(BATCH, *shape),),
            dynamo=True,
            dynamic_shapes=DYNAMIC_BATCH,
            verbose=False,
        )
    graph = program.model_proto.graph
    assert len(graph.output) == 1  # no running statistics written back
    for node in graph.node:
        assert node.domain in ("", "ai.onnx"), f"custom op {node.domain}::{node.op_type}"
        if node.op_type == "BatchNormalization":  # torch's BN: inference form
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs.get("training_mode", 0) == 0 and len(node.output) == 1
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = session.get_inputs()[0].name
    err = _max_error(model, lambda x: session.run(None, {feed: x.numpy()})[0], _inputs(shape))
    _record(table, name, net, "onnxruntime", err)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_equals_eager_and_records_inference_bn(name, net, table):
    model, shape = _model(name, net)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(BATCH, *shape))
    for node in traced.inlined_graph.nodes():
        kind = node.kind()
        assert not kind.endswith("_"), f"in-place op: {node}"
        if kind == "aten::batch_norm":  # torch's BN only
            assert node.inputsAt(5).toIValue() is False, str(node)
    _record(table, name, net, "jit.trace", _max_error(model, traced, _inputs(shape)))


def test_exported_graph_does_not_depend_on_grad_mode():
    """Under no_grad the kernels' custom op (bnlab::bn_eval) was recorded, and the
    in-place forms' size test guarded the batch; with grad enabled the pure ATen path.
    Both modes now give the same portable graph."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        bnn.BatchNorm2d(4),
        bnn.GhostBatchNorm2d(4, virtual_batch_size=2),
        bnn.BatchRenorm2d(4),
        bnn.SyncBatchNorm(4),
    ).eval()
    x = torch.randn(BATCH, 3, 5, 5)
    ops = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            ep = torch.export.export(model, (x,), dynamic_shapes=DYNAMIC_BATCH)
        _assert_inference_program(ep)
        ops.append([str(n.target) for n in ep.graph.nodes if n.op == "call_function"])
    assert ops[0] == ops[1]
