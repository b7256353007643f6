"""SyncBatchNorm and DDP training on 2 gloo processes, against single-process BN."""

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab.nn as bnn
import bnlab.nn.sync as sync_module
from bnlab import recompute_population_stats
from bnlab.distributed import DistInfo, decided_on_main, shard, sync_running_stats
from bnlab.nn.sync import CollectiveError, CollectiveUsageError
from bnlab.train.loop import train_distributed
from gloo import init_gloo, run_on_gloo, spawn


def _check_sync_vs_single(rank, shape_per_rank, gen_seed, group=None):
    """Each rank holds its slice; compare with local single-process BN on the whole batch.

    rank is the rank within ``group`` (default: the whole world).
    """
    sizes = shape_per_rank[0]
    rest = shape_per_rank[1]
    c = rest[0]
    gen = torch.Generator().manual_seed(gen_seed)
    full = torch.randn(sum(sizes), *rest, generator=gen, dtype=torch.float64) * 2 + 3
    grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    w0 = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    b0 = torch.randn(c, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])

    # Oracle: PyTorch's own batch_norm on the concatenated batch, in one process.
    ref_w, ref_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref_rm, ref_rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    sync = bnn.SyncBatchNorm(c, momentum=0.3, process_group=group, dtype=torch.float64)
    with torch.no_grad():
        sync.weight.copy_(w0)
        sync.bias.copy_(b0)
    for _ in range(2):  # two steps: running statistics too
        xr = full.clone().requires_grad_()
        yr = torch.nn.functional.batch_norm(xr, ref_rm, ref_rv, ref_w, ref_b, True, 0.3)
        yr.backward(grad)
        xs = full[part].clone().requires_grad_()
        ys = sync(xs)
        ys.backward(grad[part])
        torch.testing.assert_close(ys, yr[part], rtol=0, atol=1e-12)
        torch.testing.assert_close(xs.grad, xr.grad[part], rtol=0, atol=1e-12)
        gw, gb = sync.weight.grad.clone(), sync.bias.grad.clone()
        dist.all_reduce(gw, group=group)
        dist.all_reduce(gb, group=group)
        torch.testing.assert_close(gw, ref_w.grad, rtol=0, atol=1e-11)
        torch.testing.assert_close(gb, ref_b.grad, rtol=0, atol=1e-11)
        sync.weight.grad = sync.bias.grad = ref_w.grad = ref_b.grad = None
    torch.testing.assert_close(sync.running_mean, ref_rm, rtol=0, atol=1e-12)
    torch.testing.assert_close(sync.running_var, ref_rv, rtol=0, atol=1e-12)
    assert sync.num_batches_tracked.item() == 2
    return sync


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False), bnn.BatchNorm1d(8), nn.Sigmoid(), nn.Linear(8, 3)
    ).double()


def _sync_checks(rank):
    _check_sync_vs_single(rank, ((3, 5), (4, 3, 2)), 0)  # 3-D, unequal 3 + 5
    _check_sync_vs_single(rank, ((3, 5), (4, 2, 3, 2)), 1)  # 4-D
    _check_sync_vs_single(rank, ((3, 5), (4,)), 2)  # 2-D
    _check_sync_vs_single(rank, ((3, 5), (2, 2, 2, 3)), 3)  # 5-D
    sync = _check_sync_vs_single(rank, ((0, 8), (4, 3)), 4)  # rank 0 has an empty batch
    # eval mode is local: no collective (rank 1 would hang otherwise), running stats used
    sync.eval()
    if rank == 0:
        x = torch.randn(5, 4, 3, dtype=torch.float64)
        ref = (x - sync.running_mean[:, None]) / torch.sqrt(sync.running_var[:, None] + 1e-5)
        torch.testing.assert_close(sync(x), ref * sync.weight[:, None] + sync.bias[:, None])
    dist.barrier()
    # Population statistics (Algorithm 2, steps 8-10) through SyncBatchNorm: each global
    # batch is the union of the slices (3 + 5), so both ranks get the single-process
    # estimates (averaging per-rank statistics would not: the slices are unequal).
    net = bnn.convert_sync_batchnorm(_mlp())
    ref = bnn.revert_sync_batchnorm(copy.deepcopy(net))
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(8, 6, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    recompute_population_stats(ref, batches, progress=False)
    mine = [b[:3] if rank == 0 else b[3:] for b in batches]
    report = recompute_population_stats(net, mine, progress=False)
    assert report.layers[0].values == 32 and report.layers[0].batches == 4
    assert not torch.allclose(ref[1].running_var, torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, rtol=0, atol=1e-12)
    # DDP training on 2 processes equals single-process training on the whole batch
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    single = train_distributed(_mlp(), x, y, info=DistInfo(), steps=4, batch_size=9, lr=0.5)
    info = DistInfo(rank=rank, world_size=2)
    ddp = train_distributed(_mlp(), x, y, info=info, steps=4, batch_size=9, lr=0.5)  # 5 + 4
    assert any(isinstance(m, bnn.SyncBatchNorm) for m in ddp.modules())
    for a, b in zip(ddp.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ddp.buffers(), single.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sync_batchnorm_and_ddp_on_two_gloo_processes():
    run_on_gloo(_sync_checks)


def _subgroup_checks(rank):
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])  # every rank creates both
    if rank < 2:
        # statistics over ranks 0 and 1 only (3 + 5 samples); rank 2 takes no part, so a
        # collective over the whole world would stall and fail with the timeout
        _check_sync_vs_single(rank, ((3, 5), (4, 3)), 6, group=pair)
    else:
        # a group of one: plain local BN over this rank's own batch
        _check_sync_vs_single(0, ((6,), (4, 2, 2)), 7, group=alone)
    dist.barrier()


