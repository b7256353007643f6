"""bnlab's SyncBatchNorm under torch's own DistributedDataParallel on CPU (gloo).

torch's DDP refused every ``torch.nn.SyncBatchNorm`` instance on CPU, and so ours
while it subclassed torch's class (issue 18). These are PyTorch's DDP SyncBatchNorm
scenarios (``test_DistributedDataParallel_SyncBatchNorm*`` and
``test_ddp_sync_bn_training_vs_eval`` in torch/testing/_internal/distributed/
distributed_test.py), each on 2 gloo processes under plain
``torch.nn.parallel.DistributedDataParallel`` and compared with a single-process
reference: the same model, with torch's BatchNorm, on the whole concatenated batch,
in float64. Plus a Lightning-style training loop end to end.

Run with ``-s`` to see the measured maximum errors.
"""

import copy
import gc
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import bnlab.distributed as bdist
import bnlab.nn as bnn
import bnlab.nn.sync as sync_module
from bnlab.distributed import DistInfo, prepare_model
from bnlab.graph import is_batchnorm
from gloo import run_on_gloo

F64 = torch.float64
WORLD = 2
TOL = 1e-10


def _run(checks, *args):
    """Run ``checks(rank, workdir, *args)`` on 2 gloo processes (``workdir``: a folder
    both share); return the measurements {name: max error} (the larger of the ranks')."""
    with tempfile.TemporaryDirectory() as workdir:
        out = run_on_gloo(checks, workdir, *args, world=WORLD)
    errors = {k: max(out[r][k] for r in out) for k in out[0]}
    print(f"\n{checks.__name__}{args}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors


def _err(a, b):
    """Largest absolute difference (0 for empty tensors)."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return 0.0 if a.numel() == 0 else (a - b).abs().max().item()


def _record(errors, name, a, b):
    errors[name] = max(errors.get(name, 0.0), _err(a, b))


def _model(c, dim, affine):
    """A channel-mixing layer (so DDP has parameters with affine=False too) and torch's BN."""
    torch.manual_seed(0)
    if dim == 2:
        layers = [nn.Linear(c, c), nn.BatchNorm1d(c, momentum=0.3, affine=affine)]
    else:
        layers = [nn.Conv2d(c, c, 1), nn.BatchNorm2d(c, momentum=0.3, affine=affine)]
    model = nn.Sequential(*layers).double()
    if affine:
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 2)
            model[1].bias.normal_()
    return model


def _ddp_vs_single(rank, workdir, sizes, rest, affine, steps=2):
    """Two SGD steps under torch's DDP, this rank holding ``sizes[rank]`` samples of the
    whole batch, against the same model with torch's BN on the whole batch.

    Each rank's loss is WORLD * sum(y_r * g_r), so DDP's average of the rank gradients is
    the gradient of the whole batch's sum(y * g); an input's gradient is WORLD times the
    reference's. Checks y, dx, the parameters' gradients, the parameters after each step,
    the running statistics and num_batches_tracked. Returns the maximum errors.
    """
    c = rest[0]
    gen = torch.Generator().manual_seed(len(rest) * 10 + sum(sizes))
    full = torch.randn(sum(sizes), *rest, generator=gen, dtype=F64) * 2 + 3
    grad = torch.randn(full.shape, generator=gen, dtype=F64)
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    ref = _model(c, len(rest) + 1, affine)
    ddp = TorchDDP(bnn.convert_sync_batchnorm(copy.deepcopy(ref)))
    assert type(ddp.module[1]) is bnn.SyncBatchNorm
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    errors: dict[str, float] = {}
    for _ in range(steps):
        xr = full.clone().requires_grad_()
        yr = ref(xr)
        (yr * grad).sum().backward()
        x = full[part].clone().requires_grad_()
        y = ddp(x)
        (WORLD * (y * grad[part])).sum().backward()
        _record(errors, "y", y, yr[part])
        _record(errors, "dx", x.grad / WORLD, xr.grad[part])
        for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
            _record(errors, f"d{name}", p.grad, q.grad)
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        _record(errors, name, p, q)
    bn, bn_ref = ddp.module[1], ref[1]
    _record(errors, "running_mean", bn.running_mean, bn_ref.running_mean)
    _record(errors, "running_var", bn.running_var, bn_ref.running_var)
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == steps
    assert all(v <= TOL for v in errors.values()), errors
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not_affine"])
def test_torch_ddp_sync_batchnorm_4d_affine_and_not(affine):
    _run(_ddp_vs_single, (4, 4), (3, 5, 4), affine)  # (N, C, H, W), 4 samples per rank


