"""The functional API of batch normalization, as ``torch.nn.functional`` has it.

:func:`batch_norm` has the signature of ``torch.nn.functional.batch_norm``:
training mode is Algorithm 1 (Ioffe & Szegedy 2015, see ``PAPER.md``) with
the explicit closed-form backward of :mod:`bnlab.autograd`, eval mode the
fixed affine map of Algorithm 2, step 11.

The pure tensor math (statistics, normalization, closed-form backward,
running-statistics update, inference affine map) lives in :mod:`bnlab.core`
and is re-exported here, so ``bnlab.functional.compute_batch_stats`` and the
others keep working. Dependencies run one way:
``functional -> autograd -> core``; see :mod:`bnlab.core` for the
conventions (channel dim 1, PyTorch's momentum) and the numerics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.autograd import batch_norm_train
from bnlab.core import (
    batch_norm_backward,
    batch_norm_train_forward,
    center,
    channel_view,
    check_batch_norm_input,
    check_eps,
    compute_batch_stats,
    compute_dtype,
    inference_affine,
    input_grad,
    merge_moments,
    normalize,
    num_values_per_channel,
    reduce_dims,
    reduce_grad_sums,
    unbiased_var,
    update_running_stats,
)

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_tracked",
    "batch_norm_train_forward",
    "center",
    "channel_view",
    "check_batch_norm_input",
    "check_eps",
    "compute_batch_stats",
    "compute_dtype",
    "inference_affine",
    "input_grad",
    "merge_moments",
    "normalize",
    "num_values_per_channel",
    "reduce_dims",
    "reduce_grad_sums",
    "unbiased_var",
    "update_running_stats",
]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    In training mode this is Algorithm 1 over every dim but the channel dim,
    with an explicit closed-form backward, and the running statistics (when
    given) are updated in place. Otherwise it is the fixed affine map of
    Algorithm 2, step 11, using ``running_mean`` and ``running_var``:
    ``gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta``, the mean subtracted
    before scaling so that |E[x]| >> std keeps its precision.

    Edge cases follow torch: an empty batch (N = 0) in training gives an
    empty output, zero gradients for weight and bias, and unchanged running
    statistics; ``eps <= 0`` in training is refused. Channels whose batch
    statistics are not finite leave their running statistics unchanged
    (see :func:`batch_norm_tracked` to learn which).

    Under ``torch.func``: ``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``jvp``,
    ``functional_call`` work. With running statistics in training under
    ``vmap``, the buffers must be batched like the input (one set per
    vmapped model, as ``stack_module_state`` gives them): each slice is then
    updated with its own batch statistics. Unbatched buffers with a batched
    input raise vmap's RuntimeError on the in-place update, as torch's batch
    norm does (PyTorch issue 85533); pass ``None`` for them, or use eval mode.

    Args:
        input: (N, C, *) floating-point tensor.
        running_mean, running_var: (C,) buffers, or None.
        weight, bias: gamma and beta, (C,) or None.
        training: use batch statistics (and update the running ones).
        momentum: factor of the running-statistics update (PyTorch's convention:
            ``new = (1 - momentum) * old + momentum * batch``).
        eps: added to the variance for numerical stability; > 0 in training.

    Shape:
        input (N, C, *) -> output of the same shape, dtype and memory format.

    Raises:
        TypeError, ValueError: for input batch norm cannot take (see
            :func:`check_batch_norm_input`), a refused ``eps``, or missing
            running statistics in eval mode.
    """
    y, _ = batch_norm_tracked(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    return y


def batch_norm_tracked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None]:
    """:func:`batch_norm`, also returning which channels' running statistics were skipped.

    For modules that warn about non-finite batch statistics.

    Returns:
        ``(y, skipped)``: ``y`` as :func:`batch_norm` gives it; ``skipped`` the
        (C,) bool tensor of :func:`bnlab.core.update_running_stats` (True where
        the batch mean or variance was not finite, so that channel's running
        statistics were left unchanged) in training with running statistics;
        None in eval mode or without running statistics.
    """
    check_batch_norm_input(input, training, eps)
    channels = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and t.numel() != channels:
            raise ValueError(
                f"{name} has {t.numel()} elements but the input has {channels} channels "
                f"(dim 1 of shape {tuple(input.shape)}); they must match"
            )
    if training:
        y, mu_b, biased_var_b = batch_norm_train(input, weight, bias, eps)
        if running_mean is None and running_var is None:
            return y, None
        skipped = update_running_stats(
            running_mean,
            running_var,
            mu_b,
            biased_var_b,
            num_values_per_channel(input),
            momentum,
        )
        return y, skipped
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm in eval mode (training=False) needs running_mean and running_var; "
            "pass them, or use training=True to normalize with batch statistics"
        )
    # Algorithm 2, step 11, as gamma * (x - E[x]) * inv_std + beta: subtracting the
    # mean first keeps the precision that scale * x + shift loses to cancellation
    # when |E[x]| >> std (1e-3 off in float32 at |E[x]|/std = 1e4).
    cdt = compute_dtype(input.dtype)
    inv_std = torch.rsqrt(running_var.to(cdt) + eps)
    return normalize(input, running_mean.to(cdt), inv_std, weight, bias), None
