"""Batched crop/flip and photometric jitter against slow per-image references."""

import pytest
import torch
import torch.nn.functional as F

from bnlab.data.augment import photometric, random_crop_flip


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def reference_crop_flip(x, pad, flip, generator):
    """One image at a time, with the same draws in the same order as the batched version."""
    n, _, h, w = x.shape
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)[:, 0]
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)[:, 0]
    else:
        dy = dx = torch.zeros(n, dtype=torch.long)
    flipped = (
        (torch.rand(n, 1, generator=generator) < 0.5)[:, 0]
        if flip
        else torch.zeros(n, dtype=torch.bool)
    )
    out = []
    for i in range(n):
        padded = F.pad(x[i], (pad, pad, pad, pad))  # (C, H + 2 pad, W + 2 pad)
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(-1) if flipped[i] else crop)
    return torch.stack(out), dy, dx, flipped


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
@pytest.mark.parametrize("pad,flip", [(4, True), (4, False), (0, True), (2, True)])
def test_matches_a_per_image_reference(dtype, pad, flip):
    x = torch.randint(0, 256, (64, 3, 8, 10), generator=gen(1)).to(dtype)
    got = random_crop_flip(x, pad, flip, gen(7))
    want, dy, dx, flipped = reference_crop_flip(x, pad, flip, gen(7))
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if pad:  # the draws cover every offset, and offset (pad, pad) without flip is the original
        assert set(dy.tolist()) == set(range(2 * pad + 1)) == set(dx.tolist())
        same = (dy == pad) & (dx == pad) & ~flipped
        assert torch.equal(got[same], x[same])


def test_flip_probability_is_one_half():
    x = torch.arange(4.0).expand(2000, 1, 1, 4)  # rows 0 1 2 3: flipped reads 3 2 1 0
    out = random_crop_flip(x, 0, True, gen(3))
    flipped = out[:, 0, 0, 0] == 3
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(
        out[~flipped], x[~flipped]
    )
    # Binomial(2000, 1/2) has sd 22.4; 1000 +- 5 sd
    assert abs(int(flipped.sum()) - 1000) < 112


def test_identity_and_determinism():
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    assert random_crop_flip(x, 0, False, gen()) is x
    a = random_crop_flip(x, 3, True, gen(5))
    b = random_crop_flip(x, 3, True, gen(5))
    c = random_crop_flip(x, 3, True, gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(5)  # a generator moves on: two calls differ
    assert not torch.equal(random_crop_flip(x, 3, True, g), random_crop_flip(x, 3, True, g))


@pytest.mark.parametrize("pad,flip", [(4, True), (0, True)])
def test_channels_last_in_channels_last_out(pad, flip):
    x = torch.randint(0, 256, (32, 3, 8, 8), generator=gen(2), dtype=torch.uint8)
    xl = x.contiguous(memory_format=torch.channels_last)
    got = random_crop_flip(xl, pad, flip, gen(9))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, random_crop_flip(x, pad, flip, gen(9)))
    assert random_crop_flip(x, pad, flip, gen(9)).is_contiguous()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(torch.zeros(3, 8, 8), 4, True, gen())
    with pytest.raises(ValueError, match="pad must be >= 0"):
        random_crop_flip(torch.zeros(1, 3, 8, 8), -1, True, gen())


# ---------------------------------------------------------------- photometric


def test_photometric_per_image_formula():
    x = torch.randn(50, 3, 4, 4, dtype=torch.float64)
    out = photometric(x, 0.3, 0.4, gen(4))
    g = gen(4)
    b = (2 * torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64) - 1) * 0.3
    c = 1 + (2 * torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64) - 1) * 0.4
    for i in range(50):
        m = x[i].mean()
        torch.testing.assert_close(out[i], (x[i] - m) * c[i, 0] + m + b[i, 0])
    assert (b.abs() <= 0.3).all() and ((c - 1).abs() <= 0.4).all()


def test_photometric_zero_strength_is_identity_and_keeps_layout():
    x = torch.randn(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert photometric(x, 0.0, 0.0, gen()) is x
    out = photometric(x, 0.1, 0.1, gen())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, photometric(x, 0.1, 0.1, gen()))
    only_b = photometric(x, 0.2, 0.0, gen(1)) - x  # a pure shift: constant per image
    torch.testing.assert_close(only_b, only_b[:, :1, :1, :1].expand_as(x))
    with pytest.raises(ValueError, match="float images"):
        photometric(x.to(torch.uint8), 0.1, 0.1, gen())
