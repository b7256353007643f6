"""fuse_batchnorm_act / unfuse_batchnorm_act, and every bnlab tool that walks BN layers
given a fused BN + activation layer (BatchNormAct*d): it keeps the activation or refuses.

All comparisons in float64, against the same network with BN and its activation as two
modules (the "plain twin", built independently of the code under test).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnlab
import bnlab.nn as bnn
from bnlab.fold import BatchNormNotFoldedWarning, ChannelAffine
from bnlab.freeze import is_frozen
from bnlab.graph import is_batchnorm
from bnlab.graph import trace as bn_trace
from bnlab.nn.batchnorm_act import _BatchNormAct
from bnlab.nn.convert import swap_module_class

F64 = torch.float64
TOL = 1e-12
ACTS = [
    ("leaky_relu", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2)),
    ("relu", None, nn.ReLU),
]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN state: gamma, beta, running statistics, num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(c, generator=g, dtype=F64) * 1.5 + 0.25)
            if m.bias is not None:
                m.bias.copy_(torch.randn(c, generator=g, dtype=F64))
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=F64))
                m.running_var.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def _x(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * 2 + 0.5).requires_grad_()


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _run(model, x, mode):
    """Output, input gradient and parameter gradients of one forward/backward in ``mode``."""
    model.train(mode == "train")
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 2, y.numel(), dtype=F64).reshape(y.shape)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return y.detach(), x.grad, grads


def _assert_same_run(a, b, x, modes=("train", "eval")):
    for mode in modes:
        ya, gxa, gpa = _run(a, x, mode)
        yb, gxb, gpb = _run(b, x, mode)
        assert _max_diff(ya, yb) <= TOL, mode
        assert _max_diff(gxa, gxb) <= TOL, mode
        assert len(gpa) == len(gpb)
        for p, q in zip(gpa, gpb):
            assert _max_diff(p, q) <= TOL, mode


def _bn_state(model):
    return [
        (m.running_mean, m.running_var, m.num_batches_tracked)
        for m in model.modules()
        if is_batchnorm(m) and m.running_mean is not None
    ]


def _assert_same_bn_state(a, b):
    sa, sb = _bn_state(a), _bn_state(b)
    assert len(sa) == len(sb) > 0
    for (ma, va, na), (mb, vb, nb) in zip(sa, sb):
        assert _max_diff(ma, mb) <= TOL and _max_diff(va, vb) <= TOL
        assert int(na) == int(nb)


def plain_seq():
    """BN layers (torch's and bnlab's, 1d/2d, nested) each followed by an activation."""
    return _randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4, 5, 1),
            bnn.BatchNorm2d(5),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(5 * 4 * 4, 6),
            nn.BatchNorm1d(6),
            nn.SiLU(),
            nn.Sequential(nn.Linear(6, 6), nn.Sequential(bnn.BatchNorm1d(6), nn.Sigmoid())),
        ).double()
    )


def fused_pair(act="leaky_relu", act_kwargs=None, make_act=None, **kw):
    """A network with fused layers, and its plain twin with the same state."""
    torch.manual_seed(0)
    fused = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        bnn.BatchNormAct2d(4, act_layer=act, act_kwargs=act_kwargs, dtype=F64, **kw),
        nn.Conv2d(4, 4, 1),
        bnn.BatchNormAct2d(4, act_layer="relu", dtype=F64),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        bnn.BatchNormAct1d(5, act_layer=act, act_kwargs=act_kwargs, dtype=F64),
    ).double()
    _randomize(fused)
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Sequential(bnn.BatchNorm2d(4), make_act()),
        nn.Conv2d(4, 4, 1),
        nn.Sequential(bnn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.Sequential(bnn.BatchNorm1d(5), make_act()),
    ).double()
    state = {}
    for k, v in fused.state_dict().items():
        idx, _, rest = k.partition(".")
        state[f"{idx}.0.{rest}" if idx in ("1", "3", "6") else k] = v
    plain.load_state_dict(state)
    return fused, plain


# --------------------------------------------------------------------------
# fuse_batchnorm_act / unfuse_batchnorm_act
# --------------------------------------------------------------------------


def test_fuse_sequential_same_outputs_gradients_state_and_report():
    ref = plain_seq()
    model = copy.deepcopy(ref)
    out, names = bnn.fuse_batchnorm_act(model, return_report=True)
    assert out is model
    assert names == ["1", "4", "8", "10.1.0"]
    assert type(model[1]) is bnn.BatchNormAct2d and type(model[1].act) is nn.LeakyReLU
    assert model[1].act.negative_slope == 0.2 and type(model[2]) is nn.Identity
    assert type(model[4]) is bnn.BatchNormAct2d and type(model[4].act) is nn.ReLU
    assert type(model[8]) is bnn.BatchNormAct1d and type(model[8].act) is nn.SiLU
    assert type(model[10][1][0]) is bnn.BatchNormAct1d and type(model[10][1][1]) is nn.Identity
    assert all(m.memory == "standard" for m in model.modules() if isinstance(m, _BatchNormAct))
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert list(sd_ref) == list(sd)
    assert all(torch.equal(sd_ref[k], sd[k]) for k in sd)
    x = _x(6, 3, 6, 6)
    _assert_same_run(ref, model, x)
    _assert_same_bn_state(ref, model)  # the training forwards updated both alike


def test_fuse_shares_state_and_keeps_settings():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=None, bias=False).double()
    _randomize(bn)
    bn.weight.requires_grad_(False)
    bn.eval()
    act = nn.LeakyReLU(0.3)
    act.train()
    model = nn.Sequential(bn, act)
    bnn.fuse_batchnorm_act(model)
    new = model[0]
    assert type(new) is bnn.BatchNormAct2d
    assert new.weight is bn.weight and new.bias is None
    assert new.running_mean is bn.running_mean and new.running_var is bn.running_var
    assert new.num_batches_tracked is bn.num_batches_tracked
    assert (new.eps, new.momentum, new.affine, new.track_running_stats) == (1e-3, None, True, True)
    assert not new.training and new.act.training  # each keeps its own flag
    assert not new.weight.requires_grad and new.running_mean.dtype == F64
    assert new.act is not act and new.act.negative_slope == 0.3

    for kw in ({"affine": False}, {"track_running_stats": False}):
        ref = _randomize(nn.Sequential(nn.BatchNorm1d(3, **kw), nn.Sigmoid()).double())
        model = bnn.fuse_batchnorm_act(copy.deepcopy(ref))
        assert type(model[0]) is bnn.BatchNormAct1d
        assert (model[0].affine, model[0].track_running_stats) == (
            ref[0].affine,
            ref[0].track_running_stats,
        )
        _assert_same_run(ref, model, _x(5, 3, 2))


def test_fuse_memory_save_only_for_invertible_activations():
    ref = _randomize(
        nn.Sequential(
            nn.Linear(3, 4),
            nn.BatchNorm1d(4),
            nn.LeakyReLU(0.2),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.BatchNorm1d(4),
            nn.LeakyReLU(0.0),
            nn.BatchNorm1d(4),
            nn.LeakyReLU(-0.5),
        ).double()
    )
    model = bnn.fuse_batchnorm_act(copy.deepcopy(ref), memory="save")
    assert [model[i].memory for i in (1, 3, 5, 7)] == ["save", "standard", "standard", "standard"]
    _assert_same_run(ref, model, _x(7, 3))
    _assert_same_bn_state(ref, model)
    with pytest.raises(ValueError, match="memory"):
        bnn.fuse_batchnorm_act(nn.Sequential(nn.BatchNorm1d(2), nn.ReLU()), memory="inplace")


class _MyReLU(nn.ReLU):
    pass


def test_fuse_leaves_what_it_must_not_fuse():
    shared = nn.BatchNorm1d(3)
    hooked = nn.BatchNorm1d(3)
    hooked.register_forward_hook(lambda *a: None)
    already = bnn.BatchNormAct1d(3, act_layer="relu")
    model = nn.Sequential(
        bnn.SyncBatchNorm(3), nn.ReLU(),
        nn.SyncBatchNorm(3), nn.ReLU(),
        bnn.GhostBatchNorm1d(3, virtual_batch_size=2), nn.ReLU(),
        bnn.BatchRenorm1d(3), nn.ReLU(),
        nn.BatchNorm1d(3), nn.Identity(),
        nn.BatchNorm1d(3), _MyReLU(),
        nn.BatchNorm1d(3), nn.GELU(),
        nn.BatchNorm1d(3), nn.Tanh(),
        shared, nn.ReLU(), shared,
        hooked, nn.ReLU(),
        already, nn.ReLU(),
        nn.ReLU(), nn.BatchNorm1d(3),
    )  # fmt: skip
    types = [type(m) for m in model]
    _, names = bnn.fuse_batchnorm_act(model, return_report=True)
    assert names == [] and [type(m) for m in model] == types


class _Block(nn.Module):
    """Activations as a shared module, functions, and a method; one BN with two users."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = bnn.BatchNorm2d(4)
        self.bn4 = nn.BatchNorm2d(4)
        self.bn5 = nn.BatchNorm2d(4)
        self.bn6 = nn.BatchNorm2d(4)
        self.tail = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.SiLU())

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = F.leaky_relu(self.bn2(self.conv2(y)), 0.1)
        z = torch.sigmoid(self.bn3(z))
        z = self.bn4(z).relu()
        w = F.silu(self.bn5(z + y))
        v = self.bn6(w)
        return self.tail(self.relu(v) + v)


