"""Batch Renormalization (Ioffe 2017; PAPER.md Section 10): bnlab.nn.BatchRenorm*d,
bnlab.functional.batch_renorm and the math in bnlab.core. float64 unless stated.

Parity with BN is checked to atol 1e-12 rather than bit for bit: bnlab's BN may run
a compiled backend whose rounding differs from the pure-PyTorch path."""

import itertools

import pytest
import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import core

SHAPES = [(6, 4), (6, 4, 5), (3, 4, 5, 6), (2, 4, 3, 4, 2)]
RENORM = {2: bnn.BatchRenorm1d, 3: bnn.BatchRenorm1d, 4: bnn.BatchRenorm2d, 5: bnn.BatchRenorm3d}
BN = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
EXACT = {"rtol": 0, "atol": 1e-12}
FIXED = {"warmup_steps": 0, "rmax_steps": 0, "dmax_steps": 0}  # the final limits from step 1


def _view(v, x):
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def reference_renorm(x, weight, bias, running_mean, running_var, eps, rmax, dmax):
    """Ioffe 2017's equations with plain autograd; stop_gradient is detach()."""
    dims = [0, *range(2, x.dim())]
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu_b - running_mean) / sigma).clamp(-dmax, dmax).detach()
    x_hat = (x - _view(mu_b, x)) / _view(sigma_b, x) * _view(r, x) + _view(d, x)
    if weight is not None:
        x_hat = x_hat * _view(weight, x)
    if bias is not None:
        x_hat = x_hat + _view(bias, x)
    return x_hat


def _inputs(shape, scale=3.0, shift=1.0):
    x = (torch.randn(*shape, dtype=torch.float64) * scale + shift).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()
    return x, w, b


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_with_clipped_corrections(shape):
    """gradcheck and gradgradcheck where r = 1/rmax and d = +-dmax in every channel:
    clipped, they are locally constant, so finite differences see the stop_gradient."""
    x, w, b = _inputs(shape, scale=1.0, shift=0.0)
    c = shape[1]
    running_mean = torch.tensor([50.0, -50.0] * (c // 2), dtype=torch.float64)
    running_var = torch.full((c,), 400.0, dtype=torch.float64)  # sigma_B / sigma ~ 1/20

    def f(x, w, b):
        return BF.batch_renorm_train(x, w, b, running_mean, running_var, 1e-5, 3.0, 2.0)[0]

    _, _, _, r, d = BF.batch_renorm_train(x, w, b, running_mean, running_var, 1e-5, 3.0, 2.0)
    torch.testing.assert_close(r, torch.full_like(r, 1 / 3), rtol=0, atol=0)
    assert torch.equal(d.abs(), torch.full_like(d, 2.0))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_stop_gradient_reference(shape, affine):
    """Unclipped and clipped channels mixed: the closed-form backward (BN's with
    gamma * r, plus r * dgamma' + d * dbeta') equals autograd through the equations
    with r and d detached."""
    x, w, b = _inputs(shape)
    if not affine:
        w = b = None
    c = shape[1]
    running_mean = torch.linspace(-3, 3, c, dtype=torch.float64)
    running_var = torch.linspace(0.5, 30, c, dtype=torch.float64)
    rmax, dmax = 2.0, 1.0
    y, _, _, r, d = BF.batch_renorm_train(x, w, b, running_mean, running_var, 1e-5, rmax, dmax)
    assert ((r > 1 / rmax) & (r < rmax)).any() and ((r == rmax) | (r == 1 / rmax)).any()
    assert (d.abs() < dmax).any() and (d.abs() == dmax).any()
    y_ref = reference_renorm(x, w, b, running_mean, running_var, 1e-5, rmax, dmax)
    torch.testing.assert_close(y, y_ref, **EXACT)
    g = torch.randn_like(y)
    params = [x] if w is None else [x, w, b]
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-11)


def test_closed_form_is_bn_backward_with_scaled_gamma():
    """dl/dx of Batch Renorm is BN's dl/dx with gamma * r (core.batch_norm_backward)."""
    x, w, _ = _inputs((8, 3, 4))
    x, w = x.detach(), w.detach()
    mu_b, var_b = core.compute_batch_stats(x)
    inv_std = torch.rsqrt(var_b + 1e-5)
    r = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    d = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64)
    g = torch.randn_like(x)
    gx, gw, gb = core.batch_renorm_backward(g, x, w, mu_b, inv_std, r, d)
    gx_bn, gw_bn, gb_bn = core.batch_norm_backward(g, x, w * r, mu_b, inv_std)
    torch.testing.assert_close(gx, gx_bn, rtol=0, atol=0)
    torch.testing.assert_close(gw, r * gw_bn + d * gb_bn, rtol=0, atol=0)
    torch.testing.assert_close(gb, gb_bn, rtol=0, atol=0)


