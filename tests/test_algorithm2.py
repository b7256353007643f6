"""Algorithm 2 end to end: insert BN, population statistics, folding, freezing."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import bnlab
import bnlab.nn as bnn
from bnlab.fold import ChannelAffine
from bnlab.insert import format_summary, insertion_summary


def mnist_mlp():
    """The paper's Section 4.1 network: 784-100-100-100-10 with sigmoids."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 100),
        nn.Sigmoid(),
        nn.Linear(100, 100),
        nn.Sigmoid(),
        nn.Linear(100, 100),
        nn.Sigmoid(),
        nn.Linear(100, 10),
    ).double()


def conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Tanh()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).double()


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return TF.relu(x + self.conv2(TF.relu(self.conv1(x))))


# ---------------------------------------------------------------- insert_batchnorm


def test_insert_on_the_paper_mnist_network():
    net = mnist_mlp()
    before = copy.deepcopy(net.state_dict())
    bn_net = bnlab.insert_batchnorm(net)
    layers = list(bn_net)
    bns = [i for i, m in enumerate(layers) if isinstance(m, bnn.BatchNorm1d)]
    assert len(bns) == 3
    for i in bns:
        assert isinstance(layers[i - 1], nn.Linear) and layers[i - 1].bias is None
        assert isinstance(layers[i + 1], nn.Sigmoid)
    assert layers[-1].bias is not None  # output layer untouched
    # Weights kept (both arms can start equal); original unchanged.
    torch.testing.assert_close(layers[1].weight, net[1].weight)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert net[1].bias is not None and len(net) == 8
    assert len(insertion_summary(bn_net)) == 3
    assert "3 BN layer(s) inserted" in format_summary(insertion_summary(bn_net))
    assert bn_net(torch.randn(5, 1, 28, 28, dtype=torch.float64)).shape == (5, 10)


def test_insert_on_nested_conv_net():
    bn_net = bnlab.insert_batchnorm(conv_net())
    kinds = [type(m) for m in bn_net.modules()]
    assert kinds.count(bnn.BatchNorm2d) == 2
    assert bn_net[0].bias is None and bn_net[3][0].bias is None
    assert isinstance(bn_net[3][1], bnn.BatchNorm2d) and isinstance(bn_net[3][2], nn.Tanh)
    assert bn_net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 5)


def test_insert_through_fx_on_a_residual_block():
    block = ResidualBlock()
    bn_block = bnlab.insert_batchnorm(block)
    ins = insertion_summary(bn_block)
    assert [(i.layer, i.bn_type, i.nonlinearity) for i in ins] == [("conv1", "BatchNorm2d", "relu")]
    assert bn_block.conv1.bias is None and block.conv1.bias is not None
    assert bn_block.conv2.bias is not None  # conv2 feeds the addition, not a nonlinearity
    x = torch.randn(3, 4, 5, 5)
    bn1 = bn_block.get_submodule(ins[0].batchnorm)
    expected = TF.relu(x + bn_block.conv2(TF.relu(bn1(bn_block.conv1(x)))))
    torch.testing.assert_close(bn_block(x), expected)


def test_insert_errors():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return torch.sigmoid(h) + h  # h also used outside the nonlinearity

    with pytest.raises(ValueError, match="'lin'.*more than the nonlinearity"):
        bnlab.insert_batchnorm(Branchy())

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.lin(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="could not trace DataDependent"):
        bnlab.insert_batchnorm(DataDependent())
    with pytest.raises(ValueError, match="found no nonlinearity"):
        bnlab.insert_batchnorm(nn.Sequential(nn.Linear(3, 3)))


# ------------------------------------------------------ recompute_population_stats


