"""The training-mode Batch Normalizing Transform as an autograd.Function.

The forward and backward call :mod:`bnlab.functional` through two functions,
:func:`bnlab.functional.batch_norm_train_forward` and
:func:`bnlab.functional.batch_norm_backward`. They are the one narrow
interface between the autograd layer and the hot path: a compiled backend
replaces them without touching the modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import functional as F

__all__ = ["BatchNormTrainFunction", "batch_norm_train"]


class BatchNormTrainFunction(torch.autograd.Function):
    """Algorithm 1 with the closed-form backward of Section 3.

    Outputs ``(y, mu_b, biased_var_b)``; the statistics are not differentiable
    (they feed the running averages only).

    Double backward is supported: when the backward itself is recorded
    (``create_graph=True``) it re-derives the batch statistics from ``x``
    with autograd enabled, so the second derivative sees their dependence on
    ``x`` exactly.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y, mu_b, biased_var_b = F.batch_norm_train_forward(x, weight, bias, eps)
        inv_std = torch.rsqrt(biased_var_b + eps)
        ctx.save_for_backward(x, weight, mu_b, inv_std)
        ctx.eps = eps
        ctx.mark_non_differentiable(mu_b, biased_var_b)
        return y, mu_b, biased_var_b

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mu: Tensor, _grad_var: Tensor):
        x, weight, mu_b, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: rebuild the statistics as a function of x.
            mu_b, biased_var_b = F.compute_batch_stats(x)
            inv_std = torch.rsqrt(biased_var_b + ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = F.batch_norm_backward(
            grad_y, x, weight, mu_b, inv_std, (need_x, need_w, need_b)
        )
        return grad_x, grad_w, grad_b, None


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of ``x`` with the explicit backward.

    Returns:
        ``(y, mu_b, biased_var_b)``.
    """
    return BatchNormTrainFunction.apply(x, weight, bias, eps)
