"""The checks of ``bnlab verify``: this implementation, checked on the user's own machine.

:func:`run_checks` runs, on the chosen device, gradcheck of the explicit backward,
parity of outputs, gradients and running statistics with PyTorch's kernels, accuracy
of low-precision inputs against the float64 result, and the paper's properties of the
transform (:func:`transform_properties`); :func:`format_table` lays the results out
with the largest errors. The command itself (parsing, printing, exit status) is
``bnlab.commands.verify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import backend

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "CheckResult",
    "format_table",
    "run_checks",
    "transform_properties",
]

# Absolute tolerances on unit-scale outputs/gradients per input dtype.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class CheckResult:
    """One row of the verify table."""

    name: str
    dtype: str
    max_error: float | None  # None for pass/fail checks such as gradcheck
    tolerance: float | None
    ok: bool | None = None

    @property
    def passed(self) -> bool:
        if self.max_error is None:
            return bool(self.ok)
        return self.max_error <= self.tolerance


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _parity_with_torch(ours_cls, ref_cls, shape, device, channels_last=False) -> float:
    """Max |ours - torch| over 3 training steps (outputs, 3 grads, buffers) and eval."""
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    ref = ref_cls(c, momentum=0.2, device=device, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(c, generator=gen))
        ref.bias.copy_(torch.randn(c, generator=gen))
    ours = ours_cls(c, momentum=0.2, device=device, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    err = 0.0
    for _ in range(3):
        x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1).to(device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), ref(xs[1])]
        g = torch.randn(ys[0].shape, generator=gen, dtype=torch.float64).to(device)
        grads = [
            torch.autograd.grad(y, (xi, m.weight, m.bias), g)
            for y, xi, m in zip(ys, xs, (ours, ref))
        ]
        err = max(err, _max_err([ys[0], *grads[0]], [ys[1], *grads[1]]))
    err = max(err, _max_err(list(ours.buffers()), list(ref.buffers())))
    ours.eval()
    ref.eval()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)
    return max(err, _max_err([ours(x)], [ref(x)]))


def _dtype_accuracy(dtype: torch.dtype, device: str) -> float:
    """Max error of output and input gradient against float64 math on the same input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, 8, 8, generator=gen, dtype=torch.float64).to(dtype).to(device)
    g = torch.randn(32, 16, 8, 8, generator=gen, dtype=torch.float64).to(dtype).to(device)
    w = (torch.rand(16, generator=gen) + 0.5).to(device)
    b = torch.randn(16, generator=gen).to(device)
    xl = x.clone().requires_grad_()
    y = BF.batch_norm(xl, None, None, w, b, training=True)
    (gx,) = torch.autograd.grad(y, xl, g)
    x64 = x.double().requires_grad_()
    y64 = BF.batch_norm(x64, None, None, w.double(), b.double(), training=True)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    return _max_err([y, gx], [y64, gx64])


