"""recompute_population_stats: Algorithm 2, steps 8-10."""

import copy

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn as bnn
from bnlab.graph import is_batchnorm
from nets import paper_mlp

F64 = torch.float64


def mnist_mlp():
    return paper_mlp(depth=2)


def conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Tanh()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).double()


def _trained(net, shape, steps=5):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(*shape, dtype=F64)).square().mean().backward()
        opt.step()
    return net


def _bns(net):
    return [m for m in net.modules() if is_batchnorm(m)]


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: bnlab.insert_batchnorm(mnist_mlp()), (16, 1, 28, 28)),
        (lambda: bnlab.insert_batchnorm(conv_net()), (8, 3, 8, 8)),
    ],
)
def test_matches_torch_cumulative_average_oracle(make, shape):
    net = _trained(make(), shape)
    batches = [torch.randn(*shape, dtype=F64) * 2 + 0.5 for _ in range(6)]
    # Oracle: PyTorch's BN with momentum=None after reset_running_stats() averages the
    # batch means and unbiased batch variances, with each BN in training mode.
    oracle = bnn.revert_batchnorm(copy.deepcopy(net))
    for m in _bns(oracle):
        assert type(m).__module__.startswith("torch")
        m.momentum = None
        m.reset_running_stats()
    with torch.no_grad():
        for b in batches:
            oracle(b)
    stale = [m.running_mean.clone() for m in _bns(net)]
    report = bnlab.recompute_population_stats(net, batches, progress=False)
    assert report.batches == 6 and not report.unreached and report.estimator == "paper"
    assert [(s.batches, s.values) for s in report.layers] == [
        (6, 6 * shape[0] * _spatial(net, s.name, shape)) for s in report.layers
    ]
    for a, b, old in zip(_bns(net), _bns(oracle), stale):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)
        assert not torch.allclose(a.running_mean, old)  # the stale moving averages replaced
    assert net.training and all(m.momentum == 0.1 and m.training for m in _bns(net))


def _spatial(net, name, shape):
    """H*W of the BN layer's input (m' = N*H*W, Section 3.2)."""
    sizes = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: sizes.__setitem__(n, a[0][0, 0].numel()))
        for n, m in net.named_modules()
        if is_batchnorm(m)
    ]
    with torch.no_grad():
        net.eval()(torch.randn(*shape, dtype=F64))
    net.train()
    for h in hooks:
        h.remove()
    return sizes[name]


def test_works_on_torch_batchnorm_and_float32():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    data = torch.randn(24, 2, 3, 3)
    bnlab.recompute_population_stats(net, list(data.split(8)), progress=False)
    with torch.no_grad():
        h = net[0](data).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(net[1].running_mean, h.mean(1).float(), rtol=1e-5, atol=1e-6)


def _single_bn_net():
    return nn.Sequential(bnn.BatchNorm2d(3, dtype=F64))


def test_batch_split_invariance_and_pooled_equals_concatenated_variance():
    data = torch.randn(24, 3, 4, 4, dtype=F64) * 2 + 1
    means, paper_vars, pooled = [], [], []
    for size in (4, 6, 12, 24):
        net = _single_bn_net()
        bnlab.recompute_population_stats(net, list(data.split(size)), progress=False)
        means.append(net[0].running_mean.clone())
        paper_vars.append(net[0].running_var.clone())
        net = _single_bn_net()
        bnlab.recompute_population_stats(
            net, list(data.split(size)), estimator="pooled", progress=False
        )
        torch.testing.assert_close(net[0].running_mean, means[-1], rtol=0, atol=1e-12)
        pooled.append(net[0].running_var.clone())
    flat = data.transpose(0, 1).reshape(3, -1)  # (C, N*H*W): every value of a channel
    for m in means:
        torch.testing.assert_close(m, flat.mean(1), rtol=0, atol=1e-12)
    for v in pooled:  # pooled = unbiased variance of the concatenated data
        torch.testing.assert_close(v, flat.var(1, correction=1), rtol=0, atol=1e-12)
    # One batch of everything: both estimators agree.
    torch.testing.assert_close(paper_vars[-1], pooled[-1], rtol=0, atol=1e-12)


def test_pooled_adds_the_spread_of_batch_means():
    # Batches whose means differ (unshuffled data): pooled = within + between spread,
    # the paper's estimate only the within-batch variance.
    batches = [torch.randn(200, 2, dtype=F64) + k for k in range(4)]
    net = nn.Sequential(bnn.BatchNorm1d(2, dtype=F64))
    bnlab.recompute_population_stats(net, batches, progress=False)
    paper = net[0].running_var.clone()
    bnlab.recompute_population_stats(net, batches, estimator="pooled", progress=False)
    torch.testing.assert_close(paper, torch.ones(2, dtype=F64), rtol=0.2, atol=0)
    torch.testing.assert_close(net[0].running_var, torch.cat(batches).var(0), rtol=0, atol=1e-12)
    assert (net[0].running_var - paper > 1).all()  # Var of the offsets 0..3 is 1.25


def test_unequal_batch_sizes_are_weighted_by_count():
    data = torch.randn(10, 3, dtype=F64)
    net = nn.Sequential(bnn.BatchNorm1d(3, dtype=F64))
    bnlab.recompute_population_stats(net, [data[:3], data[3:]], progress=False)
    torch.testing.assert_close(net[0].running_mean, data.mean(0), rtol=0, atol=1e-12)
    expected_var = (3 * data[:3].var(0) + 7 * data[3:].var(0)) / 10
    torch.testing.assert_close(net[0].running_var, expected_var, rtol=0, atol=1e-12)


