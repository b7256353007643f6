"""Fused BN + activation (bnlab.nn.BatchNormAct*d, bnlab.functional.batch_norm_act)
against float64 math written out here: Algorithm 1, then the activation, differentiated
by autograd in float64. Every layout the kernels take (contiguous, channels_last, 2-D)
and odd strides, both memory modes, both paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
import bnlab.functional as BF
import bnlab.nn
from bnlab import backend

ACTS = ("identity", "relu", "leaky_relu", "silu", "sigmoid")


@pytest.fixture(autouse=True)
def always_fused(monkeypatch):
    """The small test inputs take the fused kernels too (not the small-input route)."""
    monkeypatch.setattr(BF, "FUSE_ABOVE", 0)


SLOPE = 0.2
PATHS = ("compiled", "torch")


def _act64(z, act, slope=SLOPE):
    return {
        "identity": lambda t: t,
        "relu": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
        "leaky_relu": lambda t: torch.where(t > 0, t, t * slope),
        "silu": lambda t: t / (1 + torch.exp(-t)),
        "sigmoid": lambda t: 1 / (1 + torch.exp(-t)),
    }[act](z)


def reference(x, w, b, act, gy, eps=1e-5, slope=SLOPE):
    """y, dx, dw, db of f(BN(x)) in float64: the formulas of Algorithm 1, then f."""
    x, w, b = (t.detach().double().contiguous().requires_grad_() for t in (x, w, b))
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    z = (x - mu) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)
    y = _act64(z, act, slope)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy.double())
    return y.detach(), dx, dw, db


def layouts():
    """(name, make(x64) -> tensor of that layout, shape of the contiguous source)."""
    cl4 = torch.channels_last
    cl5 = torch.channels_last_3d
    return [
        ("2d", lambda t: t, (33, 7)),
        ("3d", lambda t: t, (5, 6, 7)),
        ("4d", lambda t: t, (4, 6, 5, 3)),
        ("4d-cl", lambda t: t.contiguous(memory_format=cl4), (4, 6, 5, 3)),
        ("5d-cl", lambda t: t.contiguous(memory_format=cl5), (2, 3, 2, 3, 4)),
        ("one-channel", lambda t: t, (3, 1, 5, 5)),
        # (N, L, C) data viewed as (N, C, L, 1): channels_last-dense with a size-1 dim
        ("transpose-unsqueeze", lambda t: t.transpose(1, 2).unsqueeze(-1), (4, 10, 3)),
        ("strided-slice", lambda t: t[:, :, ::2], (4, 5, 12)),
        ("permuted", lambda t: t.permute(0, 3, 1, 2), (3, 4, 5, 6)),
    ]


def _case(name, make, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = make(torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1)
    c = x.shape[1]
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    w[0] = -w[0]  # a negative gamma: the inverse of memory="save" must keep its sign
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    gy = make(torch.randn(shape, generator=gen, dtype=torch.float64))
    return x.to(dtype), w.to(dtype), b.to(dtype), gy.to(dtype)


def _run(x, w, b, gy, act, memory, slope=SLOPE):
    xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    ws, bs = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = BF.batch_norm_act(xs, None, None, ws, bs, True, 0.1, 1e-5, act, slope, memory)
    y.backward(gy)
    return y, xs.grad, ws.grad, bs.grad


def _rel(a, r):
    return ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-300)).item()


def _modes(act):
    return ("standard", "save") if act in ("identity", "leaky_relu") else ("standard",)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", ACTS)
def test_fused_float64_matches_the_math_on_every_layout(path, act):
    worst = 0.0
    with backend.using(path):
        for name, make, shape in layouts():
            for memory in _modes(act):
                x, w, b, gy = _case(name, make, shape, torch.float64)
                got = _run(x, w, b, gy, act, memory)
                want = reference(x, w, b, act, gy)
                errs = [_rel(g, r) for g, r in zip(got, want)]
                assert max(errs) < 1e-12, (name, memory, errs)
                assert got[0].shape == x.shape and got[1].shape == x.shape
                worst = max(worst, *errs)
    print(f"{path} {act}: worst relative error {worst:.1e}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", ACTS)
def test_fused_float32_is_as_precise_as_torch(path, act):
    """float32 against float64 math on the same (rounded) inputs; torch's BN followed by
    the activation, in float32, sets the bar (with a factor 4 of slack)."""
    with backend.using(path):
        for name, make, shape in layouts():
            for memory in _modes(act):
                x, w, b, gy = _case(name, make, shape, torch.float32, seed=1)
                got = _run(x, w, b, gy, act, memory)
                want = reference(x, w, b, act, gy)
                xt = x.detach().clone().requires_grad_()
                wt, bt = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
                yt = _act64(F.batch_norm(xt, None, None, wt, bt, True, 0.1, 1e-5), act)
                yt.backward(gy)
                torch_errs = [_rel(t, r) for t, r in zip((yt, xt.grad, wt.grad, bt.grad), want)]
                for g, r, te, what in zip(got, want, torch_errs, ("y", "dx", "dw", "db")):
                    assert _rel(g, r) <= max(4 * te, 1e-5), (name, memory, what, _rel(g, r), te)


@pytest.mark.parametrize("path", PATHS)
def test_half_precision_inputs(path):
    """bfloat16/float16 input with float32 parameters (torch's mixed precision)."""
    with backend.using(path):
        for dtype in (torch.bfloat16, torch.float16):
            for act in ("relu", "leaky_relu", "silu"):
                for memory in _modes(act):
                    x, w, b, gy = _case("4d-cl", layouts()[3][1], (4, 6, 5, 3), torch.float64)
                    xh, gyh = x.to(dtype), gy.to(dtype)
                    y, dx, dw, db = _run(xh, w.float(), b.float(), gyh, act, memory)
                    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
                    want = reference(xh, w.float(), b.float(), act, gyh)
                    tol = 0.05 if dtype == torch.bfloat16 else 0.01
                    for g, r in zip((y, dx, dw, db), want):
                        assert _rel(g, r) < tol, (dtype, act, memory)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("act", "memory"),
    [
        ("relu", "standard"),
        ("silu", "standard"),
        ("sigmoid", "standard"),
        ("leaky_relu", "save"),
        ("identity", "save"),
        ("leaky_relu", "standard"),
    ],
)
def test_gradcheck(path, act, memory):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return BF.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, act, SLOPE, memory)

    with backend.using(path):
        assert torch.autograd.gradcheck(f, (x, w, b))
        if memory == "standard":
            assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_of_memory_save_is_refused_with_the_fix():
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    layer = bnlab.nn.BatchNormAct1d(3, act_layer="leaky_relu", memory="save").double()
    with pytest.raises(RuntimeError, match="memory='standard'"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def _saved_storages(fn):
    """Data pointers of every tensor autograd saves while fn runs (a forward)."""
    ptrs = []

    def pack(t):
        ptrs.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, ptrs


@pytest.mark.parametrize("path", PATHS)
def test_memory_save_keeps_only_the_output(path):
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    big = x.numel() * x.element_size()
    with backend.using(path):
        for memory, keeps in (("standard", "input"), ("save", "output")):
            layer = bnlab.nn.BatchNormAct2d(4, act_layer="leaky_relu", memory=memory)
            y, saved = _saved_storages(lambda layer=layer: layer(x))
            large = {p for p, n in saved if n >= big}
            expected = x if keeps == "input" else y
            assert large == {expected.untyped_storage().data_ptr()}, (memory, saved)


@pytest.mark.parametrize("path", PATHS)
def test_memory_save_with_a_zero_gamma_keeps_the_input_and_stays_exact(path):
    x, w, b, gy = _case("4d", layouts()[2][1], (4, 6, 5, 3), torch.float64)
    w[2] = 0.0
    with backend.using(path):
        got = _run(x, w, b, gy, "leaky_relu", "save")
    for g, r in zip(got, reference(x, w, b, "leaky_relu", gy)):
        assert _rel(g, r) < 1e-12


@pytest.mark.parametrize("act", ["relu", "silu", "sigmoid"])
def test_memory_save_refuses_activations_without_an_inverse(act):
    with pytest.raises(ValueError, match="invertible"):
        bnlab.nn.BatchNormAct2d(4, act_layer=act, memory="save")
    with pytest.raises(ValueError, match="invertible"):
        BF.batch_norm_act(
            torch.randn(4, 3), None, None, training=True, activation=act, memory="save"
        )
    with pytest.raises(ValueError, match="negative_slope"):
        bnlab.nn.BatchNormAct2d(
            4, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.0}, memory="save"
        )


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="one of identity, relu"):
        bnlab.nn.BatchNormAct2d(4, act_layer="gelu_tanh")
    with pytest.raises(ValueError, match="'standard'"):
        bnlab.nn.BatchNormAct2d(4, memory="low")
    with pytest.raises(TypeError, match="nn.Module class"):
        bnlab.nn.BatchNormAct2d(4, act_layer=3)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        BF.batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="tanh")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("cls", "ref_cls", "shape"),
    [
        (bnlab.nn.BatchNormAct1d, nn.BatchNorm1d, (16, 5)),
        (bnlab.nn.BatchNormAct2d, nn.BatchNorm2d, (4, 5, 3, 3)),
        (bnlab.nn.BatchNormAct3d, nn.BatchNorm3d, (2, 5, 2, 3, 3)),
    ],
)
def test_module_is_torch_bn_then_the_activation_in_train_and_eval(path, cls, ref_cls, shape):
    torch.manual_seed(0)
    for act_layer, torch_act in (
        ("relu", nn.ReLU()),
        (nn.LeakyReLU, nn.LeakyReLU(0.3)),
        ("swish", nn.SiLU()),
        (nn.Sigmoid, nn.Sigmoid()),
    ):
        kwargs = {"negative_slope": 0.3} if act_layer is nn.LeakyReLU else None
        ours = cls(5, momentum=None, act_layer=act_layer, act_kwargs=kwargs).double()
        ref = ref_cls(5, momentum=None).double()
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
        with backend.using(path):
            for _ in range(3):
                x = torch.randn(shape, dtype=torch.float64) * 2 + 1
                torch.testing.assert_close(ours(x), torch_act(ref(x)), rtol=1e-12, atol=1e-12)
            for key, value in ref.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-13, atol=0)
            ours.eval()
            ref.eval()
            x = torch.randn(shape, dtype=torch.float64)
            torch.testing.assert_close(ours(x), torch_act(ref(x)), rtol=1e-12, atol=1e-12)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), torch_act(ref(x)), rtol=1e-12, atol=1e-12)


