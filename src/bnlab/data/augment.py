"""Batched image augmentation on tensors: random crops, flips and photometric jitter.

Every function draws all its random numbers for the whole batch at once from
the ``generator`` it is given and transforms the batch with a few tensor ops,
never a Python loop over images, so it runs at memory speed on CPU or GPU and
the same generator state gives the same output.

The crop-and-flip is the usual CIFAR augmentation (zero-pad 4, random 32x32
crop, horizontal flip); :func:`photometric` is a mild version of the
"photometric distortions" the paper reduces for its fast BN networks
(Section 4.2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["photometric", "random_crop_flip"]


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` laid out in memory like ``x`` (channels_last stays channels_last)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def random_crop_flip(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad every image by ``pad``, crop a random HxW window from it, and maybe flip it.

    Each image gets its own window, offsets ``dy, dx`` uniform in ``0..2*pad``
    (``(dy, dx) = (pad, pad)`` is the original image), and when ``flip`` is
    set a horizontal flip with probability 1/2. Padding is with zeros in
    ``x``'s units: black for uint8 images, the mean colour for normalized ones.

    Two batched gathers do it, rows then columns (the crop is separable; on CPU
    this measured twice as fast as one 4-D advanced index): with row indices
    ``rows[n, i] = dy[n] + i`` and column indices ``cols[n, j] = dx[n] + j``,
    reversed for flipped images,
    ``out[n, c, i, j] = x_pad[n, c, rows[n, i], cols[n, j]]``.

    Random draws, in this order: ``dy`` (N), ``dx`` (N), then the flips (N),
    each from ``generator`` on its own device; ``dy, dx`` are only drawn when
    ``pad > 0`` and the flips only when ``flip``.

    Args:
        x: images (N, C, H, W), any dtype, device and memory format.
        pad: pixels of zeros on each side (0: no crop).
        flip: flip each image horizontally with probability 1/2.
        generator: the source of randomness.

    Returns:
        A new tensor shaped, typed and laid out like ``x``; ``x`` itself when
        ``pad == 0`` and not ``flip``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
        >>> random_crop_flip(x, pad=4, flip=True, generator=g).shape
        torch.Size([8, 3, 32, 32])
    """
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return x
    n, c, h, w = x.shape
    gen_device = generator.device
    out = x
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=gen_device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=gen_device)
        rows = torch.arange(h, device=x.device) + dy.to(x.device)  # (N, H)
        cols = cols + dx.to(x.device)
        out = F.pad(out, (pad, pad, pad, pad))  # (N, C, H + 2 pad, W + 2 pad), zeros
        out = out.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))  # (N, C, H, W+2p)
    if flip:
        flipped = torch.rand(n, 1, generator=generator, device=gen_device) < 0.5
        cols = torch.where(flipped.to(x.device), cols.flip(1), cols)
    out = out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))  # (N, C, H, W)
    return _like(out, x)


def photometric(
    x: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-image random brightness shift and contrast scaling, batched.

    For image ``n`` with mean ``m[n]`` over all its channels and pixels:
    ``out = (x - m) * c[n] + m + b[n]`` with ``c[n] ~ U(1 - contrast, 1 + contrast)``
    and ``b[n] ~ U(-brightness, brightness)``, both in ``x``'s own units (so on
    standardized inputs ``brightness=0.2`` is a fifth of a standard deviation).
    Nothing is clipped, since the input need not be in [0, 1].

    Random draws, in this order: ``b`` (N) when ``brightness > 0``, then ``c``
    (N) when ``contrast > 0``, from ``generator`` on its own device.

    Args:
        x: float images (N, C, H, W), any memory format (the output keeps it).
        brightness: half-width of the additive shift; 0 turns it off.
        contrast: half-width of the contrast factor around 1, in [0, 1]; 0 turns it off.
        generator: the source of randomness.

    Returns:
        A new tensor like ``x``; ``x`` itself when both strengths are 0.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if brightness < 0 or not 0 <= contrast <= 1:
        raise ValueError(
            f"need brightness >= 0 and 0 <= contrast <= 1, got {brightness}, {contrast}"
        )
    if brightness == 0 and contrast == 0:
        return x
    n = x.shape[0]

    def uniform(half_width: float) -> torch.Tensor:  # (N, 1, 1, 1) in [-half_width, half_width)
        u = torch.rand(n, 1, 1, 1, generator=generator, device=generator.device, dtype=x.dtype)
        return ((2 * u - 1) * half_width).to(x.device)

    b = uniform(brightness) if brightness else None
    out = x
    if contrast:
        c = 1 + uniform(contrast)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - m) * c + m
    if b is not None:
        out = out + b
    return out
