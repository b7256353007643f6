"""The Batch Normalizing Transform as pure tensor math.

Every formula of the paper lives here once (Ioffe & Szegedy 2015; the references
page of the documentation lists every paper cited). This is the bottom of bnlab's
dependency chain:
:mod:`bnlab.autograd` wraps it in an ``autograd.Function`` and
:mod:`bnlab.functional` (the public functional API, which re-exports these
names) dispatches to it. There are no modules and no global state in this file.
The last sections hold the math of two related methods (Ioffe 2017; Hoffer et al. 2017):
Batch Renormalization and ghost batch normalization.

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
The variance is computed by :func:`center` with a corrected two-pass
algorithm (the mean, then sums of the centered values, minus the square of
their own mean), never as E[x^2] - E[x]^2, so an input whose mean is much
larger than its standard deviation keeps its precision. The normalization
subtracts the mean before scaling for the same reason, in training and at
inference.

In-place fast paths (reusing a fresh buffer) are taken only for plain tensors
with autograd not recording; under ``torch.func`` transforms (vmap, jvp,
grad) and batched gradients (``is_grads_batched``) the same math runs
out of place.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormDtypeError",
    "BatchNormShapeError",
    "activate",
    "activation_grad",
    "batch_norm_act_backward",
    "batch_norm_backward",
    "batch_norm_train_forward",
    "batch_renorm_affine",
    "batch_renorm_backward",
    "batch_renorm_correction",
    "batch_renorm_limits",
    "batch_renorm_train_forward",
    "center",
    "channel_view",
    "check_batch_norm_input",
    "check_batch_norm_state",
    "check_eps",
    "compute_batch_stats",
    "compute_dtype",
    "inference_affine",
    "input_grad",
    "invert_activation",
    "merge_moments",
    "normalize",
    "num_values_per_channel",
    "reduce_dims",
    "reduce_grad_sums",
    "unbiased_var",
    "update_running_stats",
    "virtual_batches",
]


class BatchNormShapeError(ValueError, RuntimeError):
    """A size mismatch between an input or a tensor and a BN layer's channels.

    A ValueError (bnlab's convention for bad arguments) and a RuntimeError (what
    PyTorch raises for the same mistakes), so ``except RuntimeError`` code written
    for torch's BN still catches it. Raised by the functional API and the modules
    alike (``bnlab.nn.BatchNormShapeError`` is this class).
    """


class BatchNormDtypeError(TypeError, RuntimeError):
    """Parameters or running statistics of a dtype batch norm cannot mix with the input's.

    A TypeError (bnlab's convention for a wrong type) and a RuntimeError (what PyTorch
    raises for the same mixes), so ``except RuntimeError`` code written for torch's BN
    still catches it. See :func:`check_batch_norm_state` for the rule.
    """


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


def check_eps(eps: float, training: bool) -> None:
    """Refuse an ``eps`` that batch normalization cannot use, as torch does.

    Raises:
        ValueError: ``eps <= 0`` in training (a constant channel has batch
            variance 0, so eps = 0 gives 1/sqrt(0) = inf and then NaN), or
            ``eps < 0`` (also in eval).
    """
    if training and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive in training, got {eps!r}: a channel with "
            "constant values has batch variance 0, and 1/sqrt(0 + eps) is then inf. Use a "
            "small positive value such as 1e-5"
        )
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, got {eps!r}; use e.g. 1e-5")


def check_batch_norm_input(x: Tensor, training: bool, eps: float | None = None) -> None:
    """Raise a clear error for input that batch normalization cannot take.

    An empty batch (m = 0 values per channel, e.g. N = 0) is accepted, as in
    torch: the output is empty and the running statistics stay unchanged.

    Args:
        x: the input, (N, C, *).
        training: whether batch statistics will be taken.
        eps: when given, checked too (see :func:`check_eps`).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has fewer than 2 dimensions; or, in training, a
            channel has exactly one value (the batch variance is then 0 and
            the unbiased estimate undefined); or ``eps`` is refused.
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
    if training and num_values_per_channel(x) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}: batch statistics of a single value are undefined. Use a "
            "mini-batch of at least 2 samples, or call .eval() to use running statistics"
        )
    if eps is not None:
        check_eps(eps, training)


