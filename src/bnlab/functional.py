"""The functional API of batch normalization, as ``torch.nn.functional`` has it.

:func:`batch_norm` has the signature of ``torch.nn.functional.batch_norm``:
training mode is Algorithm 1 (Ioffe & Szegedy 2015) with
the explicit closed-form backward of :mod:`bnlab.autograd`, eval mode the
fixed affine map of Algorithm 2, step 11.

One dispatcher, ``_dispatch``, routes :func:`batch_norm` and the forward of
:class:`bnlab.nn.BatchNorm2d` and its kin alike: eval's affine map, or training's
one compiled step, or the explicit-backward Function followed by the
running-statistics update (a module's ``num_batches_tracked`` counted there, and
its ``momentum=None`` the cumulative average). Each caller checks its input first,
naming itself in the errors; the modules keep their state and train/eval policy.

The pure tensor math (statistics, normalization, closed-form backward,
running-statistics update, inference affine map) lives in :mod:`bnlab.core`
and is re-exported here, so ``bnlab.functional.compute_batch_stats`` and the
others keep working. Dependencies run one way:
``functional -> autograd -> core``; see :mod:`bnlab.core` for the
conventions (channel dim 1, PyTorch's momentum) and the numerics.

:func:`batch_renorm` is Batch Renormalization (Ioffe 2017)
with its explicit-backward :class:`BatchRenormTrainFunction` (kept here, beside
its one entry point); its math is in :mod:`bnlab.core` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.autograd import (
    batch_norm_act_train,
    batch_norm_backward,
    batch_norm_train,
    batch_norm_train_forward,
    batch_norm_train_step,
    normalize_by_stats,
)
from bnlab.core import (
    ACTIVATIONS,
    INVERTIBLE_ACTIVATIONS,
    BatchNormDtypeError,
    BatchNormShapeError,
    activate,
    activation_grad,
    batch_norm_act_backward,
    batch_renorm_affine,
    batch_renorm_backward,
    batch_renorm_correction,
    batch_renorm_limits,
    batch_renorm_train_forward,
    center,
    channel_view,
    check_batch_norm_input,
    check_batch_norm_state,
    check_eps,
    compute_batch_stats,
    compute_dtype,
    inference_affine,
    input_grad,
    invert_activation,
    merge_moments,
    normalize,
    num_values_per_channel,
    reduce_dims,
    reduce_grad_sums,
    unbiased_var,
    update_running_stats,
    virtual_batches,
)

__all__ = [
    "BatchNormDtypeError",
    "BatchNormShapeError",
    "ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "BatchRenormTrainFunction",
    "activate",
    "activation_grad",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_act_backward",
    "batch_norm_backward",
    "batch_norm_tracked",
    "check_activation",
    "batch_norm_train_forward",
    "batch_renorm",
    "batch_renorm_affine",
    "batch_renorm_backward",
    "batch_renorm_correction",
    "batch_renorm_limits",
    "batch_renorm_train",
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
            ``new = (1 - momentum) * old + momentum * batch``). ``None`` is refused
            with a TypeError, as by torch: the modules' cumulative average needs their
            batch count (pass ``1 / k`` for the k-th batch instead).
        eps: added to the variance for numerical stability; > 0 in training.

    Shape:
        input (N, C, *) -> output of the same shape, dtype and memory format.

    Raises:
        TypeError, ValueError: for input batch norm cannot take (see
            :func:`check_batch_norm_input`), a refused ``eps``, ``momentum=None``,
            or missing running statistics in eval mode.
        BatchNormShapeError: ``running_mean``, ``running_var``, ``weight`` or
            ``bias`` does not have C elements (a ValueError and a RuntimeError, the
            type torch raises there).
        BatchNormDtypeError: a dtype mix torch refuses (a TypeError and a
            RuntimeError): parameters and running statistics share one dtype, the
            input's, or float32 for float16/bfloat16 input (see
            :func:`check_batch_norm_state`); only one of ``running_mean`` and
            ``running_var`` given is a ValueError, as in torch.
    """
    y, _ = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
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
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, tracked=True
    )