def _trained(net, shape, steps=5):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(*shape, dtype=torch.float64)).square().mean().backward()
        opt.step()
    return net


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: bnlab.insert_batchnorm(mnist_mlp()), (16, 1, 28, 28)),
        (lambda: bnlab.insert_batchnorm(conv_net()), (8, 3, 8, 8)),
    ],
)
def test_population_stats_match_torch_cumulative_average_oracle(make, shape):
    net = _trained(make(), shape)
    batches = [torch.randn(*shape, dtype=torch.float64) for _ in range(6)]
    # Oracle: PyTorch's BN with momentum=None averages batch means and unbiased variances.
    oracle = bnn.revert_batchnorm(copy.deepcopy(net))
    oracle.eval()
    for m in oracle.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
            m.train()
    with torch.no_grad():
        for b in batches:
            oracle(b)
    net.train()
    report = bnlab.recompute_population_stats(net, batches, progress=False)
    assert report.batches == 6 and not report.unreached
    ours = [m for m in net.modules() if isinstance(m, bnn.BatchNorm1d | bnn.BatchNorm2d)]
    ref = [m for m in oracle.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)
    assert net.training and all(m.momentum == 0.1 for m in ours)  # restored


def _single_bn_net():
    return nn.Sequential(bnn.BatchNorm2d(3, dtype=torch.float64))


def test_batch_split_invariance_and_pooled_estimator():
    data = torch.randn(24, 3, 4, 4, dtype=torch.float64) * 2 + 1
    means, pooled = [], []
    for size in (4, 6, 12):
        net = _single_bn_net()
        bnlab.recompute_population_stats(net, list(data.split(size)), progress=False)
        means.append(net[0].running_mean.clone())
        net = _single_bn_net()
        bnlab.recompute_population_stats(
            net, list(data.split(size)), estimator="pooled", progress=False
        )
        pooled.append(net[0].running_var.clone())
    for m in means[1:]:
        torch.testing.assert_close(m, means[0], rtol=0, atol=1e-12)
    flat = data.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(means[0], flat.mean(1))
    for v in pooled:  # pooled = unbiased variance of the concatenated data
        torch.testing.assert_close(v, flat.var(1, correction=1), rtol=0, atol=1e-12)


def test_unequal_batch_sizes_are_weighted_by_count():
    data = torch.randn(10, 3, dtype=torch.float64)
    net = nn.Sequential(bnn.BatchNorm1d(3, dtype=torch.float64))
    bnlab.recompute_population_stats(net, [data[:3], data[3:]], progress=False)
    torch.testing.assert_close(net[0].running_mean, data.mean(0))
    expected_var = (3 * data[:3].var(0) + 7 * data[3:].var(0)) / 10
    torch.testing.assert_close(net[0].running_var, expected_var)


def test_dropout_inactive_modes_restored_and_unreached_reported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)
            self.bn = bnn.BatchNorm1d(4, dtype=torch.float64)
            self.unused = bnn.BatchNorm1d(4, dtype=torch.float64)

        def forward(self, x):
            return self.bn(self.drop(x))

    net = TwoHeads()
    net.train()
    net.unused.eval()
    data = torch.randn(32, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="never reached"):
        report = bnlab.recompute_population_stats(net, [data], progress=False, compute_stderr=True)
    assert report.unreached == ["unused"]
    # With dropout active the mean would be that of a 90%-zeroed, rescaled input.
    torch.testing.assert_close(net.bn.running_mean, data.mean(0))
    assert net.training and net.drop.training and not net.unused.training
    torch.testing.assert_close(net.unused.running_mean, torch.zeros(4, dtype=torch.float64))


def test_stderr_and_tolerance_stop():
    data = [torch.randn(50, 2, dtype=torch.float64) for _ in range(200)]
    net = nn.Sequential(bnn.BatchNorm1d(2, dtype=torch.float64))
    report = bnlab.recompute_population_stats(net, data, tol=0.05, progress=False)
    assert report.stopped_early and 2 <= report.batches < 200
    se = report.layers[0].mean_stderr
    assert se is not None and (se < 0.05 * net[0].running_var.sqrt()).all()


