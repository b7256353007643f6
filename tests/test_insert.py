"""insert_batchnorm: Algorithm 2, steps 1-2, with the placement of Section 3.2."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
import bnlab.nn as bnn
from bnlab.graph import is_batchnorm
from bnlab.insert import Insertion, format_summary, insertion_summary
from bnlab.models import SeedBatchedLinear
from nets import paper_mlp


def mnist_mlp():
    """The paper's Section 4.1 network: 784-100-100-100-10 with sigmoids."""
    return paper_mlp()


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


def test_paper_mnist_network_gets_three_bn_before_the_sigmoids():
    net = mnist_mlp()
    before = copy.deepcopy(net.state_dict())
    bn_net = bnlab.insert_batchnorm(net)
    layers = list(bn_net)
    assert [type(m).__name__ for m in layers] == [
        "Flatten",
        *["Linear", "BatchNorm1d", "Sigmoid"] * 3,
        "Linear",
    ]
    bns = [i for i, m in enumerate(layers) if is_batchnorm(m)]
    assert len(bns) == 3
    for i in bns:
        assert isinstance(layers[i], bnn.BatchNorm1d) and layers[i].num_features == 100
        assert isinstance(layers[i - 1], nn.Linear) and layers[i - 1].bias is None
        assert isinstance(layers[i + 1], nn.Sigmoid)
        assert layers[i].weight.dtype == torch.float64
    assert layers[-1].bias is not None  # the output layer feeds no nonlinearity
    # The copy keeps the weights (both arms of an experiment can start equal) ...
    for a, b in zip([m for m in layers if isinstance(m, nn.Linear)], net[1::2]):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        assert a.weight is not b.weight
    # ... and the original is unchanged.
    assert len(net) == 8 and all(net[i].bias is not None for i in (1, 3, 5, 7))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert bn_net(torch.randn(5, 1, 28, 28, dtype=torch.float64)).shape == (5, 10)


def test_summary_lists_each_insertion_and_formats_it():
    bn_net = bnlab.insert_batchnorm(mnist_mlp())
    summary = insertion_summary(bn_net)
    assert summary == [
        Insertion("1", "2", "BatchNorm1d", 100, "Sigmoid", True),
        Insertion("4", "5", "BatchNorm1d", 100, "Sigmoid", True),
        Insertion("7", "8", "BatchNorm1d", 100, "Sigmoid", True),
    ]
    for i in summary:
        assert is_batchnorm(bn_net.get_submodule(i.batchnorm))
        assert isinstance(bn_net.get_submodule(i.layer), nn.Linear)
    text = format_summary(bn_net)
    assert text == format_summary(summary)
    assert text.startswith("3 BN layer(s) inserted") and text.count("Sigmoid") == 3
    assert insertion_summary(mnist_mlp()) == [] and format_summary([]) == "no BN layers inserted"


@pytest.mark.parametrize(
    "layer,bn_cls,shape",
    [
        (nn.Linear(6, 5), bnn.BatchNorm1d, (4, 6)),
        (nn.Conv1d(3, 5, 3), bnn.BatchNorm1d, (4, 3, 7)),
        (nn.Conv2d(3, 5, 3), bnn.BatchNorm2d, (4, 3, 6, 6)),
        (nn.Conv2d(4, 6, 3, groups=2), bnn.BatchNorm2d, (4, 4, 6, 6)),
        (nn.Conv3d(3, 5, 2), bnn.BatchNorm3d, (2, 3, 4, 4, 4)),
    ],
)
def test_bn_class_follows_the_layer_type(layer, bn_cls, shape):
    bn_net = bnlab.insert_batchnorm(nn.Sequential(layer, nn.ReLU()).double())
    c = layer.weight.shape[0]
    assert type(bn_net[1]) is bn_cls and bn_net[1].num_features == c
    assert bn_net[0].bias is None
    y = bn_net(torch.randn(*shape, dtype=torch.float64))
    # Training mode: each channel of the BN output has zero mean before the ReLU.
    pre = bn_net[1](bn_net[0](torch.randn(*shape, dtype=torch.float64)))
    dims = [0, *range(2, pre.dim())]
    torch.testing.assert_close(pre.mean(dims), torch.zeros(c, dtype=torch.float64))
    assert (y >= 0).all()


def test_nested_conv_net_and_a_linear_feeding_across_sequential_boundaries():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Tanh()),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8 * 4 * 4, 7)),  # its nonlinearity is in the next block
        nn.Sequential(nn.GELU(), nn.Linear(7, 5)),
    ).double()
    bn_net = bnlab.insert_batchnorm(net)
    assert isinstance(bn_net[1], bnn.BatchNorm2d) and bn_net[0].bias is None
    assert isinstance(bn_net[3][1], bnn.BatchNorm2d) and isinstance(bn_net[3][2], nn.Tanh)
    assert isinstance(bn_net[5][1], bnn.BatchNorm1d) and bn_net[5][0].bias is None
    assert bn_net[6][1].bias is not None
    assert [i.batchnorm for i in insertion_summary(bn_net)] == ["1", "3.1", "5.1"]
    assert bn_net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 5)


def test_only_the_given_nonlinearities_and_only_direct_feeds():
    net = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Dropout(0.0)
    )
    net.append(nn.Tanh())  # fed by Dropout, not by the Linear
    with pytest.warns(UserWarning, match="Dropout"):
        bn_net = bnlab.insert_batchnorm(net, nonlinearities=(nn.Tanh,))
    assert [type(m).__name__ for m in bn_net] == [
        "Linear", "ReLU", "Linear", "BatchNorm1d", "Tanh", "Linear", "Dropout", "Tanh",
    ]  # fmt: skip
    assert bn_net[0].bias is not None and bn_net[2].bias is None and bn_net[5].bias is not None


