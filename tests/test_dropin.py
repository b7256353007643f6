"""bnlab's modules where torch's BN is recognised: torch's own tools, torch.func,
checkpointing, torch.compile, and torch's behaviour at the edges (float64)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.optim.swa_utils import update_bn
from torch.utils.checkpoint import checkpoint

import bnlab
import bnlab.nn as bnn
from bnlab.nn import FUSER_METHOD_MAPPING

F64 = torch.float64
PAIRS = [
    (bnn.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (bnn.BatchNorm1d, nn.BatchNorm1d, (6, 4, 3)),
    (bnn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 2, 3)),
    (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 2, 2, 3)),
    (bnn.SyncBatchNorm, nn.BatchNorm2d, (3, 4, 2, 3)),  # local BN outside torch.distributed
]


def _net(bn_cls, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn_cls(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net = net.double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net[1].bias.normal_()
    return net


def _twins():
    """The same network with bnlab's and with torch's BatchNorm2d."""
    return _net(bnn.BatchNorm2d), _net(nn.BatchNorm2d)


# --------------------------------------------------------------------------
# 1. Recognised where torch's BN is recognised
# --------------------------------------------------------------------------


def test_subclasses_of_torch_bn_with_our_own_methods():
    for ours, ref, _ in PAIRS[:4]:
        assert issubclass(ours, _BatchNorm) and issubclass(ours, ref)
    # Not torch's SyncBatchNorm: torch's DDP refuses that class on CPU (see bnlab.nn.sync).
    assert issubclass(bnn.SyncBatchNorm, _BatchNorm)
    assert not issubclass(bnn.SyncBatchNorm, nn.SyncBatchNorm)
    # Every method torch's classes define that touches the math or the state is ours,
    # so no torch code path bypasses our forward, checks or state-dict loading.
    for cls in (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.SyncBatchNorm):
        for name in ("forward", "_check_input_dim", "_load_from_state_dict", "__init__"):
            assert getattr(cls, name).__module__.startswith("bnlab"), (cls, name)
    assert bnn.SyncBatchNorm.convert_sync_batchnorm.__func__.__module__ == "bnlab.nn.sync"
    # constructor checks and messages stay ours
    with pytest.raises(ValueError, match="at least 1"):
        bnn.BatchNorm2d(0)


def test_swa_update_bn_gives_torchs_statistics():
    ours, ref = _twins()
    ours.load_state_dict(ref.state_dict())
    data = [torch.randn(5, 3, 4, 4, dtype=F64) * 2 + 1 for _ in range(3)]
    update_bn(data, ours)
    update_bn(data, ref)
    assert not torch.equal(ours[1].running_mean, torch.zeros(4, dtype=F64))
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert ours[1].momentum == 0.1  # restored


def test_fuse_conv_bn_eval_and_fuse_modules():
    ours, ref = _twins()
    for net in (ours, ref):
        net.train()
        net(torch.randn(6, 3, 4, 4, dtype=F64) * 2 + 1)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    fused, fused_ref = fuse_conv_bn_eval(ours[0], ours[1]), fuse_conv_bn_eval(ref[0], ref[1])
    torch.testing.assert_close(fused.weight, fused_ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(fused.bias, fused_ref.bias, rtol=0, atol=0)
    # fuse_modules matches exact types: our classes come in through the mapping
    config = {"additional_fuser_method_mapping": FUSER_METHOD_MAPPING}
    m = fuse_modules(ours, [["0", "1", "2"]], fuse_custom_config_dict=config)
    m_ref = fuse_modules(ref, [["0", "1", "2"]])
    assert type(m[0]) is type(m_ref[0]) and isinstance(m[1], nn.Identity)
    torch.testing.assert_close(m(x), m_ref(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x), ours(x), rtol=0, atol=1e-12)
    lin = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4)).double().eval()
    fl = fuse_modules(lin, [["0", "1"]], fuse_custom_config_dict=config)
    xl = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(fl(xl), lin(xl), rtol=0, atol=1e-12)


def test_convert_sync_batchnorm_torchs_and_ours_both_ways():
    ours, ref = _twins()
    ours[1].running_mean.fill_(0.5)
    # torch's classmethod makes torch's SyncBatchNorm, sharing our layer's state, as it
    # does from torch's BN: a user asking torch for torch's layer gets it
    t = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    t_ref = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(t[1]) is nn.SyncBatchNorm and type(t_ref[1]) is nn.SyncBatchNorm
    torch.testing.assert_close(t[1].running_mean, torch.full((4,), 0.5, dtype=F64))
    # ours, as a classmethod (as torch's is called) or a function, makes bnlab's
    for convert in (bnn.SyncBatchNorm.convert_sync_batchnorm, bnn.convert_sync_batchnorm):
        s = convert(copy.deepcopy(ours))
        assert type(s[1]) is bnn.SyncBatchNorm
        assert type(bnn.revert_sync_batchnorm(s)[1]) is bnn.BatchNorm2d
    s = bnn.convert_sync_batchnorm(t)  # torch's SyncBatchNorm -> ours -> torch's again
    assert type(s[1]) is bnn.SyncBatchNorm
    assert type(bnn.revert_sync_batchnorm(s)[1]) is nn.SyncBatchNorm
    # torch <-> bnlab, local layers and SyncBatchNorm (keeping its process group)
    back = bnn.revert_batchnorm(copy.deepcopy(ours))
    assert type(back[1]) is nn.BatchNorm2d
    assert type(bnn.replace_batchnorm(back)[1]) is bnn.BatchNorm2d
    t[1].process_group = "group"  # a stand-in: only carried over
    s = bnn.replace_batchnorm(t)
    assert type(s[1]) is bnn.SyncBatchNorm and s[1].process_group == "group"
    assert s[1].running_mean is t[1].running_mean  # shared, not copied
    assert type(bnn.revert_batchnorm(s)[1]) is nn.SyncBatchNorm
    x = torch.randn(4, 3, 4, 4, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(bnn.convert_sync_batchnorm(ours)(x), ref(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_func_replace_all_batch_norm_modules(train):
    ours, ref = _twins()
    for net in (ours, ref):
        torch.func.replace_all_batch_norm_modules_(net)
        net.train(train)
    assert ours[1].running_mean is None and not ours[1].track_running_stats
    x = torch.randn(4, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    xs = torch.randn(2, 4, 3, 4, 4, dtype=F64)
    out = torch.func.vmap(lambda xi: torch.func.functional_call(ours, params, (xi,)))(xs)
    torch.testing.assert_close(out[1], ours(xs[1]), rtol=0, atol=1e-12)


def test_isinstance_based_tools_of_bnlab_find_our_layers():
    """insert/fold/freeze/population/graph find bnlab's layers as before, and torch's."""
    from bnlab.graph import is_batchnorm

    for cls in (bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.SyncBatchNorm):
        assert is_batchnorm(cls(3))
    net = bnlab.insert_batchnorm(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    assert type(net[1]) is bnn.BatchNorm1d
    net = net.double()
    report = bnlab.recompute_population_stats(
        net, [torch.randn(8, 4, dtype=F64) for _ in range(2)], progress=False
    )
    assert report.layers[0].batches == 2
    bnlab.freeze_batchnorm(net)
    net.train()
    assert not net[1].training
    folded = bnlab.fold_batchnorm(net.eval())
    assert not any(is_batchnorm(m) for m in folded.modules())


# --------------------------------------------------------------------------
# 3. torch's behaviour at the edges
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,ref_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_as_torch(ours_cls, ref_cls, shape, momentum):
    ours = ours_cls(4, momentum=momentum, dtype=F64)
    ref = ref_cls(4, momentum=momentum, dtype=F64)
    ours(torch.randn(*shape, dtype=F64))  # one real batch first
    ref(torch.randn(*shape, dtype=F64))
    ours.load_state_dict(ref.state_dict())
    before = copy.deepcopy(ours.state_dict())
    for bn in (ours, ref):
        x = torch.randn(0, *shape[1:], dtype=F64, requires_grad=True)
        y = bn(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.equal(bn.weight.grad, torch.zeros(4, dtype=F64))
        assert torch.equal(bn.bias.grad, torch.zeros(4, dtype=F64))
    torch.testing.assert_close(ours.running_mean, before["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, before["running_var"], rtol=0, atol=0)
    # torch counts the empty batch (with momentum=None it weighs the later ones)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2
    x = torch.randn(*shape, dtype=F64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-12)


def test_load_state_dict_without_num_batches_tracked_keeps_the_count():
    for make in (bnn.BatchNorm1d, nn.BatchNorm1d):
        bn = make(3, momentum=None)
        for _ in range(3):
            bn(torch.randn(5, 3))
        plain = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
        fresh = make(3, momentum=None)
        fresh.num_batches_tracked.fill_(7)
        fresh.load_state_dict(plain)  # a plain dict: no version metadata
        assert fresh.num_batches_tracked.item() == 7, make
        fresh.load_state_dict({"running_mean": torch.ones(3)}, strict=False)  # partial
        assert fresh.num_batches_tracked.item() == 7, make
        torch.testing.assert_close(fresh.running_mean, torch.ones(3))


def _load_old_checkpoint(make, count, version, strict=True):
    """Load a state dict without num_batches_tracked, with the given metadata version,
    into a module whose count is ``count``; the count after, and the error if any."""
    src = make(2)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    if version is None:
        del sd._metadata[""]["version"]
    else:
        sd._metadata[""]["version"] = version
    dst = make(2)
    dst.num_batches_tracked.fill_(count)
    try:
        dst.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        return dst.num_batches_tracked, "missing" if "num_batches_tracked" in str(e) else str(e)
    return dst.num_batches_tracked, None


@pytest.mark.parametrize("version", [1, None, 2])
@pytest.mark.parametrize("count", [0, 7])
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_old_checkpoints_as_torch(version, count, strict):
    """torch's test_load_state_dict_BC, and the same on a module that has trained.

    A version-1 (or unversioned) checkpoint predates num_batches_tracked: torch
    2.13 fills it in with the module's own count (0 on a fresh module, as torch's
    test checks; a tensor(0) on the meta device), so nothing is reported missing. A
    version-2 checkpoint without it is missing a key (an error under strict) and
    leaves the count alone. bnlab does the same in every case.
    """
    for ours, theirs in ((bnn.BatchNorm3d, nn.BatchNorm3d), (bnn.BatchNorm1d, nn.BatchNorm1d)):
        got, got_err = _load_old_checkpoint(ours, count, version, strict)
        want, want_err = _load_old_checkpoint(theirs, count, version, strict)
        assert got.dtype == want.dtype == torch.long
        assert got.item() == want.item(), (version, count, strict)
        assert got_err == want_err
        if version != 2:
            assert got.item() == count and got_err is None  # torch's BC rule
        else:
            assert got_err == ("missing" if strict else None)
    bn = bnn.BatchNorm2d(2, device="meta")  # the meta-device branch: a real zero count
    sd = nn.BatchNorm2d(2).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn.load_state_dict(sd, assign=True)
    assert bn.num_batches_tracked.device.type == "cpu" and bn.num_batches_tracked.item() == 0


def test_fold_keeps_requires_grad_as_torch_fusion():
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    for bias in (True, False):
        for frozen in (True, False):
            net = nn.Sequential(nn.Linear(3, 4, bias=bias), bnn.BatchNorm1d(4)).eval()
            for p in net[0].parameters():
                p.requires_grad_(not frozen)
            folded = bnlab.fold_batchnorm(net)[0]
            ref = fuse_linear_bn_eval(net[0], net[1])
            assert folded.weight.requires_grad == ref.weight.requires_grad == (not frozen)
            assert folded.bias.requires_grad == ref.bias.requires_grad, (bias, frozen)


def test_population_stats_warn_when_the_data_runs_short():
    net = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="num_batches=5 was asked for .* only 2 batch"):
        report = bnlab.recompute_population_stats(
            net, [torch.randn(6, 3) for _ in range(2)], num_batches=5, progress=False
        )
    assert report.batches == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.recompute_population_stats(
            net, [torch.randn(6, 3) for _ in range(3)], num_batches=2, progress=False
        )


def test_pooled_estimator_is_bessel_corrected_fvcore():
    """fvcore's precise BN pools the biased variance; ours is n/(n-1) times it."""
    net = nn.Sequential(bnn.BatchNorm1d(2)).double()
    batches = [torch.randn(4, 2, dtype=F64) * 3 + 1 for _ in range(3)]
    bnlab.recompute_population_stats(net, batches, estimator="pooled", progress=False)
    pooled = torch.cat(batches)
    n = pooled.shape[0]
    fvcore_var = pooled.var(0, unbiased=False)
    torch.testing.assert_close(net[0].running_var, fvcore_var * n / (n - 1))
    readme = open("README.md").read()
    assert "as fvcore's precise BN" not in readme and "n/(n-1)" in readme