def _block():
    return _randomize(_Block().double())


def test_fuse_graph_module():
    ref = _block()
    gm = bn_trace(copy.deepcopy(ref), "test")
    out, names = bnn.fuse_batchnorm_act(gm, return_report=True)
    assert out is gm
    assert names == ["bn1", "bn2", "bn3", "bn4", "bn5", "tail.1"]
    assert [type(gm.get_submodule(f"bn{i}").act) for i in range(1, 6)] == [
        nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.ReLU, nn.SiLU,
    ]  # fmt: skip
    assert gm.bn2.act.negative_slope == 0.1
    assert type(gm.bn6) is nn.BatchNorm2d  # two users: not fused
    assert type(gm.relu) is nn.ReLU  # still called after bn6
    assert type(gm.get_submodule("tail.2")) is nn.Identity  # called nowhere else
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert F.leaky_relu not in targets and torch.sigmoid not in targets and "relu" not in targets
    assert F.silu not in targets
    x = _x(2, 3, 5, 5)
    _assert_same_run(ref, gm, x)
    _assert_same_bn_state(ref, gm)

    # torch.fx's own tracer, torch's BN only
    ref = _randomize(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).double()
    )
    gm = fx.symbolic_trace(copy.deepcopy(ref))
    assert bnn.fuse_batchnorm_act(gm, return_report=True)[1] == ["1"]
    _assert_same_run(ref, gm, x)


