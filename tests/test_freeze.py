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


# --------------------------------------------------------------------------
# Freezing survives every converter, in both directions (issue 18): the new layer
# is frozen too, so .train() leaves it normalizing with the running statistics.
# --------------------------------------------------------------------------


def _from_sync(cls):
    """A SyncBatchNorm made by convert_sync_batchnorm from a ``cls`` layer."""
    return lambda c: bnn.convert_sync_batchnorm(cls(c))


CONVERSIONS = {  # name: (source layer, converter, class of the converted layer)
    "replace torch->bnlab 2d": (nn.BatchNorm2d, bnn.replace_batchnorm, bnn.BatchNorm2d),
    "replace torch->bnlab 1d": (nn.BatchNorm1d, bnn.replace_batchnorm, bnn.BatchNorm1d),
    "revert bnlab->torch 2d": (bnn.BatchNorm2d, bnn.revert_batchnorm, nn.BatchNorm2d),
    "revert bnlab->torch 3d": (bnn.BatchNorm3d, bnn.revert_batchnorm, nn.BatchNorm3d),
    "to sync from torch": (nn.BatchNorm2d, bnn.convert_sync_batchnorm, bnn.SyncBatchNorm),
    "to sync from bnlab": (bnn.BatchNorm2d, bnn.convert_sync_batchnorm, bnn.SyncBatchNorm),
    "to sync from torch sync": (nn.SyncBatchNorm, bnn.convert_sync_batchnorm, bnn.SyncBatchNorm),
    "revert sync->torch": (_from_sync(nn.BatchNorm2d), bnn.revert_sync_batchnorm, nn.BatchNorm2d),
    "revert sync->bnlab": (_from_sync(bnn.BatchNorm2d), bnn.revert_sync_batchnorm, bnn.BatchNorm2d),
    "revert sync->cls": (
        bnn.SyncBatchNorm, lambda m: bnn.revert_sync_batchnorm(m, bnn.BatchNorm2d), bnn.BatchNorm2d
    ),
    "replace torch sync->bnlab sync": (nn.SyncBatchNorm, bnn.replace_batchnorm, bnn.SyncBatchNorm),
    "revert bnlab sync->torch sync": (bnn.SyncBatchNorm, bnn.revert_batchnorm, nn.SyncBatchNorm),
    "to batch renorm": (nn.BatchNorm2d, bnn.convert_to_batch_renorm, bnn.BatchRenorm2d),
    "to ghost": (
        nn.BatchNorm2d, lambda m: bnn.convert_to_ghost_batchnorm(m, 2), bnn.GhostBatchNorm2d
    ),
}  # fmt: skip


def _frozen_net(make_bn, train_affine):
    bn = make_bn(4)
    dims = 2 if isinstance(bn, nn.BatchNorm1d) else 5 if isinstance(bn, nn.BatchNorm3d) else 4
    net = nn.Sequential(nn.Conv2d(3, 4, 1) if dims == 4 else nn.Identity(), bn).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # population statistics and affine parameters far from the defaults
        bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(4, generator=gen, dtype=F64) + 0.5)
        bn.num_batches_tracked.fill_(7)
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    bnlab.freeze_batchnorm(net, train_affine=train_affine)
    shape = {2: (6, 4), 4: (6, 3, 2, 2), 5: (6, 4, 2, 2, 2)}[dims]
    return net, torch.randn(shape, generator=gen, dtype=F64) * 3 + 1


@pytest.mark.parametrize("train_affine", [False, True], ids=["frozen", "train_affine"])
@pytest.mark.parametrize("name", CONVERSIONS)
def test_freezing_survives_every_converter(name, train_affine):
    make_bn, convert, target = CONVERSIONS[name]
    net, x = _frozen_net(make_bn, train_affine)
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    net = convert(net)
    bn = net[1]
    assert type(bn) is target
    net.train()
    y = net(x.requires_grad_())
    for k, v in bn.state_dict().items():  # no running-stat update, no batch counted
        assert torch.equal(v, before[k]), f"{k} changed: the freeze was lost"
    assert net.training and net[0].training and not bn.training and is_frozen(bn)
    h = net[0](x)
    expected = torch.nn.functional.batch_norm(
        h, before["running_mean"], before["running_var"], before["weight"], before["bias"],
        training=False, eps=bn.eps,
    )  # fmt: skip
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # gamma and beta train only with train_affine; the other layers are untouched.
    assert bn.weight.requires_grad is train_affine and bn.bias.requires_grad is train_affine
    y.sum().backward()
    assert (bn.weight.grad is not None) is train_affine
    # unfreezing the converted model restores the flags and the train/eval switch
    bnlab.unfreeze_batchnorm(net)
    assert bn.training and bn.weight.requires_grad and "train" not in vars(bn)


def test_freezing_survives_a_round_trip_and_a_copy():
    net, x = _frozen_net(nn.BatchNorm2d, train_affine=True)
    ref = net(x)
    net = bnn.revert_sync_batchnorm(bnn.convert_sync_batchnorm(bnn.replace_batchnorm(net)))
    net = copy.deepcopy(bnn.revert_batchnorm(net))
    assert type(net[1]) is nn.BatchNorm2d and is_frozen(net[1])
    net.train()
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    assert net[1].weight.requires_grad and not net[1].training
