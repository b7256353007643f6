"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch

import bnlab
import bnlab.functional as BF
import bnlab.nn as bnn
from bnlab import backend


@pytest.mark.parametrize(
    "make,x,exc,phrase",
    [
        (
            lambda: bnn.BatchNorm1d(3),
            torch.randn(1, 3),
            ValueError,
            "more than 1 value per channel",
        ),
        (lambda: bnn.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "more than 1 value"),
        (lambda: bnn.BatchNorm2d(3), torch.randn(4, 3), ValueError, "expects 4-D"),
        (lambda: bnn.BatchNorm1d(3), torch.randn(4, 3, 2, 2), ValueError, "use BatchNorm2d"),
        (lambda: bnn.BatchNorm3d(3), torch.randn(4, 3, 2, 2), ValueError, "expects 5-D"),
        (lambda: bnn.BatchNorm2d(3), torch.randn(4, 5, 2, 2), ValueError, "num_features=5"),
        (lambda: bnn.BatchNorm1d(3), torch.ones(4, 3, dtype=torch.long), TypeError, "floating"),
        (lambda: bnn.BatchNorm1d(3), [[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
    ],
)
def test_module_input_errors(make, x, exc, phrase):
    bn = make()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(exc, match=phrase):
        bn(x)
    for k, v in bn.state_dict().items():  # nothing half-updated
        torch.testing.assert_close(v, before[k])


def test_one_value_per_channel_is_fine_in_eval():
    bn = bnn.BatchNorm1d(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize(
    "kwargs,exc,phrase",
    [
        ({"num_features": 0}, ValueError, "at least 1"),
        ({"num_features": 2.5}, TypeError, "must be an int"),
        ({"num_features": 3, "eps": -1e-5}, ValueError, "non-negative"),
        ({"num_features": 3, "momentum": 1.5}, ValueError, r"\[0, 1\]"),
        ({"num_features": 3, "momentum": -0.1}, ValueError, r"\[0, 1\]"),
    ],
)
def test_constructor_errors(kwargs, exc, phrase):
    with pytest.raises(exc, match=phrase):
        bnn.BatchNorm2d(**kwargs)


def test_state_dict_of_wrong_size():
    state = bnn.BatchNorm2d(4).state_dict()
    # As torch: collected in error_msgs, raised by load_state_dict as one RuntimeError
    # listing every mismatch (our message, not torch's too), strict or not.
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="num_features=4") as info:
            bnn.BatchNorm2d(3).load_state_dict(state, strict=strict)
        msg = str(info.value)
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert f"size mismatch for {name}: the state dict entry" in msg
        assert "copying a param" not in msg  # torch's duplicate message is dropped
    # strict=False collects the mismatches of every layer, not only the first
    two = torch.nn.Sequential(bnn.BatchNorm1d(3), bnn.BatchNorm1d(5))
    src = torch.nn.Sequential(bnn.BatchNorm1d(4), bnn.BatchNorm1d(6)).state_dict()
    with pytest.raises(RuntimeError) as info:
        two.load_state_dict(src, strict=False)
    assert "0.weight" in str(info.value) and "1.weight" in str(info.value)


def test_wrong_sized_state_is_a_runtime_error_like_torch():
    # torch raises RuntimeError for these; ours is a ValueError and a RuntimeError.
    for name in ("weight", "bias", "running_mean", "running_var"):
        wrong = torch.ones(4)
        if name in ("weight", "bias"):
            wrong = torch.nn.Parameter(wrong)
        for make in (bnn.BatchNorm1d, torch.nn.BatchNorm1d):
            bn = make(3)
            setattr(bn, name, wrong)
            with pytest.raises(RuntimeError):
                bn(torch.randn(5, 3))
        bn = bnn.BatchNorm1d(3)
        setattr(bn, name, wrong)
        with pytest.raises(ValueError, match=f"{name} has 4 elements, not num_features=3"):
            bn(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="num_features=5"):  # input channels
        bnn.BatchNorm2d(3)(torch.randn(2, 5, 4, 4))


def test_eps_must_be_positive_in_training_like_torch():
    x = torch.randn(4, 3, 2)
    for make in (bnn.BatchNorm1d, torch.nn.BatchNorm1d, bnn.SyncBatchNorm):
        bn = make(3, eps=0.0)
        with pytest.raises(ValueError, match="eps must be positive"):
            bn(x)
        if make is not torch.nn.BatchNorm1d:  # torch counts the failed batch; we do not
            assert bn.num_batches_tracked.item() == 0
        bn.eval()
        assert torch.isfinite(bn(x)).all()  # eval with eps=0 and var=1 is fine, as in torch


def test_channel_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="num_features=4 or fix the preceding layer"):
        bnn.BatchNorm2d(3)(torch.randn(2, 4, 5, 5))
    # Linear output of shape (N, L, C): the features sit in the last dim, not dim 1.
    with pytest.raises(ValueError, match=r"features are in the last dim.*transpose\(1, -1\)"):
        bnn.BatchNorm1d(8)(torch.randn(4, 5, 8))


def test_functional_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="3 channels"):
        BF.batch_norm(x, torch.zeros(2), torch.ones(2), training=True)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        BF.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        BF.batch_norm(torch.randn(3), None, None, training=True)
    with pytest.raises(TypeError, match="floating-point"):
        BF.batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, training=True)


