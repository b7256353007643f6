"""The Section 4.1 MNIST network, optionally several independent copies at once.

``mnist_mlp(seeds=[s0, s1, ...])`` builds S independent networks side by side
in one module: activations are laid out (N, S * features), each copy with its
own weights and its own mini-batch. One step then trains all S networks with
the same number of PyTorch ops as one, which is what makes multi-seed runs
cheap on a CPU. BN inserted after such a layer (``BatchNorm1d(S * features)``)
normalizes every copy's features over that copy's batch only, exactly as S
separate BN networks would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.nn import BatchNorm1d

__all__ = ["SeedBatchedLinear", "mnist_mlp"]


class SeedBatchedLinear(nn.Module):
    """S independent Linear layers: (N, S * in) -> (N, S * out).

    An input of shape (N, in) is shared by all S copies (used for evaluation on
    one test set). ``out_features`` is the total width S * out, and
    ``batchnorm_class`` lets :func:`bnlab.insert_batchnorm` put a BN after it.

    Shape:
        weight (S, out, in), bias (S, out) or None.
    """

    batchnorm_class = BatchNorm1d

    def __init__(self, copies: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.copies, self.in_per_copy, self.out_per_copy = copies, in_features, out_features
        self.out_features = copies * out_features
        self.weight = nn.Parameter(torch.empty(copies, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(copies, out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        s, i, o = self.copies, self.in_per_copy, self.out_per_copy
        if s == 1:  # a plain Linear: one fused addmm
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        if x.shape[1] == i:  # one input shared by every copy
            y = x @ self.weight.reshape(s * o, i).t()
        else:
            # Weight first, so that autograd produces the weight gradient directly in
            # the weight's (S, out, in) layout (no transposing copy of it every step):
            # (S, out, in) @ (S, in, N) -> (S, out, N) -> (N, S, out) -> (N, S*out)
            y = torch.bmm(self.weight, x.reshape(n, s, i).permute(1, 2, 0))
            y = y.permute(2, 0, 1).contiguous().view(n, s * o)
        return y if self.bias is None else y + self.bias.reshape(-1)

    def extra_repr(self) -> str:
        return (
            f"copies={self.copies}, in_features={self.in_per_copy}, "
            f"out_features={self.out_per_copy}, bias={self.bias is not None}"
        )


def mnist_mlp(
    seeds: Sequence[int] = (0,),
    hidden: int = 100,
    depth: int = 3,
    init_std: float | str = 0.01,
    in_features: int = 784,
    classes: int = 10,
    dropout: float = 0.0,
) -> nn.Sequential:
    """The network of Section 4.1: 784 - 100 - 100 - 100 - 10, sigmoid hidden units.

    y = g(Wu + b) with g the sigmoid; weights drawn from N(0, init_std^2) ("small
    random Gaussian values"), biases zero. One independent copy per seed, each
    initialized from its own seed, so copy k equals ``mnist_mlp(seeds=[seeds[k]])``.

    Args:
        init_std: the weights' standard deviation, or ``"glorot"`` for Glorot &
            Bengio's normal initialization, std = sqrt(2 / (fan_in + fan_out)) per layer.
        dropout: if > 0, an ``nn.Dropout(dropout)`` after each hidden sigmoid
            (elementwise, so every copy drops its own units).

    Returns:
        ``nn.Sequential`` of SeedBatchedLinear and Sigmoid (and Dropout); the output
        is (N, S * classes) logits.
    """
    if isinstance(init_std, str) and init_std != "glorot":
        raise ValueError(f"init_std must be a number or 'glorot', got {init_std!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    sizes = [in_features] + [hidden] * depth + [classes]
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(SeedBatchedLinear(len(seeds), sizes[k], sizes[k + 1]))
        if k < depth:
            layers.append(nn.Sigmoid())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    linears = [m for m in layers if isinstance(m, SeedBatchedLinear)]
    with torch.no_grad():
        for c, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(seed))
            for lin in linears:
                std = (
                    math.sqrt(2.0 / (lin.in_per_copy + lin.out_per_copy))
                    if init_std == "glorot"
                    else init_std
                )
                lin.weight[c].normal_(0.0, std, generator=gen)
    return nn.Sequential(*layers)
