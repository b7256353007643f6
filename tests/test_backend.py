"""The compiled CPU backend (src/bnlab/backend): parity, numerics, threading, fallback.

float64 unless a test says otherwise; the kernels are compared with float64 math on
the same input, with torch's own batch norm, and with the pure-PyTorch path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import backend
from bnlab.backend import build

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("BNLAB_BACKEND") == "torch", reason="BNLAB_BACKEND=torch: no compiled path"
)


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Build (or load) the kernels once; with a compiler on this machine they must load."""
    assert backend.is_available(), backend.describe()


@pytest.fixture
def compiled_mode():
    with backend.using("compiled"):
        yield


def _channels_last(x):
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _non_contiguous(x):
    """Same values, strided storage: a transposed copy transposed back."""
    return x.transpose(0, -1).contiguous().transpose(0, -1)


LAYOUTS = {"contiguous": lambda x: x, "channels_last": _channels_last, "strided": _non_contiguous}

# C=1; N*HW=2; 2-D, 3-D, 4-D, 5-D; sizes that are not multiples of a vector width; the
# paper's MNIST layer; fewer channels than threads (the batch-split path).
SHAPES = [
    (4, 3, 5, 5),
    (2, 1, 7),
    (7, 1),
    (1, 3, 2),
    (2, 3),
    (2, 5, 1, 1),
    (60, 100),
    (5, 17, 3),
    (3, 70, 2, 3, 2),
    (8, 3, 33, 17),
    (16, 2, 64, 65),
    (300, 33),
]


def _reference(x, w, b, eps):
    """Algorithm 1 in float64 with autograd: y, mu_b, biased_var_b."""
    dims = [0, *range(2, x.dim())]
    xd = x.double()
    mu = xd.mean(dims)
    biased_var = xd.var(dims, correction=0)
    view = [1, -1] + [1] * (x.dim() - 2)
    y = (xd - mu.view(view)) * torch.rsqrt(biased_var.view(view) + eps)
    return y * w.double().view(view) + b.double().view(view), mu, biased_var


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64_math(shape, layout):
    x = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64) * 3 + 1)
    c = shape[1]
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    y, mu, biased_var = backend.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = _reference(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert _max_err(y, y_ref) < 1e-12
    assert _max_err(mu, mu_ref) < 1e-12 and _max_err(biased_var, var_ref) < 1e-12
    if layout == "channels_last" and x.dim() >= 4:
        assert y.stride() == x.stride()  # memory format kept

    grad_y = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64))
    inv_std = torch.rsqrt(biased_var + 1e-5)
    gx, gw, gb = backend.backward(grad_y, x, w, mu, inv_std, (True, True, True))
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    y_t = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    refs = torch.autograd.grad(y_t, leaves, grad_y)
    for ours, ref in zip((gx, gw, gb), refs):
        assert _max_err(ours, ref) < 1e-10


def test_backward_returns_only_what_is_needed():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    _, mu, var = backend.train_forward(x, None, None, 1e-5)
    inv_std = torch.rsqrt(var + 1e-5)
    gx, gw, gb = backend.backward(torch.randn_like(x), x, None, mu, inv_std, (False, True, True))
    assert gx is None and gw is None and gb is not None  # no weight: no weight gradient
    full = backend.backward(torch.ones_like(x), x, None, mu, inv_std, (True, False, False))
    assert full[1] is None and full[2] is None
    assert full[0].abs().max() < 1e-12  # dl/dx of sum(y) is 0 (zero-mean gradient)