def test_population_stats_bad_input():
    with pytest.raises(ValueError, match="no batches"):
        bnlab.recompute_population_stats(_single_bn_net(), [], progress=False)
    with pytest.raises(ValueError, match="no BN layer"):
        bnlab.recompute_population_stats(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    net = nn.Sequential(bnn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="batch 0: Expected more than 1 value per channel"):
        bnlab.recompute_population_stats(net, [torch.randn(1, 3)], progress=False)
    assert net.training and net[0].momentum == 0.1  # restored after the error
    with pytest.raises(ValueError, match="estimator"):
        bnlab.recompute_population_stats(net, [torch.randn(4, 3)], estimator="ema")


# ---------------------------------------------------------------- fold_batchnorm


def _warm(net, shape):
    with torch.no_grad():
        for m in net.modules():
            if bnlab.graph.is_batchnorm(m) and m.affine:
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
        for _ in range(3):
            net(torch.randn(*shape, dtype=torch.float64) * 2 + 1)
    return net.eval()


@pytest.mark.parametrize(
    "net,shape,expect_affine",
    [
        (nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4)), (6, 5), 0),
        (nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)), (6, 5), 0),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), (4, 3, 6, 6), 0),
        (
            nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), bnn.BatchNorm2d(6)),
            (4, 4, 6, 6),
            0,
        ),
        (nn.Sequential(nn.Conv1d(3, 4, 3), bnn.BatchNorm1d(4)), (4, 3, 7), 0),
        (nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (3, 2, 4, 4, 4), 0),
        (nn.Sequential(nn.ReLU(), bnn.BatchNorm1d(5)), (6, 5), 1),
        (nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4, affine=False)), (6, 5), 0),
        (bnn.BatchNorm2d(3), (4, 3, 2, 2), 1),
    ],
)
def test_fold_equals_original_in_float64(net, shape, expect_affine):
    net = _warm(net.double(), shape)
    state = copy.deepcopy(net.state_dict())
    folded = bnlab.fold_batchnorm(net)
    assert not any(bnlab.graph.is_batchnorm(m) for m in folded.modules())
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == expect_affine
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-9)
    for k, v in net.state_dict().items():  # original untouched
        torch.testing.assert_close(v, state[k])


def test_fold_through_fx_on_inserted_residual_block():
    net = bnlab.insert_batchnorm(ResidualBlock().double())
    _trained(net, (4, 4, 5, 5))
    net.eval()
    folded = bnlab.fold_batchnorm(net)
    assert not any(bnlab.graph.is_batchnorm(m) for m in folded.modules())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-9)


def test_fold_refuses_training_mode():
    net = nn.Sequential(nn.Linear(3, 3), bnn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="eval mode"):
        bnlab.fold_batchnorm(net)
    net.eval()
    net[1].train()
    with pytest.raises(ValueError, match=r"\['1'\]"):
        bnlab.fold_batchnorm(net)


# ---------------------------------------------------------------- freeze


def test_freeze_survives_train_and_train_affine():
    net = bnlab.insert_batchnorm(mnist_mlp())
    bnlab.freeze_batchnorm(net, train_affine=True)
    net.train()
    bns = [m for m in net.modules() if isinstance(m, bnn.BatchNorm1d)]
    assert all(not m.training for m in bns) and net[1].training
    before = [m.running_mean.clone() for m in bns]
    for p in net.parameters():
        p.requires_grad_(False)
    for m in bns:
        m.weight.requires_grad_(True)
        m.bias.requires_grad_(True)
    net(torch.randn(8, 1, 28, 28, dtype=torch.float64)).sum().backward()
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in bns)
    assert net[1].weight.grad is None
    for m, b in zip(bns, before):  # eval mode: running stats untouched
        torch.testing.assert_close(m.running_mean, b)


def test_freeze_without_affine_then_unfreeze():
    net = bnlab.insert_batchnorm(mnist_mlp())
    bn = net[2]
    bnlab.freeze_batchnorm(net)
    net.train()
    assert not bn.training and not bn.weight.requires_grad
    bnlab.unfreeze_batchnorm(net)
    assert bn.training and bn.weight.requires_grad
    net.eval()
    assert not bn.training
    net.train()
    assert bn.training
    with pytest.raises(ValueError, match="no BN layer"):
        bnlab.freeze_batchnorm(nn.Linear(2, 2))