def _refuse_momentum_none() -> None:
    """The functional forms' refusal of momentum=None, with the fix."""
    # torch.nn.functional.batch_norm refuses None too. The modules' momentum=None, a
    # cumulative average (1 / num_batches_tracked), needs a batch count that a
    # functional call does not have; silently reading None as 0 (the compiled path
    # did) left the running statistics unchanged.
    raise TypeError(
        "batch_norm: momentum=None (a cumulative average) needs the batch count that "
        "the modules keep in num_batches_tracked, and a functional call has none; pass "
        "momentum=1/k for the k-th batch, or use bnlab.nn.BatchNorm*d(momentum=None)"
    )


def _check_call(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> None:
    """The functional forms' checks (:func:`batch_norm`, :func:`batch_norm_act`), before
    any state changes."""
    if momentum is None:
        _refuse_momentum_none()
    check_batch_norm_input(input, training, eps)
    _check_channel_sizes(input, running_mean, running_var, weight, bias)
    check_batch_norm_state(input, weight, bias, running_mean, running_var)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    tracked: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`batch_norm_tracked`; ``skipped`` only when ``tracked`` (else None), as
    building it costs a small op per call. The functional form's checks, then
    :func:`_dispatch`."""
    _check_call(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y, mu_b, biased_var_b, skipped = _dispatch(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if not tracked:
        return y, None
    if not isinstance(skipped, int):
        return y, skipped
    # The kernels count the skipped channels; the mask is rebuilt only when one was.
    if skipped:
        return y, ~torch.isfinite(mu_b + biased_var_b)
    return y, torch.zeros(mu_b.shape, dtype=torch.bool)


def _dispatch(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | int | None]:
    """The one routing of batch normalization, for :func:`batch_norm` and the modules
    (:class:`bnlab.nn.BatchNorm2d` ...), after the caller's own checks.

    Eval (``training`` False) is the fixed affine map of Algorithm 2, step 11, on the
    kernels where they apply (:func:`bnlab.autograd.normalize_by_stats`). Training is
    Algorithm 1 and, when running statistics are given, their update (Algorithm 2,
    step 10): one compiled call where the kernels apply
    (:func:`bnlab.autograd.batch_norm_train_step`), else the explicit-backward Function
    and :func:`update_running_stats`, the same math. Where each runs (compiled, native,
    pure; tracing and export keep the pure path's ATen ops) is :mod:`bnlab.backend`'s
    decision.

    Momentum is PyTorch's: ``new = (1 - momentum) * old + momentum * batch``. With
    ``num_batches_tracked`` (a module's count) each training step with running
    statistics counts the batch there, and ``momentum=None`` is the cumulative average
    ``1 / num_batches_tracked``; without it, None stands for 0, torch's fallback (the
    functional form refuses None before it gets here).

    Args:
        input, running_mean, running_var, weight, bias, eps: as :func:`batch_norm`,
            already checked; the running statistics both given or both None. In
            training, None running statistics are neither read nor updated.
        training: normalize with batch statistics (else with the running ones).
        momentum: the update's factor, or None (see above).
        num_batches_tracked: the count a training step with running statistics
            increments in place, or None.

    Returns:
        ``(y, mu_b, biased_var_b, skipped)``: in eval ``(y, None, None, None)``. In
        training the batch statistics and, when running statistics were updated, the
        channels whose update was skipped because their batch statistics were not
        finite: the kernels' count (an int, known without a device sync) or the pure
        path's (C,) bool mask (see :func:`update_running_stats`); otherwise None.

    Raises:
        ValueError: eval without running statistics.
    """
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm in eval mode (training=False) needs running_mean and running_var; "
                "pass them, or use training=True to normalize with batch statistics"
            )
        # Algorithm 2, step 11: gamma * (x - E[x]) * inv_std + beta.
        y = normalize_by_stats(input, running_mean, running_var, weight, bias, eps)
        return y, None, None, None
    tracks = running_mean is not None
    step = batch_norm_train_step(  # one compiled call, where the kernels apply
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked if tracks else None,
        momentum,
        eps,
    )
    if step is not None:
        y, mu_b, biased_var_b, n_skipped = step
        return y, mu_b, biased_var_b, (n_skipped if tracks else None)
    y, mu_b, biased_var_b = batch_norm_train(input, weight, bias, eps)
    if not tracks:
        return y, mu_b, biased_var_b, None
    m = num_values_per_channel(input)
    skipped = _count_and_update(
        running_mean, running_var, num_batches_tracked, mu_b, biased_var_b, m, momentum
    )
    return y, mu_b, biased_var_b, skipped


MEMORY_MODES = ("standard", "save")
# Inputs of at most this many values run BN, then the activation, in memory="standard"
# (see _dispatch_act); larger ones the fused kernels.
FUSE_ABOVE = 1 << 16


def check_activation(activation: str, negative_slope: float, memory: str) -> None:
    """Refuse an activation or memory mode a fused BN layer cannot take, naming the fix.

    Raises:
        ValueError: an activation not in :data:`ACTIVATIONS`, an unknown ``memory``, or
            ``memory="save"`` with an activation that has no inverse (relu, silu,
            sigmoid; leaky_relu with a slope <= 0).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not one a fused BN layer applies; use one of "
            f"{', '.join(ACTIVATIONS)} (or apply it after an unfused BN layer)"
        )
    if memory not in MEMORY_MODES:
        raise ValueError(
            f"memory={memory!r}: use 'standard' (keep the input for the "
            "backward) or 'save' (keep only the output)"
        )
    if memory == "save" and (
        activation not in INVERTIBLE_ACTIVATIONS
        or (activation == "leaky_relu" and not negative_slope > 0)
    ):
        raise ValueError(
            f"memory='save' recomputes the input from the output, so the activation must be "
            f"invertible: {activation!r}"
            + (f" with negative_slope={negative_slope}" if activation == "leaky_relu" else "")
            + " is not. Use activation='leaky_relu' with negative_slope > 0 (InPlace-ABN's "
            "choice) or 'identity', or memory='standard'"
        )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    memory: str = "standard",
) -> Tensor:
    """``f(batch_norm(input, ...))`` in one fused call; the arguments of :func:`batch_norm`
    and the activation.

    In training the compiled CPU kernels make one statistics pass and one output pass
    that applies f, and a backward of two passes that recompute z = BN(x) per value: no
    intermediate tensor is written (see :class:`bnlab.autograd.BatchNormActFunction`).
    Inputs of at most 65,536 values (``FUSE_ABOVE``) in ``memory="standard"`` run the
    one-call BN step and then f instead: there per-call overhead is the cost, not memory
    traffic. The same math either way.

    Args:
        activation: one of :data:`ACTIVATIONS` (``"identity"``, ``"relu"``,
            ``"leaky_relu"``, ``"silu"``, ``"sigmoid"``), as torch.nn.functional
            defines them.
        negative_slope: leaky_relu's slope for z < 0.
        memory: ``"standard"`` keeps x for the backward; ``"save"`` keeps only the
            output (InPlace-ABN, Rota Bulo et al. 2018) and recomputes x from it, for
            invertible activations (identity, leaky_relu with a positive slope). A
            training step whose gamma has a zero keeps x instead (x cannot be recovered
            from the output of such a channel). The recovered x loses about
            ``|beta / gamma|`` units in the last place.

    Raises:
        as :func:`batch_norm`, and ValueError for the activation (see
        :func:`check_activation`).
    """
    check_activation(activation, negative_slope, memory)
    _check_call(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y, _, _, _ = _dispatch_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        memory,
    )
    return y