def test_timm_compatible_constructor_and_state_dict():
    layer = bnlab.nn.BatchNormAct2d(
        8,
        1e-3,
        0.05,
        True,
        True,
        apply_act=True,
        act_layer=nn.LeakyReLU,
        act_kwargs={"negative_slope": 0.1},
        inplace=False,
        drop_layer=None,
    )
    assert isinstance(layer, nn.BatchNorm2d) and isinstance(layer.act, nn.LeakyReLU)
    assert layer.act.negative_slope == 0.1 and isinstance(layer.drop, nn.Identity)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(8).state_dict())
    torch_bn = nn.BatchNorm2d(8)
    torch_bn.running_mean.normal_()
    layer.load_state_dict(torch_bn.state_dict())  # a torch (or timm) checkpoint loads as is
    torch.testing.assert_close(layer.running_mean, torch_bn.running_mean)
    assert isinstance(bnlab.nn.BatchNormAct2d(8, apply_act=False).act, nn.Identity)
    assert "memory='save'" in repr(
        bnlab.nn.BatchNormAct2d(8, act_layer="leaky_relu", memory="save")
    )


def test_other_activation_or_drop_layer_runs_unfused_with_the_same_result():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    layer = bnlab.nn.BatchNormAct2d(3).double()
    layer.act = nn.GELU()  # not one the kernels fuse
    ref = nn.BatchNorm2d(3).double()
    torch.testing.assert_close(layer(x), F.gelu(ref(x)), rtol=1e-12, atol=1e-12)

    class Scale(nn.Module):
        def forward(self, t):
            return 2 * t

    layer = bnlab.nn.BatchNormAct2d(3, act_layer="silu", drop_layer=Scale).double()
    torch.testing.assert_close(layer(x), F.silu(2 * ref(x)), rtol=1e-12, atol=1e-12)


