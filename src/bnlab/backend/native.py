"""PyTorch's own fused batch-norm kernels, for tensors that are not on the CPU (CUDA).

bnlab's compiled kernels are CPU code. On a GPU the pure-PyTorch path would launch
a dozen small kernels per call; torch's ``native_batch_norm`` and
``native_batch_norm_backward`` do the same math (Algorithm 1 and the closed-form
backward of Section 3) in one or two. These wrappers give them the signatures of
:func:`bnlab.core.batch_norm_train_forward` and :func:`bnlab.core.batch_norm_backward`.

Numerics: torch returns ``inv_std = 1 / sqrt(sigma2_B + eps)``, not the variance;
the variance is recovered as ``1 / inv_std^2 - eps`` in float64 (so the subtraction
loses nothing to float32 rounding when sigma2_B << eps).

These functions run on any device torch supports (the CPU included), which is how
the test suite checks them where no GPU is present.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for

from bnlab.core import compute_dtype, reduce_dims


def _one_layout(x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """x and ``others`` in one memory format (channels_last where x is dense in it, else
    contiguous), with the strides that format gives, also on size-1 dims.

    torch 2.13's kernels pick each tensor's layout by ``suggest_memory_format()``, which
    reads the strides of size-1 dims as well; a channels_last-dense x such as (4, 3, 10, 1)
    with strides (30, 1, 3, 1) is then taken for contiguous and its gradient is wrong
    (by ~3.5 at scale 2 on the CPU). Restriding size-1 dims moves no data: their stride
    never multiplies a non-zero index.
    """
    channels_last = x.dim() in (4, 5) and not x.is_contiguous()
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        channels_last = x.is_contiguous(memory_format=fmt)
    if not channels_last:
        fmt, strides = torch.contiguous_format, make_contiguous_strides_for(x.shape)
    else:
        strides = make_channels_last_strides_for(x.shape)
    out = []
    for t in (x, *others):
        t = t.contiguous(memory_format=fmt)
        out.append(t if t.stride() == tuple(strides) else t.as_strided(t.shape, strides))
    return tuple(out)


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mu_b, biased_var_b)`` by ``torch.native_batch_norm`` (training mode, no
    running statistics: bnlab updates those itself)."""
    (x,) = _one_layout(x)
    y, mean, inv_std = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    acc = compute_dtype(x.dtype)
    biased_var = (inv_std.double().pow(-2) - eps).clamp_(min=0).to(acc)
    return y, mean.to(acc), biased_var


def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    needs_input_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)`` by ``aten::native_batch_norm_backward``.

    In training mode torch's backward reads ``inv_std`` (its eps argument is unused).
    """
    need_x, need_w, need_b = needs_input_grad
    x, grad_y = _one_layout(x, grad_y)
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad_y,
        x,
        weight,
        None,
        None,
        mu_b,
        inv_std,
        True,
        0.0,
        [need_x, need_w and weight is not None, need_b],
    )
    if need_b and weight is None and grad_b is None:  # torch skips it without a weight
        grad_b = grad_y.sum(reduce_dims(x), dtype=compute_dtype(x.dtype)).to(grad_y.dtype)
    return (
        grad_x if need_x else None,
        grad_w if need_w and weight is not None else None,
        grad_b if need_b else None,
    )


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Inference BN (Algorithm 2, step 11) by torch's kernel."""
    (x,) = _one_layout(x)
    return torch.batch_norm(
        x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
    )
