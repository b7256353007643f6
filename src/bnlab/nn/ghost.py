"""Ghost batch normalization modules (Hoffer et al. 2017, "Train longer, generalize better").

In training, the mini-batch is split along dim 0 into ghost ("virtual")
batches of ``virtual_batch_size`` consecutive samples, each normalized with
its own statistics (Algorithm 1 per ghost batch). When ``virtual_batch_size``
does not divide N, the last ghost batch holds the remaining N mod
``virtual_batch_size`` samples and is normalized with its own statistics
(:func:`bnlab.core.virtual_batches`); a remainder with a single value per
channel is refused.

Running statistics: updated once per ghost batch, in order, each with its own
count m (so its unbiased variance) and PyTorch's momentum convention
``running = (1 - momentum) * running + momentum * batch``; ``num_batches_tracked``
counts ghost batches, so ``momentum=None`` is the cumulative average over all
ghost batches seen. A ghost layer in training is thus exactly a BatchNorm
layer applied to each ghost batch in turn (outputs, gradients, running
statistics). A call with k ghost batches moves the running statistics as k
BN steps do: 1 - (1 - momentum)^k of the way, where one BN step on the whole
batch moves them ``momentum``.

Eval mode never splits: it uses the running statistics (Algorithm 2, step 11),
and each sample's output depends on that sample alone. Without running
statistics (``track_running_stats=False``) eval mode uses the whole batch's
statistics, as BatchNorm does.

Why a separate family rather than a ``virtual_batch_size=`` option on
:class:`bnlab.nn.BatchNorm2d`: bnlab's BN modules are drop-ins with torch's
exact constructor, shared with SyncBatchNorm and the converters (which
rebuild a module from torch's arguments); an option there would have to be
carried through each and would add a branch to the hot path every BN model
runs. The ghost modules subclass them (so ``isinstance(m, nn.BatchNorm2d)``,
BN-finding tools, folding and the state dict work unchanged) and override only
the training forward.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

import bnlab.functional as BF
from bnlab.autograd import batch_norm_train
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_BatchNorm):
    """Shared state and policy of the ghost batch normalization modules.

    Args:
        num_features: C, the number of channels (features) of the input.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as
            :class:`bnlab.nn.BatchNorm2d` (PyTorch's arguments and convention).
        virtual_batch_size: (keyword-only) samples per ghost batch, an int >= 1;
            None (the default) normalizes the whole mini-batch (plain BN).
            Mini-batches of at most this many samples are not split.

    Raises:
        ValueError: ``virtual_batch_size`` is not None or an int >= 1.
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
        virtual_batch_size: int | None = None,
    ) -> None:
        self.check_virtual_batch_size(virtual_batch_size)
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
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)

    # The smallest ghost batch some input can be normalized with.
    _min_virtual_batch_size = 1
    _min_reason = ""

    @classmethod
    def check_virtual_batch_size(cls, virtual_batch_size: int | None) -> None:
        """Refuse a ``virtual_batch_size`` this class cannot train with (a ValueError).

        Converters call it before they change a model, so a refused size leaves
        nothing half-converted.
        """
        least = cls._min_virtual_batch_size
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, numbers.Integral)
            or virtual_batch_size < least
        ):
            raise ValueError(
                f"{cls.__name__} virtual_batch_size must be an int >= {least} (samples per "
                f"ghost batch) or None for the whole batch, got {virtual_batch_size!r}"
                + (
                    cls._min_reason
                    if type(virtual_batch_size) is int and virtual_batch_size == 1
                    else ""
                )
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        v = self.virtual_batch_size
        if not self.training or v is None:  # eval never splits: running statistics
            return super().forward(input)
        self._check_input_dim(input)
        state = self._check_state_sizes()
        BF.check_batch_norm_input(input, True, self.eps)
        BF.check_batch_norm_state(input, *state, type(self).__name__)
        batches = BF.virtual_batches(input, v)
        if len(batches) == 1:
            return super().forward(input)
        update = self._updates_running_stats()
        outputs = []
        for batch in batches:  # (v, C, *) each, the last possibly smaller
            y, mu_b, biased_var_b = batch_norm_train(batch, self.weight, self.bias, self.eps)
            if update:  # once per ghost batch, with its own count
                self._update_running_stats(mu_b, biased_var_b, BF.num_values_per_channel(batch))
            outputs.append(y)
        return torch.cat(outputs, 0)  # (N, C, *), the input's memory format


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost batch normalization over a 2-D (N, C) or 3-D (N, C, L) input (Hoffer et al. 2017).

    Arguments and state-dict keys as :class:`bnlab.nn.BatchNorm1d`, plus the
    keyword ``virtual_batch_size``, here an int >= 2: ghost batches of one sample
    of (N, C) input have one value per feature, whose statistics are undefined
    (for (N, C, L) input they would be instance normalization:
    ``torch.nn.InstanceNorm1d``).

    Shape:
        input (N, C) or (N, C, L) -> output of the same shape.

    Example:
        >>> bn = GhostBatchNorm1d(100, virtual_batch_size=32)
        >>> y = bn(torch.randn(256, 100))  # 8 ghost batches of 32

    Raises:
        ValueError: ``virtual_batch_size`` is not None or an int >= 2.
    """

    _min_virtual_batch_size = 2
    _min_reason = (
        ": ghost batches of one sample have a single value per feature for (N, C) input, "
        "whose batch statistics are undefined, so no batch size could train it (for "
        "(N, C, L) input normalized per sample, use torch.nn.InstanceNorm1d)"
    )


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost batch normalization over a 4-D (N, C, H, W) input (Hoffer et al. 2017).

    Each ghost batch of ``virtual_batch_size`` samples is normalized over its
    samples and all H*W locations (Section 3.2). Channels-last inputs keep
    their memory format.

    Shape:
        input (N, C, H, W) -> output of the same shape.
    """


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """Ghost batch normalization over a 5-D (N, C, D, H, W) input (Hoffer et al. 2017).

    Shape:
        input (N, C, D, H, W) -> output of the same shape.
    """