def test_fuse_plain_module_only_in_sequentials_unless_traced():
    ref = _block()
    model = copy.deepcopy(ref)
    out, names = bnn.fuse_batchnorm_act(model, return_report=True)
    assert out is model and names == ["tail.1"]
    assert type(model.bn1) is nn.BatchNorm2d
    _assert_same_run(ref, model, _x(2, 3, 5, 5))

    model = copy.deepcopy(ref)
    gm, names = bnn.fuse_batchnorm_act(model, trace=True, return_report=True)
    assert isinstance(gm, fx.GraphModule) and len(names) == 6
    assert type(model.bn1) is nn.BatchNorm2d and type(model.tail[1]) is nn.BatchNorm2d
    _assert_same_run(ref, gm, _x(2, 3, 5, 5))
    with pytest.raises(TypeError, match="nn.Module"):
        bnn.fuse_batchnorm_act([nn.BatchNorm1d(2), nn.ReLU()])
    with pytest.raises(TypeError, match="nn.Module"):
        bnn.unfuse_batchnorm_act("model")


def test_round_trip_sequential_same_outputs_gradients_and_state():
    ref = plain_seq()
    model = bnn.unfuse_batchnorm_act(bnn.fuse_batchnorm_act(copy.deepcopy(ref)))
    assert type(model[1]) is nn.Sequential
    assert type(model[1][0]) is bnn.BatchNorm2d and type(model[1][1]) is nn.LeakyReLU
    assert type(model[2]) is nn.Identity
    renamed = {"1.": "1.0.", "4.": "4.0.", "8.": "8.0.", "10.1.0.": "10.1.0.0."}
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        prefix = next((p for p in sorted(renamed, key=len, reverse=True) if k.startswith(p)), None)
        key = renamed[prefix] + k[len(prefix) :] if prefix else k
        assert torch.equal(sd.pop(key), v), k
    assert not sd
    x = _x(6, 3, 6, 6)
    _assert_same_run(ref, model, x)
    _assert_same_bn_state(ref, model)


