"""Ghost batch normalization (Hoffer et al. 2017; PAPER.md Section 10):
bnlab.nn.GhostBatchNorm*d and bnlab.core.virtual_batches. float64.

Comparisons with bnlab's BN use atol 1e-12 (the same math, but torch.cat/split
and a possibly compiled backend may round differently)."""

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

import bnlab.nn as bnn
from bnlab import core

SHAPES = [(12, 4), (12, 4, 5), (12, 4, 3, 5), (12, 4, 2, 3, 2)]
GHOST = {2: bnn.GhostBatchNorm1d, 3: bnn.GhostBatchNorm1d, 4: bnn.GhostBatchNorm2d}
GHOST[5] = bnn.GhostBatchNorm3d
BN = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
EXACT = {"rtol": 0, "atol": 1e-12}


def _pair(shape, v, **kw):
    ghost = GHOST[len(shape)](shape[1], virtual_batch_size=v, dtype=torch.float64, **kw)
    bn = BN[len(shape)](shape[1], dtype=torch.float64, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    ghost.load_state_dict(bn.state_dict())
    return ghost, bn


def _x(shape):
    return torch.randn(*shape, dtype=torch.float64) * 3 + 1


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 2), (8, 2, 2, 3), (8, 2, 1, 2, 2)])
def test_gradcheck(shape):
    """gradcheck and gradgradcheck of the module's training forward (3 + 3 + 2 samples)."""
    ghost = GHOST[len(shape)](shape[1], virtual_batch_size=3, dtype=torch.float64)
    x = _x(shape).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return functional_call(ghost, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# --------------------------------------------------------------------------
# Parity with BN
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,v,momentum,affine",
    list(itertools.product(SHAPES, [12, 100, None], [0.1, None], [True, False])),
)
def test_one_ghost_batch_equals_batchnorm(shape, v, momentum, affine):
    """virtual_batch_size >= N (or None) is torch's and bnlab's BN: outputs, gradients,
    running statistics over several steps, eval outputs."""
    ghost, bn = _pair(shape, v, momentum=momentum, affine=affine)
    ref = TORCH_BN[len(shape)](shape[1], dtype=torch.float64, momentum=momentum, affine=affine)
    ref.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = _x(shape)
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((ghost, bn, ref), xs)]
        g = torch.randn_like(x)
        for y in ys:
            y.backward(g)
        for m, y, xi in zip((bn, ref), ys[1:], xs[1:]):
            torch.testing.assert_close(ys[0], y, **EXACT)
            torch.testing.assert_close(xs[0].grad, xi.grad, **EXACT)
            if affine:
                torch.testing.assert_close(ghost.weight.grad, m.weight.grad, rtol=0, atol=1e-11)
                torch.testing.assert_close(ghost.bias.grad, m.bias.grad, rtol=0, atol=1e-11)
            for a, e in zip(ghost.buffers(), m.buffers()):
                torch.testing.assert_close(a, e, **EXACT)
    x = _x(shape)
    for m in (ghost, bn, ref):
        m.eval()
    torch.testing.assert_close(ghost(x), ref(x), **EXACT)


CHUNK_CASES = [
    (shape, v, momentum, channels_last)
    for shape, v, momentum, channels_last in itertools.product(
        SHAPES, [3, 4, 5], [0.1, None], [False, True]
    )
    if len(shape) == 4 or not channels_last  # channels_last is a 4-D layout
]


@pytest.mark.parametrize("shape,v,momentum,channels_last", CHUNK_CASES)
def test_ghost_batches_equal_batchnorm_on_each_chunk(shape, v, momentum, channels_last):
    """k ghost batches (the last one smaller when v does not divide N) equal a BN layer
    run on each chunk in turn: outputs, gradients of x, gamma and beta, running
    statistics and num_batches_tracked (one update per ghost batch, its own count)."""
    ghost, bn = _pair(shape, v, momentum=momentum)
    for _ in range(2):
        x = _x(shape)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xg = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        y = ghost(xg)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
        chunks = xb.split(v, 0)
        y_ref = torch.cat([bn(c) for c in chunks], 0)
        torch.testing.assert_close(y, y_ref, **EXACT)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(xg.grad, xb.grad, **EXACT)
        torch.testing.assert_close(ghost.weight.grad, bn.weight.grad, rtol=0, atol=1e-11)
        torch.testing.assert_close(ghost.bias.grad, bn.bias.grad, rtol=0, atol=1e-11)
    assert ghost.num_batches_tracked == bn.num_batches_tracked == 2 * len(chunks)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, **EXACT)
    torch.testing.assert_close(ghost.running_var, bn.running_var, **EXACT)


def test_each_ghost_batch_is_normalized_on_its_own():
    """Algorithm 1 per ghost batch: zero mean, unit variance per channel in each."""
    ghost = bnn.GhostBatchNorm2d(3, virtual_batch_size=4, affine=False, dtype=torch.float64)
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64) * torch.arange(1.0, 11).view(-1, 1, 1, 1)
    y = ghost(x)
    for chunk in y.split(4):  # 4, 4, 2 samples
        mean = chunk.mean((0, 2, 3))
        var = chunk.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-12)
        torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-4)  # eps 1e-5