@pytest.mark.slow
def test_process_group_subgroups_are_respected():
    run_on_gloo(_subgroup_checks, world=3, timeout=30)


def _stall_worker(rank, path, results):
    try:
        init_gloo(rank, 2, path, timeout=3)
        bn = bnn.SyncBatchNorm(3)
        ones = torch.ones(3)
        if rank == 1:
            time.sleep(8)  # never joins the collective within the timeout
            results.put((rank, "slept"))
            return
        t0 = time.time()
        try:
            bn(torch.randn(4, 3))
            results.put((rank, "no error"))
        except CollectiveError as e:
            ok = "did not complete" in str(e) and "timeout" in str(e) and time.time() - t0 < 30
            # the collective runs before any state changes: nothing half-updated
            ok = ok and bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, ones)
            results.put((rank, "timeout error" if ok else f"unclear: {e}"))
    except BaseException as e:
        results.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.slow
def test_a_stalled_peer_gives_a_clear_timeout_error():
    out = spawn(_stall_worker)
    assert out == {0: "timeout error", 1: "slept"}, out


def test_local_fallback_and_converters():
    sync = bnn.SyncBatchNorm(4, dtype=torch.float64)
    ref = bnn.BatchNorm2d(4, dtype=torch.float64)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x))  # not distributed: plain BN
    torch.testing.assert_close(sync.running_var, ref.running_var)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bnn.BatchNorm1d(2))
    model[1].running_mean.fill_(0.5)
    conv = bnn.convert_sync_batchnorm(model)
    assert isinstance(conv[1], bnn.SyncBatchNorm) and isinstance(conv[2], bnn.SyncBatchNorm)
    torch.testing.assert_close(conv[1].running_mean, torch.full((4,), 0.5))
    back = bnn.revert_sync_batchnorm(conv)
    assert type(back[1]) is nn.BatchNorm2d and type(back[2]) is bnn.BatchNorm1d
    with pytest.raises(ValueError, match="pass cls="):
        bnn.revert_sync_batchnorm(bnn.SyncBatchNorm(3))
    assert type(bnn.revert_sync_batchnorm(bnn.SyncBatchNorm(3), bnn.BatchNorm1d)) is bnn.BatchNorm1d
    assert [shard(9, r, 2) for r in range(2)] == [slice(0, 5), slice(5, 9)]
    with pytest.raises(ValueError, match="expects 2-D to 5-D"):
        sync(torch.randn(4))