# --------------------------------------------------------------------------
# 4. fold's bias keeps its precision when |mean| >> std
# --------------------------------------------------------------------------


def test_fold_bias_precision_at_large_mean_float32():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4))
    with torch.no_grad():
        net[0].bias.fill_(1e4)  # the layer's output has mean ~1e4 and std ~1
        net[0].bias.add_(torch.randn(4) * 0.5)
        net[1].weight.uniform_(0.5, 2)
        net[1].bias.normal_()
        # the population statistics of that output: E[x] ~ 1e4, Var[x] ~ 1
        net[1].running_mean.copy_(net[0].bias + torch.randn(4) * 0.1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    f64 = bnlab.fold_batchnorm(copy.deepcopy(net).double())[0]
    f32 = bnlab.fold_batchnorm(net)[0]
    # scale * (b - E[x]) + beta: b - E[x] is exact, so the bias is good to float32 rounding
    # of an O(1) value; scale * b + (beta - scale * E[x]) would be off by ~1e-3
    torch.testing.assert_close(f32.bias.double(), f64.bias, rtol=0, atol=2e-6)


def test_unfoldable_bn_keeps_its_precision_at_large_mean_float32():
    bn = bnn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.fill_(1e4)
        bn.running_var.fill_(1.0)
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(64, 3) + 1e4
    affine = bnlab.fold_batchnorm(bn)
    ref = bnlab.fold_batchnorm(copy.deepcopy(bn).double())(x.double())
    # (x - E[x]) * scale + beta; x * scale + (beta - E[x] * scale) is ~1e-3 off
    torch.testing.assert_close(affine(x).double(), ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# 5. Non-finite batch statistics, checkpointing, torch.compile
# --------------------------------------------------------------------------


def test_non_finite_batch_statistics_skip_the_channel_and_warn_once_by_name():
    net = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), bnn.BatchNorm1d(3)))
    bn = net[1][1]
    net(torch.randn(8, 3))
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"BN layer '1\.1'.*1 channel\(s\) \[1\]"):
        net(x)
    assert torch.equal(bn.running_mean[1], before[0][1]) and torch.isfinite(bn.running_var).all()
    assert not torch.equal(bn.running_mean[0], before[0][0])  # the others update
    x[3, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        net(x)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_non_finite_batches_in_population_stats_are_left_out_per_channel():
    net = nn.Sequential(bnn.BatchNorm1d(2)).double()
    batches = [torch.randn(5, 2, dtype=F64) for _ in range(3)]
    bad = batches[1].clone()
    bad[0, 1] = float("nan")
    ref = copy.deepcopy(net)
    bnlab.recompute_population_stats(ref, [batches[0], batches[2]], progress=False)
    with pytest.warns(RuntimeWarning, match=r"BN layer '0'.*\[1\]"):
        bnlab.recompute_population_stats(net, [batches[0], bad, batches[2]], progress=False)
    # channel 1 from the two finite batches only; channel 0 from all three
    torch.testing.assert_close(net[0].running_mean[1], ref[0].running_mean[1])
    torch.testing.assert_close(net[0].running_var[1], ref[0].running_var[1])
    torch.testing.assert_close(net[0].running_mean[0], torch.cat(batches)[:, 0].mean())


class _Block(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 6), bnn.BatchNorm1d(6, momentum=None), nn.Tanh())
        self.head = nn.Linear(6, 2)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        if self.use_reentrant is None:
            h = self.inner(x)
        else:
            h = checkpoint(self.inner, x, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_updates_running_stats_once_per_forward(use_reentrant):
    torch.manual_seed(0)
    plain = _Block(None).double()
    ckpt = copy.deepcopy(plain)
    ckpt.use_reentrant = use_reentrant
    for _ in range(3):
        x = torch.randn(8, 4, dtype=F64, requires_grad=True)
        for net in (plain, ckpt):
            net.zero_grad()
            net(x).square().sum().backward()
        for a, b in zip(plain.parameters(), ckpt.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    for a, b in zip(plain.buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert ckpt.inner[1].num_batches_tracked.item() == 3


def _has_compiler() -> str | None:
    """Why torch.compile cannot run here, or None when it can (a C++ compiler for inductor)."""
    import shutil

    if sys.platform == "win32":
        return "torch.compile's inductor backend is not supported on Windows"
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++", "c++")):
        return "no C/C++ compiler on PATH for torch.compile's inductor backend"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_has_compiler() is not None, reason=str(_has_compiler()))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_matches_eager(momentum):
    torch._dynamo.reset()
    eager = bnn.BatchNorm2d(3, momentum=momentum)
    compiled_bn = copy.deepcopy(eager)
    compiled = torch.compile(compiled_bn)  # graph breaks allowed: results are the point
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_bn.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    eager.eval(), compiled_bn.eval()
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# 6. Docstrings true to the code, dead code gone
# --------------------------------------------------------------------------


def test_convergence_checks_per_decade_as_documented():
    from bnlab.stats.population import _check_now

    checks = sum(_check_now(n) for n in range(1000, 10000))
    assert 270 <= checks <= 300  # "about 285 per decade"
    doc = _check_now.__doc__
    assert "285" in doc and "about 100 times per decade" not in doc


def test_insert_docstring_says_it_copies_and_the_original_is_untouched():
    from bnlab.insert import insert_batchnorm

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    new = insert_batchnorm(net)
    assert new[0] is not net[0] and net[0].bias is not None
    assert "in place of a deep copy" not in insert_batchnorm.__doc__


def test_cli_docstring_matches_what_help_imports():
    code = (
        "import importlib, sys, bnlab.cli as c\n"
        "for name in c.COMMAND_MODULES: importlib.import_module(name)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imports_torch = out.stdout.strip() == "True"
    import bnlab.cli

    assert ("stays fast" not in bnlab.cli.__doc__) or not imports_torch
    if imports_torch:
        assert "import torch" in bnlab.cli.__doc__


def test_dead_code_is_removed():
    from bnlab.data.mnist import Dataset

    assert not hasattr(Dataset, "name")
    src = open("src/bnlab/report/figure1.py").read()
    assert "data_description" not in src
