"""The paper's own properties of the Batch Normalizing Transform."""

import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn

# The paper's properties hold exactly at eps = 0, which training refuses (as torch does);
# 1e-30 is lost against a variance of order 1 in float64, so they still hold to rounding.
TINY_EPS = 1e-30


def test_normalized_output_has_zero_mean_unit_biased_variance_per_channel():
    x = torch.randn(16, 5, 4, 4, dtype=torch.float64) * 7 - 3
    y = BF.batch_norm(x, None, None, training=True, eps=TINY_EPS)
    flat = y.transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(
        flat.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        flat.var(1, correction=0), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_identity_recovery_with_gamma_sqrt_var_and_beta_mean():
    """Section 3: gamma = sqrt(Var[x]) (+eps), beta = E[x] recovers the input."""
    x = torch.randn(10, 3, 6, dtype=torch.float64) * 2 + 4
    mu, var = BF.compute_batch_stats(x)
    eps = 1e-5
    y = BF.batch_norm(x, None, None, torch.sqrt(var + eps), mu, training=True, eps=eps)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)


def _linear_bn(weight, u):
    return BF.batch_norm(u @ weight.t(), None, None, training=True, eps=TINY_EPS)


def test_scale_invariance_section_3_3():
    """BN((aW)u) = BN(Wu); d/du unchanged; d/d(aW) = 1/a * d/dW."""
    u = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a = 3.7
    aw = (a * w).detach().requires_grad_()
    g = torch.randn(12, 4, dtype=torch.float64)
    y1 = _linear_bn(w, u)
    gu1, gw = torch.autograd.grad(y1, (u, w), g)
    y2 = _linear_bn(aw, u)
    gu2, gaw = torch.autograd.grad(y2, (u, aw), g)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    torch.testing.assert_close(gu1, gu2, atol=1e-12, rtol=0)
    torch.testing.assert_close(gaw, gw / a, atol=1e-12, rtol=0)


def test_scale_invariance_through_the_module_with_a_linear_layer():
    lin = nn.Linear(6, 4, bias=False).double()
    bn = bnn.BatchNorm1d(4, eps=TINY_EPS, dtype=torch.float64)
    u = torch.randn(9, 6, dtype=torch.float64)
    y = bn(lin(u))
    with torch.no_grad():
        lin.weight.mul_(100.0)
    torch.testing.assert_close(bn(lin(u)), y, atol=1e-10, rtol=0)


def test_input_gradient_sums_to_zero_per_channel():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = BF.batch_norm(x, None, None, w, b, training=True)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    sums = gx.sum((0, 2, 3))
    torch.testing.assert_close(sums, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert gx.abs().max() > 1e-3  # the gradient itself is not trivially zero