def _dispatch_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str,
    negative_slope: float,
    memory: str,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The routing of :func:`batch_norm_act` and the fused modules, after their checks;
    arguments and result as :func:`_dispatch`, with the activation's."""
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm_act in eval mode (training=False) needs running_mean and "
                "running_var; pass them, or use training=True"
            )
        z = normalize_by_stats(input, running_mean, running_var, weight, bias, eps)
        return _activate_output(z, activation, negative_slope), None, None, None
    if memory == "standard" and input.numel() <= FUSE_ABOVE:
        # Small inputs: per-call overhead, not memory traffic, is the cost there, and the
        # compiled one-call BN step followed by the activation has less of it (60x100:
        # 60 us against the fused Function's 147 us, torch's 77 us). The same math.
        y, mu_b, biased_var_b, skipped = _dispatch(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            True,
            momentum,
            eps,
            num_batches_tracked,
        )
        return activate(y, activation, negative_slope), mu_b, biased_var_b, skipped
    # memory="save" recovers x - mu = (z - beta) / (gamma inv_std): not where gamma is 0.
    # (torch.compile traces the composition of BN and f, which saves what autograd saves.)
    save_output = (
        memory == "save"
        and not torch.compiler.is_compiling()
        and (weight is None or bool((weight != 0).all()))
    )
    y, mu_b, biased_var_b = batch_norm_act_train(
        input, weight, bias, eps, activation, negative_slope, save_output
    )
    if running_mean is None:
        return y, mu_b, biased_var_b, None
    m = num_values_per_channel(input)
    skipped = _count_and_update(
        running_mean, running_var, num_batches_tracked, mu_b, biased_var_b, m, momentum
    )
    return y, mu_b, biased_var_b, skipped