def test_round_trip_graph_module():
    ref = _block()
    gm = bnn.unfuse_batchnorm_act(bnn.fuse_batchnorm_act(bn_trace(copy.deepcopy(ref), "t")))
    assert isinstance(gm, fx.GraphModule)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "bn1.0" in called and "bn1.1" in called and "bn1" not in called
    assert not any(isinstance(m, _BatchNormAct) for m in gm.modules())
    _assert_same_run(ref, gm, _x(2, 3, 5, 5))
    _assert_same_bn_state(ref, gm)


@pytest.mark.parametrize("act,kw,make", ACTS)
def test_unfuse_fused_layers_with_drop_and_frozen(act, kw, make):
    fused, plain = fused_pair(act, kw, make)
    fused[1] = bnn.BatchNormAct2d(4, act_layer=act, act_kwargs=kw, drop_layer=nn.Dropout, dtype=F64)
    plain[1] = nn.Sequential(bnn.BatchNorm2d(4, dtype=F64), nn.Dropout(), make())
    _randomize(fused, 3), _randomize(plain, 3)
    bnlab.freeze_batchnorm(fused[3])
    bnlab.freeze_batchnorm(plain[3])
    ref = copy.deepcopy(fused)
    model = bnn.unfuse_batchnorm_act(fused)
    assert [type(m) for m in model[1]] == [bnn.BatchNorm2d, nn.Dropout, type(make())]
    assert is_frozen(model[3][0])
    assert not any(isinstance(m, _BatchNormAct) for m in model.modules())
    torch.manual_seed(0)
    x = _x(4, 3, 6, 6)
    _assert_same_run(plain, model, x, modes=("eval",))
    _assert_same_run(ref, model, x, modes=("eval",))
    # a lone fused layer as the root
    layer = _randomize(bnn.BatchNormAct2d(4, act_layer=act, act_kwargs=kw, dtype=F64))
    root = bnn.unfuse_batchnorm_act(copy.deepcopy(layer))
    assert type(root) is nn.Sequential and type(root[0]) is bnn.BatchNorm2d
    _assert_same_run(layer, root, _x(3, 4, 2, 2))


# --------------------------------------------------------------------------
# The converters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("act,kw,make", ACTS)
def test_replace_batchnorm_keeps_fused_layers(act, kw, make):
    fused, plain = fused_pair(act, kw, make)
    fused.insert(0, nn.BatchNorm2d(3, dtype=F64))
    plain.insert(0, nn.BatchNorm2d(3, dtype=F64))
    ref = copy.deepcopy(fused)
    out = bnn.replace_batchnorm(fused)
    assert type(out[0]) is bnn.BatchNorm2d
    assert [type(m) for m in out[1:]] == [type(m) for m in ref[1:]]
    assert type(out[2].act) is type(make())
    _assert_same_run(ref, out, _x(4, 3, 6, 6))


