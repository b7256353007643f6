"""The Batch Normalizing Transform as pure tensor math.

Every formula of the paper lives here once (Ioffe & Szegedy 2015, see
``PAPER.md``); modules, converters and experiments call these functions.
There are no modules and no global state in this file.

Conventions
-----------
* The channel (feature) dimension is dim 1, as in ``torch.nn.BatchNorm*d``.
  Statistics are taken over every other dimension, so for a convolutional
  input of shape (N, C, H, W) the effective mini-batch is m' = N*H*W
  (Section 3.2).
* Momentum follows PyTorch: ``new = (1 - momentum) * old + momentum * batch``.
* ``biased_var`` is the mini-batch variance of Algorithm 1 (divide by m);
  ``unbiased_var`` is m/(m-1) times it (Algorithm 2, step 10).
* float16/bfloat16 inputs are normalized with statistics accumulated in
  float32 (``compute_dtype``); the output has the input's dtype.

Numerics
--------
The variance is computed with ``torch.var_mean`` (a Welford / two-pass
reduction), never as E[x^2] - E[x]^2, so an input whose mean is much larger
than its standard deviation keeps its precision. The normalization subtracts
the mean before scaling for the same reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train_forward",
    "check_batch_norm_input",
    "compute_batch_stats",
    "center",
    "compute_dtype",
    "inference_affine",
    "input_grad",
    "merge_moments",
    "reduce_grad_sums",
    "normalize",
    "reduce_dims",
    "unbiased_var",
    "update_running_stats",
]


# Inputs with at most this many elements take the fewer-ops paths (per-op overhead
# dominates there); larger ones the fewer-passes paths.
SMALL_INPUT = 1 << 16


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions statistics are taken over: every dim but the channel dim 1."""
    return [0, *range(2, x.dim())]


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector (C,) to broadcast against ``x`` (N, C, *)."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 or wider."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def num_values_per_channel(x: Tensor) -> int:
    """m, the number of values each channel's statistics are taken over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def check_batch_norm_input(x: Tensor, training: bool) -> None:
    """Raise a clear error for input that batch normalization cannot take.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has fewer than 2 dimensions, or, in training, a
            channel has a single value (the batch variance is then 0 and the
            unbiased estimate undefined).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"batch_norm expects a floating-point input, got dtype {x.dtype}; "
            "convert it first, e.g. x.float()"
        )
    if x.dim() < 2:
        raise ValueError(
            f"batch_norm expects input of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}; add a batch dimension, e.g. x.unsqueeze(0)"
        )
    if training and num_values_per_channel(x) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}: batch statistics of a single value are undefined. Use a "
            "mini-batch of at least 2 samples, or call .eval() to use running statistics"
        )


# --------------------------------------------------------------------------
# Algorithm 1: statistics, normalization, scale and shift
# --------------------------------------------------------------------------


def _sum_sq(t: Tensor, dims: list[int]) -> Tensor:
    """Per-channel sum of squares of ``t`` without a temporary where possible."""
    if t.dim() > 2 and t.stride(1) != 1:
        # Reduction runs over the contiguous inner dims: the norm kernel is fastest.
        return torch.linalg.vector_norm(t, 2, dims).square()
    return (t * t).sum(dims)  # channel innermost (2-D, channels_last)


