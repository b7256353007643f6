"""fold_batchnorm: Algorithm 2, step 11 (inference BN as a fixed affine map, folded)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

import bnlab
import bnlab.nn as bnn
from bnlab.fold import ChannelAffine, fold_conv_bn_weights, fold_linear_bn_weights
from bnlab.functional import inference_affine
from bnlab.graph import is_batchnorm

F64 = torch.float64


def _warm(net, shape):
    """Non-trivial gamma, beta and running statistics, then eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if is_batchnorm(m) and m.affine:
                m.weight.uniform_(0.5, 2)
                m.bias.normal_()
        for _ in range(3):
            net(torch.randn(*shape, dtype=F64) * 2 + 1)
    return net.eval()


@pytest.mark.parametrize(
    "net,shape,expect_affine",
    [
        (nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4)), (6, 5), 0),
        (nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)), (6, 5), 0),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), (4, 3, 6, 6), 0),
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bnn.BatchNorm2d(4)), (4, 3, 6, 6), 0),
        (
            nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), bnn.BatchNorm2d(6)),
            (4, 4, 6, 6),
            0,
        ),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)), (4, 4, 6, 6), 0),
        (nn.Sequential(nn.Conv1d(3, 4, 3), bnn.BatchNorm1d(4)), (4, 3, 7), 0),
        (nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (3, 2, 4, 4, 4), 0),
        (nn.Sequential(nn.ReLU(), bnn.BatchNorm1d(5)), (6, 5), 1),  # no neighbour
        (nn.Sequential(nn.Linear(5, 4), bnn.BatchNorm1d(4, affine=False)), (6, 5), 0),
        (nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False)), (6, 5), 0),
        (nn.Sequential(bnn.BatchNorm1d(5, affine=False), nn.Linear(5, 2)), (6, 5), 1),
        (bnn.BatchNorm2d(3), (4, 3, 2, 2), 1),
        (nn.Sequential(nn.Sequential(nn.Linear(5, 4)), bnn.BatchNorm1d(4)), (6, 5), 1),
    ],
)
def test_folded_equals_original_in_float64(net, shape, expect_affine):
    net = _warm(net.double(), shape)
    state = copy.deepcopy(net.state_dict())
    folded = bnlab.fold_batchnorm(net)
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == expect_affine
    assert not folded.training
    x = torch.randn(*shape, dtype=F64) * 3 - 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-9)
    for k, v in net.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert any(is_batchnorm(m) for m in net.modules())


def test_pure_functions_match_torch_fusion():
    rm, rv = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    gamma, beta = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    scale, shift = inference_affine(rm, rv, gamma, beta, 1e-5)
    w, b = torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)
    ref_w, ref_b = fuse_linear_bn_weights(w, b, rm, rv, 1e-5, gamma, beta)
    ours = fold_linear_bn_weights(w, b, scale, shift)
    torch.testing.assert_close(ours, (ref_w, ref_b), rtol=0, atol=1e-12)
    cw = torch.randn(4, 2, 3, 3, dtype=F64)  # grouped: (out, in/groups, kh, kw)
    ref_w, ref_b = fuse_conv_bn_weights(cw, None, rm, rv, 1e-5, gamma, beta)
    torch.testing.assert_close(
        fold_conv_bn_weights(cw, None, scale, shift), (ref_w, ref_b), rtol=0, atol=1e-12
    )


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_side = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.bn_side(x) + self.conv2(F.relu(self.conv1(x))))


def test_fold_through_fx_on_a_residual_block():
    net = bnlab.insert_batchnorm(ResidualBlock().double())
    net = _warm(net.train(), (4, 4, 5, 5))
    folded = bnlab.fold_batchnorm(net)
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert isinstance(folded.bn_side, ChannelAffine)  # fed by the block's input
    assert folded.conv1.bias is not None  # the folded shift is the new bias
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-9)


def test_paper_mlp_folds_into_its_linears():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()
    bn_net = _warm(bnlab.insert_batchnorm(net), (8, 3, 2, 2))
    folded = bnlab.fold_batchnorm(bn_net)
    assert [type(m).__name__ for m in folded] == ["Flatten", "Linear", "Sigmoid", "Linear"]
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn_net(x), rtol=0, atol=1e-9)


def test_refuses_training_mode_and_unfoldable_bn():
    net = nn.Sequential(nn.Linear(3, 3), bnn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="eval mode.*model.eval"):
        bnlab.fold_batchnorm(net)
    net.eval()
    net[1].train()
    with pytest.raises(ValueError, match=r"\['1'\]"):
        bnlab.fold_batchnorm(net)
    no_stats = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnlab.fold_batchnorm(no_stats.eval())
    with pytest.raises(TypeError, match="nn.Module"):
        bnlab.fold_batchnorm("model")


def test_channel_affine():
    aff = ChannelAffine(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0]))
    x = torch.ones(3, 2, 4)
    y = aff(x)
    assert (y[:, 0] == 2.5).all() and (y[:, 1] == -1).all()
    assert set(aff.state_dict()) == {"scale", "shift"}
    centered = ChannelAffine(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0]), torch.ones(2))
    assert (centered(x)[:, 0] == 0.5).all() and set(centered.state_dict()) == {
        "scale",
        "shift",
        "center",
    }