def test_trace_in_eval_matches_eager():
    layer = bnlab.nn.BatchNormAct2d(3, act_layer="leaky_relu").eval()
    layer.running_mean.normal_()
    x = torch.randn(2, 3, 4, 4)
    traced = torch.jit.trace(layer, x)
    y = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(traced(y), layer(y))


def test_script_refuses_with_a_fix_that_works():
    import copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.nn.BatchNormAct2d(4, act_layer="leaky_relu"))
    model.eval()
    with pytest.raises(RuntimeError, match="unfuse_batchnorm_act"):
        torch.jit.script(model)
    scripted = torch.jit.script(
        bnlab.nn.revert_batchnorm(bnlab.nn.unfuse_batchnorm_act(copy.deepcopy(model)))
    )
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("path", PATHS)
def test_small_inputs_route_through_bn_then_activation_with_the_same_math(path, monkeypatch):
    monkeypatch.setattr(BF, "FUSE_ABOVE", 1 << 16)
    with backend.using(path):
        for act in ACTS:
            x, w, b, gy = _case("2d", layouts()[0][1], (60, 100), torch.float64)
            got = _run(x, w, b, gy, act, "standard")
            for g, r in zip(got, reference(x, w, b, act, gy)):
                assert _rel(g, r) < 1e-12
            # memory="save" keeps its promise at every size: only the output is saved
            layer = bnlab.nn.BatchNormAct1d(100, act_layer="leaky_relu", memory="save")
            xs = torch.randn(60, 100, requires_grad=True)
            y, saved = _saved_storages(lambda layer=layer, xs=xs: layer(xs))
            assert xs.untyped_storage().data_ptr() not in {p for p, _ in saved}