@pytest.mark.slow
def test_torch_ddp_sync_batchnorm_2d_input():
    _run(_ddp_vs_single, (6, 6), (5,), True)  # (N, C)


@pytest.mark.slow
@pytest.mark.parametrize("rest", [(3,), (3, 2, 2)], ids=["2d", "4d"])
def test_torch_ddp_sync_batchnorm_one_input_per_process(rest):
    # One sample per rank: a single value per channel locally (local BN would refuse
    # 2-D input in training), two across the processes.
    _run(_ddp_vs_single, (1, 1), rest, True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes", [(3, 7), (1, 6), (0, 5)], ids=["3+7", "1+6", "empty+5"]
)  # fmt: skip
def test_torch_ddp_sync_batchnorm_different_input_sizes_per_rank(sizes):
    # torch's Diff_Input_Sizes_Running_Value and _gradient: the running statistics and
    # the gradients of the parameters and inputs are the whole batch's, for unequal
    # slices (an average of per-rank statistics would not be).
    _run(_ddp_vs_single, sizes, (3, 2, 3), True)


def _training_vs_eval(rank, workdir):
    """Training synchronizes (one all_gather per forward), eval uses the running
    statistics with no collective: each rank's eval output is that of its own slice."""
    calls = []
    gather = sync_module.global_moments

    def counting(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)

    sync_module.global_moments = counting
    errors: dict[str, float] = {}
    try:
        errors.update(_ddp_vs_single(rank, workdir, (3, 5), (3, 2, 2), True))
        assert len(calls) == 2, calls  # two training steps, one collective each
        ref = _model(3, 4, True)
        ddp = TorchDDP(bnn.convert_sync_batchnorm(copy.deepcopy(ref)))
        gen = torch.Generator().manual_seed(1)
        xs = torch.randn(2, 5, 3, 2, 2, generator=gen, dtype=F64) * 2 + 1
        calls.clear()
        ddp.train()
        ddp(xs[rank]).sum().backward()  # moves the running statistics
        ref(xs.reshape(10, 3, 2, 2)).sum().backward()
        assert len(calls) == 1
        calls.clear()
        ddp.eval()
        ref.eval()
        with torch.no_grad():
            y = ddp(xs[rank][: 2 + rank])  # different sizes, no collective to match
        assert not calls, "eval mode ran a collective"
        _record(errors, "eval y", y, ref(xs[rank][: 2 + rank]).detach())
        _record(errors, "eval running_var", ddp.module[1].running_var, ref[1].running_var)
        assert not torch.allclose(ref[1].running_var, torch.ones(3, dtype=F64))
    finally:
        sync_module.global_moments = gather
    assert all(v <= TOL for v in errors.values()), errors
    return errors


@pytest.mark.slow
def test_torch_ddp_sync_batchnorm_training_vs_eval():
    _run(_training_vs_eval)


# --------------------------------------------------------------------------
# A Lightning-style loop: torch BN layers, bnlab.nn.convert_sync_batchnorm where
# Lightning calls torch.nn.SyncBatchNorm.convert_sync_batchnorm, plain torch DDP,
# DistributedSampler, SGD, a checkpoint written by rank 0.
# --------------------------------------------------------------------------

EPOCHS, BATCH = 2, 4  # per rank; 24 samples, 12 per rank: 3 steps per epoch


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    ).double()  # fmt: skip


