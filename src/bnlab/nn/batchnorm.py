"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

The modules hold state (gamma, beta, running statistics) and the train/eval
policy; all math is in :mod:`bnlab.functional`, reached through the dispatcher
that :func:`bnlab.functional.batch_norm` uses too. Constructor arguments,
attribute names and state-dict keys are PyTorch's, so checkpoints load in
both directions.

Momentum follows PyTorch's convention:
``running = (1 - momentum) * running + momentum * batch``; ``momentum=None``
gives a cumulative average (momentum = 1 / num_batches_tracked).

The classes subclass PyTorch's (``torch.nn.modules.batchnorm._BatchNorm`` and
``torch.nn.BatchNorm1d/2d/3d``), so tools that find BN layers with
``isinstance`` (``torch.optim.swa_utils.update_bn``, ``fuse_conv_bn_eval``,
``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func.replace_all_batch_norm_modules_``,
fvcore's precise BN, timm's and detectron2's freeze helpers) treat them as BN. Every
method torch's classes define is overridden here or behaves the same on our
state: the forward, the input check, the state-dict loading are ours.
``torch.ao.quantization.fuse_modules`` matches exact types; pass it
``fuse_custom_config_dict={"additional_fuser_method_mapping": FUSER_METHOD_MAPPING}``.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization.fuser_method_mappings import (
    fuse_conv_bn,
    fuse_conv_bn_relu,
    fuse_linear_bn,
)

import bnlab.functional as BF
from bnlab.core import BatchNormShapeError

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormShapeError",
    "FUSER_METHOD_MAPPING",
]


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a torch.func transform's wrapped tensor (inside vmap, say)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _in_backward_pass() -> bool:
    """Whether this forward runs inside the autograd engine's backward pass.

    That is where ``torch.utils.checkpoint`` recomputes a checkpointed forward,
    reentrant (its Function's backward) and non-reentrant (its saved-tensor
    unpack hook) alike; torch keys its recomputations by the same graph-task
    id. A training-mode forward there is a recomputation of one that already
    updated the running statistics (PyTorch issue 96136).
    """
    if torch.compiler.is_compiling():
        return False  # compiled code does not run inside the engine's backward
    return torch._C._current_graph_task_id() != -1


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


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared state and policy of the BN modules (a subclass of PyTorch's ``_BatchNorm``).

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
        # Keywords, not positions: torch's SyncBatchNorm puts process_group before device.
        super().__init__(
            int(num_features),
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self._warned_nonfinite = False

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
            raise BatchNormShapeError(
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

    def _check_state_sizes(self) -> tuple[Tensor | None, ...]:
        """Refuse parameters or running statistics resized after construction
        (torch raises RuntimeError there; ours is a RuntimeError too).

        Returns:
            ``(weight, bias, running_mean, running_var)``, for the forward to use.
        """
        # The dicts, not getattr: nn.Module.__getattr__ costs a microsecond per name, a
        # tenth of the whole forward of the paper's (60, 100) layer.
        params, buffers = self._parameters, self._buffers
        state = (
            params.get("weight"),
            params.get("bias"),
            buffers.get("running_mean"),
            buffers.get("running_var"),
        )
        for name, t in zip(("weight", "bias", "running_mean", "running_var"), state):
            if t is not None and t.numel() != self.num_features:
                raise BatchNormShapeError(
                    f"{type(self).__name__}({self.num_features}).{name} has {t.numel()} "
                    f"elements, not num_features={self.num_features}; assign a tensor of "
                    f"{self.num_features} elements or build the module with "
                    f"num_features={t.numel()}"
                )
        return state

    def _updates_running_stats(self) -> bool:
        """Training with running statistics, and not a checkpoint's recomputation."""
        return (
            self.training
            and self.track_running_stats
            and self.running_mean is not None
            and not _in_backward_pass()
        )

    def _update_running_stats(self, mu_b: Tensor, biased_var_b: Tensor, m: int) -> None:
        """Count the batch and fold its statistics into the running ones.

        For the layers whose training forward is their own (ghost batches,
        renormalization, cross-process statistics). PyTorch's momentum convention,
        ``new = (1 - momentum) * old + momentum * batch``; ``momentum=None`` is the
        cumulative average 1 / num_batches_tracked. An empty batch (m = 0) is counted
        but changes no statistic, as in torch. Channels whose batch statistics are not
        finite (fp16 overflow, a NaN in the batch) keep their running statistics
        (:func:`bnlab.functional.update_running_stats` skips them), and the layer
        warns once, by name.
        """
        skipped = BF._count_and_update(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            mu_b,
            biased_var_b,
            m,
            self.momentum,
        )
        self._warn_once_if_skipped(mu_b, biased_var_b, skipped)

    def _warn_once_if_skipped(
        self, mu_b: Tensor, biased_var_b: Tensor, skipped: Tensor | int | None
    ) -> None:
        """Warn, once per layer, that some channels kept their running statistics.

        ``skipped`` as :func:`bnlab.functional._dispatch` returns it: the kernels'
        count, the pure path's (C,) mask, or None (nothing updated).
        """
        if skipped is None or getattr(self, "_warned_nonfinite", False):
            return
        if not isinstance(skipped, int):
            if torch.compiler.is_compiling() or _is_batched(skipped):
                return  # no data-dependent if in a traced graph or under vmap
            skipped = bool(skipped.any())  # one device-to-host sync per step until warned
        if skipped:
            self._warned_nonfinite = True
            warn_nonfinite_stats(self, mu_b, biased_var_b, stacklevel=4)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: refuse with the fix, instead of
        TorchScript's error about a missing attribute deep inside our forward (which
        runs Python dispatch and C++ kernels that TorchScript cannot compile)."""
        name = type(self).__name__
        if type(self) in (BatchNorm1d, BatchNorm2d, BatchNorm3d):
            fix = (
                "script a copy whose BN layers are torch's, with the same state: "
                "torch.jit.script(bnlab.nn.revert_batchnorm(copy.deepcopy(model)))"
            )
        elif hasattr(self, "act"):  # a fused BN + activation layer (bnlab.nn.BatchNormAct2d)
            fix = (
                "script a copy with the layers unfused and torch's BN: torch.jit.script("
                "bnlab.nn.revert_batchnorm(bnlab.nn.unfuse_batchnorm_act(copy.deepcopy(model))))"
            )
        else:
            fix = (
                f"{name} has no TorchScript form; for deployment put the model in eval mode "
                "and fold BN into the preceding layers (bnlab.fold_batchnorm), or revert it "
                "to torch's BN (bnlab.nn.revert_batchnorm) where the math allows"
            )
        raise RuntimeError(
            f"torch.jit.script cannot compile bnlab's {name}: {fix}; or record the model "
            "with torch.jit.trace or torch.export.export, which work on it as it is"
        )

    def forward(self, input: Tensor) -> Tensor:
        if torch._C._get_tracing_state() is not None and not self.training:
            # torch.jit.trace of inference BN (the pure path's ATen ops; see bnlab.backend):
            # the checks of channels and sizes read traced sizes, and the tracer warns that
            # their results are constants, as they are for a module. In training the
            # warnings stay: there the trace bakes in the batch size, as torch's BN does.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return self._forward(input)
        return self._forward(input)

    def _checked_state(self, input: Tensor) -> tuple[Tensor | None, ...]:
        """Check ``input`` and the layer's state for a forward, before any state changes.

        Returns:
            ``(weight, bias, running_mean, running_var, use_batch_stats)``; the running
            statistics None where this forward must neither read nor update them.
        """
        self._check_input_dim(input)
        weight, bias, running_mean, running_var = self._check_state_sizes()
        # Batch statistics in training, and in eval when no running ones are kept.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        # Before any state changes, as torch: one value per channel and eps <= 0 are refused
        # wherever batch statistics are taken (eval without running statistics too), a
        # negative eps everywhere (eps may be set after construction).
        BF.check_batch_norm_input(input, use_batch_stats, self.eps)
        BF.check_batch_norm_state(  # torch's dtype rule, and both running statistics or none
            input, weight, bias, running_mean, running_var, type(self).__name__
        )
        if use_batch_stats and not self._updates_running_stats():
            running_mean = running_var = None  # batch statistics only: nothing to update
        return weight, bias, running_mean, running_var, use_batch_stats

    def _forward(self, input: Tensor) -> Tensor:
        weight, bias, running_mean, running_var, use_batch_stats = self._checked_state(input)
        y, mu_b, biased_var_b, skipped = BF._dispatch(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self._buffers.get("num_batches_tracked"),
        )
        self._warn_once_if_skipped(mu_b, biased_var_b, skipped)
        return y

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
        """Load this layer's entries; every mismatch goes to ``error_msgs``.

        As in torch, mismatches are collected rather than raised, so one
        ``load_state_dict`` reports all of them (as a RuntimeError) and
        ``strict=False`` still loads the rest. torch's ``_NormBase`` handles a
        dict without ``num_batches_tracked`` (a plain dict, or a version-1
        checkpoint): the module keeps its current count.
        """
        ours = []
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            value = state_dict.get(key)
            if getattr(self, name) is None:
                continue  # an unexpected key: reported by load_state_dict itself
            if isinstance(value, Tensor) and value.numel() != self.num_features:
                ours.append(f"size mismatch for {key}:")
                error_msgs.append(
                    f"size mismatch for {key}: the state dict entry has shape "
                    f"{tuple(value.shape)} but this {type(self).__name__} has num_features="
                    f"{self.num_features}; build the module with num_features={value.numel()} "
                    "or load a matching checkpoint"
                )
        first_new = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # torch's own message for the entries already reported above would repeat them.
        error_msgs[first_new:] = [
            m for m in error_msgs[first_new:] if not m.startswith(tuple(ours))
        ]


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
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


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
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


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch Normalization over a 5-D (N, C, D, H, W) input (Algorithm 1, Section 3.2).

    Shape:
        input (N, C, D, H, W) -> output of the same shape.
    """

    _expected_dims = (5,)
    _shape_names = ("5-D (N, C, D, H, W)",)
    _hint = "BatchNorm1d for 2-D/3-D and BatchNorm2d for 4-D input"


def _qualified_name(module: nn.Module) -> str:
    """The module's name in the outermost module of the current call stack.

    A module does not know its own name; the model calling it does. Only used
    to name a layer in a (once-per-layer) warning, so walking the stack is cheap
    enough.
    """
    name = None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and owner is not module:
            for n, m in owner.named_modules():
                if m is module:
                    name = n  # keep going: an outer caller gives the fuller name
                    break
        frame = frame.f_back
    return name or type(module).__name__


def nonfinite_stats_message(name: str, mu_b: Tensor, biased_var_b: Tensor) -> str:
    """The warning for batch statistics that are not finite in some channels."""
    bad = (~(torch.isfinite(mu_b) & torch.isfinite(biased_var_b))).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return (
        f"BN layer '{name}': the batch statistics of {len(bad)} channel(s) [{shown}] are not "
        "finite (an overflow, or inf/NaN in the batch); their running statistics were left "
        "unchanged for this batch. Warned once per layer; check the input and loss scaling"
    )


def warn_nonfinite_stats(
    module: nn.Module, mu_b: Tensor, biased_var_b: Tensor, stacklevel: int = 3
) -> None:
    """Warn that ``module`` skipped the running-statistics update of some channels."""
    warnings.warn(
        nonfinite_stats_message(_qualified_name(module), mu_b, biased_var_b),
        RuntimeWarning,
        stacklevel=stacklevel,
    )


# For torch.ao.quantization.fuse_modules, which matches exact types:
#   fuse_modules(model, names, fuse_custom_config_dict={
#       "additional_fuser_method_mapping": FUSER_METHOD_MAPPING})
FUSER_METHOD_MAPPING: dict[tuple[type, ...], Any] = {
    (nn.Conv1d, BatchNorm1d): fuse_conv_bn,
    (nn.Conv1d, BatchNorm1d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv2d, BatchNorm2d): fuse_conv_bn,
    (nn.Conv2d, BatchNorm2d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Conv3d, BatchNorm3d): fuse_conv_bn,
    (nn.Conv3d, BatchNorm3d, nn.ReLU): fuse_conv_bn_relu,
    (nn.Linear, BatchNorm1d): fuse_linear_bn,
}
