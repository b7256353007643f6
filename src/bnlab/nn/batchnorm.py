"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

The modules hold state (gamma, beta, running statistics) and the train/eval
policy; all math is in :mod:`bnlab.functional`. Constructor arguments,
attribute names and state-dict keys are PyTorch's, so checkpoints load in
both directions.

Momentum follows PyTorch's convention:
``running = (1 - momentum) * running + momentum * batch``; ``momentum=None``
gives a cumulative average (momentum = 1 / num_batches_tracked).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _check_hyperparameters(num_features: Any, eps: Any, momentum: Any) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(
            f"num_features must be an int (the number of channels C), "
            f"got {type(num_features).__name__}"
        )
    if num_features < 1:
        raise ValueError(
            f"num_features must be at least 1 (the number of channels C), got {num_features}"
        )
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a non-negative number such as 1e-5, got {eps!r}")
    if momentum is not None and (not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1):
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch's convention: new = (1 - momentum) * old "
            f"+ momentum * batch) or None for a cumulative average, got {momentum!r}"
        )


class _BatchNorm(nn.Module):
    """Shared state and policy of the BN modules (PyTorch's ``_BatchNorm``).

    Args:
        num_features: C, the number of channels (features) of the input.
        eps: added to the variance for numerical stability. Default 1e-5.
        momentum: factor of the running-statistics update,
            ``running = (1 - momentum) * running + momentum * batch``;
            None for a cumulative average. Default 0.1.
        affine: learn gamma (``weight``) and beta (``bias``). Default True.
        track_running_stats: keep running mean and variance for inference.
            When False, batch statistics are used in train and eval mode.
        bias: (keyword-only, as in PyTorch) learn beta; False keeps gamma only.
    """

    _version = 2
    _expected_dims: tuple[int, ...] = ()

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
    ) -> None:
        _check_hyperparameters(num_features, eps, momentum)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            else:  # gamma only (PyTorch's keyword-only ``bias=False``)
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(
                    0,
                    dtype=torch.long,
                    **{k: v for k, v in factory_kwargs.items() if k != "dtype"},
                ),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set gamma = 1, beta = 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{type(self).__name__} expects a torch.Tensor, got {type(input).__name__}"
            )
        if input.dim() not in self._expected_dims:
            shapes = " or ".join(self._shape_names)
            raise ValueError(
                f"{type(self).__name__} expects {shapes} input, got a {input.dim()}-D tensor of "
                f"shape {tuple(input.shape)}; use {self._hint}"
            )
        if input.shape[1] != self.num_features:
            fix = f"construct it with num_features={input.shape[1]} or fix the preceding layer"
            if input.dim() > 2 and input.shape[-1] == self.num_features:
                # A Linear applied to (N, L, C) puts the features last; BN wants them in dim 1.
                fix = (
                    "the features are in the last dim (as a Linear on (N, L, C) input leaves "
                    "them): move them to dim 1, e.g. x.transpose(1, -1), or flatten to (N*L, C)"
                )
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input with "
                f"{input.shape[1]} channels (dim 1 of shape {tuple(input.shape)}); {fix}"
            )

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def _momentum_for_step(self) -> float:
        """Count this batch and return the momentum of its running-stat update."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        F.check_batch_norm_input(input, self.training)  # before any state changes
        momentum = self._momentum_for_step()
        # Batch statistics in training, and in eval when no running ones are kept.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed (PyTorch's version 1).
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = state_dict.get(prefix + name)
            if getattr(self, name) is None:
                continue  # an unexpected key: reported by load_state_dict itself
            if isinstance(value, Tensor) and value.numel() != self.num_features:
                raise ValueError(
                    f"state dict entry '{prefix + name}' has shape {tuple(value.shape)} but this "
                    f"{type(self).__name__} has num_features={self.num_features}; build the "
                    f"module with num_features={value.numel()} or load a matching checkpoint"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm1d(_BatchNorm):
    """Batch Normalization over a 2-D (N, C) or 3-D (N, C, L) input (Algorithm 1).

    For (N, C) each feature is normalized over the mini-batch; for (N, C, L)
    over the mini-batch and the L positions (Section 3.2). Same arguments,
    attributes and state-dict keys as ``torch.nn.BatchNorm1d``.

    Shape:
        input (N, C) or (N, C, L) -> output of the same shape.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> y = bn(torch.randn(60, 100))
    """

    _expected_dims = (2, 3)
    _shape_names = ("2-D (N, C)", "3-D (N, C, L)")
    _hint = "BatchNorm2d for 4-D and BatchNorm3d for 5-D input, or add a batch dimension"


class BatchNorm2d(_BatchNorm):
    """Batch Normalization over a 4-D (N, C, H, W) input (Algorithm 1, Section 3.2).

    Statistics are taken jointly over the mini-batch and all H*W locations of
    a feature map (the effective mini-batch m' = N*H*W), with one gamma and
    beta per channel. Channels-last inputs keep their memory format.

    Shape:
        input (N, C, H, W) -> output of the same shape.
    """

    _expected_dims = (4,)
    _shape_names = ("4-D (N, C, H, W)",)
    _hint = "BatchNorm1d for 2-D/3-D and BatchNorm3d for 5-D input"


class BatchNorm3d(_BatchNorm):
    """Batch Normalization over a 5-D (N, C, D, H, W) input (Algorithm 1, Section 3.2).

    Shape:
        input (N, C, D, H, W) -> output of the same shape.
    """

    _expected_dims = (5,)
    _shape_names = ("5-D (N, C, D, H, W)",)
    _hint = "BatchNorm1d for 2-D/3-D and BatchNorm2d for 4-D input"
