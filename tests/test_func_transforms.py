"""bnlab's training-mode batch norm under torch.func, forward-mode AD and batched gradients.

Every result is compared with torch's own batch norm where torch works, float64.
"""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import (
    functional_call,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vmap,
)

import bnlab.functional as BF
import bnlab.nn as bnn

DT = torch.float64
SHAPES = [(5, 3), (4, 3, 5), (3, 2, 3, 4)]


def _ours(x, w=None, b=None):
    return BF.batch_norm(x, None, None, w, b, training=True)


def _torch(x, w=None, b=None):
    return F.batch_norm(x, None, None, w, b, training=True)


def _args(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=DT) * 2 + 1
    return x, torch.randn(c, generator=gen, dtype=DT), torch.randn(c, generator=gen, dtype=DT)


def _close(a, b, atol=1e-10):
    for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_batched_grad_and_forward_ad(shape, affine):
    """PyTorch's own test helpers use check_batched_grad; the in-place backward failed it."""
    x, w, b = (t.requires_grad_() for t in _args(shape))
    args = (x, w, b) if affine else (x,)
    assert gradcheck(_ours, args, check_batched_grad=True, check_forward_ad=True)
    assert gradgradcheck(_ours, args, check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_vmap_over_the_input_matches_a_loop_and_torch(shape):
    xs = torch.stack([_args(shape, seed)[0] for seed in range(4)])  # (B, N, C, *)
    _, w, b = _args(shape)
    out = vmap(_ours, (0, None, None))(xs, w, b)
    _close(out, torch.stack([_ours(x, w, b) for x in xs]), atol=1e-12)
    _close(out, vmap(_torch, (0, None, None))(xs, w, b), atol=1e-12)


def test_vmap_over_weight_and_bias_with_a_shared_input():
    """Unbatched x with batched gamma/beta: in place, x's buffer could not take them."""
    x, _, _ = _args((6, 3, 4))
    ws, bs = torch.randn(5, 3, dtype=DT), torch.randn(5, 3, dtype=DT)
    out = vmap(_ours, (None, 0, 0))(x, ws, bs)
    _close(out, vmap(_torch, (None, 0, 0))(x, ws, bs), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_jacrev_and_jacfwd_match_torch(shape):
    x, w, b = _args(shape)
    for jac in (jacrev, jacfwd):
        _close(jac(_ours, (0, 1, 2))(x, w, b), jac(_torch, (0, 1, 2))(x, w, b))


def test_jvp_matches_torch_and_the_paper_formula():
    x, w, b = _args((6, 3, 4))
    tx, tw, tb = _args((6, 3, 4), seed=1)
    y, ty = jvp(_ours, (x, w, b), (tx, tw, tb))
    y_ref, ty_ref = jvp(_torch, (x, w, b), (tx, tw, tb))
    _close((y, ty), (y_ref, ty_ref), atol=1e-12)
    # dy = gamma * inv_std * (dx - mean(dx) - x_hat mean(dx x_hat)) + dgamma x_hat + dbeta
    dims = (0, 2)
    mu, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
    inv_std = (var + 1e-5).rsqrt()
    x_hat = (x - mu) * inv_std
    d_hat = inv_std * (
        tx - tx.mean(dims, keepdim=True) - x_hat * (tx * x_hat).mean(dims, keepdim=True)
    )
    expected = w.view(1, -1, 1) * d_hat + tw.view(1, -1, 1) * x_hat + tb.view(1, -1, 1)
    _close(ty, expected, atol=1e-12)


def test_forward_ad_dual_tensors_without_torch_func():
    x, w, b = _args((5, 3))
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(_ours(fwAD.make_dual(x, tx), w, b)).tangent
        ref = fwAD.unpack_dual(_torch(fwAD.make_dual(x, tx), w, b)).tangent
    _close(ours, ref, atol=1e-12)


def test_second_derivatives_mixing_modes_match_torch():
    """hessian is jacfwd(jacrev); jacrev(jacfwd) differentiates the jvp in reverse mode."""
    x, w, b = _args((6, 3, 2))

    def loss(f):
        return lambda x: (f(x, w, b) ** 3).sum()

    expected = jacrev(jacrev(loss(_torch)))(x)
    _close(hessian(loss(_ours))(x), expected)
    _close(jacrev(jacfwd(loss(_ours)))(x), expected)
    _close(jacrev(jacrev(loss(_ours)))(x), expected)


def test_autograd_jacobian_vectorized_and_is_grads_batched():
    x, w, b = (t.requires_grad_() for t in _args((4, 3, 5)))
    jac = torch.autograd.functional.jacobian(_ours, (x, w, b), vectorize=True)
    _close(jac, torch.autograd.functional.jacobian(_torch, (x, w, b), vectorize=True))
    y = _ours(x, w, b)
    gs = torch.randn(7, *y.shape, dtype=DT)
    batched = torch.autograd.grad(y, (x, w, b), gs, retain_graph=True, is_grads_batched=True)
    loop = [torch.autograd.grad(y, (x, w, b), g, retain_graph=True) for g in gs]
    for i in range(3):
        _close(batched[i], torch.stack([grads[i] for grads in loop]), atol=1e-12)


def test_vmap_running_statistics_batched_buffers_update_per_slice():
    """Under vmap each slice of batched running buffers gets its own batch's statistics."""
    xs = torch.stack([_args((6, 3, 4), seed)[0] for seed in range(4)])
    rm, rv = torch.zeros(4, 3, dtype=DT), torch.ones(4, 3, dtype=DT)
    rm_t, rv_t = rm.clone(), rv.clone()
    vmap(lambda x, m, v: BF.batch_norm(x, m, v, training=True, momentum=0.3))(xs, rm, rv)
    vmap(lambda x, m, v: F.batch_norm(x, m, v, training=True, momentum=0.3))(xs, rm_t, rv_t)
    _close((rm, rv), (rm_t, rv_t), atol=1e-12)
    assert not torch.equal(rm[0], rm[1])  # really per slice


def test_vmap_running_statistics_unbatched_buffers_raise_as_in_torch():
    """PyTorch issue 85533: one set of buffers cannot take B batches' statistics in place."""
    xs = torch.randn(4, 6, 3, dtype=DT)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(lambda x: BF.batch_norm(x, rm, rv, training=True))(xs)
    with pytest.raises(RuntimeError):
        vmap(lambda x: F.batch_norm(x, rm, rv, training=True))(xs)
    assert torch.equal(rm, torch.zeros(3, dtype=DT))  # left as it was
    # Without running statistics (track_running_stats=False) it works.
    out = vmap(lambda x: BF.batch_norm(x, None, None, training=True))(xs)
    _close(out, torch.stack([_ours(x) for x in xs]), atol=1e-12)


def _ensemble(bn_cls, n=3):
    torch.manual_seed(3)
    models = [
        nn.Sequential(nn.Linear(4, 3), bn_cls(3), nn.ReLU(), nn.Linear(3, 2)).to(DT)
        for _ in range(n)
    ]
    for m in models:
        with torch.no_grad():
            m[1].running_mean.normal_()
            m[1].running_var.uniform_(0.5, 2)
    return models


@pytest.mark.parametrize("training", [False, True])
def test_functional_call_over_stack_module_state_matches_torch(training):
    """Model ensembling: vmap over stacked parameters and buffers of bnlab BN models.

    In training each model's running statistics live in its slice of the stacked
    buffers and are updated in place there, as with torch's BN.
    """
    data = torch.randn(8, 4, dtype=DT)
    results = []
    for bn_cls in (bnn.BatchNorm1d, nn.BatchNorm1d):
        models = _ensemble(bn_cls)
        for m in models:
            m.train(training)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(p, bufs, x, base=base):
            return functional_call(base, (p, bufs), (x,))

        out = vmap(call, (0, 0, None))(params, buffers, data)
        grads = torch.autograd.grad(out.square().sum(), list(params.values()))
        results.append((out, grads, buffers["1.running_mean"], buffers["1.running_var"]))
        # Each model run on its own gives the same output (and would update the same stats).
        for i, m in enumerate(models):
            _close(out[i], m(data), atol=1e-12)
    _close(results[0], results[1], atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph_matches_eager(training):
    """The transform-aware dispatch must not break dynamo (it refuses custom jvps).

    aot_eager needs no C++ compiler, so this runs everywhere.
    """
    x = torch.randn(6, 3, 4, dtype=DT, requires_grad=True)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    b = torch.randn(3, dtype=DT, requires_grad=True)
    stats = [torch.zeros(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5]
    stats_eager = [t.clone() for t in stats]

    def f(x, w, b, rm, rv):
        return BF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(x, w, b, *stats)
    y_ref = f(x, w, b, *stats_eager)
    g = torch.randn_like(y)
    _close(y, y_ref, atol=1e-12)
    _close(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g))
    _close(stats, stats_eager, atol=1e-12)