def center(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Center ``x`` on its batch mean and take its biased batch variance.

    Corrected two-pass algorithm (mean, then sums of ``x - mu_B``), so the
    variance and the centered values keep their precision when |mean| >> std;
    no E[x^2] - E[x]^2 anywhere.

    Returns:
        ``(x_mu, mu_b, biased_var_b)``: a new tensor x - mu_B (x's shape and
        memory format, ``compute_dtype``) and the (C,) statistics.
    """
    dims = reduce_dims(x)
    m = num_values_per_channel(x)
    xc = x.to(compute_dtype(x.dtype))
    mu_b = xc.sum(dims) / m  # sum then divide: cheaper than mean() on small inputs
    x_mu = xc - channel_view(mu_b, x)
    # Corrected two-pass: the centered values' own mean c is the rounding error of
    # the first mean (large when |mean| >> std in float32). Remove it from x_mu, and
    # from the variance as sum(x_mu^2)/m - c^2, which is exact algebra.
    c = x_mu.sum(dims) / m
    biased_var_b = (_sum_sq(x_mu, dims) / m - c.square()).clamp_min(0)
    c_view = channel_view(c, x)
    x_mu = x_mu.sub_(c_view) if _inplace_ok() else x_mu - c_view
    return x_mu, mu_b + c, biased_var_b


def compute_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mini-batch mean and biased variance per channel (Algorithm 1, lines 1-2).

        mu_B     = 1/m * sum_i x_i
        sigma2_B = 1/m * sum_i (x_i - mu_B)^2

    Args:
        x: input of shape (N, C, *).

    Returns:
        ``(mu_b, biased_var_b)``, each of shape (C,), in ``compute_dtype(x.dtype)``.
    """
    _, mu_b, biased_var_b = center(x)
    return mu_b, biased_var_b


def merge_moments(
    counts: Tensor, means: Tensor, biased_vars: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-part statistics into those of the union of the parts.

    For K parts with n_k values, means mu_k and biased variances v_k (per
    channel), the union of N = sum n_k values has

        mu  = sum_k n_k mu_k / N
        var = sum_k n_k (v_k + (mu_k - mu)^2) / N

    (the parallel form of Chan et al.; no E[x^2] - E[x]^2, so it is stable when
    |mean| >> std). Parts with n_k = 0 are ignored, whatever their mean holds.
    Used for statistics across processes (unequal per-rank batch sizes) and
    across mini-batches (population statistics).

    Args:
        counts: (K,) or (K, C) number of values per part.
        means, biased_vars: (K, C).

    Returns:
        ``(total_count, mean, biased_var)`` of shapes (C,) or scalar count.
    """
    n = counts.to(means.dtype)
    if n.dim() == 1:
        n = n.unsqueeze(1)
    total = n.sum(0)
    w = n / total.clamp_min(1)
    present = n > 0
    mean = torch.where(present, means, 0).mul(w).sum(0)
    dev2 = torch.where(present, biased_vars + (means - mean).square(), 0)
    return total.squeeze(0) if counts.dim() == 1 else total, mean, dev2.mul(w).sum(0)


def unbiased_var(biased_var: Tensor, m: int) -> Tensor:
    """The unbiased variance estimate m/(m-1) * sigma2_B (Algorithm 2, step 10)."""
    return biased_var * (m / (m - 1))


def _inplace_ok() -> bool:
    """In-place updates of fresh buffers save memory traffic, but only when
    autograd is not recording (it would need the overwritten values)."""
    return not torch.is_grad_enabled()


def _scale_shift_(
    x_mu: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """x_mu * inv_std * gamma + beta (Algorithm 1, lines 3-4), in ``x_mu``'s
    buffer when autograd is not recording."""
    scale = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
    scale = channel_view(scale, x_mu)
    if bias is None:
        return x_mu.mul_(scale) if _inplace_ok() else x_mu * scale
    shift = channel_view(bias.to(scale.dtype), x_mu)
    if _inplace_ok() and x_mu.numel() > SMALL_INPUT:
        return x_mu.mul_(scale).add_(shift)
    return torch.addcmul(shift, x_mu, scale)


def normalize(
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = gamma * (x - mean) * inv_std + beta (Algorithm 1, lines 3-4).

    ``mean`` and ``inv_std`` are per-channel (C,) vectors: the batch
    statistics in training, the population statistics at inference.
    The mean is subtracted before scaling, exact when |mean| >> std.
    The result has ``x``'s dtype and memory format.
    """
    x_mu = x.to(mean.dtype) - channel_view(mean, x)
    return _scale_shift_(x_mu, inv_std, weight, bias).to(x.dtype)


def inference_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Coefficients of inference BN as a fixed affine map (Algorithm 2, step 11).

        scale = gamma / sqrt(Var[x] + eps)
        shift = beta - gamma * E[x] / sqrt(Var[x] + eps)

    so that ``BN_inf(x) = scale * x + shift`` per channel. These are what
    inference folding composes into a neighbouring Linear or ConvNd layer.

    Returns:
        ``(scale, shift)``, each of shape (C,).
    """
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


# --------------------------------------------------------------------------
# The backward pass (Section 3, chain-rule equations) in closed form
# --------------------------------------------------------------------------


def batch_norm_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward (Algorithm 1): the hot path a compiled backend may replace.

    Returns:
        ``(y, mu_b, biased_var_b)``; ``y`` has ``x``'s dtype, the statistics
        ``compute_dtype(x.dtype)``.
    """
    x_mu, mu_b, biased_var_b = center(x)
    inv_std = torch.rsqrt(biased_var_b + eps)
    y = _scale_shift_(x_mu, inv_std, weight, bias)  # reuses the x - mu_B buffer
    return y.to(x.dtype), mu_b, biased_var_b


def batch_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Algorithm 1 with respect to x, gamma and beta.

    The paper's chain rule (Section 3)

        dl/dxhat_i   = dl/dy_i * gamma
        dl/dsigma2_B = sum_i dl/dxhat_i (x_i - mu_B) * -1/2 (sigma2_B + eps)^(-3/2)
        dl/dmu_B     = -sum_i dl/dxhat_i / sqrt(sigma2_B + eps)
                       + dl/dsigma2_B * sum_i -2 (x_i - mu_B) / m
        dl/dx_i      = dl/dxhat_i / sqrt(sigma2_B + eps)
                       + dl/dsigma2_B * 2 (x_i - mu_B) / m + dl/dmu_B / m
        dl/dgamma    = sum_i dl/dy_i xhat_i
        dl/dbeta     = sum_i dl/dy_i

    collapses (the second term of dl/dmu_B is zero) to

        dl/dx_i = gamma * inv_std / m * (m dl/dy_i - sum_j dl/dy_j - xhat_i sum_j dl/dy_j xhat_j)

    which is what is computed, per channel over m = N * prod(spatial) values.

    Args:
        grad_y: dl/dy, shape of ``x``.
        x: the forward input.
        weight: gamma, or None for gamma = 1.
        mu_b, inv_std: the forward's batch mean and 1/sqrt(sigma2_B + eps).
        needs_input_grad: which of (x, weight, bias) gradients to return.

    Returns:
        ``(grad_x, grad_weight, grad_bias)``; entries not needed are None.
    """
    need_x, need_w, need_b = needs_input_grad
    sum_dy, sum_dy_xmu, scratch = reduce_grad_sums(grad_y, x, mu_b)
    grad_x = grad_w = grad_b = None
    if need_x:
        m = num_values_per_channel(x)
        grad_x = input_grad(grad_y, x, weight, mu_b, inv_std, sum_dy, sum_dy_xmu, m, scratch)
    if need_w and weight is not None:
        grad_w = (sum_dy_xmu * inv_std).to(weight.dtype)  # dl/dgamma = sum dy * xhat
    if need_b:
        grad_b = sum_dy.to(weight.dtype if weight is not None else grad_y.dtype)  # dl/dbeta
    return grad_x, grad_w, grad_b


def reduce_grad_sums(grad_y: Tensor, x: Tensor, mu_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The two per-channel sums the backward needs.

        sum_dy     = sum_i dl/dy_i                 (= dl/dbeta)
        sum_dy_xmu = sum_i dl/dy_i * (x_i - mu_B)  (= dl/dgamma / inv_std)

    Across processes these are the only values to all-reduce before
    :func:`input_grad` (with m the global count).

    Returns:
        ``(sum_dy, sum_dy_xmu, scratch)``; ``scratch`` is a buffer of ``x``'s
        shape that :func:`input_grad` may overwrite.
    """
    dims = reduce_dims(x)
    cdt = mu_b.dtype
    gy = grad_y.to(cdt)
    scratch = x.to(cdt) - channel_view(mu_b, x)  # x - mu_B, exact when |mean| >> std
    sum_dy = gy.sum(dims)
    sum_dy_xmu = (scratch.mul_(gy) if _inplace_ok() else scratch * gy).sum(dims)
    return sum_dy, sum_dy_xmu, scratch


def input_grad(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    m: int,
    scratch: Tensor | None = None,
) -> Tensor:
    """dl/dx of Algorithm 1 from the reduced sums (closed form of Section 3):

        dl/dx = k * dy - k * sum_dy / m - (k * inv_std^2 * sum_dy_xmu / m) * (x - mu_B),
        k = gamma * inv_std

    Args:
        m: the number of values the statistics were taken over (all ranks).
        scratch: optional buffer of ``x``'s shape to write the result into.
    """
    cdt = mu_b.dtype
    gy = grad_y.to(cdt)
    xc = x.to(cdt)
    mu = channel_view(mu_b, x)
    k = inv_std if weight is None else weight.to(cdt) * inv_std
    coef_xmu = channel_view(-k * inv_std * inv_std * sum_dy_xmu / m, x)
    coef_const = channel_view(-k * sum_dy / m, x)
    if _inplace_ok():  # no new allocation when a scratch buffer is given
        buf = xc - mu if scratch is None else torch.sub(xc, mu, out=scratch)
        grad_x = buf.mul_(coef_xmu).add_(coef_const).addcmul_(gy, channel_view(k, x))
    else:  # double backward: autograd records these ops
        grad_x = torch.addcmul(coef_const, xc - mu, coef_xmu) + gy * channel_view(k, x)
    return grad_x.to(x.dtype)


# --------------------------------------------------------------------------
# Running statistics (Section 3.1: moving averages track the population)
# --------------------------------------------------------------------------


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mu_b: Tensor,
    biased_var_b: Tensor,
    m: int,
    momentum: float,
) -> None:
    """Update running statistics in place with PyTorch's momentum convention.

        running_mean = (1 - momentum) * running_mean + momentum * mu_B
        running_var  = (1 - momentum) * running_var  + momentum * m/(m-1) sigma2_B

    The variance uses the unbiased estimate of Algorithm 2, step 10.
    A cumulative average is ``momentum = 1 / num_batches_tracked``.
    """
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mu_b.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_(unbiased_var(biased_var_b, m).to(running_var.dtype), momentum)


# --------------------------------------------------------------------------
# The public entry point, same signature as torch.nn.functional.batch_norm
# --------------------------------------------------------------------------


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
    Algorithm 2, step 11, using ``running_mean`` and ``running_var``.

    Args:
        input: (N, C, *) floating-point tensor.
        running_mean, running_var: (C,) buffers, or None.
        weight, bias: gamma and beta, (C,) or None.
        training: use batch statistics (and update the running ones).
        momentum: factor of the running-statistics update (PyTorch's convention).
        eps: added to the variance for numerical stability.

    Shape:
        input (N, C, *) -> output of the same shape, dtype and memory format.

    Raises:
        TypeError, ValueError: for input batch norm cannot take (see
            :func:`check_batch_norm_input`), or missing running statistics in
            eval mode.
    """
    from bnlab.autograd import batch_norm_train  # autograd builds on this module

    check_batch_norm_input(input, training)
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
        update_running_stats(
            running_mean,
            running_var,
            mu_b,
            biased_var_b,
            num_values_per_channel(input),
            momentum,
        )
        return y
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm in eval mode (training=False) needs running_mean and running_var; "
            "pass them, or use training=True to normalize with batch statistics"
        )
    scale, shift = inference_affine(running_mean, running_var, weight, bias, eps)
    cdt = compute_dtype(input.dtype)
    y = torch.addcmul(
        channel_view(shift.to(cdt), input), input.to(cdt), channel_view(scale.to(cdt), input)
    )
    return y.to(input.dtype)