def test_traced_residual_block_with_functional_relu():
    block = ResidualBlock().double()
    bn_block = bnlab.insert_batchnorm(block)
    ins = insertion_summary(bn_block)
    assert [(i.layer, i.batchnorm, i.bn_type, i.nonlinearity) for i in ins] == [
        ("conv1", "bn_conv1", "BatchNorm2d", "relu")
    ]
    assert bn_block.conv1.bias is None and block.conv1.bias is not None
    assert bn_block.conv2.bias is not None  # conv2 feeds the addition, not a nonlinearity
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    bn1 = bn_block.bn_conv1
    expected = F.relu(x + bn_block.conv2(F.relu(bn1(bn_block.conv1(x)))))
    torch.testing.assert_close(bn_block(x), expected, rtol=0, atol=0)
    assert not any(is_batchnorm(m) for m in block.modules())  # original unchanged


def test_traced_model_with_sigmoid_function_method_and_kept_modes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 4)
            self.head = nn.Sequential(nn.Linear(4, 4), nn.SiLU())

        def forward(self, x):
            return self.head(self.b(torch.sigmoid(self.a(x))).relu())

    net = Net().double().eval()
    bn_net = bnlab.insert_batchnorm(net)
    ins = {i.layer: i for i in insertion_summary(bn_net)}
    assert set(ins) == {"a", "b", "head.0"}
    assert ins["a"].nonlinearity == "sigmoid" and ins["b"].nonlinearity == ".relu()"
    assert ins["head.0"].nonlinearity == "SiLU"
    assert all(not m.training for m in bn_net.modules())  # eval copy stays in eval
    assert bn_net(torch.randn(2, 3, dtype=torch.float64)).shape == (2, 4)


def test_custom_layer_opts_in_with_batchnorm_class():
    from bnlab.models.mlp import SeedBatchedLinear

    net = nn.Sequential(SeedBatchedLinear(2, 3, 4), nn.Sigmoid(), SeedBatchedLinear(2, 4, 2))
    bn_net = bnlab.insert_batchnorm(net)
    assert isinstance(bn_net[1], bnn.BatchNorm1d) and bn_net[0].bias is None


def test_bn_settings_and_training_step():
    bn_net = bnlab.insert_batchnorm(mnist_mlp(), momentum=None, eps=1e-3)
    bns = [m for m in bn_net.modules() if is_batchnorm(m)]
    assert all(m.momentum is None and m.eps == 1e-3 for m in bns)
    bn_net(torch.randn(8, 1, 28, 28, dtype=torch.float64)).sum().backward()
    assert all(m.weight.grad is not None for m in bns)


def test_errors_name_the_problem():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), Gate())

        def forward(self, x):
            return torch.relu(self.body(x))

    with pytest.raises(ValueError, match=r"could not trace 'body\.1' \(Gate\) inside DataDep"):
        bnlab.insert_batchnorm(DataDependent())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return torch.sigmoid(h) + h  # h also used outside the nonlinearity

    with pytest.raises(ValueError, match="'lin'.*more than the nonlinearity"):
        bnlab.insert_batchnorm(Branchy())
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shared module"):
        bnlab.insert_batchnorm(nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU()))
    with pytest.raises(ValueError, match="found no nonlinearity"):
        bnlab.insert_batchnorm(nn.Sequential(nn.Linear(3, 3)))
    for bn_net in (  # already a BN network: say so, rather than advise nonlinearities=
        bnlab.insert_batchnorm(mnist_mlp()),
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()),
    ):
        with pytest.raises(ValueError, match="already has BN.*already a BN network") as info:
            bnlab.insert_batchnorm(bn_net)
        assert "nonlinearities=" not in str(info.value)
    with pytest.raises(TypeError, match="nn.Module"):
        bnlab.insert_batchnorm(lambda x: x)
    with pytest.raises(TypeError, match="nonlinearities entries"):
        bnlab.insert_batchnorm(mnist_mlp(), nonlinearities=(3,))
    with pytest.raises(ValueError, match="empty"):
        bnlab.insert_batchnorm(mnist_mlp(), nonlinearities=())


def test_algorithm2_readme_examples_run(capsys):
    doc = Path(__file__).resolve().parents[1] / "docs" / "readme" / "algorithm2.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
    assert "BN layer(s) inserted" in capsys.readouterr().out


def test_fx_path_treats_seed_batched_layers_as_leaves():
    """A non-Sequential model with a SeedBatchedLinear (which fx cannot trace inside)
    gets its BN through the torch.fx path: one BatchNorm1d over all copies' features."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = SeedBatchedLinear(2, 4, 3)
            nn.init.normal_(self.lin.weight)

        def forward(self, x):
            return torch.sigmoid(self.lin(x)) * 2

    torch.manual_seed(0)
    net = Net()
    bn_net = bnlab.insert_batchnorm(net)
    bns = [m for m in bn_net.modules() if isinstance(m, bnn.BatchNorm1d)]
    assert len(bns) == 1 and bns[0].num_features == 6 and bn_net.lin.bias is None
    x = torch.randn(5, 8)
    z = torch.bmm(net.lin.weight, x.view(5, 2, 4).permute(1, 2, 0)).permute(2, 0, 1)
    z = z.reshape(5, 6)
    ref = torch.sigmoid((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)) * 2
    torch.testing.assert_close(bn_net(x), ref, rtol=1e-5, atol=1e-6)