def _activate_output(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """f(z) of inference: in place where autograd does not record z (a fresh tensor);
    out of place under torch.jit.trace, whose graph must not depend on grad mode."""
    if (z.requires_grad and torch.is_grad_enabled()) or torch._C._get_tracing_state():
        return activate(z, activation, negative_slope)
    if activation == "relu":
        return z.relu_()
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, negative_slope)
    if activation == "sigmoid":
        return z.sigmoid_()
    if activation == "silu":
        return torch.nn.functional.silu(z, inplace=True)
    return z


def _count_batch(num_batches_tracked: Tensor | None, momentum: float | None) -> float | Tensor:
    """Count a batch in ``num_batches_tracked`` (in place) and return the momentum of
    its running-statistics update.

    PyTorch's convention: ``running = (1 - momentum) * running + momentum * batch``;
    ``momentum=None`` is a cumulative average, momentum = 1 / num_batches_tracked.
    Without a count (None: a functional call, or a module's removed by hand) None
    stands for 0, torch's fallback.
    """
    if num_batches_tracked is None:
        return 0.0 if momentum is None else momentum
    num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average
        # Under vmap no data-dependent float(); under torch.jit.trace a float would be
        # a constant of the trace: a tensor keeps 1 / count in the traced graph.
        if (
            torch._C._functorch.is_functorch_wrapped_tensor(num_batches_tracked)
            or torch._C._get_tracing_state()
        ):
            return 1.0 / num_batches_tracked
        return 1.0 / float(num_batches_tracked)
    return momentum


def _count_and_update(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mu_b: Tensor,
    biased_var_b: Tensor,
    m: int,
    momentum: float | None,
) -> Tensor:
    """Count the batch (:func:`_count_batch`), then :func:`update_running_stats`.

    The update of :func:`_dispatch`, and of the modules whose training forward is their
    own (ghost batches, renormalization, cross-process statistics).
    """
    momentum = _count_batch(num_batches_tracked, momentum)
    return update_running_stats(running_mean, running_var, mu_b, biased_var_b, m, momentum)