def _dataset():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(24, 3, 6, 6, generator=gen, dtype=F64) * 1.5 + 0.5
    return TensorDataset(x, torch.randint(0, 3, (24,), generator=gen))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _lightning_loop(rank, workdir):
    ds = _dataset()
    model = bnn.convert_sync_batchnorm(_convnet())  # Lightning: sync_batchnorm=True
    ddp = TorchDDP(model)  # Lightning's DDPStrategy: plain torch DDP
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    opt = _sgd(ddp.parameters())
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()  # equal slices: DDP's mean is the batch's
            opt.step()
    ckpt = os.path.join(workdir, "last.ckpt")
    if rank == 0:  # rank 0 writes the checkpoint, as Lightning's ModelCheckpoint
        state = {"state_dict": ddp.module.state_dict(), "optimizer_states": [opt.state_dict()]}
        torch.save(state, ckpt)
    dist.barrier()

    # Single process on the whole global batch: each step takes both ranks' slices.
    ref = _convnet()
    opt_ref = _sgd(ref.parameters())
    samplers = [DistributedSampler(ds, WORLD, r, shuffle=True, seed=3) for r in range(WORLD)]
    for epoch in range(EPOCHS):
        for s in samplers:
            s.set_epoch(epoch)
        order = [list(s) for s in samplers]
        for i in range(0, len(order[0]), BATCH):
            idx = [j for o in order for j in o[i : i + BATCH]]
            x, y = ds[idx]
            opt_ref.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt_ref.step()

    # The checkpoint loads into the torch-BN model (same keys), and equals the reference.
    loaded = _convnet()
    loaded.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    errors: dict[str, float] = {}
    for (name, a), b, c in zip(
        loaded.state_dict().items(), ref.state_dict().values(), model.state_dict().values()
    ):
        kind = "running stats" if "running" in name else "parameters"
        if "num_batches_tracked" in name:
            assert a.item() == b.item() == c.item() == EPOCHS * 3, name
            continue
        _record(errors, f"checkpoint {kind}", a, b)
        _record(errors, f"rank {kind}", c, b)  # every rank's model, not just rank 0's
    moved = _err(ref[1].running_var, torch.ones(6))
    assert moved > 0.01 and errors["checkpoint parameters"] <= TOL, errors
    assert all(v <= TOL for v in errors.values()), errors
    return errors


@pytest.mark.slow
def test_lightning_style_loop_with_torch_ddp_and_bnlab_sync_batchnorm():
    _run(_lightning_loop)


# --------------------------------------------------------------------------
# In this process: torch's DDP accepts ours on CPU; what isinstance says.
# --------------------------------------------------------------------------


def test_torch_ddp_accepts_bnlab_sync_batchnorm_on_cpu(tmp_path):
    sync = bnn.SyncBatchNorm(4)
    # A BN layer for every tool that looks for torch's _BatchNorm (and for bnlab's), but
    # not a torch.nn.SyncBatchNorm: that is what torch's DDP refuses on CPU.
    assert isinstance(sync, nn.modules.batchnorm._BatchNorm) and is_batchnorm(sync)
    assert not isinstance(sync, nn.SyncBatchNorm)
    assert sync.process_group is None and bnn.SyncBatchNorm.convert_sync_batchnorm
    assert list(sync.state_dict()) == list(nn.SyncBatchNorm(4).state_dict())
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'rendezvous'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        net = _convnet()
        ref = copy.deepcopy(net)
        ddp = TorchDDP(bnn.convert_sync_batchnorm(net))
        x = torch.randn(5, 3, 6, 6, dtype=F64)
        torch.testing.assert_close(ddp(x), ref(x), rtol=0, atol=1e-12)
        # torch's own SyncBatchNorm is still refused on CPU: its kernel needs a GPU.
        with pytest.raises(ValueError, match="only work with GPU"):
            TorchDDP(nn.SyncBatchNorm.convert_sync_batchnorm(_convnet()))
        # prepare_model wraps with torch's own DDP class.
        wrapped = prepare_model(_convnet(), DistInfo(rank=0, world_size=2))
        assert type(wrapped) is TorchDDP
        assert type(wrapped.module[1]) is bnn.SyncBatchNorm
        # bnlab's DistributedDataParallel is only a deprecated name for torch's.
        with pytest.warns(DeprecationWarning, match="torch.nn.parallel.DistributedDataParallel"):
            assert bdist.DistributedDataParallel is TorchDDP
    finally:
        dist.destroy_process_group()
        gc.collect()