def test_following_layers_see_batch_normalized_inputs():
    net = nn.Sequential(bnn.BatchNorm1d(3, dtype=F64), nn.Linear(3, 3).double())
    net.append(bnn.BatchNorm1d(3, dtype=F64))
    data = torch.randn(50, 3, dtype=F64) * 5 + 3
    bnlab.recompute_population_stats(net, [data], progress=False)
    with torch.no_grad():
        centered = (data - data.mean(0)) / torch.sqrt(data.var(0, correction=0) + 1e-5)
        expected = net[1](centered).mean(0)  # not net[1](data): the BN output as in training
    torch.testing.assert_close(net[2].running_mean, expected, rtol=0, atol=1e-12)


def test_dropout_inactive_modes_restored_and_unreached_reported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)
            self.bn = bnn.BatchNorm1d(4, dtype=F64)
            self.unused = bnn.BatchNorm1d(4, dtype=F64)

        def forward(self, x):
            return self.bn(self.drop(x))

    net = TwoHeads()
    net.train()
    net.unused.eval()
    data = torch.randn(32, 4, dtype=F64)
    with pytest.warns(UserWarning, match=r"never reached.*\['unused'\]"):
        report = bnlab.recompute_population_stats(net, [data], progress=False)
    assert report.unreached == ["unused"] and [s.name for s in report.layers] == ["bn"]
    # With dropout active the mean would be that of a 90%-zeroed, rescaled input.
    torch.testing.assert_close(net.bn.running_mean, data.mean(0), rtol=0, atol=1e-12)
    assert net.training and net.drop.training and net.bn.training and not net.unused.training
    torch.testing.assert_close(net.unused.running_mean, torch.zeros(4, dtype=F64))
    assert int(net.bn.num_batches_tracked) == 0  # restored as well


def test_forward_callable_tuples_and_num_batches():
    net = nn.Sequential(bnn.BatchNorm1d(2, dtype=F64))
    data = [torch.randn(8, 2, dtype=F64) for _ in range(5)]
    it = iter([{"x": d} for d in data])
    report = bnlab.recompute_population_stats(
        net, it, num_batches=3, forward=lambda model, b: model(b["x"]), progress=False
    )
    assert report.batches == 3 and next(it)["x"] is data[3]  # no batch consumed beyond 3
    torch.testing.assert_close(net[0].running_mean, torch.cat(data[:3]).mean(0))
    pairs = [(d, torch.zeros(8)) for d in data]
    bnlab.recompute_population_stats(net, pairs, progress=True)  # not a TTY: no bar
    torch.testing.assert_close(net[0].running_mean, torch.cat(data).mean(0))
    with pytest.raises(TypeError, match="forward="):
        bnlab.recompute_population_stats(net, [{"x": data[0]}], progress=False)


def test_stderr_and_tolerance_stop():
    data = [torch.randn(50, 2, dtype=F64) for _ in range(200)]
    net = nn.Sequential(bnn.BatchNorm1d(2, dtype=F64))
    report = bnlab.recompute_population_stats(net, data[:10], compute_stderr=True, progress=False)
    means = torch.stack([d.mean(0) for d in data[:10]])
    uvars = torch.stack([d.var(0) for d in data[:10]])
    torch.testing.assert_close(report.layers[0].mean_stderr, means.std(0) / 10**0.5)
    torch.testing.assert_close(report.layers[0].var_stderr, uvars.std(0) / 10**0.5)
    report = bnlab.recompute_population_stats(net, data, tol=0.05, progress=False)
    assert report.stopped_early and 2 <= report.batches < 200
    se = report.layers[0].mean_stderr
    assert se is not None and (se < 0.05 * net[0].running_var.sqrt()).all()
    report = bnlab.recompute_population_stats(net, data[:5], progress=False)
    assert report.layers[0].mean_stderr is None and not report.stopped_early


def test_frozen_bn_is_still_recomputed_and_stays_frozen():
    net = bnlab.freeze_batchnorm(nn.Sequential(bnn.BatchNorm1d(3, dtype=F64)))
    data = torch.randn(20, 3, dtype=F64) + 4
    bnlab.recompute_population_stats(net, [data], progress=False)
    torch.testing.assert_close(net[0].running_mean, data.mean(0), rtol=0, atol=1e-12)
    net.train()
    assert not net[0].training


def test_bad_input_leaves_the_model_unchanged():
    with pytest.raises(ValueError, match="no batches"):
        bnlab.recompute_population_stats(_single_bn_net(), [], progress=False)
    with pytest.raises(ValueError, match="no BN layer"):
        bnlab.recompute_population_stats(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    net = nn.Sequential(bnn.BatchNorm1d(3))
    net[0].running_mean.fill_(7)
    with pytest.raises(ValueError, match="batch 1: Expected more than 1 value per channel"):
        bnlab.recompute_population_stats(net, [torch.randn(4, 3), torch.randn(1, 3)])
    assert net.training and net[0].momentum == 0.1  # restored after the error
    assert (net[0].running_mean == 7).all() and int(net[0].num_batches_tracked) == 0
    with pytest.raises(ValueError, match="estimator"):
        bnlab.recompute_population_stats(net, [torch.randn(4, 3)], estimator="ema")
    with pytest.raises(ValueError, match="num_batches"):
        bnlab.recompute_population_stats(net, [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(ValueError, match="tol"):
        bnlab.recompute_population_stats(net, [torch.randn(4, 3)], tol=-1)
    with pytest.raises(TypeError, match="iterable"):
        bnlab.recompute_population_stats(net, 3)