def test_export_in_eval_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        bnlab.nn.BatchNormAct2d(8, act_layer="silu"),
        nn.Conv2d(8, 4, 3),
        bnlab.nn.BatchNormAct2d(4, act_layer="leaky_relu", memory="save"),
    )
    for _ in range(3):
        model(torch.randn(4, 3, 12, 12))
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_without_gamma_or_beta(path):
    """affine=False (no gamma, no beta) and bias=False (gamma only), both memory modes."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 2 + 1
    gy = torch.randn_like(x)
    with backend.using(path):
        for memory in ("standard", "save"):
            for kwargs in ({"affine": False}, {"bias": False}):
                layer = bnlab.nn.BatchNormAct2d(
                    4,
                    act_layer="leaky_relu",
                    act_kwargs={"negative_slope": SLOPE},
                    memory=memory,
                    **kwargs,
                ).double()
                if layer.weight is not None:
                    with torch.no_grad():
                        layer.weight.uniform_(0.5, 1.5)
                xs = x.clone().requires_grad_()
                y = layer(xs)
                y.backward(gy)
                w = layer.weight if layer.weight is not None else torch.ones(4).double()
                want = reference(x, w, torch.zeros(4).double(), "leaky_relu", gy)
                assert _rel(y, want[0]) < 1e-12 and _rel(xs.grad, want[1]) < 1e-12
                if layer.weight is not None:
                    assert _rel(layer.weight.grad, want[2]) < 1e-12


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_trains_as_torch(path):
    layer = bnlab.nn.BatchNormAct2d(3, act_layer="silu")
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with backend.using(path):
        y = layer(x)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(3))
    assert torch.equal(layer.running_mean, torch.zeros(3))