class _CompiledBN(torch.autograd.Function):
    """The backend's forward and backward as one autograd.Function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, w, b):
        y, mu, var = backend.train_forward(x, w, b, 1e-5)
        inv_std = torch.rsqrt(var + 1e-5)
        ctx.save_for_backward(x, w, mu, inv_std)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, mu, inv_std = ctx.saved_tensors
        return backend.backward(grad_y, x, w, mu, inv_std, ctx.needs_input_grad)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 3, 4), (2, 3, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(shape, channels_last):
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = _channels_last(x)
    x.requires_grad_()
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CompiledBN.apply, (x, w, b))


@pytest.mark.parametrize("shape", [(16, 8, 12, 12), (512, 24)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_keeps_float32_accuracy(shape, channels_last):
    """|mean| = 1e4 * std: float32 statistics and outputs stay at float32 precision
    (no E[x^2] - E[x]^2 cancellation). Tolerance 1e-4 on unit-scale outputs."""
    x = (torch.randn(*shape, dtype=torch.float64) + 1e4).float()
    if channels_last:
        x = _channels_last(x)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    y, mu, biased_var = backend.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = _reference(x, w, b, 1e-5)
    assert _max_err(y, y_ref) < 1e-4
    assert _max_err(biased_var, var_ref) / var_ref.min().item() < 1e-4
    assert _max_err(mu, mu_ref) < 1e-2  # float32 ulp at 1e4 is 1e-3
    g = torch.randn_like(x)
    gx, gw, gb = backend.backward(g, x, w, mu, torch.rsqrt(biased_var + 1e-5), (True,) * 3)
    leaves = [x.double().requires_grad_(), w.double().requires_grad_(), b.double()]
    y64 = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    ref_gx, ref_gw = torch.autograd.grad(y64, leaves[:2], g.double())
    assert _max_err(gx, ref_gx) < 1e-3
    assert _max_err(gw, ref_gw) / ref_gw.abs().max().item() < 1e-3


@pytest.mark.parametrize(
    "dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_against_float64(dtype, tol, channels_last):
    """Statistics accumulate in float32; tolerances are absolute on unit-scale values
    (about two ulps of the output dtype at magnitude 4)."""
    x = torch.randn(8, 16, 9, 7, dtype=torch.float64).to(dtype)
    if channels_last:
        x = _channels_last(x)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    y, mu, biased_var = backend.train_forward(x, w, b, 1e-5)
    assert y.dtype == dtype and mu.dtype == biased_var.dtype == torch.float32
    y_ref, _, _ = _reference(x, w, b, 1e-5)
    assert _max_err(y, y_ref) < tol * 4
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    gx, gw, gb = backend.backward(g, x, w, mu, torch.rsqrt(biased_var + 1e-5), (True,) * 3)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == torch.float32
    leaves = [x.double().requires_grad_(), w.double(), b.double()]
    y64 = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    (ref_gx,) = torch.autograd.grad(y64, leaves[0], g.double())
    assert _max_err(gx, ref_gx) < tol * 4


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# NCS inputs on one thread with short runs (S * itemsize <= 2 KiB) and at least 1 MiB take
# the streaming kernels (x read front to back, then again for the output) instead of the
# per-channel ones; the shapes below are just over 1 MiB in their dtype.
def test_streaming_path_matches_float64_math(one_thread):
    shape = (16, 64, 12, 12)  # float64: 1.2 MB, runs of 1152 bytes
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    y, mu, biased_var = backend.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = _reference(x, w, b, 1e-5)
    assert _max_err(y, y_ref) < 1e-12
    assert _max_err(mu, mu_ref) < 1e-12 and _max_err(biased_var, var_ref) < 1e-12
    grad_y = torch.randn_like(x)
    inv_std = torch.rsqrt(biased_var + 1e-5)
    gx, gw, gb = backend.backward(grad_y, x, w, mu, inv_std, (True, True, True))
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    y_t = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    refs = torch.autograd.grad(y_t, leaves, grad_y)
    for ours, ref in zip((gx, gw, gb), refs):
        assert _max_err(ours, ref) < 1e-10
    _, gw_only, gb_only = backend.backward(grad_y, x, w, mu, inv_std, (False, True, True))
    assert torch.equal(gw_only, gw) and torch.equal(gb_only, gb)


@pytest.mark.parametrize(
    "dtype,tol,shift",
    [(torch.bfloat16, 4e-2, 0.0), (torch.float16, 5e-3, 0.0), (torch.float32, 1e-4, 1e4)],
    ids=["bfloat16", "float16", "float32-large-mean"],
)
def test_streaming_path_low_precision_and_large_mean(one_thread, dtype, tol, shift):
    """The streaming kernels keep the float16/bfloat16 staging and the shifted sums
    (|mean| = 1e4 * std in float32); tolerances as in the per-channel tests."""
    x = (torch.randn(64, 64, 14, 14, dtype=torch.float64) + shift).to(dtype)  # >= 1.6 MB
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    y, mu, biased_var = backend.train_forward(x, w, b, 1e-5)
    y_ref, _, var_ref = _reference(x, w, b, 1e-5)
    assert _max_err(y, y_ref) < tol * 4
    assert _max_err(biased_var, var_ref) / var_ref.min().item() < 1e-3
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    gx, _, _ = backend.backward(g, x, w, mu, torch.rsqrt(biased_var + 1e-5), (True,) * 3)
    leaves = [x.double().requires_grad_(), w.double(), b.double()]
    y64 = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
    (ref_gx,) = torch.autograd.grad(y64, leaves[0], g.double())
    assert _max_err(gx, ref_gx) < tol * 4


@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((16, 64, 24, 24), False),
        ((64, 2, 48, 48), False),
        ((16, 24, 20, 20), True),
        ((4096, 64), False),
        ((1, 3, 160, 170), False),
        ((2, 1, 300, 300), False),
        ((32, 64, 14, 14), False),
    ],
    ids=[
        "ncs-channels",
        "ncs-batch-split",
        "channels_last",
        "2d",
        "ncs-plane-split",
        "one-channel",
        "ncs-streaming-vs-per-channel",  # 1 thread: streaming kernels; 2: per channel
    ],
)
def test_multithreaded_equals_single_threaded(shape, channels_last):
    """Thread count changes only the summation order: float32 results agree to 1e-5
    relative (statistics) and 1e-5 absolute (unit-scale outputs and gradients)."""
    x = torch.randn(*shape) * 2 + 3
    if channels_last:
        x = _channels_last(x)
    g = torch.randn_like(x)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mu, var = backend.train_forward(x, w, b, 1e-5)
            grads = backend.backward(g, x, w, mu, torch.rsqrt(var + 1e-5), (True,) * 3)
            outs.append((y, mu, var, *grads))
    finally:
        torch.set_num_threads(threads)
    (y1, mu1, v1, gx1, gw1, gb1), (y2, mu2, v2, gx2, gw2, gb2) = outs
    assert _max_err(y1, y2) < 1e-5 and _max_err(gx1, gx2) < 1e-5
    assert _max_err(mu1, mu2) < 1e-5 * 3 and (_max_err(v1, v2) / v1.min().item()) < 1e-5
    assert _max_err(gw1, gw2) / gw1.abs().max().item() < 1e-5
    assert _max_err(gb1, gb2) / gb1.abs().max().item() < 1e-5


def _count_compiled_calls(monkeypatch) -> dict[str, int]:
    """Count the backend's calls that returned a compiled result.

    ``step`` counts the modules' one-call training forward (``backend.train_step``),
    whose backward runs in C++ (its grad_fn is a CppNode, checked where it matters).
    """
    counts = {"forward": 0, "backward": 0, "step": 0, "eval": 0}
    fwd, bwd = backend.train_forward, backend.backward
    step, ev = backend.train_step, backend.eval_forward

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts[key] += out is not None
            return out

        return wrapper

    monkeypatch.setattr(backend, "train_forward", counted(fwd, "forward"))
    monkeypatch.setattr(backend, "backward", counted(bwd, "backward"))
    monkeypatch.setattr(backend, "train_step", counted(step, "step"))
    monkeypatch.setattr(backend, "eval_forward", counted(ev, "eval"))
    return counts


COMPILED_NODE = "BnlabBatchNormBackward"


@pytest.mark.parametrize(
    "ours_cls,ref_cls,shape,channels_last",
    [
        (bnn.BatchNorm1d, nn.BatchNorm1d, (8, 4), False),
        (bnn.BatchNorm1d, nn.BatchNorm1d, (8, 4, 5), False),
        (bnn.BatchNorm2d, nn.BatchNorm2d, (4, 4, 5, 6), False),
        (bnn.BatchNorm2d, nn.BatchNorm2d, (4, 4, 5, 6), True),
        (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 2), False),
    ],
)
def test_modules_on_compiled_path_match_torch(
    ours_cls, ref_cls, shape, channels_last, compiled_mode, monkeypatch
):
    """Outputs, three gradients and running statistics over 3 steps, then eval."""
    counts = _count_compiled_calls(monkeypatch)
    c = shape[1]
    ref = ref_cls(c, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(c))
        ref.bias.copy_(torch.randn(c))
    ours = ours_cls(c, momentum=0.2, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        if channels_last:
            x = _channels_last(x)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), ref(xs[1])]
        assert ys[0].grad_fn.name().endswith(COMPILED_NODE)  # the C++ backward runs
        g = torch.randn(shape, dtype=torch.float64)
        g_ours = torch.autograd.grad(ys[0], (xs[0], ours.weight, ours.bias), g)
        g_ref = torch.autograd.grad(ys[1], (xs[1], ref.weight, ref.bias), g)
        assert _max_err(ys[0], ys[1]) < 1e-10
        for a, b in zip(g_ours, g_ref):
            assert _max_err(a, b) < 1e-10
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert _max_err(a, b) < 1e-10
    assert counts["step"] == 3, counts
    ours.eval()
    ref.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    assert _max_err(ours(x), ref(x)) < 1e-10  # with grad mode on: the differentiable path
    with torch.no_grad():
        assert _max_err(ours(x), ref(x)) < 1e-10
    assert counts["eval"] == 1, counts


# forward_ad.make_dual loads torch's jit-scripted jvp decompositions on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_not_applicable_returns_none(compiled_mode):
    x = torch.randn(6, 4, dtype=torch.float64)
    assert backend.train_forward(x.long().float().int(), None, None, 1e-5) is None
    assert backend.train_forward(x[:0], None, None, 1e-5) is None
    # Recording autograd (double backward) needs the differentiable pure path.
    assert backend.train_forward(x.clone().requires_grad_(), None, None, 1e-5) is None
    with torch.no_grad():
        assert backend.train_forward(x.clone().requires_grad_(), None, None, 1e-5) is not None
    seen = []

    def per_sample(v):
        seen.append(backend.train_forward(v, None, None, 1e-5))
        return v

    torch.func.vmap(per_sample)(torch.randn(3, 6, 4, dtype=torch.float64))
    assert seen == [None]  # vmap's batched tensors take the Function's own rules
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert backend.train_forward(dual, None, None, 1e-5) is None


def test_backend_env_torch_and_invalid(monkeypatch):
    x = torch.randn(6, 4, dtype=torch.float64)
    with backend.using(None):  # restores this process's choice afterwards
        monkeypatch.setenv("BNLAB_BACKEND", "torch")
        backend.set_backend(None)  # re-read the environment
        assert backend.train_forward(x, None, None, 1e-5) is None
        assert "BNLAB_BACKEND=torch" in backend.describe()
        monkeypatch.setenv("BNLAB_BACKEND", "fast")
        with pytest.raises(ValueError, match="BNLAB_BACKEND"):
            backend.set_backend(None)
        monkeypatch.setenv("BNLAB_BACKEND", "compiled")
        backend.set_backend(None)
        assert backend.train_forward(x, None, None, 1e-5) is not None
        assert backend.describe().startswith("compiled")
        with backend.using("torch"):
            assert backend.train_forward(x, None, None, 1e-5) is None
        assert backend.mode() == "compiled"


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    """A failing build (simulated in-process) is one warning and the pure path; with
    BNLAB_BACKEND=compiled it is an error that names the cause."""
    monkeypatch.setattr(backend, "_state", backend._State())

    def no_compiler(verbose=False):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(build, "build_and_load", no_compiler)
    monkeypatch.delenv("BNLAB_BACKEND", raising=False)
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch path") as record:
        assert backend.train_forward(x, None, None, 1e-5) is None
        assert backend.train_forward(x, None, None, 1e-5) is None
    assert len([w for w in record if "bnlab" in str(w.message)]) == 1
    assert "unavailable" in backend.describe()
    y = BF.batch_norm(x, None, None, training=True)  # the public path still works
    assert _max_err(y, _reference(x, torch.ones(4), torch.zeros(4), 1e-5)[0]) < 1e-12
    backend.set_backend("compiled")  # on the patched state, dropped after the test
    with pytest.raises(backend.BackendUnavailableError, match="c\\+\\+: not found"):
        backend.train_forward(x, None, None, 1e-5)


def _python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_missing_compiler_in_fresh_process_warns_and_falls_back(tmp_path):
    """CXX points nowhere and the cache is empty: the real build fails, one warning."""
    code = """
        import warnings, torch
        import bnlab.functional as BF
        from bnlab import backend
        warnings.simplefilter("always")
        x = torch.randn(6, 4, dtype=torch.float64)
        assert backend.train_forward(x, None, None, 1e-5) is None
        assert backend.train_forward(x, None, None, 1e-5) is None
        BF.batch_norm(x, None, None, training=True)
        print(backend.describe())
    """
    env = {"CXX": "/nonexistent/c++", "BNLAB_CACHE_DIR": str(tmp_path)}
    env.pop("BNLAB_BACKEND", None)
    out = _python(code, {**env, "BNLAB_BACKEND": "auto"})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("compiled CPU backend is unavailable") == 1, out.stderr
    assert out.stdout.startswith("torch (pure PyTorch; compiled backend unavailable")


@pytest.mark.slow
def test_parallel_processes_build_once_into_a_fresh_cache(tmp_path):
    """Two processes start on an empty cache: the lock lets one build, both load it;
    a corrupted cache entry is rebuilt."""
    code = """
        import torch
        from bnlab import backend
        x = torch.randn(6, 4, dtype=torch.float64)
        assert backend.train_forward(x, None, None, 1e-5) is not None
        print(backend.describe())
    """
    env = {**os.environ, "BNLAB_CACHE_DIR": str(tmp_path), "BNLAB_BACKEND": "compiled"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    described = sorted(o[0] for o in outs)
    assert "built in" in described[0] or "built in" in described[1]
    assert any("loaded from cache" in d for d in described)
    (lib,) = tmp_path.glob("bnlab_cpu_*/*.so")
    # A truncated library and torch's build lock left by a killed build: rebuilt, no hang.
    lib.write_bytes(b"not a library")
    (lib.parent / "lock").touch()
    again = _python(code, {"BNLAB_CACHE_DIR": str(tmp_path), "BNLAB_BACKEND": "compiled"})
    assert again.returncode == 0 and "built in" in again.stdout, again.stderr[-2000:]


def test_ops_pass_opcheck_and_trace_under_compile():
    """Schema, fake (meta) kernels and dispatch are consistent (torch.library.opcheck),
    and torch.compile traces the ops with fullgraph=True."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bnlab.bn_train_fwd.default, (x, w, b, 1e-5))
    _, mu, var = torch.ops.bnlab.bn_train_fwd(x, w, b, 1e-5)
    args = (torch.randn_like(x), x, w, mu, torch.rsqrt(var + 1e-5), True)
    torch.library.opcheck(torch.ops.bnlab.bn_bwd.default, args)

    def fwd(x, w, b):
        return torch.ops.bnlab.bn_train_fwd(x, w, b, 1e-5)[0] * 2

    compiled = torch.compile(fwd, backend="aot_eager", fullgraph=True)
    assert _max_err(compiled(x, w, b), fwd(x, w, b)) < 1e-12


