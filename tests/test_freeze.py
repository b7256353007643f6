"""freeze_batchnorm / unfreeze_batchnorm: BN kept at its population statistics."""

import copy
import io

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn as bnn
from bnlab.freeze import is_frozen
from bnlab.graph import is_batchnorm

F64 = torch.float64


def bn_mlp():
    net = nn.Sequential(
        nn.Linear(6, 5), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(5, 5), nn.Sigmoid(),
        nn.Linear(5, 2),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="Dropout"):
        return bnlab.insert_batchnorm(net.double())


def _bns(net):
    return [m for m in net.modules() if is_batchnorm(m)]


def test_freezing_survives_model_train_and_keeps_running_stats():
    net = bn_mlp()
    bnlab.freeze_batchnorm(net)
    net.train()
    assert all(not m.training and is_frozen(m) for m in _bns(net))
    assert net.training and net[0].training and net[3].training  # others follow .train()
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in _bns(net)]
    x = torch.randn(8, 6, dtype=F64)
    y = net(x).sum()
    y.backward()
    for m, (rm, rv) in zip(_bns(net), before):  # inference mode: no running-stat update
        torch.testing.assert_close(m.running_mean, rm, rtol=0, atol=0)
        torch.testing.assert_close(m.running_var, rv, rtol=0, atol=0)
        assert m.weight.grad is None and not m.weight.requires_grad
    assert net[0].weight.grad is not None
    # One sample is fine now: the statistics are fixed.
    assert net(x[:1]).shape == (1, 2)


def test_train_affine_only_gamma_beta_get_gradients_in_bn():
    net = bn_mlp()
    bnlab.freeze_batchnorm(net, train_affine=True)
    net.train()
    bns = _bns(net)
    for p in net.parameters():  # fine-tune only the BN affine parameters
        if not any(p is q for m in bns for q in m.parameters()):
            p.requires_grad_(False)
    net(torch.randn(8, 6, dtype=F64)).sum().backward()
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in bns)
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith(("1", "5")))
    assert all(not m.training for m in bns)


def test_unfreeze_restores_mode_and_requires_grad():
    net = bn_mlp()
    bn = net[1]
    bn.bias.requires_grad_(False)  # a setting of the user's, from before freezing
    bnlab.freeze_batchnorm(net)
    bnlab.freeze_batchnorm(net, train_affine=True)  # twice: the first saved flags count
    bnlab.unfreeze_batchnorm(net)
    assert bn.training and bn.weight.requires_grad and not bn.bias.requires_grad
    assert not is_frozen(bn) and "train" not in vars(bn)
    net.eval()
    assert not bn.training
    net.train()
    assert bn.training


def test_frozen_model_copies_and_pickles():
    net = bnlab.freeze_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    for other in (copy.deepcopy(net), _roundtrip(net)):
        other.train()
        assert not other[1].training and other[0].training
        bnlab.unfreeze_batchnorm(other)
        other.train()
        assert other[1].training
    net.train()
    assert not net[1].training  # copies are independent


def _roundtrip(net):
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_errors():
    with pytest.raises(ValueError, match="no BN layer"):
        bnlab.freeze_batchnorm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no BN layer"):
        bnlab.freeze_batchnorm(nn.Sequential(bnn.BatchNorm1d(2, track_running_stats=False)))
    with pytest.raises(TypeError, match="nn.Module"):
        bnlab.freeze_batchnorm(None)
