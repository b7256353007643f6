"""A small Inception network for 32x32 images: the Section 4.2 experiment at laptop scale.

The paper's ImageNet network (Ioffe & Szegedy 2015, Section 4.2) is GoogLeNet with
ReLUs, each 5x5 convolution replaced by two stacked 3x3 ones (Figure 5), and no
fully-connected layer but the softmax classifier. This is the same design scaled
down for CIFAR-10:

* stem: 3x3 conv, g, [LRN], 3x3 conv, g, [LRN] (LRN where GoogLeNet has it, after
  its first two convolution stages, only with ``lrn=True``);
* three stages at 32x32, 16x16 and 8x8, each ``depth`` Inception modules, with a
  stride-2 reduction module (as BN-Inception's 3c / 4e) between stages;
* global average pooling, [dropout], a linear softmax classifier (logits).

Inception module, with BN-Inception's channel ratios (its module 3a is u = 64):

    1x1 (u) | 1x1 (u) -> 3x3 (u) | 1x1 (u) -> 3x3 (1.5u) -> 3x3 (1.5u) | 3x3 max-pool -> 1x1 (u/2)

concatenated on channels (4u out). Reduction module (in c, out c + 4u, as 3c):

    1x1 (2u) -> 3x3/2 (2.5u) | 1x1 (u) -> 3x3 (1.5u) -> 3x3/2 (1.5u) | 3x3/2 max-pool (c)

With u = ``width`` in the first stage, 2 * width in the second and 4 * width in the
third, every stage doubles the channels as the resolution halves (4u -> 8u).

Every convolution has a bias and its own nonlinearity module, so
:func:`bnlab.insert_batchnorm` (through torch.fx) puts a BatchNorm2d before every
nonlinearity and drops every convolution's bias (Section 3.2), which is how every BN
variant of Section 4.2 is built.

Seed batching (see :mod:`bnlab.models.mlp`): S = ``len(seeds)`` independent copies
in one module. Activations are (N, S * C, H, W), seed-major: copy k owns channels
[k * C, (k + 1) * C). Convolutions are grouped (``groups=S``), so a copy sees only
its own channels; branches are concatenated per copy (:func:`seed_cat`); LRN works
within a copy (:class:`SeedLocalResponseNorm`); the classifier is a
:class:`~bnlab.models.mlp.SeedBatchedLinear`. A BN over the S * C channels then
normalizes each copy's channels over that copy's own mini-batch, exactly as S
separate BN networks would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn

from bnlab.models.mlp import SeedBatchedLinear

__all__ = [
    "InceptionModule",
    "InceptionNet",
    "ReductionModule",
    "SeedLocalResponseNorm",
    "count_parameters",
    "inception_net",
    "seed_cat",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
IMAGE_CHANNELS = 3

# ----------------------------------------------------------------------------------
# Seed-batched building blocks
# ----------------------------------------------------------------------------------


def _is_channels_last(x: Tensor) -> bool:
    # A tensor with H = W = 1 is both; it takes the contiguous path.
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# fx.wrap: under torch.fx tracing (insert_batchnorm) these functions are recorded as
# one graph node each and run as plain Python, so they may look at shapes and
# memory formats.


@fx.wrap
def seed_cat(tensors: Sequence[Tensor], copies: int) -> Tensor:
    """Concatenate seed-batched tensors on channels, copy by copy.

    Copy k of the result holds copy k's channels of every input, in order, so the
    result keeps the seed-major layout: a plain ``torch.cat(dim=1)`` would put all
    copies of the first input before the second input.

    Args:
        tensors: (N, S * C_i, H, W) each, seed-major.
        copies: S.

    Returns:
        (N, S * sum(C_i), H, W), seed-major; channels_last if the inputs are.
    """
    if copies == 1:
        return torch.cat(list(tensors), 1)
    if _is_channels_last(tensors[0]):
        # The memory is (N, H, W, S * C_i); cat the innermost dim of (N, H, W, S, C_i)
        # views, so the result is channels_last without a layout conversion.
        parts = [t.permute(0, 2, 3, 1).unflatten(3, (copies, -1)) for t in tensors]
        # (N, H, W, S, sum C_i) -> (N, H, W, S * sum C_i) -> (N, S * sum C_i, H, W)
        return torch.cat(parts, 4).flatten(3).permute(0, 3, 1, 2)
    parts = [t.unflatten(1, (copies, -1)) for t in tensors]  # (N, S, C_i, H, W)
    return torch.cat(parts, 2).flatten(1, 2)  # (N, S, sum C_i, H, W) -> (N, S * sum C_i, H, W)


@fx.wrap
def _per_copy_input(x: Tensor, copies: int) -> Tensor:
    """(N, 3, H, W) shared by every copy, or (N, S * 3, H, W) per copy -> (N, S * 3, H, W)."""
    if x.dim() != 4 or x.shape[1] not in (IMAGE_CHANNELS, copies * IMAGE_CHANNELS):
        raise ValueError(
            f"the Inception net with {copies} copies expects images (N, {IMAGE_CHANNELS}, H, W) "
            f"shared by every copy or (N, {copies * IMAGE_CHANNELS}, H, W) with copy k's images "
            f"in channels [{IMAGE_CHANNELS}k, {IMAGE_CHANNELS}k + {IMAGE_CHANNELS}); got shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] == copies * IMAGE_CHANNELS:
        return x
    return x.repeat(1, copies, 1, 1)  # (N, 3, H, W) -> (N, S * 3, H, W)


class SeedLocalResponseNorm(nn.Module):
    """torch.nn.LocalResponseNorm within each copy's channels.

    The channel window of a plain LRN over S * C channels would straddle two copies
    at every copy boundary; here each copy is normalized as its own sample.

    Args:
        copies: S.
        size, alpha, beta, k: of ``torch.nn.LocalResponseNorm`` (GoogLeNet: size 5,
            alpha 1e-4, beta 0.75, k 1).

    Shape:
        (N, S * C, H, W) -> (N, S * C, H, W).
    """

    def __init__(
        self, copies: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
    ) -> None:
        super().__init__()
        self.copies = copies
        self.lrn = nn.LocalResponseNorm(size, alpha, beta, k)

    def forward(self, x: Tensor) -> Tensor:
        # (N, S * C, H, W) -> (N, S, C, H, W) -> (N * S, C, H, W): one sample per copy
        y = self.lrn(x.unflatten(1, (self.copies, -1)).flatten(0, 1))
        # (N * S, C, H, W) -> (N, S, C, H, W) -> (N, S * C, H, W)
        return y.unflatten(0, (-1, self.copies)).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"copies={self.copies}"


def _conv_act(
    copies: int, cin: int, cout: int, kernel: int, activation: type[nn.Module], stride: int = 1
) -> list[nn.Module]:
    """[conv, nonlinearity]: S grouped convs, (N, S * cin, H, W) -> (N, S * cout, H, W)."""
    conv = nn.Conv2d(
        copies * cin, copies * cout, kernel, stride, padding=kernel // 2, groups=copies, bias=True
    )
    return [conv, activation()]


class InceptionModule(nn.Module):
    """An Inception module with the double 3x3 branch (Figure 5), for S copies.

    Args:
        copies: S.
        cin: input channels per copy.
        u: the unit width; the branches give u, u, 1.5u and u/2 channels (BN-Inception's
            3a is u = 64).
        activation: the nonlinearity module class.

    Shape:
        (N, S * cin, H, W) -> (N, S * out_channels, H, W), ``out_channels`` per copy.
    """

    def __init__(self, copies: int, cin: int, u: int, activation: type[nn.Module]) -> None:
        super().__init__()
        c1, c3r, c3, cdr, cd, cp = u, u, u, u, u + u // 2, max(1, u // 2)
        self.copies = copies
        self.branch1x1 = nn.Sequential(*_conv_act(copies, cin, c1, 1, activation))
        self.branch3x3 = nn.Sequential(
            *_conv_act(copies, cin, c3r, 1, activation), *_conv_act(copies, c3r, c3, 3, activation)
        )
        self.branch3x3dbl = nn.Sequential(
            *_conv_act(copies, cin, cdr, 1, activation),
            *_conv_act(copies, cdr, cd, 3, activation),
            *_conv_act(copies, cd, cd, 3, activation),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), *_conv_act(copies, cin, cp, 1, activation)
        )
        self.out_channels = c1 + c3 + cd + cp

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1x1, self.branch3x3, self.branch3x3dbl, self.branch_pool]
        return seed_cat([b(x) for b in branches], self.copies)


class ReductionModule(nn.Module):
    """A stride-2 grid reduction (BN-Inception's 3c / 4e), for S copies.

    Args:
        copies: S.
        cin: input channels per copy (passed through by the max-pool branch).
        u: the unit width of the stage before; the conv branches give 2.5u and 1.5u.
        activation: the nonlinearity module class.

    Shape:
        (N, S * cin, H, W) -> (N, S * out_channels, ceil(H / 2), ceil(W / 2)).
    """

    def __init__(self, copies: int, cin: int, u: int, activation: type[nn.Module]) -> None:
        super().__init__()
        c3r, c3, cdr, cd = 2 * u, 2 * u + u // 2, u, u + u // 2
        self.copies = copies
        self.branch3x3 = nn.Sequential(
            *_conv_act(copies, cin, c3r, 1, activation),
            *_conv_act(copies, c3r, c3, 3, activation, stride=2),
        )
        self.branch3x3dbl = nn.Sequential(
            *_conv_act(copies, cin, cdr, 1, activation),
            *_conv_act(copies, cdr, cd, 3, activation),
            *_conv_act(copies, cd, cd, 3, activation, stride=2),
        )
        self.branch_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = c3 + cd + cin

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch3x3, self.branch3x3dbl, self.branch_pool]
        return seed_cat([b(x) for b in branches], self.copies)


class InceptionNet(nn.Module):
    """S independent Inception networks; build it with :func:`inception_net`.

    Shape:
        input (N, 3, H, W) shared by every copy, or (N, S * 3, H, W) with copy k's
        images in channels [3k, 3k + 3); output (N, S * classes) logits, copy k's in
        columns [k * classes, (k + 1) * classes).
    """

    def __init__(
        self,
        copies: int,
        width: int,
        depth: int,
        activation: type[nn.Module],
        lrn: bool,
        dropout: float,
        classes: int,
    ) -> None:
        super().__init__()
        self.copies = copies
        s, w = copies, width
        stem: list[nn.Module] = _conv_act(s, IMAGE_CHANNELS, w, 3, activation)
        stem += [SeedLocalResponseNorm(s)] if lrn else []
        stem += _conv_act(s, w, 3 * w, 3, activation)  # GoogLeNet's stem: 64 then 192
        stem += [SeedLocalResponseNorm(s)] if lrn else []
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        channels = 3 * w
        for stage in range(3):
            u = w * 2**stage
            if stage > 0:
                blocks.append(ReductionModule(s, channels, u // 2, activation))
                channels = blocks[-1].out_channels
            for _ in range(depth):
                blocks.append(InceptionModule(s, channels, u, activation))
                channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = SeedBatchedLinear(s, channels, classes)
        self.features = channels

    def forward(self, x: Tensor) -> Tensor:
        x = _per_copy_input(x, self.copies)  # (N, S * 3, H, W)
        x = self.blocks(self.stem(x))  # (N, S * C, H / 4, W / 4)
        x = self.pool(x).flatten(1)  # (N, S * C, 1, 1) -> (N, S * C), seed-major
        return self.classifier(self.dropout(x))  # (N, S * classes)


# ----------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------


def inception_net(
    seeds: Sequence[int] = (0,),
    width: int = 8,
    depth: int = 1,
    activation: str = "relu",
    lrn: bool = False,
    dropout: float = 0.0,
    init_gain: float = 1.0,
    classes: int = 10,
) -> InceptionNet:
    """The Section 4.2 Inception network for 32x32 images, one independent copy per seed.

    Copy k is initialized from ``torch.Generator().manual_seed(seeds[k])`` only, so it
    equals ``inception_net(seeds=[seeds[k]], ...)`` weight for weight: convolutions
    He-normal, std = init_gain * sqrt(2 / fan_in) with fan_in = cin * k * k of one copy
    (the same std for sigmoid), classifier N(0, 0.01^2), biases zero.

    Args:
        seeds: one per copy; S = len(seeds).
        width: u of the first stage's Inception modules (BN-Inception's 3a has 64);
            the stem has ``width`` and 3 * ``width`` channels, the stages 4, 8 and 16
            times ``width``. At least 2.
        depth: Inception modules per stage (at least 1).
        activation: "relu" (the paper's Inception) or "sigmoid" (BN-x5-Sigmoid).
        lrn: Local Response Normalization in the stem, as GoogLeNet (Section 4.2.1
            removes it from the BN networks).
        dropout: rate before the classifier; 0 for none (Section 4.2.1 removes it).
        init_gain: multiplies every convolution's initial std.
        classes: outputs per copy.

    Returns:
        An :class:`InceptionNet`; (N, 3 or S * 3, H, W) images -> (N, S * classes) logits.

    Raises:
        ValueError: for an unknown activation or out-of-range settings.

    Example:
        >>> net = inception_net(seeds=[0, 1], width=8)
        >>> net(torch.randn(4, 6, 32, 32)).shape  # each copy its own 4 images
        torch.Size([4, 20])
        >>> bn_net = bnlab.insert_batchnorm(net)  # BN before every nonlinearity
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; pass one seed per copy, e.g. seeds=(0,)")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if width < 2 or depth < 1 or classes < 1:
        raise ValueError(
            f"need width >= 2, depth >= 1 and classes >= 1; got width={width}, depth={depth}, "
            f"classes={classes}"
        )
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout is a rate in [0, 1), got {dropout!r}")
    net = InceptionNet(len(seeds), width, depth, _ACTIVATIONS[activation], lrn, dropout, classes)
    _init_copies(net, seeds, init_gain)
    return net


def _init_copies(net: InceptionNet, seeds: list[int], init_gain: float) -> None:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    s = len(seeds)
    with torch.no_grad():
        for conv in convs:
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(net.classifier.bias)
        for k, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            for conv in convs:  # module order: the same draws for every S
                cout = conv.out_channels // s
                w = conv.weight[k * cout : (k + 1) * cout]  # copy k's filters
                std = init_gain * (2.0 / w[0].numel()) ** 0.5  # fan_in = cin * kh * kw
                w.normal_(0.0, std, generator=gen)
            net.classifier.weight[k].normal_(0.0, 0.01, generator=gen)


def count_parameters(model: nn.Module, copies: int = 1) -> int:
    """Trainable parameters of one copy of a seed-batched model (all of them if copies=1).

    Works before and after :func:`bnlab.insert_batchnorm` (BN's gamma and beta count).

    Raises:
        ValueError: the total is not a multiple of ``copies``.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if copies < 1 or total % copies:
        raise ValueError(
            f"{total} parameters do not split into {copies} equal copies; pass the model's "
            "number of seeds as copies"
        )
    return total // copies