@pytest.mark.parametrize("mode", ["compiled", "torch"])
def test_parity_suite_on_both_paths(mode):
    """The functional, module and precision suites, with the backend forced each way."""
    files = ["tests/test_functional.py", "tests/test_modules.py", "tests/test_precision.py"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        env={**os.environ, "BNLAB_BACKEND": mode},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-4000:]


def test_ops_reject_mismatched_channel_vectors():
    """Called directly, the ops check what the Python layer normally guarantees."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="weight must be a CPU tensor of 3 elements"):
        torch.ops.bnlab.bn_train_fwd(x, torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="mean must be a CPU tensor of 3 elements"):
        torch.ops.bnlab.bn_bwd(x, x, None, torch.zeros(2), torch.ones(3), True)
    with pytest.raises(RuntimeError, match="same"):
        torch.ops.bnlab.bn_bwd(x[:2], x, None, torch.zeros(3), torch.ones(3), True)


def test_bench_command_smoke(tmp_path, capsys):
    """`bnlab bench` on one tiny shape: a row per impl and pass, ratios, the JSON file."""
    import argparse
    import json

    from bnlab.commands import bench

    parser = argparse.ArgumentParser(prog="bnlab")
    bench.add_parser(parser.add_subparsers())
    out = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "6x4", "6x4x3x3:cl", "--threads", "1", "--repeats", "2"]
    args = parser.parse_args([*argv, "--networks", "--json", str(out)])
    assert bench._run(args) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "compiled" in printed and "pure" in printed
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 * 3 * 3  # shapes x passes (fwd, fwd+bwd, eval) x impls
    assert all(r["ratio_to_torch"] > 0 for r in records)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--shapes", "6"])


def test_an_overflowing_variance_gives_nan_as_the_pure_path():
    """Values near float32's limit: the variance overflows; the output must be NaN on that
    channel on both paths (a finite output there would hide a diverging run)."""
    x = torch.randn(60, 4)
    x[:, 2] *= 1e37
    with backend.using("compiled"):
        y, _, var = BF.batch_norm_train_forward(x, None, None, 1e-5)
    with backend.using("torch"):
        y_pure, _, _ = BF.batch_norm_train_forward(x, None, None, 1e-5)
    assert not torch.isfinite(var[2])
    assert torch.isnan(y[:, 2]).all() and torch.isnan(y_pure[:, 2]).all()
    torch.testing.assert_close(y[:, [0, 1, 3]], y_pure[:, [0, 1, 3]])


# --------------------------------------------------------------------------
# The modules' one-call training step (bnlab::bn_train) and inference (bnlab::bn_eval)
# --------------------------------------------------------------------------


def _module_pair(cls, c, **kwargs):
    """Two identical modules with random gamma, beta and running statistics."""
    a = cls(c, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        for t in a.parameters():
            t.copy_(torch.randn(c))
        if a.track_running_stats:
            a.running_mean.copy_(torch.randn(c))
            a.running_var.copy_(torch.rand(c) + 0.5)
    b = cls(c, dtype=torch.float64, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize(
    "cls,shape,layout",
    [
        (bnn.BatchNorm1d, (60, 100), "contiguous"),
        (bnn.BatchNorm1d, (5, 17, 3), "strided"),
        (bnn.BatchNorm2d, (4, 6, 5, 7), "contiguous"),
        (bnn.BatchNorm2d, (4, 6, 5, 7), "channels_last"),
        (bnn.BatchNorm3d, (2, 3, 3, 4, 2), "contiguous"),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"bias": False}, {"track_running_stats": False}],
    ids=str,
)
def test_train_step_matches_the_pure_path(cls, shape, layout, kwargs, monkeypatch):
    """Outputs, every gradient, running statistics and the batch count over 3 steps, the
    one-call C++ step against the Python Function on the pure path (float64)."""
    counts = _count_compiled_calls(monkeypatch)
    fast, pure = _module_pair(cls, shape[1], **kwargs)
    for _ in range(3):
        x = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64) * 2 + 1)
        g = torch.randn(shape, dtype=torch.float64)
        outs = []
        for module, mode in ((fast, "compiled"), (pure, "torch")):
            xi = x.clone().requires_grad_()
            with backend.using(mode):
                y = module(xi)
            leaves = [xi, *module.parameters()]
            outs.append((y, *torch.autograd.grad(y, leaves, g)))
        assert outs[0][0].grad_fn.name().endswith(COMPILED_NODE)
        assert not outs[1][0].grad_fn.name().endswith(COMPILED_NODE)
        for a, b in zip(*outs):
            assert _max_err(a, b) < 1e-10
    assert counts["step"] == 3
    for (name, a), b in zip(fast.named_buffers(), pure.buffers()):
        assert torch.equal(a, b) if a.dtype == torch.long else _max_err(a, b) < 1e-12, name


def test_train_step_leaves_non_finite_channels_and_warns_once():
    """A NaN in channel 1: its running statistics stay, the others update, one warning
    naming the layer; the count of skipped channels comes from the kernel."""
    model = nn.Sequential(nn.Identity(), bnn.BatchNorm1d(4))
    bn = model[1]
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    with backend.using("compiled"):
        step = backend.train_step(x, None, None, torch.zeros(4), torch.ones(4), None, 0.1, 1e-5)
        assert step[3] == 1
        with pytest.warns(RuntimeWarning, match=r"BN layer '1'.*1 channel\(s\) \[1\]"):
            model(x)
        before = bn.running_mean.clone()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per layer
            model(x)
    assert bn.running_mean[1] == 0 and bn.running_var[1] == 1
    assert (bn.running_mean[[0, 2, 3]] != before[[0, 2, 3]]).all()
    assert int(bn.num_batches_tracked) == 2


def test_train_step_double_backward_and_batched_grads():
    """create_graph=True and is_grads_batched take the C++ node's differentiable branch."""
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b):
        y = BF.batch_norm(x, rm, rv, w, b, training=True)
        assert y.grad_fn.name().endswith(COMPILED_NODE)
        return y

    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