@pytest.mark.parametrize("act,kw,make", ACTS)
def test_converters_to_other_classes_refuse_fused_layers(act, kw, make):
    fused, plain = fused_pair(act, kw, make)
    fused.insert(0, bnn.BatchNorm2d(3, dtype=F64))
    calls = [
        (bnn.revert_batchnorm, "revert_batchnorm"),
        (bnn.convert_to_batch_renorm, "convert_to_batch_renorm"),
        (lambda m: bnn.convert_to_ghost_batchnorm(m, 2), "convert_to_ghost_batchnorm"),
        (bnn.convert_sync_batchnorm, "convert_sync_batchnorm"),
        (bnn.SyncBatchNorm.convert_sync_batchnorm, "convert_sync_batchnorm"),
    ]
    for call, tool in calls:
        with pytest.raises(
            TypeError, match=rf"{tool}: '2' is a BatchNormAct2d.*unfuse_batchnorm_act"
        ):
            call(fused)
        assert type(fused[0]) is bnn.BatchNorm2d  # refused before changing anything
    with pytest.raises(TypeError, match="unfuse_batchnorm_act"):
        swap_module_class(fused[2], bnn.BatchNorm2d)
    with pytest.raises(TypeError, match="'the model'|the model"):
        bnn.revert_batchnorm(bnn.BatchNormAct1d(3))

    # The fix the message names: unfuse, then convert; the activation stays.
    ref, ref_ghost = copy.deepcopy(fused), copy.deepcopy(fused)
    reverted = bnn.revert_batchnorm(bnn.unfuse_batchnorm_act(copy.deepcopy(fused)))
    assert type(reverted[2][0]) is nn.BatchNorm2d and type(reverted[2][1]) is type(make())
    _assert_same_run(ref, reverted, _x(4, 3, 6, 6))
    ghost = bnn.convert_to_ghost_batchnorm(bnn.unfuse_batchnorm_act(copy.deepcopy(fused)), 4)
    _assert_same_run(ref_ghost, ghost, _x(4, 3, 6, 6), modes=("eval",))


def test_revert_sync_batchnorm_leaves_fused_layers():
    fused, plain = fused_pair("leaky_relu", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2))
    fused.insert(0, bnn.SyncBatchNorm(3, dtype=F64))
    ref = copy.deepcopy(fused)
    out = bnn.revert_sync_batchnorm(fused, cls=bnn.BatchNorm2d)
    assert type(out[0]) is bnn.BatchNorm2d and type(out[2]) is bnn.BatchNormAct2d
    _assert_same_run(ref, out, _x(4, 3, 6, 6))


# --------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------


def _fold_pair():
    fused = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        bnn.BatchNormAct2d(4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.2}),
        nn.Conv2d(4, 4, 1, bias=False),
        bnn.BatchNormAct2d(4, act_layer="relu"),
        bnn.BatchNormAct2d(4, act_layer="leaky_relu"),  # no conv before it: a ChannelAffine
        nn.Conv2d(4, 4, 1),
        bnn.BatchNormAct2d(4, act_layer="silu", drop_layer=nn.Dropout),
        nn.Flatten(),
    ).double()
    return _randomize(fused).eval()


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def test_fold_sequential_keeps_the_activations():
    model = _fold_pair()
    x = _x(3, 3, 6, 6)
    folded, report = bnlab.fold_batchnorm(model, return_report=True)
    assert type(folded) is nn.Sequential
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert _count(folded, nn.LeakyReLU) == 2 and _count(folded, nn.ReLU) == 1
    assert _count(folded, nn.SiLU) == 1 and _count(folded, ChannelAffine) == 1
    assert [r.node for r in report] == ["4"]
    with torch.no_grad():
        assert _max_diff(folded(x), model(x)) <= TOL
    # a lone fused layer
    layer = _randomize(bnn.BatchNormAct2d(4, act_layer="leaky_relu", dtype=F64)).eval()
    out = bnlab.fold_batchnorm(layer)
    assert [type(m) for m in out] == [ChannelAffine, nn.LeakyReLU]
    with torch.no_grad():
        x4 = _x(2, 4, 3, 3)
        assert _max_diff(out(x4), layer(x4)) <= TOL


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = bnn.BatchNormAct2d(4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.1})
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = bnn.BatchNormAct2d(4, act_layer="relu")
        self.pre = bnn.BatchNormAct2d(4, act_layer="sigmoid")  # after the input: no fold

    def forward(self, x):
        x = self.pre(x)
        return self.bn2(self.conv2(self.bn(self.conv(x)) + x))


