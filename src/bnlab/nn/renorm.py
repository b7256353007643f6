"""Batch Renormalization modules (Ioffe 2017, "Batch Renormalization").

Batch Renorm corrects the batch-normalized value with the moving statistics,

    r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
    d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

so that training sees the same transform as inference when the limits allow
it. The math is in :mod:`bnlab.core` (``batch_renorm_*``); these modules hold
the state and the warm-up schedule.

The schedule advances with the module's own step count, its
``num_batches_tracked`` buffer: the limits of a training step are computed
from the buffer at that step (:func:`bnlab.core.batch_renorm_limits`), never
once at construction, and are saved and restored with the state dict.
``reset_running_stats()`` restarts it.

The modules subclass bnlab's (and so torch's) ``BatchNorm1d/2d/3d``: same
constructor arguments plus the schedule, same attributes and state-dict keys,
and eval mode is BN's eval mode (the moving statistics, Algorithm 2, step 11),
so inference folding and BN-finding tools apply. torch's
``SyncBatchNorm.convert_sync_batchnorm`` would replace them by plain
synchronized BN; bnlab's converters leave them alone.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

import bnlab.functional as BF
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _check_schedule(
    cls_name: str,
    rmax: Any,
    dmax: Any,
    warmup_steps: Any,
    rmax_steps: Any,
    dmax_steps: Any,
    track_running_stats: Any,
) -> None:
    if not track_running_stats:
        raise ValueError(
            f"{cls_name} needs track_running_stats=True: r and d compare the batch statistics "
            "with the moving ones, in training too. For batch statistics in eval mode use "
            "BatchNorm with track_running_stats=False"
        )
    for name, value, low, what in (
        ("rmax", rmax, 1, "1 disables r"),
        ("dmax", dmax, 0, "0 disables d"),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not low <= value < float("inf")
        ):
            raise ValueError(
                f"{cls_name} {name} must be a finite number >= {low} ({what}), got {value!r}"
            )
    for name, value in (
        ("warmup_steps", warmup_steps),
        ("rmax_steps", rmax_steps),
        ("dmax_steps", dmax_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{cls_name} {name} must be an int >= 0 (steps), got {value!r}")
    for name, value in (("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
        if value < warmup_steps and value != 0:
            raise ValueError(
                f"{cls_name} {name}={value} is before warmup_steps={warmup_steps}: the limit "
                f"rises from the end of the warm-up to step {name}. Use {name} >= warmup_steps "
                f"(the paper: warmup_steps=5000, rmax_steps=40000, dmax_steps=25000), or "
                f"{name}=0 for a jump to the final value right after the warm-up"
            )


class _BatchRenorm(_BatchNorm):
    """Shared state and policy of the Batch Renorm modules.

    Args:
        num_features: C, the number of channels (features) of the input.
        eps: added to the batch and the moving variance. Default 1e-5.
        momentum: factor of the moving-statistics update, PyTorch's convention
            ``running = (1 - momentum) * running + momentum * batch``; None for a
            cumulative average. Default 0.1.
        affine: learn gamma (``weight``) and beta (``bias``). Default True.
        track_running_stats: must be True (the moving statistics enter training).
        bias: (keyword-only, as in PyTorch) learn beta.
        rmax: final limit of r, clip(sigma_B / sigma, 1/rmax, rmax); >= 1. Default 3.
        dmax: final limit of d, clip((mu_B - mu) / sigma, -dmax, dmax); >= 0. Default 5.
        warmup_steps: plain BN (rmax = 1, dmax = 0) for this many training steps.
            Default 5000.
        rmax_steps: the step at which rmax reaches its final value, rising
            linearly after the warm-up. Default 40000.
        dmax_steps: the same for dmax. Default 25000.

    The defaults are the paper's. ``warmup_steps = rmax_steps = dmax_steps = 0``
    gives fixed limits; ``rmax=1, dmax=0`` gives BN.

    Limitations: ``torch.func`` transforms (vmap, jvp) are not supported in
    training mode. Under ``torch.utils.checkpoint`` the recomputed forward
    does not update the state again (as BN), but it reads the moving
    statistics and step count its original forward already updated, so its
    r and d (and the gradients) are those of one update later.

    Raises:
        ValueError: track_running_stats=False, rmax < 1, dmax < 0, a negative
            or non-integer step count, or a ramp that ends inside the warm-up.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        rmax_steps: int = 40000,
        dmax_steps: int = 25000,
    ) -> None:
        _check_schedule(
            type(self).__name__,
            rmax,
            dmax,
            warmup_steps,
            rmax_steps,
            dmax_steps,
            track_running_stats,
        )
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_steps = int(warmup_steps)
        self.rmax_steps = int(rmax_steps)
        self.dmax_steps = int(dmax_steps)

    def _limits(self, step: Tensor | int, dtype: Any) -> tuple[Tensor, Tensor]:
        return BF.batch_renorm_limits(
            step,
            self.rmax,
            self.dmax,
            self.warmup_steps,
            self.rmax_steps,
            self.dmax_steps,
            dtype,
        )

    def current_limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` of the next training step (the module's own count + 1).

        (1.0, 0.0) during the warm-up. Reads ``num_batches_tracked`` (a
        device-to-host copy on an accelerator).
        """
        self._check_moving_stats()
        rmax, dmax = self._limits(int(self.num_batches_tracked) + 1, torch.float64)
        return float(rmax), float(dmax)

    def _check_moving_stats(self) -> None:
        if (
            not self.track_running_stats
            or self.running_mean is None
            or self.running_var is None
            or self.num_batches_tracked is None
        ):
            raise RuntimeError(
                f"{type(self).__name__} needs its running_mean, running_var and "
                "num_batches_tracked buffers and track_running_stats=True (r and d use the "
                "moving statistics, the schedule the step count); they were removed or "
                "disabled after construction. Restore them, or convert the layer back to "
                "BatchNorm"
            )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, rmax_steps={self.rmax_steps}, "
            f"dmax_steps={self.dmax_steps}"
        )

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:  # BN's eval: the moving statistics (Algorithm 2, step 11)
            self._check_moving_stats()
            return super().forward(input)
        self._check_input_dim(input)
        state = self._check_state_sizes()
        self._check_moving_stats()
        BF.check_batch_norm_input(input, True, self.eps)
        BF.check_batch_norm_state(input, *state, type(self).__name__)
        # The limits of this step, from the module's own count (on the device, no sync).
        # A checkpoint's recomputation (torch.utils.checkpoint) sees the count and moving
        # statistics its original forward already updated, so its r and d can differ.
        rmax, dmax = self._limits(self.num_batches_tracked + 1, BF.compute_dtype(input.dtype))
        y, mu_b, biased_var_b, _, _ = BF.batch_renorm_train(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            rmax,
            dmax,
        )
        if self._updates_running_stats():
            self._update_running_stats(mu_b, biased_var_b, BF.num_values_per_channel(input))
        return y


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch Renormalization over a 2-D (N, C) or 3-D (N, C, L) input (Ioffe 2017).

    Arguments as :class:`bnlab.nn.BatchNorm1d` plus the schedule (``rmax``,
    ``dmax``, ``warmup_steps``, ``rmax_steps``, ``dmax_steps``; see
    ``_BatchRenorm``). State-dict keys are BatchNorm1d's.

    Shape:
        input (N, C) or (N, C, L) -> output of the same shape.

    Example:
        >>> bn = BatchRenorm1d(100, warmup_steps=1000, rmax_steps=8000, dmax_steps=5000)
        >>> y = bn(torch.randn(60, 100))
        >>> bn.current_limits()
        (1.0, 0.0)
    """


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch Renormalization over a 4-D (N, C, H, W) input (Ioffe 2017).

    Statistics per channel over N*H*W values, as BatchNorm2d (Section 3.2);
    channels-last inputs keep their memory format.

    Shape:
        input (N, C, H, W) -> output of the same shape.
    """


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    """Batch Renormalization over a 5-D (N, C, D, H, W) input (Ioffe 2017).

    Shape:
        input (N, C, D, H, W) -> output of the same shape.
    """