def test_train_step_under_inference_mode_and_checkpointing():
    bn = bnn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    with torch.inference_mode():  # tensors without the Autograd key: the CPU kernel
        y = bn(x)
    assert y.shape == x.shape and int(bn.num_batches_tracked) == 1
    ref = nn.BatchNorm2d(3)
    ref(x)
    assert _max_err(bn.running_var, ref.running_var) < 1e-6
    # A checkpointed recomputation runs the forward again, but counts the batch once.
    xg = x.clone().requires_grad_()
    y = torch.utils.checkpoint.checkpoint(bn, xg, use_reentrant=False)
    y.sum().backward()
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(60, 100), (4, 3, 5, 5), (8, 3, 33, 17), (2, 1, 7)], ids=str)
def test_eval_kernel_matches_torch(shape, layout, monkeypatch):
    counts = _count_compiled_calls(monkeypatch)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    ref = cls(shape[1], dtype=torch.float64)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            t.copy_(torch.randn(shape[1]))
        ref.running_var.copy_(torch.rand(shape[1]) + 0.1)
    ours = {nn.BatchNorm1d: bnn.BatchNorm1d, nn.BatchNorm2d: bnn.BatchNorm2d}[cls](shape[1])
    ours = ours.double()
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64) * 3 + 1)
    with torch.no_grad(), backend.using("compiled"):
        y = ours(x)
    assert counts["eval"] == 1
    assert _max_err(y, ref(x)) < 1e-12
    if layout == "channels_last" and x.dim() == 4:
        assert y.stride() == x.stride()


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 8e-2), (torch.float16, 1e-2)]
)
def test_eval_kernel_precision(dtype, tol):
    """|E[x]| = 1e4 std in float32: the mean is subtracted before scaling; low-precision
    inputs are computed in float32 (tolerances: a few ulps of the output dtype)."""
    c = 8
    mean = 1e4 if dtype == torch.float32 else 2.0
    x64 = torch.randn(16, c, 6, 6, dtype=torch.float64) + mean
    rm, rv = torch.full((c,), mean), torch.ones(c)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    with torch.no_grad():
        y = backend.eval_forward(x64.to(dtype), rm, rv, w, b, 1e-5)
    view = (1, -1, 1, 1)
    ref = (x64.to(dtype).double() - mean) / (1 + 1e-5) ** 0.5 * w.double().view(view)
    ref = ref + b.double().view(view)
    assert y.dtype == dtype and _max_err(y, ref) < tol * 4


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fake_kernels_lay_out_outputs_as_the_kernels_do(layout):
    """The fake kernels (what torch.compile traces) give the real outputs' strides, for
    contiguous, channels_last and strided inputs."""
    x = LAYOUTS[layout](torch.randn(4, 3, 5, 6, dtype=torch.float64))
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bnlab.bn_train_fwd.default, (x, w, b, 1e-5))
    _, mu, var = torch.ops.bnlab.bn_train_fwd(x, w, b, 1e-5)
    args = (torch.randn_like(x), x, w, mu, torch.rsqrt(var + 1e-5), True)
    torch.library.opcheck(torch.ops.bnlab.bn_bwd.default, args)
    torch.library.opcheck(torch.ops.bnlab.bn_eval.default, (x, w, b, rm, rv, 1e-5))


