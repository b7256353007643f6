"""The training-mode Batch Normalizing Transform as an autograd.Function, and the one
place that chooses between the kernels of :mod:`bnlab.backend` and the pure math of
:mod:`bnlab.core`.

The Function's forward and backward go through :func:`batch_norm_train_forward` and
:func:`batch_norm_backward`: the narrow interface between the autograd layer and the hot
path. The other dispatchers here serve :func:`bnlab.functional.batch_norm` and the
modules, through the one routing they share (``bnlab.functional._dispatch``):
:func:`batch_norm_train_step`, a layer's whole training forward in one compiled call;
:func:`normalize_by_stats`, inference; and SyncBatchNorm's local parts
(:func:`batch_stats`, :func:`grad_sums`, :func:`input_grad`). Each tries the kernels
first and runs the pure math where they do not apply (see :mod:`bnlab.backend` for
when). Dependencies run one way:
``bnlab.functional -> bnlab.autograd -> bnlab.backend, bnlab.core``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad

from bnlab import backend, core

__all__ = [
    "BatchNormActFunction",
    "BatchNormTrainFunction",
    "batch_norm_act_train",
    "batch_norm_backward",
    "batch_norm_train",
    "batch_norm_train_forward",
    "batch_norm_train_step",
    "batch_stats",
    "grad_sums",
    "input_grad",
    "normalize_by_stats",
]


def batch_norm_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bnlab.core.batch_norm_train_forward`, on the compiled kernels where they apply."""
    out = backend.train_forward(x, weight, bias, eps)
    return out if out is not None else core.batch_norm_train_forward(x, weight, bias, eps)


