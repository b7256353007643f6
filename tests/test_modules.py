"""bnlab.nn.BatchNorm*d as drop-in replacements for torch.nn.BatchNorm*d, float64."""

import itertools

import pytest
import torch
from torch import nn

import bnlab.nn as bnn

CLASSES = [
    (bnn.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (bnn.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (bnn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6)),
    (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 2)),
]


def _pair(ours_cls, ref_cls, **kw):
    ours = ours_cls(4, dtype=torch.float64, **kw)
    ref = ref_cls(4, dtype=torch.float64, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _run_steps(ours, ref, shape, steps=4, channels_last=False):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    for _ in range(steps):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
        if channels_last:
            x = x.to(memory_format=fmt)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
        if channels_last:
            assert y1.is_contiguous(memory_format=fmt)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)
        if ref.affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-11)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=0, atol=1e-11)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


CONFIGS = list(itertools.product(CLASSES, [0.1, 0.5, None], [True, False], [True, False]))


@pytest.mark.parametrize("classes,momentum,affine,track", CONFIGS)
def test_parity_train_then_eval(classes, momentum, affine, track):
    ours_cls, ref_cls, shape = classes
    ours, ref = _pair(
        ours_cls, ref_cls, momentum=momentum, affine=affine, track_running_stats=track
    )
    _run_steps(ours, ref, shape)
    if track:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4
    ours.eval()
    ref.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


def test_channels_last_2d_and_3d():
    ours, ref = _pair(bnn.BatchNorm2d, nn.BatchNorm2d)
    _run_steps(ours, ref, (3, 4, 5, 6), channels_last=True)
    ours, ref = _pair(bnn.BatchNorm3d, nn.BatchNorm3d)
    _run_steps(ours, ref, (2, 4, 3, 4, 2), channels_last=True)


def test_state_dict_keys_and_round_trips_both_ways():
    ours, ref = _pair(bnn.BatchNorm2d, nn.BatchNorm2d)
    _run_steps(ours, ref, (3, 4, 5, 6), steps=2)
    assert (
        list(ours.state_dict())
        == list(ref.state_dict())
        == [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
    )
    fresh_ref = nn.BatchNorm2d(4, dtype=torch.float64)
    fresh_ref.load_state_dict(ours.state_dict())
    fresh_ours = bnn.BatchNorm2d(4, dtype=torch.float64)
    fresh_ours.load_state_dict(ref.state_dict())
    for a, b in zip(fresh_ref.state_dict().values(), fresh_ours.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_reset_and_repr_match_torch():
    ours = bnn.BatchNorm1d(3, momentum=None, affine=False)
    ref = nn.BatchNorm1d(3, momentum=None, affine=False)
    assert repr(ours) == repr(ref)
    ours(torch.randn(5, 3))
    ours.reset_running_stats()
    assert ours.num_batches_tracked.item() == 0
    torch.testing.assert_close(ours.running_var, torch.ones(3))
    bn = bnn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.fill_(2)
    bn.reset_parameters()
    torch.testing.assert_close(bn.weight, torch.ones(3))


def test_replace_and_revert_keep_state_and_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )
    model.double()
    model(torch.randn(4, 3, 6, 6, dtype=torch.float64))
    model[5].eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    model.eval()
    expected = model(x)
    model.train()
    model[5].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = bnn.replace_batchnorm(model)
    assert type(converted[1]) is bnn.BatchNorm2d and type(converted[5]) is bnn.BatchNorm1d
    assert converted[1].training and not converted[5].training
    for k, v in converted.state_dict().items():
        torch.testing.assert_close(v, state[k])
    converted.eval()
    torch.testing.assert_close(converted(x), expected)
    back = bnn.revert_batchnorm(converted)
    assert type(back[1]) is nn.BatchNorm2d and type(back[5]) is nn.BatchNorm1d
    torch.testing.assert_close(back(x), expected)