def check_batch_norm_state(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    who: str = "batch_norm",
) -> None:
    """Refuse the running statistics and dtype mixes that torch's batch norm refuses.

    torch 2.13's rule, followed here: ``running_mean`` and ``running_var`` are both
    given or both None; the tensors given among ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` share one dtype, which is ``x``'s, or float32
    for float16/bfloat16 ``x`` (mixed precision: statistics and the affine map in
    float32, output in ``x``'s dtype). bnlab's math could take any mix (it would
    compute in the input's dtype), but a model that runs here and fails under
    torch's BN, or a float64 weight silently rounded to float32, is no drop-in.

    Args:
        x: the input (a floating-point tensor, already checked).
        weight, bias, running_mean, running_var: as :func:`bnlab.functional.batch_norm`.
        who: the function or module named in the error.

    Raises:
        ValueError: only one of ``running_mean`` and ``running_var`` is given
            (torch raises ValueError too).
        BatchNormDtypeError: a dtype mix torch refuses (a TypeError and a RuntimeError).
    """
    if (running_mean is None) != (running_var is None):
        given, missing = (
            ("running_mean", "running_var")
            if running_var is None
            else ("running_var", "running_mean")
        )
        raise ValueError(
            f"{who} got {given} but {missing} is None: pass both running statistics "
            "(e.g. torch.zeros(C) and torch.ones(C) to start) or neither (batch statistics "
            "only, nothing tracked)"
        )
    dtype = x.dtype
    if (
        (weight is None or weight.dtype == dtype)
        and (bias is None or bias.dtype == dtype)
        and (running_mean is None or running_mean.dtype == dtype)
        and (running_var is None or running_var.dtype == dtype)
    ):
        return  # the usual case, at the cost of four attribute reads
    given = [
        (name, t.dtype)
        for name, t in (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        )
        if t is not None
    ]
    first, state_dtype = given[0]
    for name, other in given[1:]:
        if other != state_dtype:
            raise BatchNormDtypeError(
                f"{who}: {first} is {state_dtype} but {name} is {other}; parameters and "
                "running statistics must share one dtype (torch refuses this mix too): "
                f"convert them to one, e.g. {name}.to({state_dtype}) or module.to(dtype)"
            )
    if state_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        return  # torch's mixed precision
    allowed = "the input's dtype" + (
        " or float32" if dtype in (torch.float16, torch.bfloat16) else ""
    )
    raise BatchNormDtypeError(
        f"{who}: {first} is {state_dtype} but the input is {dtype}; parameters and running "
        f"statistics must have {allowed} (torch refuses this mix too): convert the input "
        f"with x.to({state_dtype}), or the parameters and statistics with "
        f".to({dtype}) (module.to({dtype}) for a module)"
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
    no E[x^2] - E[x]^2 anywhere. An empty input (m = 0) has mean 0 and
    variance 0 by convention (finite, so gradients of an empty batch are 0).

    Returns:
        ``(x_mu, mu_b, biased_var_b)``: a new tensor x - mu_B (x's shape and
        memory format, ``compute_dtype``) and the (C,) statistics.
    """
    dims = reduce_dims(x)
    m = max(num_values_per_channel(x), 1)  # empty sums are 0: statistics 0, not 0/0
    xc = x.to(compute_dtype(x.dtype))
    mu_b = xc.sum(dims) / m  # sum then divide: cheaper than mean() on small inputs
    x_mu = xc - channel_view(mu_b, x)
    # Corrected two-pass: the centered values' own mean c is the rounding error of
    # the first mean (large when |mean| >> std in float32). Remove it from x_mu, and
    # from the variance as sum(x_mu^2)/m - c^2, which is exact algebra.
    c = x_mu.sum(dims) / m
    biased_var_b = (_sum_sq(x_mu, dims) / m - c.square()).clamp_min(0)
    c_view = channel_view(c, x)
    x_mu = x_mu.sub_(c_view) if _inplace_ok(x) else x_mu - c_view
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


def _inplace_ok(*tensors: Tensor) -> bool:
    """Whether an in-place update of a fresh buffer computed from ``tensors`` is safe.

    In-place ops save memory traffic, but only when autograd is not recording
    (it would need the overwritten values) and every tensor involved is a
    plain one: under ``vmap`` (``torch.func`` or the batched gradients of
    ``is_grads_batched``/``check_batched_grad``) an unbatched buffer cannot
    take a batched operand in place, and other transforms wrap tensors too.
    """
    if torch.is_grad_enabled():
        return False
    if torch.compiler.is_exporting():
        # An exported graph is functional, so in-place ops buy nothing there, and the size
        # test that picks the in-place form would put a guard on the batch size (say
        # 216 * N <= 65536) that a dynamic batch dim (torch.export.Dim) refuses.
        return False
    if torch.compiler.is_compiling():
        return True  # traced tensors are never functorch-wrapped; functionalization copes
    for t in tensors:
        if t is not None and (
            _functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t)
        ):
            return False
    return True


def _scale_shift_(
    x_mu: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """x_mu * inv_std * gamma + beta (Algorithm 1, lines 3-4), in ``x_mu``'s
    buffer when autograd is not recording."""
    scale = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
    scale = channel_view(scale, x_mu)
    inplace = _inplace_ok(x_mu, scale, bias)
    if bias is None:
        return x_mu.mul_(scale) if inplace else x_mu * scale
    shift = channel_view(bias.to(scale.dtype), x_mu)
    if inplace and x_mu.numel() > SMALL_INPUT:
        if x_mu.stride(1) == 1:  # channel innermost (2-D, channels_last): one fused pass
            return torch.addcmul(shift, x_mu, scale, out=x_mu)
        return x_mu.mul_(scale).add_(shift)  # addcmul broadcasting over inner dims is slow
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
    inplace = _inplace_ok(gy, scratch)
    sum_dy_xmu = (scratch.mul_(gy) if inplace else scratch * gy).sum(dims)
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
    if _inplace_ok(gy, xc, mu, k, coef_xmu, coef_const, scratch):
        # No new allocation when a scratch buffer is given.
        buf = xc - mu if scratch is None else torch.sub(xc, mu, out=scratch)
        grad_x = buf.mul_(coef_xmu).add_(coef_const).addcmul_(gy, channel_view(k, x))
    else:  # double backward (autograd records these ops), or under vmap
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
    momentum: float | Tensor,
) -> Tensor:
    """Update running statistics in place with PyTorch's momentum convention.

        running_mean = (1 - momentum) * running_mean + momentum * mu_B
        running_var  = (1 - momentum) * running_var  + momentum * m/(m-1) sigma2_B

    The variance uses the unbiased estimate of Algorithm 2, step 10.
    A cumulative average is ``momentum = 1 / num_batches_tracked``.

    Two cases leave the running statistics as they are:

    * an empty batch (m = 0), as in torch;
    * channels whose batch mean or variance is not finite (a NaN or inf in the
      batch, float16 overflow). One such batch would otherwise poison the
      running statistics for good (PyTorch issues 115500, 88474). Their
      finite running values stay exactly as they were; the other channels
      are updated as usual.

    Under ``torch.func.vmap`` the buffers must be batched like the statistics
    (as ``torch.func.stack_module_state`` gives them, one set per model);
    unbatched buffers with batched statistics raise a RuntimeError from vmap,
    as torch's own batch norm does (PyTorch issue 85533).

    Args:
        running_mean, running_var: (C,) buffers updated in place, or None.
        mu_b, biased_var_b: the batch statistics, (C,).
        m: the number of values they were taken over (0: nothing to update).
        momentum: a float, or a 0-dim tensor (e.g. ``1 / num_batches_tracked``
            computed on the device, which also works under vmap).

    Returns:
        A (C,) bool tensor, True for the channels whose update was skipped
        because their batch statistics were not finite (all False for an
        empty batch). Reading it (``skipped.any()``) synchronizes with the
        device; callers that warn should do so only when they must.
    """
    with torch.no_grad():
        # One test for both: a NaN or inf in either makes the sum non-finite.
        finite = torch.isfinite(mu_b + biased_var_b)
        if m == 0:
            return torch.zeros_like(finite)
        # A skipped channel moves towards its own value: lerp(a, a, w) = a exactly.
        if running_mean is not None:
            batch_mean = torch.where(finite, mu_b.to(running_mean.dtype), running_mean)
            running_mean.lerp_(batch_mean, momentum)
        if running_var is not None:
            batch_var = unbiased_var(biased_var_b, m).to(running_var.dtype)
            running_var.lerp_(torch.where(finite, batch_var, running_var), momentum)
        return ~finite


# --------------------------------------------------------------------------
# Batch Renormalization (Ioffe 2017)
# --------------------------------------------------------------------------


def batch_renorm_limits(
    step: Tensor | int,
    rmax: float,
    dmax: float,
    warmup_steps: int,
    rmax_steps: int,
    dmax_steps: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The clipping limits (rmax, dmax) of Batch Renorm at training step ``step``.

    The schedule of Ioffe 2017: plain BN (rmax = 1,
    dmax = 0) for the first ``warmup_steps`` steps, then each limit rises
    linearly to its final value, reached at step ``rmax_steps`` (resp.
    ``dmax_steps``) and kept afterwards:

        rmax(s) = 1 + (rmax - 1) * clip((s - warmup_steps) / (rmax_steps - warmup_steps), 0, 1)
        dmax(s) =      dmax      * clip((s - warmup_steps) / (dmax_steps - warmup_steps), 0, 1)

    A ramp whose end is at or before ``warmup_steps`` jumps to its final value
    at step ``warmup_steps + 1``; ``warmup_steps = rmax_steps = dmax_steps = 0``
    gives fixed limits from the first step. In the paper: 5000, 40000, 25000
    with rmax = 3 and dmax = 5.

    Args:
        step: the 1-based index of the training step the limits are for (a
            module passes ``num_batches_tracked + 1``): an int, or a 0-dim
            tensor so that no device-to-host copy is needed.
        rmax, dmax: the final limits (rmax >= 1, dmax >= 0).
        warmup_steps, rmax_steps, dmax_steps: the schedule, in steps.
        dtype: the dtype of the result.

    Returns:
        ``(rmax_s, dmax_s)``, 0-dim tensors (on ``step``'s device when it is a
        tensor). Exactly 1 and 0 during the warm-up.
    """
    s = step.to(dtype) if isinstance(step, Tensor) else torch.tensor(float(step), dtype=dtype)

    def ramp(end: int) -> Tensor:
        if end <= warmup_steps:
            return (s > warmup_steps).to(dtype)
        return ((s - warmup_steps) / (end - warmup_steps)).clamp(0, 1)

    return 1 + (rmax - 1) * ramp(rmax_steps), dmax * ramp(dmax_steps)


def batch_renorm_correction(
    mu_b: Tensor,
    biased_var_b: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """The correction (r, d) of Batch Renorm (Ioffe 2017), per channel, without gradient.

        sigma_B = sqrt(sigma2_B + eps),  sigma = sqrt(running_var + eps)
        r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))

    with mu = ``running_mean``, the moving statistics *before* this batch's
    update. The moving variance is BN's (the unbiased estimate of Algorithm 2,
    step 10, averaged with PyTorch's momentum) where the paper averages
    sigma itself; so on a stationary input r ~ sqrt((m - 1) / m), not 1,
    when rmax > 1 (a 1/(2m) relative difference).

    With rmax = 1 and dmax = 0 this gives r = 1 and d = 0 exactly.

    Returns:
        ``(r, d)``, each (C,) in ``mu_b``'s dtype, detached.
    """
    with torch.no_grad():
        cdt = mu_b.dtype
        rmax = torch.as_tensor(rmax, dtype=cdt, device=mu_b.device)
        dmax = torch.as_tensor(dmax, dtype=cdt, device=mu_b.device)
        inv_sigma = torch.rsqrt(running_var.to(cdt) + eps)
        r = torch.sqrt(biased_var_b + eps) * inv_sigma
        r = torch.clamp(r, 1 / rmax, rmax)
        d = torch.clamp((mu_b - running_mean.to(cdt)) * inv_sigma, -dmax, dmax)
    return r.detach(), d.detach()


def batch_renorm_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """Batch Renorm as BN with a per-channel scale and shift:

        y = gamma * (xhat_B * r + d) + beta = (gamma * r) * xhat_B + (beta + gamma * d)

    with xhat_B = (x - mu_B) / sigma_B, the BN-normalized value. With r = 1
    and d = 0 these are gamma and beta exactly.

    Returns:
        ``(scale, shift)``: gamma * r and beta + gamma * d, (C,) in ``r``'s dtype.
    """
    cdt = r.dtype
    scale = r if weight is None else weight.to(cdt) * r
    shift = d if weight is None else weight.to(cdt) * d
    if bias is not None:
        shift = bias.to(cdt) + shift
    return scale, shift


def batch_renorm_train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode forward of Batch Renorm (Ioffe 2017, Algorithm 1 of that paper).

        xhat = (x - mu_B) / sigma_B * r + d ;  y = gamma * xhat + beta

    computed as BN's forward (:func:`batch_norm_train_forward`) with the scale
    gamma * r and shift beta + gamma * d of :func:`batch_renorm_affine`; r
    and d from :func:`batch_renorm_correction`. The running statistics are
    read, not updated (the caller updates them afterwards, as in BN).

    Returns:
        ``(y, mu_b, biased_var_b, r, d)``; ``y`` has ``x``'s dtype, the rest
        ``compute_dtype(x.dtype)``.
    """
    x_mu, mu_b, biased_var_b = center(x)
    inv_std = torch.rsqrt(biased_var_b + eps)
    r, d = batch_renorm_correction(mu_b, biased_var_b, running_mean, running_var, eps, rmax, dmax)
    scale, shift = batch_renorm_affine(weight, bias, r, d)
    y = _scale_shift_(x_mu, inv_std, scale, shift)  # reuses the x - mu_B buffer
    return y.to(x.dtype), mu_b, biased_var_b, r, d


def batch_renorm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    r: Tensor,
    d: Tensor,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Batch Renorm with respect to x, gamma and beta.

    r and d are constants (stop_gradient), so y = (gamma r) xhat_B + (beta + gamma d)
    is BN with the effective scale gamma' = gamma r and shift beta' = beta + gamma d,
    and the chain rule through gamma' and beta' gives

        dl/dx     = BN's dl/dx with gamma' = gamma * r  (:func:`batch_norm_backward`)
        dl/dgamma = sum_i dl/dy_i (r xhat_B,i + d) = r * dl/dgamma' + d * dl/dbeta'
        dl/dbeta  = sum_i dl/dy_i                  = dl/dbeta'

    where dl/dgamma' = sum_i dl/dy_i xhat_B,i is BN's weight gradient (it does
    not depend on gamma'). With r = 1, d = 0 these are BN's gradients exactly.

    Args:
        grad_y: dl/dy, shape of ``x``.
        x: the forward input.
        weight: gamma, or None for gamma = 1.
        mu_b, inv_std: the batch mean and 1/sqrt(sigma2_B + eps).
        r, d: the forward's corrections, (C,).
        needs_input_grad: which of (x, weight, bias) gradients to return.

    Returns:
        ``(grad_x, grad_weight, grad_bias)``; entries not needed are None.
    """
    need_x, need_w, need_b = needs_input_grad
    need_w = need_w and weight is not None
    scale = r if weight is None else weight.to(r.dtype) * r
    grad_x, grad_scale, grad_shift = batch_norm_backward(
        grad_y, x, scale, mu_b, inv_std, (need_x, need_w, need_b or need_w)
    )
    grad_w = grad_b = None
    if need_w:
        grad_w = (r * grad_scale + d * grad_shift).to(weight.dtype)
    if need_b:
        grad_b = grad_shift.to(weight.dtype if weight is not None else grad_y.dtype)
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------
# Ghost batch normalization (Hoffer et al. 2017)
# --------------------------------------------------------------------------


def virtual_batches(x: Tensor, virtual_batch_size: int) -> tuple[Tensor, ...]:
    """Split a mini-batch along dim 0 into ghost ("virtual") batches.

    Consecutive samples form a ghost batch of ``virtual_batch_size``; when
    that does not divide N, the last ghost batch holds the remaining
    N mod ``virtual_batch_size`` samples and is normalized with its own
    statistics like the others. Every ghost batch keeps ``x``'s memory
    format (they are views of ``x``).

    Raises:
        ValueError: the last ghost batch would have a single value per channel
            (e.g. one sample of a 2-D (N, C) input), whose batch statistics
            are undefined.
    """
    batches = x.split(virtual_batch_size, 0)
    if len(batches) > 1 and num_values_per_channel(batches[-1]) == 1 and virtual_batch_size == 1:
        raise ValueError(  # every ghost batch is one sample: no batch size can help
            f"ghost batch normalization: virtual batches of 1 sample have a single value per "
            f"channel for input of shape {tuple(x.shape)} (no positions to normalize over), "
            "and batch statistics of one value are undefined; use virtual_batch_size >= 2"
        )
    if len(batches) > 1 and num_values_per_channel(batches[-1]) == 1:
        raise ValueError(
            f"ghost batch normalization: a mini-batch of {x.shape[0]} samples in virtual "
            f"batches of {virtual_batch_size} leaves a last virtual batch of 1 sample with a "
            f"single value per channel (input shape {tuple(x.shape)}), and batch statistics of "
            f"one value are undefined. Use a batch size N with N % {virtual_batch_size} != 1 "
            "(e.g. DataLoader(drop_last=True)) or another virtual_batch_size"
        )
    return batches


# --------------------------------------------------------------------------
# BN followed by an activation (fused layers; InPlace-ABN, Rota Bulo et al. 2018)
# --------------------------------------------------------------------------

# The activations a fused BN layer applies, by the names torch.nn.functional gives them.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "sigmoid")
# Those with an inverse, whose output alone determines the backward (memory="save").
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu")


def activate(z: Tensor, kind: str, negative_slope: float = 0.01) -> Tensor:
    """f(z) for one of :data:`ACTIVATIONS`, with torch.nn.functional's definitions."""
    if kind == "identity":
        return z
    if kind == "relu":
        return torch.relu(z)
    if kind == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if kind == "silu":
        return torch.nn.functional.silu(z)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {kind!r}; one of {', '.join(ACTIVATIONS)}")


def activation_grad(grad_out: Tensor, z: Tensor, kind: str, negative_slope: float = 0.01) -> Tensor:
    """dl/dz = dl/df * f'(z), with torch's conventions at the kinks (relu'(0) = 0,
    leaky_relu'(0) = negative_slope)."""
    if kind == "identity":
        return grad_out
    if kind == "relu":
        return torch.where(z > 0, grad_out, torch.zeros_like(grad_out))
    if kind == "leaky_relu":
        return torch.where(z > 0, grad_out, grad_out * negative_slope)
    s = torch.sigmoid(z)
    if kind == "silu":
        return grad_out * s * (1 + z * (1 - s))
    if kind == "sigmoid":
        return grad_out * s * (1 - s)
    raise ValueError(f"unknown activation {kind!r}; one of {', '.join(ACTIVATIONS)}")


def invert_activation(y: Tensor, kind: str, negative_slope: float = 0.01) -> Tensor:
    """z = f^-1(y) for the invertible activations (identity; leaky_relu with a positive
    slope: y >= 0 exactly where z >= 0)."""
    if kind == "identity":
        return y
    if kind == "leaky_relu":
        return torch.where(y >= 0, y, y / negative_slope)
    raise ValueError(
        f"activation {kind!r} has no inverse; memory='save' takes one of "
        f"{', '.join(INVERTIBLE_ACTIVATIONS)}"
    )


def batch_norm_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    kind: str,
    negative_slope: float,
    from_output: bool,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of y = f(BN(x)) with respect to x, gamma and beta.

    With z = gamma * xhat + beta the BN output, dl/dz = dl/dy * f'(z), and the rest is
    the closed form of Section 3 (:func:`batch_norm_backward`) with dl/dz in place of
    dl/dy.

    ``saved`` is x (``from_output`` False), or the output y (``from_output`` True, the
    memory-saving mode of InPlace-ABN, Rota Bulo et al. 2018): then
    z = f^-1(y), x - mu_B = (z - beta) / (gamma * inv_std), and x itself is never needed.
    That needs an invertible f and gamma != 0 in every channel (the caller checks).
    """
    cdt = mu_b.dtype
    scale = inv_std if weight is None else weight.to(cdt) * inv_std
    if from_output:
        z = invert_activation(saved.to(cdt), kind, negative_slope)
        shift = z if bias is None else z - channel_view(bias.to(cdt), z)
        x_mu = shift / channel_view(scale, z)  # x - mu_B, recovered from the output
        dz = activation_grad(grad_y.to(cdt), z, kind, negative_slope)
        grads = batch_norm_backward(
            dz, x_mu, weight, torch.zeros_like(mu_b), inv_std, needs_input_grad
        )
        dx = grads[0]
        return (None if dx is None else dx.to(saved.dtype)), grads[1], grads[2]
    z = normalize(saved, mu_b, inv_std, weight, bias).to(cdt)
    dz = activation_grad(grad_y.to(cdt), z, kind, negative_slope)
    dx, dw, db = batch_norm_backward(dz, saved, weight, mu_b, inv_std, needs_input_grad)
    return dx, dw, db