def _odd_layouts(device: str) -> float:
    """Max error of BN modules' outputs and gradients on inputs laid out unusually
    (channels_last with odd strides on size-1 dims, N = 1 with an odd batch stride, a
    strided slice) against float64 math on a contiguous copy. torch 2.13's own CPU kernel
    gets the first of these wrong, so the reference is the formula, not torch."""
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device) * 2 + 1

    inputs = [
        randn(4, 10, 3).transpose(1, 2).unsqueeze(-1),  # (N, L, C) as (N, C, L, 1)
        randn(1, 5, 6, 3).permute(0, 3, 1, 2).as_strided((1, 3, 5, 6), (7, 1, 18, 3)),
        randn(2, 1, 4, 4, 3).permute(0, 4, 1, 2, 3),  # channels_last_3d, D = 1
        randn(6, 3, 9)[:, :, ::2],
    ]
    worst = 0.0
    for x0 in inputs:
        cls = {3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[x0.dim()]
        bn = cls(x0.shape[1], device=device, dtype=torch.float64)
        g = randn(*x0.shape)
        x = x0.detach().requires_grad_()
        y = bn(x)
        ours = [y, *torch.autograd.grad(y, [x, bn.weight, bn.bias], g)]
        # Algorithm 1 in float64 on a contiguous copy, differentiated by autograd.
        xr = x0.detach().contiguous().requires_grad_()
        wr, br = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone()
        br.requires_grad_()
        dims, view = [0, *range(2, x0.dim())], [1, -1] + [1] * (x0.dim() - 2)
        mu = xr.mean(dims, keepdim=True)
        var = ((xr - mu) ** 2).mean(dims, keepdim=True)
        yr = (xr - mu) * torch.rsqrt(var + bn.eps) * wr.view(view) + br.view(view)
        ref = [yr, *torch.autograd.grad(yr, [xr, wr, br], g.contiguous())]
        worst = max(worst, _max_err(ours, ref))
    return worst


# The paper's properties hold exactly at eps = 0, which training refuses (as torch does);
# 1e-30 is lost against a variance of order 1 in float64, so they still hold to rounding.
TINY_EPS = 1e-30


def transform_properties(device: str = "cpu") -> dict[str, float]:
    """The paper's properties of the transform, measured now in float64 on ``device``.

    Each is exact in real arithmetic, so its value is the largest deviation that
    rounding left (about 1e-15 when the implementation is right):

    * ``"mean 0, variance 1 per channel (Alg. 1)"``: the training-mode output's
      per-channel mean and biased variance against 0 and 1 (Algorithm 1, at
      ``eps`` = 1e-30).
    * ``"scale invariance (Sec. 3.3)"``: BN(W u) = BN((a W) u), with dl/du unchanged
      and dl/d(aW) = dl/dW / a, for a = 3.7 (Section 3.3).
    * ``"sum of dl/dx per channel = 0"``: the input gradient sums to 0 per channel,
      as the closed-form backward of Section 3 implies.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``{property name: largest deviation}``, in the order above.
    """
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(16, 5, 4, 4, generator=gen, dtype=torch.float64) * 7 - 3).to(device)
    y = BF.batch_norm(x, None, None, training=True, eps=TINY_EPS)
    flat = y.transpose(0, 1).reshape(5, -1)
    moments = max(
        flat.mean(1).abs().max().item(), (flat.var(1, correction=0) - 1).abs().max().item()
    )
    u = torch.randn(12, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    aw = (3.7 * w).detach().requires_grad_()
    g = torch.randn(12, 4, generator=gen, dtype=torch.float64).to(device)

    def bn_of(weight):
        return BF.batch_norm(u @ weight.t(), None, None, training=True, eps=TINY_EPS)

    y1, y2 = bn_of(w), bn_of(aw)
    gu1, gw = torch.autograd.grad(y1, (u, w), g)
    gu2, gaw = torch.autograd.grad(y2, (u, aw), g)
    scale_inv = _max_err([y1, gu1, gw / 3.7], [y2, gu2, gaw])
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(
        BF.batch_norm(xg, None, None, training=True), xg, torch.randn_like(x)
    )
    grad_sums = gx.sum((0, 2, 3)).abs().max().item()
    return {
        "mean 0, variance 1 per channel (Alg. 1)": moments,
        "scale invariance (Sec. 3.3)": scale_inv,
        "sum of dl/dx per channel = 0": grad_sums,
    }


def run_checks(device: str = "cpu", dtypes: list[str] | None = None) -> list[CheckResult]:
    """Run every check and return the results (no printing).

    Args:
        device: "cpu" or "cuda".
        dtypes: low-precision dtypes to check against float64 (names as in ``DTYPES``).

    Raises:
        ValueError: an unknown dtype, or CUDA requested but unavailable.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available here; use --device cpu")
    dtypes = dtypes or ["float32", "bfloat16"]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")

    results: list[CheckResult] = []
    tol64 = TOLERANCES[torch.float64]

    def gradchecks_pass(shape) -> bool:
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        w = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
        fn: Callable = lambda *a: BF.batch_norm(a[0], None, None, a[1], a[2], training=True)  # noqa: E731
        ok = torch.autograd.gradcheck(fn, (x, w, b), raise_exception=False)
        return ok and torch.autograd.gradgradcheck(fn, (x, w, b), raise_exception=False)

    torch.manual_seed(0)
    for shape in [(6, 3), (3, 2, 3, 4)]:
        results.append(
            CheckResult(
                f"gradcheck + gradgradcheck {shape}", "float64", None, None, gradchecks_pass(shape)
            )
        )
    for ours_cls, ref_cls, shape, cl in [
        (bnn.BatchNorm1d, nn.BatchNorm1d, (8, 4), False),
        (bnn.BatchNorm1d, nn.BatchNorm1d, (8, 4, 5), False),
        (bnn.BatchNorm2d, nn.BatchNorm2d, (4, 4, 5, 6), False),
        (bnn.BatchNorm2d, nn.BatchNorm2d, (4, 4, 5, 6), True),
        (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 2), False),
    ]:
        name = f"{ours_cls.__name__} vs torch {len(shape)}-D" + (" channels_last" if cl else "")
        results.append(
            CheckResult(
                name, "float64", _parity_with_torch(ours_cls, ref_cls, shape, device, cl), tol64
            )
        )
    results.append(
        CheckResult("BN on odd layouts vs float64 math", "float64", _odd_layouts(device), tol64)
    )
    for name in dtypes:
        dt = DTYPES[name]
        results.append(
            CheckResult(
                "output + dl/dx vs float64 math", name, _dtype_accuracy(dt, device), TOLERANCES[dt]
            )
        )
    for name, err in transform_properties(device).items():
        results.append(CheckResult(name, "float64", err, tol64))
    return results


def format_table(results: list[CheckResult], device: str) -> str:
    """An aligned, readable table of the results with a summary line."""
    head = ("check", "dtype", "max error", "tolerance", "result")
    rows = [
        (
            r.name,
            r.dtype,
            "-" if r.max_error is None else f"{r.max_error:.2e}",
            "-" if r.tolerance is None else f"{r.tolerance:.0e}",
            "PASS" if r.passed else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [
        f"bnlab verify on {device} (torch {torch.__version__})",
        "backend: " + backend.describe(device),
        "",
        line.format(*head),
        "  ".join("-" * w for w in widths),
    ]
    out += [line.format(*row) for row in rows]
    failed = sum(not r.passed for r in results)
    out += ["", f"{len(results) - failed} passed, {failed} failed"]
    return "\n".join(out)
