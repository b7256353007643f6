"""bnlab.functional against torch.nn.functional.batch_norm and autograd, float64."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnlab.functional as BF

SHAPES = [(5, 3), (4, 3, 6), (3, 2, 4, 5), (2, 3, 2, 3, 2)]


def _args(shape, affine):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    if not affine:
        return (x,)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    return (x, w, b)


def _train_bn(x, w=None, b=None):
    return BF.batch_norm(x, None, None, w, b, training=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine):
    args = _args(shape, affine)
    assert gradcheck(_train_bn, args)
    assert gradgradcheck(_train_bn, args)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_outputs_and_gradients(shape, affine):
    args = _args(shape, affine)
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    rm_t, rv_t = rm.clone(), rv.clone()
    ours = BF.batch_norm(args[0], rm, rv, *args[1:], training=True, momentum=0.3)
    ref = torch.nn.functional.batch_norm(
        args[0], rm_t, rv_t, *args[1:], training=True, momentum=0.3
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(rm, rm_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(rv, rv_t, rtol=0, atol=1e-12)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_eval_mode_is_the_inference_affine_map():
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    ours = BF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    ref = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    scale, shift = BF.inference_affine(rm, rv, w, b, eps=1e-3)
    torch.testing.assert_close(scale, w / torch.sqrt(rv + 1e-3))
    torch.testing.assert_close(shift, b - w * rm / torch.sqrt(rv + 1e-3))


def test_batch_stats_and_unbiased_running_var():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 5
    mu, var = BF.compute_batch_stats(x)
    flat = x.transpose(0, 1).reshape(3, -1)  # (C, m') with m' = N*H*W (Section 3.2)
    torch.testing.assert_close(mu, flat.mean(1))
    torch.testing.assert_close(var, flat.var(1, correction=0))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    BF.update_running_stats(rm, rv, mu, var, m=flat.shape[1], momentum=1.0)
    torch.testing.assert_close(rv, flat.var(1, correction=1))  # Algorithm 2, step 10


def test_normalize_matches_training_output():
    x = torch.randn(8, 5, dtype=torch.float64)
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    mu, var = BF.compute_batch_stats(x)
    y = BF.normalize(x, mu, torch.rsqrt(var + 1e-5), w, b)
    torch.testing.assert_close(y, BF.batch_norm(x, None, None, w, b, training=True))


def test_merge_moments_equals_direct_statistics_with_empty_parts():
    x = torch.randn(12, 4, dtype=torch.float64) + 1e3
    parts = [x[:5], x[5:5], x[5:12]]
    nan = torch.full((4,), float("nan"), dtype=torch.float64)
    counts = torch.tensor([len(p) for p in parts])
    means = torch.stack([p.mean(0) if len(p) else nan for p in parts])
    biased = torch.stack([p.var(0, correction=0) if len(p) else nan for p in parts])
    total, mean, var = BF.merge_moments(counts, means, biased)
    assert total.item() == 12
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(var, x.var(0, correction=0))
