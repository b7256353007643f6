"""TorchScript: ``torch.jit.trace`` records what eager runs; ``torch.jit.script`` refuses
with the fix.

Review found that a trace of a model with bnlab BN recorded only ``aten::empty_like``
(the compiled kernels' entry points bypass the dispatcher): eval under ``no_grad`` gave
outputs of 1e37 with no error, and training never updated the running statistics. Under
tracing BN now takes the pure path, whose ATen ops the tracer records.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import backend

MODES = ["torch"] if os.environ.get("BNLAB_BACKEND") == "torch" else ["compiled", "torch"]


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU (a ResNet basic block)."""

    def __init__(self, c: int, momentum: float | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bnn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = bnn.BatchNorm2d(c, momentum=momentum)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _models(momentum):
    torch.manual_seed(0)
    return {
        "conv": (
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                bnn.BatchNorm2d(4, momentum=momentum),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 6 * 6, 5),
                bnn.BatchNorm1d(5, momentum=momentum),
            ),
            (6, 3, 8, 8),
        ),
        "residual": (nn.Sequential(nn.Conv2d(3, 4, 1), Residual(4, momentum)), (6, 3, 5, 5)),
        "variants": (
            nn.Sequential(
                nn.Conv2d(3, 4, 1),
                bnn.GhostBatchNorm2d(4, virtual_batch_size=3, momentum=momentum),
                bnn.BatchRenorm2d(4, momentum=momentum or 0.1),
                bnn.SyncBatchNorm(4, momentum=momentum),  # local BN outside torch.distributed
            ),
            (6, 3, 4, 4),
        ),
        "3d": (
            nn.Sequential(nn.Conv3d(2, 3, 1), bnn.BatchNorm3d(3, momentum=momentum)),
            (4, 2, 3, 3, 3),
        ),
    }


def _randomize_state(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["conv", "residual", "variants", "3d"])
def test_traced_eval_model_equals_eager_at_every_batch_size(name, mode):
    model, shape = _models(0.1)[name]
    _randomize_state(model)
    model.eval()
    with backend.using(mode), torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)  # BN adds none in eval
            traced = torch.jit.trace(model, torch.randn(shape))
        for n in (1, 2, shape[0], 17):
            x = torch.randn(n, *shape[1:]) * 3 + 1
            err = (traced(x) - model(x)).abs().max().item()
            assert err < 1e-5, f"{name}: traced vs eager, batch {n}: {err}"
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" not in graph  # bnlab's own math, not torch's kernel
    assert "aten::rsqrt" in graph or "aten::sqrt" in graph


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", ["conv", "residual", "variants", "3d"])
def test_traced_train_model_equals_eager_and_updates_running_stats(name, momentum, mode):
    """Outputs, input gradients and every buffer over 3 calls of the trace and of eager."""
    eager, shape = _models(momentum)[name]
    eager.train()
    traced_src = copy.deepcopy(eager)
    with backend.using(mode):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the batch size is baked in
            traced = torch.jit.trace(traced_src, torch.randn(shape), check_trace=False)
        traced_src.load_state_dict(eager.state_dict())  # undo the trace's own forward
        before = {k: v.clone() for k, v in eager.state_dict().items()}
        for step in range(3):
            x = torch.randn(shape) * 2 + 1
            xe, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye, yt = eager(xe), traced(xt)
            g = torch.randn_like(ye)
            ye.backward(g)
            yt.backward(g)
            assert (ye - yt).abs().max().item() < 1e-5, f"{name} step {step}: outputs"
            assert (xe.grad - xt.grad).abs().max().item() < 1e-4, f"{name} step {step}: dx"
    state_e, state_t = eager.state_dict(), traced.state_dict()
    for key, value in state_e.items():
        assert torch.allclose(value, state_t[key], atol=1e-6), key
        if "running_mean" in key:
            assert not torch.equal(value, before[key]), f"{key} never updated"
        if "num_batches_tracked" in key:
            assert value.item() >= 3  # ghost BN counts each ghost batch


def test_script_refuses_with_the_fix_and_the_fix_scripts():
    model, shape = _models(0.1)["conv"]
    _randomize_state(model)
    model.eval()
    with pytest.raises(RuntimeError, match=r"revert_batchnorm\(copy.deepcopy\(model\)\)"):
        torch.jit.script(model)
    assert isinstance(model[1], bnn.BatchNorm2d)  # the refusal changed nothing
    scripted = torch.jit.script(bnn.revert_batchnorm(copy.deepcopy(model)))
    x = torch.randn(shape)
    with torch.no_grad():
        assert (scripted(x) - model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "module",
    [bnn.GhostBatchNorm2d(4, virtual_batch_size=2), bnn.BatchRenorm2d(4)],
    ids=lambda m: type(m).__name__,
)
def test_script_of_modules_without_a_torch_twin_names_the_alternatives(module):
    with pytest.raises(RuntimeError, match="fold_batchnorm"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), module))