@pytest.mark.parametrize("as_graph", [False, True])
def test_fold_traced_and_graph_module_keep_the_activations(as_graph):
    model = _randomize(_Res().double()).eval()
    x = _x(2, 4, 5, 5)
    src = bn_trace(model, "test") if as_graph else model
    folded, report = bnlab.fold_batchnorm(src, return_report=True)
    assert isinstance(folded, fx.GraphModule)
    assert [r.module for r in report] == ["pre.0"] and "ChannelAffine" in report[0].reason
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert _count(folded, nn.LeakyReLU) == 1 and _count(folded, nn.ReLU) == 1
    assert _count(folded, nn.Sigmoid) == 1 and _count(folded, ChannelAffine) == 1
    with torch.no_grad():
        assert _max_diff(folded(x), model(x)) <= TOL
    assert type(model.bn) is bnn.BatchNormAct2d  # the input is not changed
    if as_graph:
        assert type(src.bn) is bnn.BatchNormAct2d
        with pytest.warns(BatchNormNotFoldedWarning, match="pre.0"):
            bnlab.fold_batchnorm(src)


def test_fold_exported_program_reports_fused_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        bnn.BatchNormAct2d(4, act_layer="leaky_relu"),
        nn.Conv2d(4, 4, 1),
        bnn.BatchNormAct2d(4, act_layer="identity"),
    ).double()
    model = _randomize(model).eval()
    x = _x(2, 3, 6, 6).detach()
    ep = torch.export.export(model, (x,))
    folded, report = bnlab.fold_batchnorm(ep, return_report=True)
    assert len(report) == 1 and report[0].module == "1"
    assert "fused" in report[0].reason and "fold the module before export" in report[0].reason
    with torch.no_grad():
        assert _max_diff(folded.module()(x), model(x)) <= TOL
        ep2 = torch.export.export(bnlab.fold_batchnorm(model), (x,))  # the fix it names
        assert _max_diff(ep2.module()(x), model(x)) <= TOL


# --------------------------------------------------------------------------
# freeze, insert, accumulate, population statistics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("act,kw,make", ACTS)
def test_freeze_fused_layer_like_bn_then_activation(act, kw, make):
    fused, plain = fused_pair(act, kw, make)
    for net in (fused, plain):
        bnlab.freeze_batchnorm(net)
        net.train()
    assert all(is_frozen(m) and not m.training for m in fused.modules() if is_batchnorm(m))
    assert fused[1].act.training  # the activation is no BN: it follows .train()
    before = [t.clone() for s in _bn_state(fused) for t in s]
    x = _x(4, 3, 6, 6)
    _assert_same_run(plain, fused, x, modes=("train",))
    fused.train()
    fused(x)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for s in _bn_state(fused) for t in s]))
    assert not any(
        p.requires_grad for m in fused.modules() if is_batchnorm(m) for p in m.parameters()
    )
    bnlab.unfreeze_batchnorm(fused)
    assert fused[1].training and fused[1].weight.requires_grad


