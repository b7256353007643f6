"""The seed-batched Inception network of Section 4.2 (bnlab.models.inception)."""

import copy

import pytest
import torch
from torch import fx, nn

import bnlab
from bnlab.models import count_parameters, inception_net
from bnlab.models.inception import SeedLocalResponseNorm, seed_cat
from bnlab.nn import BatchNorm2d, revert_batchnorm

SMALL = {"width": 2, "depth": 1}
CLASSES = 10


def _pair(bn: bool = False, **kw) -> tuple[nn.Module, nn.Module]:
    """The S=2 net with seeds (3, 7) and the single net with seed 7, float64."""
    kw = {**SMALL, **kw}
    two = inception_net(seeds=(3, 7), **kw).double()
    one = inception_net(seeds=(7,), **kw).double()
    if bn:
        two, one = bnlab.insert_batchnorm(two), bnlab.insert_batchnorm(one)
    return two, one


def _copy(t: torch.Tensor, k: int, copies: int) -> torch.Tensor:
    """Copy k's slice of a seed-batched parameter, buffer or output (dim 0 or 1)."""
    return t.chunk(copies, 0)[k]


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------
# Shapes and sizes
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_output_shapes_shared_and_per_copy_input(seeds):
    s = len(seeds)
    net = inception_net(seeds=seeds, **SMALL)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, s * CLASSES)
    assert net(torch.randn(2, 3 * s, 32, 32)).shape == (2, s * CLASSES)
    with pytest.raises(ValueError, match="shared by every copy"):
        net(torch.randn(2, 3 * s + 1, 32, 32))


def test_parameter_count_by_hand():
    # (cin, cout, kernel) per copy for width=4, depth=1; every conv has a bias.
    convs = [(3, 4, 3), (4, 12, 3)]  # stem
    convs += [(12, 4, 1), (12, 4, 1), (4, 4, 3), (12, 4, 1), (4, 6, 3), (6, 6, 3), (12, 2, 1)]
    convs += [(16, 8, 1), (8, 10, 3), (16, 4, 1), (4, 6, 3), (6, 6, 3)]  # reduction: 16 -> 32
    convs += [(32, 8, 1), (32, 8, 1), (8, 8, 3), (32, 8, 1), (8, 12, 3), (12, 12, 3), (32, 4, 1)]
    convs += [(32, 16, 1), (16, 20, 3), (32, 8, 1), (8, 12, 3), (12, 12, 3)]  # 32 -> 64
    convs += [(64, 16, 1), (64, 16, 1), (16, 16, 3), (64, 16, 1)]
    convs += [(16, 24, 3), (24, 24, 3), (64, 8, 1)]
    expected = sum(i * o * k * k + o for i, o, k in convs) + 64 * CLASSES + CLASSES
    assert expected == 27790
    one = inception_net(seeds=(0,), width=4, depth=1)
    three = inception_net(seeds=(0, 1, 2), width=4, depth=1)
    assert sum(isinstance(m, nn.Conv2d) for m in one.modules()) == len(convs)
    assert count_parameters(one) == expected
    assert count_parameters(three, copies=3) == expected
    assert sum(p.numel() for p in three.parameters()) == 3 * expected
    # BN drops each conv bias (cout) and adds gamma and beta (2 * cout).
    bn = bnlab.insert_batchnorm(three)
    assert count_parameters(bn, copies=3) == expected + sum(o for _, o, _ in convs)
    with pytest.raises(ValueError, match="copies"):
        count_parameters(three, copies=4)  # 83370 = 3 * 27790 is not a multiple of 4


# ----------------------------------------------------------------------------------
# Seed batching equals independent networks
# ----------------------------------------------------------------------------------


def test_copies_are_initialized_from_their_own_seed():
    two, one = _pair(width=4)
    for (name, p2), (name1, p1) in zip(two.named_parameters(), one.named_parameters()):
        assert name == name1
        assert torch.equal(_copy(p2, 1, 2), p1), name
    other = inception_net(seeds=(3,), width=4).double()
    for p2, p1 in zip(two.parameters(), other.parameters()):
        assert torch.equal(_copy(p2, 0, 2), p1)