def test_new_ops_schemas_and_fake_kernels():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bnlab.bn_eval.default, (x, w, b, rm, rv, 1e-5))
    args = (x.requires_grad_(), w, b, rm, rv, torch.tensor(0), 0.1, 1e-5)
    torch.library.opcheck(
        torch.ops.bnlab.bn_train.default,
        args,
        test_utils=("test_schema", "test_autograd_registration"),
    )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_native_route_matches_the_pure_path(affine, dtype):
    """CUDA's route (torch's fused kernels, backend.native), run on the CPU."""
    from bnlab import core
    from bnlab.backend import native

    x = torch.randn(8, 3, 5, 4, dtype=torch.float64).to(dtype)
    c = x.shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64) if affine else None
    if dtype != torch.float64 and affine:
        w, b = w.float(), b.float()
    y, mu, var = native.train_forward(x, w, b, 1e-5)
    y_ref, mu_ref, var_ref = core.batch_norm_train_forward(x, w, b, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 4e-3
    assert y.dtype == x.dtype and mu.dtype == mu_ref.dtype and var.dtype == var_ref.dtype
    for a, r in ((y, y_ref), (mu, mu_ref), (var, var_ref)):
        assert _max_err(a, r) < tol
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    inv_std = torch.rsqrt(var_ref + 1e-5)
    grads = native.backward(g, x, w, mu_ref, inv_std, (True, True, True))
    refs = core.batch_norm_backward(g, x, w, mu_ref, inv_std, (True, True, True))
    for a, r in zip(grads, refs):
        assert (a is None) == (r is None)
        if a is not None:
            assert _max_err(a, r) < tol * 10
    rm, rv = torch.randn(c).to(mu.dtype), (torch.rand(c) + 0.5).to(mu.dtype)
    y = native.eval_forward(x, rm, rv, w, b, 1e-5)
    y_ref = core.normalize(x, rm, torch.rsqrt(rv + 1e-5), w, b)
    assert _max_err(y, y_ref) < tol


@pytest.mark.cuda
def test_cuda_modules_take_torchs_kernels_and_match_torch():
    """On a GPU: the native route runs (counted) and matches torch.nn.BatchNorm2d."""
    assert backend.describe("cuda").startswith("native")
    calls = []
    real = backend.native.train_forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    backend.native.train_forward = counted
    try:
        ours, ref = bnn.BatchNorm2d(16).cuda(), nn.BatchNorm2d(16).cuda()
        for _ in range(2):
            x = torch.randn(8, 16, 12, 12, device="cuda") * 2 + 1
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ys = [ours(xs[0]), ref(xs[1])]
            g = torch.randn_like(x)
            ga = torch.autograd.grad(ys[0], (xs[0], ours.weight, ours.bias), g)
            gb = torch.autograd.grad(ys[1], (xs[1], ref.weight, ref.bias), g)
            assert _max_err(ys[0], ys[1]) < 1e-4
            for a, b in zip(ga, gb):
                assert _max_err(a, b) < 1e-3
        assert _max_err(ours.running_var, ref.running_var) < 1e-5
        ours.eval(), ref.eval()
        with torch.no_grad():
            assert _max_err(ours(x), ref(x)) < 1e-4
    finally:
        backend.native.train_forward = real
    assert len(calls) == 2


def test_train_step_node_checks_saved_input_and_works_under_anomaly_mode():
    """The hand-written autograd node saves x as torch's nodes do: an in-place change
    after the forward is an error, not a wrong gradient; anomaly mode runs it."""
    bn = bnn.BatchNorm1d(5)
    x = torch.randn(8, 5, requires_grad=True)
    h = x * 1
    y = bn(h)
    assert y.grad_fn.name() == COMPILED_NODE
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.autograd.detect_anomaly():
        y = bn(x * 2)
        (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(60, 100), (4, 3, 5, 5), (16, 2, 64, 65), (2, 1, 7)], ids=str)
