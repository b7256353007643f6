"""Dtype mixes and a half pair of running statistics: bnlab refuses what torch 2.13
refuses on CPU (with an error torch's callers catch and that names the fix) and takes
what torch takes (float16/bfloat16 input with float32 parameters and statistics).

torch's rule: weight, bias, running_mean and running_var (those given) share one
dtype, the input's, or float32 for float16/bfloat16 input. Each case runs on the
default path (the compiled kernels where they build) and the pure path.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import backend

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F16, BF16, F32, F64]
PATHS = ["default", "torch"]
C = 3


def _path(path):
    return backend.using(None if path == "default" else "torch")


def _args(x_dtype, param_dtype, stats_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, C, 4, generator=gen) * 2 + 1).to(x_dtype)
    w = b = rm = rv = None
    if param_dtype is not None:
        w = (torch.rand(C, generator=gen) + 0.5).to(param_dtype)
        b = torch.randn(C, generator=gen).to(param_dtype)
    if stats_dtype is not None:
        rm = torch.randn(C, generator=gen).to(stats_dtype)
        rv = (torch.rand(C, generator=gen) + 0.5).to(stats_dtype)
    return x, w, b, rm, rv


def _torch_refuses(x, w, b, rm, rv, training):
    def clone(t):
        return None if t is None else t.clone()

    try:
        F.batch_norm(x, clone(rm), clone(rv), w, b, training)
    except RuntimeError:
        return True
    return False


CASES = [
    (xd, pd, sd, training)
    for xd, pd, sd in itertools.product(DTYPES, [None, *DTYPES], [None, *DTYPES])
    for training in (True, False)
    if (pd, sd) != (None, None) and (training or sd is not None)
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("x_dtype", "param_dtype", "stats_dtype", "training"), CASES)
def test_functional_dtype_mix_matches_torch(path, x_dtype, param_dtype, stats_dtype, training):
    x, w, b, rm, rv = _args(x_dtype, param_dtype, stats_dtype)
    refused = _torch_refuses(x, w, b, rm, rv, training)
    t_rm, t_rv = (None, None) if rm is None else (rm.clone(), rv.clone())
    ours_rm, ours_rv = (None, None) if rm is None else (rm.clone(), rv.clone())
    with _path(path):
        if refused:
            with pytest.raises(RuntimeError, match=r"dtype.*(convert|\.to\()") as info:
                BF.batch_norm(x, ours_rm, ours_rv, w, b, training)
            assert isinstance(info.value, TypeError)  # bnlab's convention for a wrong type
            if rm is not None:  # refused before any state changed
                assert torch.equal(ours_rm, rm) and torch.equal(ours_rv, rv)
            return
        y = BF.batch_norm(x, ours_rm, ours_rv, w, b, training)
    expect = F.batch_norm(x, t_rm, t_rv, w, b, training)
    assert y.dtype == expect.dtype == x_dtype
    tol = 1e-2 if x_dtype in (F16, BF16) else 1e-5
    torch.testing.assert_close(y.float(), expect.float(), rtol=tol, atol=tol * 4)
    if rm is not None and training:
        torch.testing.assert_close(ours_rm, t_rm, rtol=tol, atol=tol)
        torch.testing.assert_close(ours_rv, t_rv, rtol=tol, atol=tol)


def test_the_documented_refusals():
    """The cases of issue 18, by name."""
    x = torch.randn(4, C)
    for path in PATHS:
        with _path(path):
            with pytest.raises(RuntimeError, match="weight is torch.float64 but the input"):
                BF.batch_norm(x, None, None, torch.ones(C, dtype=F64), None, True)
            with pytest.raises(RuntimeError, match="running_mean is torch.float64"):
                BF.batch_norm(x, torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64))
            # Half precision input with float32 parameters: torch's mixed-precision BN.
            y = BF.batch_norm(x.half(), torch.zeros(C), torch.ones(C), torch.ones(C), None)
            assert y.dtype == F16


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_one_running_statistic_without_the_other_is_refused(path, training, missing):
    x = torch.randn(4, C, 2)
    stats = {"running_mean": torch.zeros(C), "running_var": torch.ones(C), missing: None}
    with pytest.raises((ValueError, RuntimeError)):  # torch: ValueError in training
        F.batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
    given = next(v for v in stats.values() if v is not None)
    before = given.clone()
    with _path(path), pytest.raises(ValueError, match="both .*or neither"):
        BF.batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
    assert torch.equal(given, before)


MODULES = [
    (bnn.BatchNorm1d, (6, C)),
    (bnn.BatchNorm2d, (6, C, 2, 2)),
    (bnn.BatchNorm3d, (6, C, 2, 1, 2)),
    (lambda c, **kw: bnn.GhostBatchNorm1d(c, virtual_batch_size=3, **kw), (6, C, 2)),
    (bnn.BatchRenorm2d, (6, C, 2, 2)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make,shape", MODULES)
@pytest.mark.parametrize("training", [True, False])
def test_modules_refuse_what_torch_modules_refuse(path, make, shape, training):
    torch_bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
    torch_bn[5] = torch.nn.BatchNorm3d
    x = torch.randn(*shape)
    for module_dtype, x_dtype, refused in [
        (F32, F64, True),
        (F64, F32, True),
        (F16, F32, True),
        (F32, F16, False),  # mixed precision: float32 state, half input
        (F32, BF16, False),
    ]:
        ref = torch_bn[len(shape)](C, dtype=module_dtype).train(training)
        try:
            ref(x.to(x_dtype))
            torch_refused = False
        except RuntimeError:
            torch_refused = True
        assert torch_refused == refused
        bn = make(C, dtype=module_dtype).train(training)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        with _path(path):
            if refused:
                with pytest.raises(RuntimeError, match=r"dtype.*(convert|\.to\()"):
                    bn(x.to(x_dtype))
                for k, v in bn.state_dict().items():
                    assert torch.equal(v, before[k]), k
            else:
                assert bn(x.to(x_dtype)).dtype == x_dtype


@pytest.mark.parametrize("path", PATHS)
def test_module_with_one_running_statistic_is_refused(path):
    bn = bnn.BatchNorm2d(C)
    bn.running_var = None
    with _path(path), pytest.raises(ValueError, match="both .*or neither"):
        bn(torch.randn(4, C, 2, 2))
    assert bn.num_batches_tracked == 0