def _check_channel_sizes(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> None:
    """Refuse per-channel tensors whose size is not the input's channel count, with a
    :class:`BatchNormShapeError` (a RuntimeError, as torch's, and a ValueError)."""
    channels = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and t.numel() != channels:
            raise BatchNormShapeError(
                f"{name} has {t.numel()} elements but the input has {channels} channels "
                f"(dim 1 of shape {tuple(input.shape)}); pass a ({channels},) {name}, or "
                "input whose dim 1 holds the channels"
            )


# --------------------------------------------------------------------------
# Batch Renormalization (Ioffe 2017)
# --------------------------------------------------------------------------


class BatchRenormTrainFunction(torch.autograd.Function):
    """Training-mode Batch Renorm with the closed-form backward of
    :func:`bnlab.core.batch_renorm_backward` (BN's backward with gamma * r).

    Outputs ``(y, mu_b, biased_var_b, r, d)``; only ``y`` is differentiable:
    the statistics feed the running averages, and r and d are
    stop_gradient by definition. The running statistics are inputs (read for
    r and d), never saved, so updating them in place after the forward is safe.

    Double backward is supported as in :class:`bnlab.autograd.BatchNormTrainFunction`:
    a recorded backward re-derives mu_B and sigma_B from ``x`` (r and d stay
    constants). ``torch.func`` transforms (vmap, jvp) are not supported.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        rmax: float | Tensor,
        dmax: float | Tensor,
    ):
        y, mu_b, biased_var_b, r, d = batch_renorm_train_forward(
            x, weight, bias, running_mean, running_var, eps, rmax, dmax
        )
        ctx.save_for_backward(x, weight, mu_b, torch.rsqrt(biased_var_b + eps), r, d)
        ctx.eps = eps
        ctx.mark_non_differentiable(mu_b, biased_var_b, r, d)
        return y, mu_b, biased_var_b, r, d

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_grad_stats: Tensor):
        x, weight, mu_b, inv_std, r, d = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: the batch statistics as functions of x (r, d stay constant).
            mu_b, biased_var_b = compute_batch_stats(x)
            inv_std = torch.rsqrt(biased_var_b + ctx.eps)
        grad_x, grad_w, grad_b = batch_renorm_backward(
            grad_y, x, weight, mu_b, inv_std, r, d, tuple(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


def batch_renorm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode Batch Renorm of ``x`` with the explicit backward; no state changes.

    Returns:
        ``(y, mu_b, biased_var_b, r, d)`` (see :func:`bnlab.core.batch_renorm_train_forward`).
    """
    return BatchRenormTrainFunction.apply(
        x, weight, bias, running_mean, running_var, eps, rmax, dmax
    )


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017), functional form.

    In training mode:

        r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with sigma_B = sqrt(sigma2_B + eps) and mu, sigma = sqrt(running_var + eps)
    the moving statistics before this batch; then ``running_mean`` and
    ``running_var`` are updated in place as in :func:`batch_norm` (PyTorch's
    momentum convention, ``new = (1 - momentum) * old + momentum * batch``,
    unbiased variance). In eval mode it is :func:`batch_norm`'s eval mode.
    With rmax = 1 and dmax = 0 it is :func:`batch_norm`.

    ``rmax`` and ``dmax`` are fixed here; the modules
    (:class:`bnlab.nn.BatchRenorm2d` ...) follow the paper's warm-up schedule
    (:func:`bnlab.core.batch_renorm_limits`).

    Args:
        input: (N, C, *) floating-point tensor.
        running_mean, running_var: (C,) moving statistics; required (they
            enter r and d in training).
        weight, bias: gamma and beta, (C,) or None.
        training: renormalize with batch statistics and update the moving ones.
        momentum: factor of the running-statistics update (PyTorch's convention).
        eps: added to both variances; > 0 in training.
        rmax, dmax: the clipping limits (rmax >= 1, dmax >= 0), numbers or 0-dim tensors.

    Raises:
        TypeError, ValueError: as :func:`batch_norm`; missing running
            statistics; rmax < 1 or dmax < 0.
    """
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm needs running_mean and running_var (r and d compare the batch "
            "statistics with them); pass the moving statistics, e.g. torch.zeros(C) and "
            "torch.ones(C) to start"
        )
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if not isinstance(rmax, Tensor) and not rmax >= 1:
        raise ValueError(f"batch_renorm rmax must be >= 1 (1 disables r), got {rmax!r}")
    if not isinstance(dmax, Tensor) and not dmax >= 0:
        raise ValueError(f"batch_renorm dmax must be >= 0 (0 disables d), got {dmax!r}")
    check_batch_norm_input(input, True, eps)
    _check_channel_sizes(input, running_mean, running_var, weight, bias)
    check_batch_norm_state(input, weight, bias, running_mean, running_var, "batch_renorm")
    y, mu_b, biased_var_b, _, _ = batch_renorm_train(
        input, weight, bias, running_mean, running_var, eps, rmax, dmax
    )
    update_running_stats(
        running_mean, running_var, mu_b, biased_var_b, num_values_per_channel(input), momentum
    )
    return y
