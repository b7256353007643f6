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

from bnlab.core import compute_dtype, reduce_dims


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mu_b, biased_var_b)`` by ``torch.native_batch_norm`` (training mode, no
    running statistics: bnlab updates those itself)."""
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
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        grad_y.contiguous(memory_format=torch.preserve_format),
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
    return torch.batch_norm(
        x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
    )