@pytest.mark.parametrize(
    "tool",
    [bnn.replace_batchnorm, bnn.revert_batchnorm, bnlab.freeze_batchnorm, bnlab.insert_batchnorm],
    ids=lambda f: f.__name__,
)
def test_model_tools_refuse_a_non_module_with_a_type_error(tool):
    """Every model tool says what it expects (an AttributeError about named_children
    said nothing of the mistake)."""
    with pytest.raises(TypeError, match=rf"{tool.__name__} expects an nn.Module, got str"):
        tool("x")


@pytest.mark.parametrize("path", ["default", "torch"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_size_mismatch_is_a_shape_error_for_every_rank(path, rank, name, training):
    """torch raises RuntimeError for a (C,) tensor of the wrong size; code written for it
    catches that, so bnlab's error is a RuntimeError (and a ValueError) on both paths."""
    x = torch.randn(4, 3, *[2] * (rank - 2))
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    args |= {"weight": torch.ones(3), "bias": torch.zeros(3), name: torch.ones(5)}
    with pytest.raises(RuntimeError):  # torch's type
        torch.nn.functional.batch_norm(x, **args, training=training)
    with (
        backend.using(None if path == "default" else "torch"),
        pytest.raises(bnn.BatchNormShapeError, match=f"{name} has 5 elements.*3 channels"),
    ):
        BF.batch_norm(x, **args, training=training)
    assert issubclass(bnn.BatchNormShapeError, RuntimeError)
    assert issubclass(bnn.BatchNormShapeError, ValueError)
    assert BF.BatchNormShapeError is bnn.BatchNormShapeError


def test_batch_renorm_size_mismatch_is_a_shape_error():
    x = torch.randn(4, 3, 2)
    with pytest.raises(bnn.BatchNormShapeError, match="weight has 2 elements"):
        BF.batch_renorm(x, torch.zeros(3), torch.ones(3), torch.ones(2), None, training=True)


def test_module_refuses_in_eval_what_torch_refuses_in_eval():
    """Eval without running statistics takes batch statistics: one value per channel is
    refused (it returned beta); a negative eps set after construction is refused in eval
    with running statistics too (it returned inf). torch refuses both."""
    import bnlab.nn as bnn

    for make in (bnn.BatchNorm1d, torch.nn.BatchNorm1d):
        bn = make(3, track_running_stats=False).eval()
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(torch.randn(1, 3))
        bn = make(3).eval()
        bn.eps = -1.0
        with pytest.raises(ValueError, match="eps must be non-negative"):
            bn(torch.randn(4, 3))
        bn.eps = 0.0  # allowed with running statistics, as in torch
        assert torch.isfinite(bn(torch.randn(4, 3))).all()
