"""bnlab.accumulate: one running-statistics update per optimizer step, equal to one big batch."""

import contextlib
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlab
import bnlab.nn as bnn
from bnlab.accumulation import BatchNormAccumulation
from gloo import run_on_gloo

# (bnlab class, torch class, shape of one example)
SHAPES = [
    (bnn.BatchNorm1d, nn.BatchNorm1d, (4,)),
    (bnn.BatchNorm1d, nn.BatchNorm1d, (4, 3)),
    (bnn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 2)),
    (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 2, 3, 2)),
]
SPLIT = [2, 7, 3]  # unequal micro-batches of one 12-example mini-batch (_data's default)


def _data(step, shape, n=12):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64) * 3 + 5


def _assert_same_stats(a, b, atol=1e-12):
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=atol)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=atol)
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item()


@pytest.mark.parametrize("torch_bn", [False, True], ids=["bnlab", "torch"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("ours, theirs, shape", SHAPES, ids=["1d", "1d-L", "2d", "3d"])
def test_micro_batches_update_like_one_big_batch(ours, theirs, shape, momentum, torch_bn):
    cls = theirs if torch_bn else ours
    acc_bn = cls(shape[0], momentum=momentum, dtype=torch.float64)
    big_bn = cls(shape[0], momentum=momentum, dtype=torch.float64)
    worst = 0.0
    for step in range(3):
        x = _data(step, shape)
        big_bn(x)
        with bnlab.accumulate(acc_bn, micro_batches=len(SPLIT)) as acc:
            outs = [acc_bn(part) for part in x.split(SPLIT)]
        assert acc.micro_batches_seen == 3 and acc.updated == [type(acc_bn).__name__]
        worst = max(worst, (acc_bn.running_var - big_bn.running_var).abs().max().item())
        _assert_same_stats(acc_bn, big_bn)
    assert acc_bn.num_batches_tracked.item() == 3
    assert worst <= 1e-12
    # normalization stays per micro-batch: the last micro-batch is standardized on its own
    last = outs[-1].transpose(0, 1).reshape(shape[0], -1)
    torch.testing.assert_close(last.mean(1), torch.zeros(shape[0], dtype=torch.float64))


def test_without_accumulation_the_statistics_differ():
    """The reason for accumulate: k updates per step are not one big batch's update."""
    a, b = bnn.BatchNorm1d(4, dtype=torch.float64), bnn.BatchNorm1d(4, dtype=torch.float64)
    x = _data(0, (4,))
    b(x)
    for part in x.split(SPLIT):
        a(part)
    assert (a.running_var - b.running_var).abs().max() > 1e-3
    assert a.num_batches_tracked.item() == 3


class _Shared(nn.Module):
    """One BN layer called twice per forward (weight sharing): two updates per batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()
        self.bn = nn.BatchNorm1d(4, momentum=None).double()

    def forward(self, x):
        return self.bn(self.lin(self.bn(x)) * 0) + self.bn(2 * x + 1)


def test_layer_called_twice_per_forward_merges_per_position():
    acc_net, big_net = _Shared(), _Shared()
    big_net.load_state_dict(acc_net.state_dict())
    x = _data(0, (4,))
    with torch.no_grad():
        big_net(x)
        with bnlab.accumulate(acc_net, micro_batches=3):
            for part in x.split(SPLIT):
                acc_net(part)
    # the middle call sees a constant input (0 * ...): its per-position merge matters
    _assert_same_stats(acc_net.bn, big_net.bn)
    assert acc_net.bn.num_batches_tracked.item() == 3


def test_model_with_several_layers_first_layer_exact_and_no_hooks_left():
    torch.manual_seed(0)
    net = nn.Sequential(bnn.BatchNorm1d(6), nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5)).double()
    ref = nn.Sequential(bnn.BatchNorm1d(6), nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5)).double()
    ref.load_state_dict(net.state_dict())
    x = _data(1, (6,))
    ref(x)
    with bnlab.accumulate(net, micro_batches=3) as acc:
        for part in x.split(SPLIT):
            net(part).sum().backward()
    assert acc.updated == ["0", "3"]
    _assert_same_stats(net[0], ref[0])  # the first BN sees the same inputs
    assert net[3].num_batches_tracked.item() == 1  # the second: once, from what it saw
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_exception_inside_restores_the_state():
    bn = bnn.BatchNorm1d(4, dtype=torch.float64)
    bn(_data(0, (4,)))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(KeyError, match="boom"):
        with bnlab.accumulate(bn, micro_batches=3):
            bn(_data(1, (4,)))
            bn(_data(2, (4,)))
            raise KeyError("boom")
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not bn._forward_pre_hooks
    with bnlab.accumulate(bn):  # usable again: nothing is left active
        bn(_data(3, (4,)))
    assert bn.num_batches_tracked.item() == 2


def test_nesting_is_refused():
    net = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    with bnlab.accumulate(net):
        with pytest.raises(RuntimeError, match="nesting is refused"):
            with bnlab.accumulate(net[1]):
                pass
        block = bnlab.accumulate(net)
        with pytest.raises(RuntimeError, match="nesting"):
            block.__enter__()
    with bnlab.accumulate(net[1]):  # after the block: fine
        pass


def test_eval_mode_is_a_no_op():
    bn = nn.BatchNorm1d(4).double()
    bn(_data(0, (4,)))
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with bnlab.accumulate(bn, micro_batches=2) as acc:
        assert not bn._forward_pre_hooks  # no hooks at all
        bn(_data(1, (4,)))
    assert acc.updated == []
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_micro_batch_count_mismatch_merges_what_was_seen_and_warns():
    acc_bn, ref = bnn.BatchNorm1d(4, dtype=torch.float64), bnn.BatchNorm1d(4, dtype=torch.float64)
    x = _data(0, (4,))
    ref(x[:9])
    with pytest.warns(RuntimeWarning, match="expected 3 micro-batches, the model ran 2"):
        with bnlab.accumulate(acc_bn, micro_batches=3):
            acc_bn(x[:2])
            acc_bn(x[2:9])
    _assert_same_stats(acc_bn, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bnlab.accumulate(acc_bn):  # None: no check
            acc_bn(x[:5])


def test_checkpoint_recomputation_is_not_counted():
    lin = nn.Linear(4, 4).double()
    acc_net, ref_net = nn.Sequential(lin, nn.BatchNorm1d(4).double()), None
    ref_net = nn.Sequential(nn.Linear(4, 4).double(), nn.BatchNorm1d(4).double())
    ref_net.load_state_dict(acc_net.state_dict())
    x = _data(0, (4,)).requires_grad_()
    ref_net(x.detach())
    with bnlab.accumulate(acc_net, micro_batches=3) as acc:
        for part in x.split(SPLIT):
            checkpoint(acc_net, part, use_reentrant=False).sum().backward()
    assert acc.micro_batches_seen == 3
    _assert_same_stats(acc_net[1], ref_net[1])


def test_refused_layers_and_arguments():
    with pytest.raises(TypeError, match="ghost BN"):
        bnlab.accumulate(nn.Sequential(bnn.GhostBatchNorm1d(4, virtual_batch_size=2))).__enter__()
    with pytest.raises(TypeError, match="Batch Renorm"):
        bnlab.accumulate(bnn.BatchRenorm1d(4)).__enter__()
    with pytest.raises(ValueError, match="positive int"):
        bnlab.accumulate(nn.BatchNorm1d(4), micro_batches=0)
    with pytest.raises(TypeError, match="nn.Module"):
        bnlab.accumulate(torch.zeros(3))
    assert isinstance(bnlab.accumulate(nn.Linear(2, 2)), BatchNormAccumulation)
    assert bnlab.accumulate is bnlab.accumulation.accumulate  # not shadowed by the module


# ------------------------------------------------------------------ two gloo processes
RANK_SPLITS = ([2, 5, 0], [3, 1, 4])  # micro-batch sizes per rank: unequal, one empty


def _global_batch(step):
    return _data(step, (3, 2), n=sum(map(sum, RANK_SPLITS)))


def _dist_checks(rank):
    torch.manual_seed(0)
    sync = bnn.SyncBatchNorm(3, momentum=None, dtype=torch.float64)
    local = bnn.BatchNorm1d(3, momentum=0.2, dtype=torch.float64)
    ref_sync = nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)  # the whole global batch
    ref_local = nn.BatchNorm1d(3, momentum=0.2, dtype=torch.float64)  # this rank's whole batch
    mine = slice(sum(RANK_SPLITS[0]) if rank else 0, None if rank else sum(RANK_SPLITS[0]))
    for step in range(2):
        x = _global_batch(step)
        ref_sync(x)
        ref_local(x[mine])
        with bnlab.accumulate(nn.ModuleList([sync, local])) as acc:
            for part in x[mine].split(RANK_SPLITS[rank]):
                sync(part).sum().backward()
                local(part)
        assert acc.micro_batches_seen == 0  # layers called directly: merged per layer
    _assert_same_stats(sync, ref_sync)
    _assert_same_stats(local, ref_local)
    assert sync.num_batches_tracked.item() == 2
    # identical on both processes
    both = [torch.empty(6, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(both, torch.cat([sync.running_mean, sync.running_var]))
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=0)
    # a DDP-wrapped model: its forwards are the micro-batches (gradients: no_sync but last)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 3), bnn.BatchNorm1d(3)).double()
    ref = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    ref.load_state_dict(net.state_dict())
    ddp = nn.parallel.DistributedDataParallel(bnn.convert_sync_batchnorm(net))
    x = _data(5, (3,), n=sum(map(sum, RANK_SPLITS)))
    ref(x)
    parts = x[mine].split(RANK_SPLITS[rank])
    with bnlab.accumulate(ddp, micro_batches=3) as acc:
        for k, part in enumerate(parts):
            with ddp.no_sync() if k < len(parts) - 1 else contextlib.nullcontext():
                ddp(part).sum().backward()
    assert acc.micro_batches_seen == 3 and acc.updated == ["module.1"]
    _assert_same_stats(ddp.module[1], ref[1])


@pytest.mark.slow
def test_sync_batchnorm_accumulates_across_two_gloo_processes():
    run_on_gloo(_dist_checks)