def test_syncbn_local_parts_match_core(shape, layout):
    """SyncBatchNorm's local kernels (statistics, gradient sums, dx from reduced sums)
    against bnlab.core in float64; m and the sums as if from a larger global batch."""
    from bnlab import core

    x = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64) * 2 + 5)
    g = LAYOUTS[layout](torch.randn(*shape, dtype=torch.float64))
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.5
    with backend.using("compiled"):
        mu, var = backend.batch_stats(x)
        ref_mu, ref_var = core.compute_batch_stats(x)
        assert _max_err(mu, ref_mu) < 1e-12 and _max_err(var, ref_var) < 1e-12
        glob_mu = mu + 0.1  # a global mean differs from this slice's
        sums = backend.grad_sums(g, x, glob_mu)
        ref_sums = core.reduce_grad_sums(g, x, glob_mu)[:2]
        for a, r in zip(sums, ref_sums):
            assert _max_err(a, r) < 1e-10
        inv_std = torch.rsqrt(var + 0.3)
        m_global = 3 * core.num_values_per_channel(x)
        for weight in (w, None):
            dx = backend.input_grad(g, x, weight, glob_mu, inv_std, *sums, m_global)
            ref = core.input_grad(g, x, weight, glob_mu, inv_std, *ref_sums, m_global)
            assert dx.shape == x.shape and _max_err(dx, ref) < 1e-10
    torch.library.opcheck(torch.ops.bnlab.bn_stats.default, (x,))
    args = (g, x, w, glob_mu, inv_std, *sums, m_global)
    torch.library.opcheck(torch.ops.bnlab.bn_input_grad.default, args)