@pytest.mark.parametrize(
    "bn, kw",
    [
        (False, {}),
        (True, {}),
        (False, {"lrn": True}),
        (False, {"activation": "sigmoid"}),
        (True, {"activation": "sigmoid", "lrn": True, "depth": 2}),
    ],
    ids=["plain", "bn", "lrn", "sigmoid", "bn-sigmoid-lrn-depth2"],
)
def test_seed_batching_equals_independent_networks(bn, kw):
    two, one = _pair(bn, **kw)
    x = torch.randn(4, 6, 16, 16, dtype=torch.float64)  # copy k's images in channels 3k..3k+2
    g = torch.randn(4, 2 * CLASSES, dtype=torch.float64)

    # Train mode: outputs and every parameter gradient (BN uses each copy's batch).
    y2, y1 = two(x), one(x[:, 3:])
    _assert_close(y2[:, CLASSES:], y1)
    (y2 * g).sum().backward()
    (y1 * g[:, CLASSES:]).sum().backward()
    for p2, p1 in zip(two.parameters(), one.parameters()):
        _assert_close(_copy(p2.grad, 1, 2), p1.grad)
    for b2, b1 in zip(two.buffers(), one.buffers()):
        if b2.dim() > 0:  # running statistics; num_batches_tracked is shared
            _assert_close(_copy(b2, 1, 2), b1)

    # Eval mode: per-copy input and one input shared by both copies.
    two.eval(), one.eval()
    with torch.no_grad():
        _assert_close(two(x)[:, CLASSES:], one(x[:, 3:]))
        _assert_close(two(x[:, 3:])[:, CLASSES:], one(x[:, 3:]))


def test_seed_cat_keeps_copies_together():
    # Copy k of branch b is filled with 10 * b + k; each copy's channels are [b0 | b1].
    a = torch.arange(3.0).repeat_interleave(2).view(1, 6, 1, 1).expand(2, 6, 4, 4)  # C=2
    b = (10 + torch.arange(3.0)).view(1, 3, 1, 1).expand(2, 3, 4, 4)  # C=1
    out = seed_cat([a.contiguous(), b.contiguous()], 3)
    expected = torch.tensor([0, 0, 10, 1, 1, 11, 2, 2, 12], dtype=torch.float32)
    assert torch.equal(out[0, :, 0, 0], expected)
    cl = seed_cat([t.contiguous(memory_format=torch.channels_last) for t in (a, b)], 3)
    assert torch.equal(cl, out)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_seed_lrn_stays_within_a_copy():
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    lrn = nn.LocalResponseNorm(5, alpha=1.0)
    seed_lrn = SeedLocalResponseNorm(2, alpha=1.0)
    _assert_close(seed_lrn(x), torch.cat([lrn(x[:, :6]), lrn(x[:, 6:])], 1))


# ----------------------------------------------------------------------------------
# insert_batchnorm, revert_batchnorm and memory formats
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_insert_batchnorm_before_every_nonlinearity(activation):
    net = inception_net(seeds=(0, 1), lrn=True, depth=2, width=2, activation=activation)
    act = nn.ReLU if activation == "relu" else nn.Sigmoid
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert sum(isinstance(m, act) for m in net.modules()) == n_convs
    bn = bnlab.insert_batchnorm(net)
    assert isinstance(bn, fx.GraphModule)
    modules = dict(bn.named_modules())
    assert sum(isinstance(m, BatchNorm2d) for m in modules.values()) == n_convs
    assert len(bnlab.insert.insertion_summary(bn)) == n_convs
    seen = 0
    for node in bn.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], act):
            norm = node.args[0]
            assert norm.op == "call_module" and isinstance(modules[norm.target], BatchNorm2d)
            conv = modules[norm.args[0].target]
            assert isinstance(conv, nn.Conv2d) and conv.bias is None
            assert modules[norm.target].num_features == conv.out_channels
            seen += 1
    assert seen == n_convs
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))


def test_revert_batchnorm_gives_the_same_network():
    net = bnlab.insert_batchnorm(inception_net(seeds=(0, 1), **SMALL).double())
    ref = revert_batchnorm(copy.deepcopy(net))
    assert not any(isinstance(m, BatchNorm2d) for m in ref.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    x = torch.randn(4, 6, 16, 16, dtype=torch.float64)
    _assert_close(net(x), ref(x))


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_channels_last_equals_contiguous(bn):
    net = inception_net(seeds=(0, 1), lrn=True, **SMALL).double()
    if bn:
        net = bnlab.insert_batchnorm(net)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = torch.randn(4, 6, 16, 16, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y, y_cl = net(x), net_cl(x_cl)
    _assert_close(y_cl, y)
    y.sum().backward()
    y_cl.sum().backward()
    for p, p_cl in zip(net.parameters(), net_cl.parameters()):
        _assert_close(p_cl.grad, p.grad)
    if not bn:  # the seed-major concatenation keeps the layout: no conversions between modules
        block = net_cl.blocks[0]
        h = torch.randn(2, block.branch1x1[0].in_channels, 8, 8, dtype=torch.float64)
        out = block(h.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