def test_freeze_leaves_the_activation_parameters_alone():
    layer = bnn.BatchNormAct2d(3, act_layer=nn.PReLU, drop_layer=nn.Dropout)
    layer.act.weight.requires_grad_(True)
    model = nn.Sequential(layer)
    bnlab.freeze_batchnorm(model)
    assert not layer.weight.requires_grad and layer.act.weight.requires_grad
    model.train()
    assert not layer.training and layer.drop.training and layer.act.training
    model.eval()
    assert not layer.drop.training
    layer.act.weight.requires_grad_(False)
    bnlab.unfreeze_batchnorm(model)
    assert layer.weight.requires_grad and not layer.act.weight.requires_grad
    # fuse / unfuse keep a frozen layer frozen
    seq = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    bnlab.freeze_batchnorm(seq)
    bnn.fuse_batchnorm_act(seq)
    assert is_frozen(seq[0]) and type(seq[0]) is bnn.BatchNormAct1d
    seq.train()
    assert not seq[0].training
    bnn.unfuse_batchnorm_act(seq)
    assert is_frozen(seq[0][0]) and not seq[0][0].training


def test_insert_batchnorm_keeps_fused_layers():
    torch.manual_seed(0)
    fused = nn.Sequential(
        nn.Linear(4, 5), bnn.BatchNormAct1d(5, act_layer="leaky_relu"),
        nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2),
    ).double()  # fmt: skip
    _randomize(fused)
    plain = nn.Sequential(
        nn.Linear(4, 5), nn.Sequential(bnn.BatchNorm1d(5), nn.LeakyReLU()),
        nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2),
    ).double()  # fmt: skip
    state = {
        k.replace("1.", "1.0.", 1) if k.startswith("1.") else k: v
        for k, v in fused.state_dict().items()
    }
    plain.load_state_dict(state)
    new_f, new_p = bnlab.insert_batchnorm(fused), bnlab.insert_batchnorm(plain)
    assert type(new_f) is nn.Sequential
    assert [i.layer for i in bnlab.insert.insertion_summary(new_f)] == ["2"]
    assert type(new_f[1]) is bnn.BatchNormAct1d and type(new_f[1].act) is nn.LeakyReLU
    assert new_f[0].bias is not None  # it feeds BN already: not touched
    _assert_same_run(new_p, new_f, _x(6, 4))


@pytest.mark.parametrize("act,kw,make", ACTS)
def test_accumulate_fused_layers_like_bn_then_activation(act, kw, make):
    fused, plain = fused_pair(act, kw, make)
    x = _x(9, 3, 6, 6).detach()
    for net in (fused, plain):
        net.train()
        with bnlab.accumulate(net, micro_batches=3) as acc:
            for xb in x.split([2, 3, 4]):
                net(xb).square().sum().backward()
        assert len(acc.updated) == 3
    _assert_same_bn_state(plain, fused)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert _max_diff(p.grad, q.grad) <= TOL
    # and, for the first BN (no BN before it), equal to one forward of the whole batch
    fresh, _ = fused_pair(act, kw, make)
    with torch.no_grad():
        fresh.train()(x)
    assert _max_diff(fresh[1].running_mean, fused[1].running_mean) <= TOL
    assert _max_diff(fresh[1].running_var, fused[1].running_var) <= TOL
    assert int(fresh[1].num_batches_tracked) == int(fused[1].num_batches_tracked) == 8


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_population_stats_of_fused_layers_like_bn_then_activation(estimator):
    fused, plain = fused_pair("leaky_relu", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2))
    batches = [_x(5, 3, 6, 6, seed=s).detach() for s in range(4)]
    reports = [
        bnlab.recompute_population_stats(net, batches, estimator=estimator, progress=False)
        for net in (fused, plain)
    ]
    assert [layer.name for layer in reports[0].layers] == ["1", "3", "6"]
    assert not reports[0].unreached
    _assert_same_bn_state(plain, fused)
    assert fused.training and fused[1].act.training  # modes restored