# --------------------------------------------------------------------------
# r = 1, d = 0 is BN
# --------------------------------------------------------------------------


def _run_parity(renorm, refs, shape, steps=4):
    for _ in range(steps):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        xs = [x.clone().requires_grad_() for _ in range(1 + len(refs))]
        ys = [m(xi) for m, xi in zip([renorm, *refs], xs)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        for ref, y, xi in zip(refs, ys[1:], xs[1:]):
            torch.testing.assert_close(ys[0], y, **EXACT)
            torch.testing.assert_close(xs[0].grad, xi.grad, **EXACT)
            if renorm.affine:
                torch.testing.assert_close(renorm.weight.grad, ref.weight.grad, rtol=0, atol=1e-11)
                torch.testing.assert_close(renorm.bias.grad, ref.bias.grad, rtol=0, atol=1e-11)
            for (name, a), bb in zip(renorm.named_buffers(), ref.buffers()):
                torch.testing.assert_close(a, bb, **EXACT, msg=name)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    for m in (renorm, *refs):
        m.eval()
    for ref in refs:
        torch.testing.assert_close(renorm(x), ref(x), **EXACT)


@pytest.mark.parametrize(
    "shape,momentum,affine", list(itertools.product(SHAPES, [0.1, None], [True, False]))
)
def test_warmup_equals_batchnorm(shape, momentum, affine):
    """During the warm-up (r = 1, d = 0) BatchRenorm is bnlab's and torch's BN:
    outputs, all three gradients, running statistics, step count, eval outputs."""
    kw = {"momentum": momentum, "affine": affine, "dtype": torch.float64}
    ref = TORCH_BN[len(shape)](4, **kw)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    ours_bn = BN[len(shape)](4, **kw)
    renorm = RENORM[len(shape)](4, warmup_steps=10, **kw)
    ours_bn.load_state_dict(ref.state_dict())
    renorm.load_state_dict(ref.state_dict())
    _run_parity(renorm, [ref, ours_bn], shape)
    assert renorm.num_batches_tracked == 4 and renorm.current_limits() == (1.0, 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmax_one_dmax_zero_is_batchnorm_at_any_step(shape):
    """With rmax = 1 and dmax = 0 past any warm-up it stays BN exactly."""
    renorm = RENORM[len(shape)](4, rmax=1.0, dmax=0.0, dtype=torch.float64, **FIXED)
    ref = TORCH_BN[len(shape)](4, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.num_batches_tracked.fill_(10**6)
    renorm.load_state_dict(ref.state_dict())
    _run_parity(renorm, [ref], shape)
    assert renorm.current_limits() == (1.0, 0.0)


# --------------------------------------------------------------------------
# The warm-up schedule advances with the module's own steps
# --------------------------------------------------------------------------


def test_schedule_limits_advance_with_steps():
    m = bnn.BatchRenorm1d(3, rmax=3.0, dmax=5.0, warmup_steps=2, rmax_steps=6, dmax_steps=4)
    seen = []
    for _ in range(8):
        seen.append(m.current_limits())
        m(torch.randn(5, 3))
    # steps 1-2 plain BN, then rmax 1 -> 3 over steps 3..6 and dmax 0 -> 5 over steps 3..4
    assert seen == [
        (1.0, 0.0),
        (1.0, 0.0),
        (1.5, 2.5),
        (2.0, 5.0),
        (2.5, 5.0),
        (3.0, 5.0),
        (3.0, 5.0),
        (3.0, 5.0),
    ]
    m.eval()
    m(torch.randn(5, 3))  # eval does not advance the schedule
    assert m.current_limits() == (3.0, 5.0) and m.num_batches_tracked == 8
    m.reset_running_stats()
    assert m.current_limits() == (1.0, 0.0)


def test_paper_default_schedule():
    m = bnn.BatchRenorm2d(2)
    assert (m.rmax, m.dmax, m.warmup_steps, m.rmax_steps, m.dmax_steps) == (
        3.0,
        5.0,
        5000,
        40000,
        25000,
    )
    for step, (rmax, dmax) in [
        (1, (1.0, 0.0)),
        (5000, (1.0, 0.0)),
        (5001, (1 + 2 / 35000, 5 / 20000)),
        (25000, (1 + 2 * 20000 / 35000, 5.0)),
        (40000, (3.0, 5.0)),
        (10**7, (3.0, 5.0)),
    ]:
        m.num_batches_tracked.fill_(step - 1)  # current_limits() is for the next step
        assert m.current_limits() == (pytest.approx(rmax, rel=1e-15), pytest.approx(dmax))


def test_clipping_changes_over_steps():
    """The clipping the forward applies follows the schedule step by step (a layer
    whose schedule was fixed at construction would stay plain BN here)."""
    torch.manual_seed(1)
    m = bnn.BatchRenorm2d(
        3, momentum=0.0, warmup_steps=2, rmax_steps=4, dmax_steps=4, dtype=torch.float64
    )
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        m.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    # Moving statistics (0, 1) stay put (momentum 0); batches have mean ~2, std ~3:
    # r wants ~3 and d ~2, beyond the limits until the schedule opens up.
    diffs = []
    for step in range(1, 7):
        x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 2
        rmax, dmax = m.current_limits()
        y = m(x)
        bn = BF.batch_norm(x, None, None, m.weight, m.bias, True)
        expected = reference_renorm(
            x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, rmax, dmax
        )
        torch.testing.assert_close(y, expected, **EXACT)
        diffs.append((y - bn).abs().max().item())
        if step <= 2:
            assert (rmax, dmax) == (1.0, 0.0) and diffs[-1] < 1e-12
    assert diffs[2] > 1.0  # step 3: rmax 2, dmax 2.5
    assert diffs[3] > diffs[2] + 0.5  # step 4: rmax 3, dmax 5
    assert m.num_batches_tracked == 6


def test_schedule_step_lives_in_the_state_dict():
    m = bnn.BatchRenorm1d(4, warmup_steps=3, rmax_steps=5, dmax_steps=5, dtype=torch.float64)
    for _ in range(4):
        m(torch.randn(6, 4, dtype=torch.float64))
    state = m.state_dict()
    assert list(state) == list(nn.BatchNorm1d(4).state_dict())
    fresh = bnn.BatchRenorm1d(4, warmup_steps=3, rmax_steps=5, dmax_steps=5, dtype=torch.float64)
    assert fresh.current_limits() == (1.0, 0.0)
    fresh.load_state_dict(state)
    assert fresh.current_limits() == m.current_limits() == (3.0, 5.0)
    x = torch.randn(6, 4, dtype=torch.float64) * 2 + 3
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    for a, b in zip(fresh.buffers(), m.buffers()):
        assert torch.equal(a, b)


def test_state_dict_loads_both_ways_with_batchnorm():
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    ref.train()
    for _ in range(3):
        ref(torch.randn(4, 3, 2, 2, dtype=torch.float64) + 1)
    renorm = bnn.BatchRenorm2d(3, dtype=torch.float64)
    renorm.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(3, dtype=torch.float64)
    back.load_state_dict(renorm.state_dict())
    for a, b in zip(back.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert renorm.num_batches_tracked == 3


# --------------------------------------------------------------------------
# Eval, layouts, functional
# --------------------------------------------------------------------------


def test_eval_uses_moving_statistics():
    m = bnn.BatchRenorm2d(3, dtype=torch.float64, **FIXED)
    for _ in range(5):
        m(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1)
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64) * 4 - 2
    y = m(x)
    ref = nn.BatchNorm2d(3, dtype=torch.float64).eval()
    ref.load_state_dict(state)
    torch.testing.assert_close(y, ref(x), **EXACT)
    # Each sample alone: no batch statistics at inference.
    torch.testing.assert_close(m(x[:1]), y[:1], **EXACT)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_channels_last_keeps_format_and_values():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1
    a = bnn.BatchRenorm2d(3, dtype=torch.float64, **FIXED)
    b = bnn.BatchRenorm2d(3, dtype=torch.float64, **FIXED)
    with torch.no_grad():
        a.running_mean.fill_(0.5)
        b.running_mean.fill_(0.5)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    x0 = x.clone().requires_grad_()
    yc, y0 = a(xc), b(x0)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, y0, **EXACT)
    g = torch.randn_like(y0)
    yc.backward(g)
    y0.backward(g)
    torch.testing.assert_close(xc.grad, x0.grad, **EXACT)
    torch.testing.assert_close(a.running_var, b.running_var, **EXACT)


def test_functional_matches_module_and_updates_running_stats():
    m = bnn.BatchRenorm1d(4, dtype=torch.float64, **FIXED)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(6, 4, 3, dtype=torch.float64) * 2 + 1
        y = BF.batch_renorm(x, rm, rv, m.weight, m.bias, True, 0.1, 1e-5, 3.0, 5.0)
        torch.testing.assert_close(m(x), y, rtol=0, atol=0)
        torch.testing.assert_close(m.running_mean, rm, rtol=0, atol=0)
        torch.testing.assert_close(m.running_var, rv, rtol=0, atol=0)
    m.eval()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), BF.batch_renorm(x, rm, rv, m.weight, m.bias), **EXACT)