def test_train_ddp_cli_validates_options_and_trains_in_one_process(tmp_path, capsys, monkeypatch):
    from bnlab.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train-ddp", "--steps", "0", "--batch-size", "1", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and "--lr must be positive" in err
    assert "--batch-size must be at least 2" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it: ghost needs 2 per process
    assert main(["train-ddp", "--stats", "ghost", "--batch-size", "6"]) == 2
    assert "--batch-size must be at least 8 for 4 process(es)" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    ckpt = tmp_path / "model.pt"
    assert main(["train-ddp", "--steps", "20", "--log-every", "10", "--out", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "1 process(es)" in out and "test accuracy" in out and ckpt.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 20 and any("running_mean" in k for k in state["model"])


def _edge_checks(rank):
    # Double backward through the global statistics is refused, not silently wrong.
    sync = bnn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(sync(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
    # Every slice empty: an empty output, zero gradients, statistics unchanged, the
    # batch counted (as torch's BN does with N = 0).
    sync = bnn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(0, 3, 2, dtype=torch.float64, requires_grad=True)
    y = sync(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(sync.weight.grad, torch.zeros(3, dtype=x.dtype))
    assert torch.equal(sync.running_mean, torch.zeros(3, dtype=x.dtype))
    assert sync.num_batches_tracked.item() == 1
    # A group this process is not in: a usage error, not "a peer may have died".
    solo = dist.new_group([0])
    sync = bnn.SyncBatchNorm(3, process_group=solo)
    if rank == 1:
        with pytest.raises(CollectiveUsageError, match="not a member"):
            sync(torch.randn(4, 3))
        assert sync.num_batches_tracked.item() == 0
    else:
        sync(torch.randn(4, 3))  # a group of one: local BN
    dist.barrier()
    # torch's DDP refuses torch's nn.SyncBatchNorm on CPU, not bnlab's (no subclass of it).
    with pytest.raises(ValueError, match="only work with GPU"):
        torch.nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(_mlp()))
    torch.nn.parallel.DistributedDataParallel(bnn.convert_sync_batchnorm(_mlp()))
    # sync_running_stats: each rank's statistics describe its own equal share of the
    # data, so "mean" gives those of the whole data: the mean of the means, and the
    # mean variance plus the spread of the rank means.
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(2, 50, 8, generator=gen, dtype=torch.float64) * 2
    data[1] += 3  # rank means differ
    net = _mlp()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(data[rank].mean(0))
        bn.running_var.copy_(data[rank].var(0, unbiased=False))
        bn.num_batches_tracked.fill_(5 + rank)
    sync_running_stats(net, op="mean")
    whole = data.reshape(100, 8)
    torch.testing.assert_close(bn.running_mean, whole.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, whole.var(0, unbiased=False), rtol=0, atol=1e-12)
    assert bn.num_batches_tracked.item() == 6
    with torch.no_grad():
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(10 * rank)
    sync_running_stats(net, op="broadcast")
    assert torch.equal(bn.running_mean, torch.zeros(8, dtype=torch.float64))
    assert bn.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="op must be one of"):
        sync_running_stats(net, op="median")


@pytest.mark.slow
def test_sync_edges_on_two_gloo_processes():
    run_on_gloo(_edge_checks)


def _one_look_checks(rank):
    info = DistInfo(rank=rank, world_size=2)

    def only_rank_0(result):
        def decide():
            assert rank == 0, f"rank {rank} looked at the run folder itself"
            if isinstance(result, Exception):
                raise result
            return result

        return decide

    # Rank 0's decision (here: resume) is every rank's; rank 1 never looks for itself, so
    # it cannot see the folder half-written by rank 0 and refuse it (CI's torchrun failure).
    assert decided_on_main(only_rank_0(True), info) is True
    # Rank 0's refusal reaches every rank with its message, instead of leaving rank 1
    # waiting at a barrier for a peer that has exited.
    with pytest.raises(ValueError, match=r"^--out x is not empty"):
        decided_on_main(only_rank_0(ValueError("--out x is not empty; choose another")), info)
    dist.barrier()


@pytest.mark.slow
def test_run_folder_is_judged_once_by_rank_0_for_every_rank():
    run_on_gloo(_one_look_checks)


@pytest.mark.parametrize(
    "error,expected,phrase",
    [
        (RuntimeError("[gloo] Timed out waiting 3000ms for recv"), CollectiveError, "peer"),
        (RuntimeError("Connection closed by peer [127.0.0.1]"), CollectiveError, "peer"),
        (ValueError("Process group 5 is not initialized"), CollectiveUsageError, "usage"),
        (TypeError("expected a ProcessGroup"), CollectiveUsageError, "usage"),
    ],
)
def test_failed_collective_is_classified_and_changes_no_state(monkeypatch, error, expected, phrase):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(sync_module, "group_size", lambda group=None: 2)
    monkeypatch.setattr(sync_module, "_check_member", lambda group: None)
    monkeypatch.setattr(dist, "all_gather", fail)
    bn = bnn.SyncBatchNorm(3, momentum=None)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(expected, match=phrase):
        bn(torch.randn(4, 3))
    for k, v in bn.state_dict().items():  # num_batches_tracked too: counted after
        assert torch.equal(v, before[k]), k