def test_seed_batched_layout_equals_separate_layers():
    """Seed-batched (N, S * C) activations (bnlab.models.mlp): statistics per channel,
    so each copy's ghost BN equals a separate ghost BN on that copy's channels."""
    seeds, c, v = 3, 4, 4
    batched = bnn.GhostBatchNorm1d(seeds * c, virtual_batch_size=v, dtype=torch.float64)
    singles = [bnn.GhostBatchNorm1d(c, virtual_batch_size=v, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        batched.weight.normal_()
        for k, s in enumerate(singles):
            s.weight.copy_(batched.weight[k * c : (k + 1) * c])
    for _ in range(2):
        x = torch.randn(10, seeds * c, dtype=torch.float64) * 2 + 1
        y = batched(x)
        for k, s in enumerate(singles):
            torch.testing.assert_close(y[:, k * c : (k + 1) * c], s(x[:, k * c : (k + 1) * c]))
    for k, s in enumerate(singles):
        torch.testing.assert_close(batched.running_var[k * c : (k + 1) * c], s.running_var)


# --------------------------------------------------------------------------
# Eval never uses ghost batches
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_uses_running_statistics_not_ghost_batches(shape):
    ghost, bn = _pair(shape, 3)
    for _ in range(3):
        ghost(_x(shape))
    ghost.eval()
    bn.load_state_dict(ghost.state_dict())
    bn.eval()
    x = _x(shape)
    state = {k: t.clone() for k, t in ghost.state_dict().items()}
    y = ghost(x)
    torch.testing.assert_close(y, bn(x), **EXACT)
    # Each sample's output depends on that sample alone, whatever batch it comes in.
    torch.testing.assert_close(ghost(x[:1]), y[:1], **EXACT)
    torch.testing.assert_close(ghost(x[5:]), y[5:], **EXACT)
    # Not what normalizing each ghost batch would give.
    ghost.train()
    ghost.momentum = 0.0
    assert (ghost(x) - y).abs().max() > 0.1
    ghost.eval()
    for k, t in ghost.state_dict().items():
        if k != "num_batches_tracked":
            assert torch.equal(t, state[k]), k


def test_eval_without_running_statistics_uses_the_whole_batch():
    """track_running_stats=False: eval normalizes with the whole batch, as BN does."""
    kw = {"track_running_stats": False, "dtype": torch.float64}
    ghost = bnn.GhostBatchNorm1d(4, virtual_batch_size=3, **kw)
    bn = bnn.BatchNorm1d(4, **kw)
    ghost.eval()
    bn.eval()
    x = torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), bn(x), **EXACT)
    ghost.train()
    y = ghost(x)
    torch.testing.assert_close(y[:3], bn.train()(x[:3]), **EXACT)


# --------------------------------------------------------------------------
# State, conversion, errors
# --------------------------------------------------------------------------


def test_state_dict_is_batchnorms():
    ghost = bnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    ghost(torch.randn(6, 3, 2, 2))
    assert list(ghost.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(ghost.state_dict())
    assert ref.num_batches_tracked == 3
    again = bnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    again.load_state_dict(ghost.state_dict())
    for a, b in zip(again.state_dict().values(), ghost.state_dict().values()):
        assert torch.equal(a, b)
    assert "virtual_batch_size=2" in repr(ghost)
    assert isinstance(ghost, nn.BatchNorm2d)


def test_convert_to_ghost_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), bnn.BatchNorm1d(4))
    model = model.double()
    old = model[1]
    x = torch.randn(8, 3, dtype=torch.float64)
    model.eval()
    before = model(x)
    assert bnn.convert_to_ghost_batchnorm(model, virtual_batch_size=4) is model
    assert type(model[1]) is bnn.GhostBatchNorm1d and type(model[3]) is bnn.GhostBatchNorm1d
    assert model[1].weight is old.weight and model[1].running_var is old.running_var
    assert model[1].virtual_batch_size == 4 and not model[1].training
    torch.testing.assert_close(model(x), before, **EXACT)
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        bnn.convert_to_ghost_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)), 4)
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 2"):
        bnn.convert_to_ghost_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), 0)


@pytest.mark.parametrize("v", [0, -2, 2.5, True, "8"])
def test_invalid_virtual_batch_size(v):
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= "):
        bnn.GhostBatchNorm1d(3, virtual_batch_size=v)
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 1"):
        bnn.GhostBatchNorm2d(3, virtual_batch_size=v)


def test_one_sample_ghost_batches_of_1d_are_refused_at_construction():
    """GhostBatchNorm1d(C, virtual_batch_size=1) could train on no batch size: (N, C)
    ghost batches of one sample have one value per feature. It is refused when built,
    and converting a model holding a BatchNorm1d refuses before changing anything."""
    with pytest.raises(ValueError, match=r">= 2.*no batch size could train it"):
        bnn.GhostBatchNorm1d(4, virtual_batch_size=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="GhostBatchNorm1d virtual_batch_size must be an int >= 2"):
        bnn.convert_to_ghost_batchnorm(model, 1)
    assert type(model[1]) is nn.BatchNorm2d  # nothing half-converted
    # 4-D input: one sample still has H * W values per channel, so 1 is allowed.
    ghost = bnn.GhostBatchNorm2d(4, virtual_batch_size=1)
    assert ghost(torch.randn(3, 4, 2, 2)).shape == (3, 4, 2, 2)
    with pytest.raises(ValueError, match="virtual batches of 1 sample.*virtual_batch_size >= 2"):
        ghost(torch.randn(3, 4, 1, 1))  # the message asks for nothing impossible


def test_single_value_last_ghost_batch_is_refused():
    ghost = bnn.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"last virtual batch of 1 sample.*N % 4 != 1"):
        ghost(torch.randn(9, 3))
    assert ghost.num_batches_tracked == 0  # refused before any state changed
    ghost(torch.randn(9, 3, 2))  # (N, C, L): one sample still has 2 values per channel
    with pytest.raises(ValueError, match="last virtual batch"):
        core.virtual_batches(torch.randn(5, 2), 2)
    assert [c.shape[0] for c in core.virtual_batches(torch.randn(10, 2), 4)] == [4, 4, 2]