def test_float32_and_bfloat16_run():
    """Low precision: statistics in float32 (tolerance: float32/bf16 rounding)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        m = bnn.BatchRenorm2d(3, **FIXED)
        ref = bnn.BatchRenorm2d(3, dtype=torch.float64, **FIXED)
        x = torch.randn(4, 3, 4, 4) * 2 + 1
        y = m(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref(x.to(dtype).double()), rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# Converter and errors
# --------------------------------------------------------------------------


def test_convert_to_batch_renorm_keeps_state_and_mode():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 5),
        bnn.BatchNorm1d(5),
    ).double()
    for _ in range(3):
        model(torch.randn(4, 2, 4, 4, dtype=torch.float64))
    model.eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    before = model(x)
    old = [model[1], model[5]]
    out = bnn.convert_to_batch_renorm(model, warmup_steps=1, rmax_steps=2, dmax_steps=2, rmax=2.0)
    assert out is model
    assert type(model[1]) is bnn.BatchRenorm2d and type(model[5]) is bnn.BatchRenorm1d
    for new, o in zip([model[1], model[5]], old):
        assert new.weight is o.weight and new.bias is o.bias
        assert new.running_mean is o.running_mean and new.running_var is o.running_var
        assert new.num_batches_tracked is o.num_batches_tracked
        assert not new.training and new.rmax == 2.0 and new.warmup_steps == 1
        # the schedule continues from the converted layer's count (3 steps)
        assert new.current_limits() == (2.0, 5.0)
    torch.testing.assert_close(model(x), before, **EXACT)  # torch's BN eval vs bnlab's
    # A lone BN root is replaced and returned.
    root = bnn.convert_to_batch_renorm(nn.BatchNorm3d(2))
    assert type(root) is bnn.BatchRenorm3d
    # Already converted layers stay as they are.
    assert bnn.convert_to_batch_renorm(model)[1] is model[1]


def test_convert_refuses_what_batch_renorm_cannot_take():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnn.convert_to_batch_renorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        bnn.convert_to_batch_renorm(nn.Sequential(nn.SyncBatchNorm(3)))
    with pytest.raises(ValueError, match="rmax"):
        bnn.convert_to_batch_renorm(nn.Sequential(nn.BatchNorm1d(3)), rmax=0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rmax": 0.5}, "rmax must be a finite number >= 1"),
        ({"rmax": float("inf")}, "rmax must be a finite number >= 1"),
        ({"dmax": -1.0}, "dmax must be a finite number >= 0"),
        ({"dmax": True}, "dmax must be"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"rmax_steps": 2.5}, "rmax_steps must be an int >= 0"),
        ({"warmup_steps": 100, "rmax_steps": 50}, "rmax_steps=50 is before warmup_steps=100"),
        ({"warmup_steps": 100, "dmax_steps": 50}, "dmax_steps=50 is before warmup_steps=100"),
        ({"track_running_stats": False}, "needs track_running_stats=True"),
    ],
)
def test_constructor_errors_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnn.BatchRenorm2d(3, **kwargs)


def test_runtime_errors():
    m = bnn.BatchRenorm1d(3)
    m.running_mean = None
    with pytest.raises(RuntimeError, match="needs its running_mean"):
        m(torch.randn(4, 3))
    with pytest.raises(ValueError, match="2-D \\(N, C\\)"):
        bnn.BatchRenorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnn.BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        BF.batch_renorm(torch.randn(4, 3), None, None, training=True)
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        BF.batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, rmax=0.9)
    with pytest.raises(ValueError, match="dmax must be >= 0"):
        BF.batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, dmax=-1)


def test_is_a_batchnorm_for_tools():
    m = bnn.BatchRenorm2d(3)
    assert isinstance(m, nn.BatchNorm2d) and isinstance(m, bnn.BatchNorm2d)
    assert "rmax=3.0" in repr(m) and "warmup_steps=5000" in repr(m)