def batch_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`bnlab.core.batch_norm_backward`, on the compiled kernels where they apply."""
    out = backend.backward(grad_y, x, weight, mu_b, inv_std, needs_input_grad)
    if out is not None:
        return out
    return core.batch_norm_backward(grad_y, x, weight, mu_b, inv_std, needs_input_grad)


def batch_norm_train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """Algorithm 1 with its backward, and the running-statistics update of Algorithm 2
    (step 10), in one compiled call where the kernels apply; None elsewhere.

    The hot path of a BN layer in training: on a small input (the paper's (60, 100)
    MNIST layer) per-call overhead, not arithmetic, is the cost, and this call has one
    op and a C++ autograd node instead of a Python Function and a handful of small ops.
    Where it returns None the caller runs :func:`batch_norm_train` and
    :func:`bnlab.core.update_running_stats`, the same math (see
    :func:`bnlab.backend.train_step`).

    Returns:
        ``(y, mu_b, biased_var_b, n_skipped)`` or None.
    """
    return backend.train_step(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
    )


def normalize_by_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` for given per-channel statistics,
    on the kernels where they apply (no gradient needed), else :func:`bnlab.core.normalize`.

    Inference BN (Algorithm 2, step 11) with the population statistics, and
    SyncBatchNorm's output with the global batch statistics. Subtracting the mean first
    keeps the precision that ``scale * x + shift`` loses to cancellation when
    |E[x]| >> std (1e-3 off in float32 at |E[x]|/std = 1e4).
    """
    y = backend.eval_forward(x, mean, var, weight, bias, eps)
    if y is not None:
        return y
    cdt = core.compute_dtype(x.dtype)
    inv_std = torch.rsqrt(var.to(cdt) + eps)
    return core.normalize(x, mean.to(cdt), inv_std, weight, bias)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bnlab.core.compute_batch_stats` (Algorithm 1, lines 1-2), on the kernels
    where they apply: ``(mu_b, biased_var_b)``."""
    out = backend.batch_stats(x)
    return out if out is not None else core.compute_batch_stats(x)


def grad_sums(grad_y: Tensor, x: Tensor, mu_b: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`bnlab.core.reduce_grad_sums` on the kernels where they apply:
    ``(sum_dy, sum_dy_xmu, scratch)``, scratch None from the kernels."""
    out = backend.grad_sums(grad_y, x, mu_b)
    if out is not None:
        return (*out, None)
    return core.reduce_grad_sums(grad_y, x, mu_b)


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
    """:func:`bnlab.core.input_grad` (dl/dx from the two reduced sums over m values), on
    the kernels where they apply."""
    out = backend.input_grad(grad_y, x, weight, mu_b, inv_std, sum_dy, sum_dy_xmu, m)
    if out is not None:
        return out
    return core.input_grad(grad_y, x, weight, mu_b, inv_std, sum_dy, sum_dy_xmu, m, scratch)


class BatchNormTrainFunction(torch.autograd.Function):
    """Algorithm 1 with the closed-form backward of Section 3.

    Outputs ``(y, mu_b, biased_var_b)``; the statistics are not differentiable
    (they feed the running averages only).

    Double backward is supported: when the backward itself is recorded
    (``create_graph=True``) or runs under a ``torch.func`` transform, it
    re-derives the batch statistics from ``x``, so the second derivative sees
    their dependence on ``x`` exactly.

    ``torch.func`` support: ``generate_vmap_rule`` lets ``vmap`` (and so
    ``jacrev``, ``jacfwd``, batched gradients) run forward, backward and
    :meth:`jvp` per sample; the math then runs out of place (see
    ``bnlab.core._inplace_ok``). :meth:`jvp` gives forward-mode AD
    (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        return batch_norm_train_forward(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, eps = inputs
        _, mu_b, biased_var_b = output
        inv_std = torch.rsqrt(biased_var_b + eps)
        ctx.save_for_backward(x, weight, mu_b, inv_std)
        ctx.save_for_forward(x, weight, mu_b, inv_std)
        ctx.eps = eps
        ctx.mark_non_differentiable(mu_b, biased_var_b)

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps_t):
        """Forward-mode derivative of Algorithm 1 (the tangent of y).

        Differentiating mu_B, sigma2_B and x_hat of Algorithm 1 along a
        tangent (dx, dgamma, dbeta):

            dmu_B     = mean(dx)
            dsigma2_B = 2 mean((x - mu_B) dx)
            dx_hat    = inv_std * (dx - mean(dx) - x_hat * mean(dx * x_hat))
            dy        = gamma * dx_hat + dgamma * x_hat + dbeta

        (means per channel over the m values). The statistics outputs are not
        differentiable, so their tangents are None.

        The statistics are re-derived from ``x`` rather than read from the
        forward (whose statistics outputs are non-differentiable), so that
        reverse mode over this jvp (``jacrev(jacfwd(f))``) sees their
        dependence on ``x``. Forward over forward (``jacfwd(jacfwd(f))``) is
        not exact: in torch 2.13 the outer forward level does not see through
        a custom jvp (torch's own batch norm is wrong there too). For second
        derivatives use ``torch.func.hessian`` (forward over reverse),
        ``jacrev(jacfwd(f))`` or ``jacrev(jacrev(f))``, all exact.
        """
        x, weight, _, _ = ctx.saved_tensors
        x_mu, _, biased_var_b = core.center(x)
        inv_std = torch.rsqrt(biased_var_b + ctx.eps)
        cdt = inv_std.dtype
        dims = core.reduce_dims(x)
        x_hat = x_mu * core.channel_view(inv_std, x)
        dy = None
        if x_t is not None:
            dx = x_t.to(cdt)
            mean_dx = core.channel_view(dx.mean(dims), x)
            mean_dx_xhat = core.channel_view((dx * x_hat).mean(dims), x)
            dy = (dx - mean_dx - x_hat * mean_dx_xhat) * core.channel_view(inv_std, x)
            if weight is not None:
                dy = dy * core.channel_view(weight.to(cdt), x)
        if weight_t is not None:
            term = x_hat * core.channel_view(weight_t.to(cdt), x)
            dy = term if dy is None else dy + term
        if bias_t is not None:
            term = core.channel_view(bias_t.to(cdt), x).expand_as(x_hat)
            dy = term if dy is None else dy + term
        if dy is None:
            dy = torch.zeros_like(x_hat)
        return dy.to(x.dtype), None, None

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mu: Tensor, _grad_var: Tensor):
        x, weight, mu_b, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled() or (
            not torch.compiler.is_compiling() and _functorch.is_functorch_wrapped_tensor(x)
        ):
            # Double backward (or forward-over-reverse under torch.func): rebuild the
            # statistics as a function of x, so their dependence on x is seen.
            mu_b, biased_var_b = core.compute_batch_stats(x)
            inv_std = torch.rsqrt(biased_var_b + ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = batch_norm_backward(
            grad_y, x, weight, mu_b, inv_std, (need_x, need_w, need_b)
        )
        return grad_x, grad_w, grad_b, None


class _PlainBatchNormTrainFunction(torch.autograd.Function):
    """:class:`BatchNormTrainFunction` with a ``forward(ctx, ...)`` and no jvp,
    for plain tensors: no ``torch.func`` transform, no forward-AD level, and
    what ``torch.compile`` traces.

    Same math and backward (batched gradients need no vmap rule of the
    forward). Two reasons for a second class: ``Function.apply`` binds the
    arguments of a ``setup_context``-style forward with ``inspect.signature``
    on every call, about 10 us, a fifth of the forward of a (60, 100) batch
    on CPU; and dynamo refuses to trace a Function with a custom jvp.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        output = BatchNormTrainFunction.forward(x, weight, bias, eps)
        BatchNormTrainFunction.setup_context(ctx, (x, weight, bias, eps), output)
        return output

    backward = staticmethod(BatchNormTrainFunction.backward)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of ``x`` with the explicit backward.

    Under a ``torch.func`` transform or inside ``forward_ad.dual_level()``
    this applies :class:`BatchNormTrainFunction` (vmap rule, jvp), otherwise
    the same math without them (see ``_PlainBatchNormTrainFunction``).

    Returns:
        ``(y, mu_b, biased_var_b)``.
    """
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    ):
        return BatchNormTrainFunction.apply(x, weight, bias, eps)
    return _PlainBatchNormTrainFunction.apply(x, weight, bias, eps)


class BatchNormActFunction(torch.autograd.Function):
    """y = f(BN(x)) in training mode, fused: Algorithm 1 followed by an activation, with
    the closed-form backward of Section 3 applied to dl/dz = dl/dy * f'(z).

    Outputs ``(y, mu_b, biased_var_b)``; the statistics are not differentiable. Saved for
    the backward: x (``save_output`` False), or only the output y (``save_output`` True,
    InPlace-ABN's memory-saving mode, Rota Bulo et al. 2018: z = f^-1(y) and
    x - mu_B = (z - beta) / (gamma * inv_std); the caller makes sure that f is invertible
    and gamma != 0). Neither z nor dl/dz is ever a tensor on the kernels' path.

    Double backward (``create_graph=True``) is exact for ``save_output`` False (the
    statistics are re-derived from x, as :class:`BatchNormTrainFunction` does) and
    refused for ``save_output`` True, whose saved output does not carry x's statistics.
    For ``torch.func`` transforms and forward-mode AD, :func:`batch_norm_act_train`
    composes :class:`BatchNormTrainFunction` and the activation instead.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        activation: str,
        negative_slope: float,
        save_output: bool,
    ):
        out = backend.act_train_forward(x, weight, bias, eps, activation, negative_slope)
        if out is None:
            z, mu_b, biased_var_b = core.batch_norm_train_forward(x, weight, bias, eps)
            y = core.activate(z, activation, negative_slope)
        else:
            y, mu_b, biased_var_b = out
        inv_std = torch.rsqrt(biased_var_b + eps)
        ctx.save_for_backward(y if save_output else x, weight, bias, mu_b, inv_std)
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.save_output = save_output
        ctx.mark_non_differentiable(mu_b, biased_var_b)
        return y, mu_b, biased_var_b

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mu: Tensor, _grad_var: Tensor):
        saved, weight, bias, mu_b, inv_std = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        kind, slope = ctx.activation, ctx.negative_slope
        if torch.is_grad_enabled():
            if ctx.save_output:
                raise RuntimeError(
                    "double backward (create_graph=True) through a fused BN + activation "
                    "layer with memory='save': it keeps only its output, and the second "
                    "derivative needs the input's statistics as a function of x; build the "
                    "layer with memory='standard' for higher-order gradients"
                )
            # Double backward: the statistics as a function of x, so their dependence on
            # x is seen by the second derivative (the pure path's ops are recorded).
            mu_b, biased_var_b = core.compute_batch_stats(saved)
            inv_std = torch.rsqrt(biased_var_b + ctx.eps)
            grads = core.batch_norm_act_backward(
                grad_y, saved, weight, bias, mu_b, inv_std, kind, slope, False, needs
            )
        else:
            grads = backend.act_backward(
                grad_y, saved, weight, bias, mu_b, inv_std, kind, slope, ctx.save_output, needs
            )
            if grads is None:
                grads = core.batch_norm_act_backward(
                    grad_y,
                    saved,
                    weight,
                    bias,
                    mu_b,
                    inv_std,
                    kind,
                    slope,
                    ctx.save_output,
                    needs,
                )
        grad_x, grad_w, grad_b = grads
        if bias is None:
            grad_b = None
        return grad_x, grad_w, grad_b, None, None, None, None


def batch_norm_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float = 0.01,
    save_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode y = f(BN(x)): :class:`BatchNormActFunction` on plain tensors; under
    ``torch.func`` transforms, forward-mode AD or ``torch.compile``, the composition of
    :func:`batch_norm_train` and the activation (the same math, their vmap/jvp rules).

    Returns:
        ``(y, mu_b, biased_var_b)``.
    """
    if torch.compiler.is_compiling() or (
        torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    ):
        z, mu_b, biased_var_b = batch_norm_train(x, weight, bias, eps)
        return core.activate(z, activation, negative_slope), mu_b, biased_var_b
    return BatchNormActFunction.apply(x, weight, bias, eps, activation, negative_slope, save_output)
