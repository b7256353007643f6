"""The kernels batch normalization runs on, and when they apply.

:func:`train_forward` and :func:`backward` have the signatures of
:func:`bnlab.core.batch_norm_train_forward` and :func:`bnlab.core.batch_norm_backward`;
:func:`eval_forward` is inference BN (Algorithm 2, step 11) and :func:`train_step` a
module's whole training forward (with the running-statistics update and a C++ autograd
node) in one call. The autograd layer (:mod:`bnlab.autograd`, re-exported by
:mod:`bnlab.functional`) calls them first. They return their result from

* CPU tensors: the C++ kernels of ``bn_cpu.cpp`` (custom ops ``torch.ops.bnlab.*``);
* CUDA tensors: torch's own fused kernels (:mod:`bnlab.backend.native`);

or ``None`` where neither applies and the pure-PyTorch path of :mod:`bnlab.core` must run:

* ``BNLAB_BACKEND=torch``; devices other than CPU and CUDA;
* dtypes other than float32, float64, float16, bfloat16; empty inputs;
* functorch-transformed tensors (vmap, jvp, grad) and forward-mode dual tensors,
  which need the autograd.Function's own vmap/jvp rules;
* autograd recording (``requires_grad`` input with grad mode on: double backward),
  because the custom ops have no derivative of their own (``train_step`` records
  its own node and is the exception);
* ``torch.jit.trace``: the trace must record ATen ops, which the pure path is made of.
* ``torch.export`` (and ``torch.onnx.export``): the graph must hold portable ATen ops.

``BNLAB_BACKEND`` (read once per process) selects the path: ``compiled`` (an error,
naming the cause, when the kernels cannot be built), ``torch`` (never build), or
unset/``auto`` (build on first use; where that fails, one warning and the pure-PyTorch
path). :func:`set_backend` and the context manager :func:`using` change it at run time.

Numerics of the kernels: one statistics pass over values shifted by a sample of
their channel, block sums in float32 (float64 for float64 input) added in float64;
float16/bfloat16 accumulate in float32 (``core.compute_dtype``).
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch._C import _functorch
from torch._prims_common import suggest_memory_format
from torch.autograd import forward_ad

from bnlab.backend import build, native
from bnlab.core import ACTIVATIONS, compute_dtype

__all__ = [
    "BackendUnavailableError",
    "act_backward",
    "act_train_forward",
    "backward",
    "describe",
    "describe_without_loading",
    "batch_stats",
    "eval_forward",
    "grad_sums",
    "input_grad",
    "is_available",
    "mode",
    "set_backend",
    "train_forward",
    "train_step",
    "using",
]

MODES = ("auto", "compiled", "torch")
SUPPORTED_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})


class BackendUnavailableError(RuntimeError):
    """``BNLAB_BACKEND=compiled`` was asked for but the kernels cannot be built or loaded."""


class _State:
    """What the loader found out, once per process."""

    lock = threading.Lock()
    tried = False
    loaded = False
    error: str | None = None
    library: Path | None = None
    module = None  # the library as a Python module (pybind11 entry points)
    build_seconds = 0.0
    warned = False
    mode: str | None = None  # None: not yet read from BNLAB_BACKEND


_state = _State()


def mode() -> str:
    """The path asked for: ``auto``, ``compiled`` or ``torch``.

    :func:`set_backend` decides; until it is called, ``BNLAB_BACKEND`` (read once per
    process: reading the environment costs a microsecond, a tenth of a small BN call).

    Raises:
        ValueError: an unknown value.
    """
    if _state.mode is None:
        set_backend(os.environ.get("BNLAB_BACKEND"))
    return _state.mode


def set_backend(value: str | None) -> None:
    """Force a path for this process: ``"compiled"``, ``"torch"`` or ``"auto"``;
    None re-reads ``BNLAB_BACKEND`` (unset means ``auto``).

    Raises:
        ValueError: an unknown value.
    """
    if value is None:
        value = os.environ.get("BNLAB_BACKEND", "auto")
    value = value.strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"BNLAB_BACKEND={value!r} is not one of {', '.join(MODES)}; "
            "unset it for the default (compiled where it builds, else pure PyTorch)"
        )
    _state.mode = value


@contextmanager
def using(value: str | None):
    """``with backend.using("torch"):`` runs the block on that path and restores the
    previous choice afterwards (also on errors)."""
    old = _state.mode
    set_backend(value)
    try:
        yield
    finally:
        _state.mode = old


def _load() -> bool:
    """Build/load the kernels once per process; True when ``torch.ops.bnlab`` has them."""
    if _state.tried:
        return _state.loaded
    with _state.lock:
        if not _state.tried:
            try:
                _state.library, _state.build_seconds, _state.module = build.build_and_load()
                _register_fakes()
                _state.loaded = True
            except Exception as e:  # noqa: BLE001 - any build failure means: fall back
                # build.BuildError's message is one line naming the cause.
                lines = [line for line in str(e).strip().splitlines() if line.strip()]
                _state.error = f"{type(e).__name__}: {lines[-1] if lines else repr(e)}"
            _state.tried = True
    return _state.loaded


def is_available() -> bool:
    """Whether the compiled kernels are (or can be) loaded; builds them on first call."""
    return _load()


def _compiled_ready() -> bool:
    """Whether to use the kernels at all; warns once or raises per ``BNLAB_BACKEND``."""
    wanted = mode()
    if wanted == "torch":
        return False
    if torch._C._get_tracing_state() is not None:
        # torch.jit.trace records dispatcher ops only; the kernels' Python entry points
        # bypass it, so a trace would hold an empty_like and return uninitialised memory
        # (and never update running statistics). The pure path's ATen ops are recorded.
        return False
    if torch.compiler.is_exporting():
        # torch.export (and torch.onnx.export, which runs it) must leave a portable graph:
        # the pure path's ATen ops, which ONNX and an ExportedProgram loaded without
        # bnlab both run. The kernels' custom ops (bnlab::bn_eval, ...) would be kept as
        # they are, so an export under no_grad, or of a model without trainable
        # parameters, could not be converted to ONNX ("No ONNX function found").
        return False
    if not _state.tried and torch.compiler.is_compiling():
        # No build inside a trace: this graph keeps the pure path. Calling
        # is_available() (or any eager BN call) before torch.compile avoids that.
        return False
    if _load():
        return True
    if wanted == "compiled":
        raise BackendUnavailableError(
            f"BNLAB_BACKEND=compiled but bnlab's C++ kernels could not be built or loaded "
            f"({_state.error}). Install a C++ compiler (g++) and ninja (`pip install ninja`), "
            f"or unset BNLAB_BACKEND to fall back to the pure-PyTorch path"
        )
    if not _state.warned:
        _state.warned = True
        warnings.warn(
            f"bnlab: the compiled CPU backend is unavailable ({_state.error}); using the "
            "pure-PyTorch path (correct, slower). Install a C++ compiler (g++) to enable it, "
            "or set BNLAB_BACKEND=torch to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def _plain(tensors: tuple[Tensor | None, ...]) -> bool:
    """Tensors a kernel may take: not functorch-wrapped (vmap, grad, jvp), without a
    forward-AD tangent. Cheap when no transform is active."""
    if torch.compiler.is_compiling():
        return True  # traced with fake tensors; the ops' fake kernels apply
    if _functorch.maybe_current_level() is not None and any(  # a transform is active
        t is not None and _functorch.is_functorch_wrapped_tensor(t) for t in tensors
    ):
        return False
    if forward_ad._current_level >= 0 and any(  # a dual level is entered
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return False
    return True


def _plain_cpu(tensors: tuple[Tensor | None, ...]) -> bool:
    """Plain tensors (see :func:`_plain`), all on the CPU."""
    return all(t is None or t.is_cpu for t in tensors) and _plain(tensors)


def _records_grad(tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether autograd records ops on these tensors (the kernels' ops have no derivative)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _route(x: Tensor, *others: Tensor | None) -> str | None:
    """Which kernels take this call: ``"compiled"`` (ours, CPU), ``"native"`` (torch's
    fused kernels, CUDA) or None (the pure-PyTorch path of :mod:`bnlab.core`)."""
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 2 or x.numel() == 0:
        return None
    tensors = (x, *others)
    if _records_grad(tensors):
        return None  # recording autograd (double backward): the differentiable pure path
    if x.is_cpu:
        return "compiled" if _plain_cpu(tensors) and _compiled_ready() else None
    if x.is_cuda and mode() != "torch" and _plain(tensors):
        if all(t is None or t.device == x.device for t in others):
            return "native"
    return None


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Training-mode forward (Algorithm 1) by the kernels, or None where none apply.

    Returns:
        ``(y, mu_b, biased_var_b)`` as :func:`bnlab.core.batch_norm_train_forward`,
        or None.
    """
    route = _route(x, weight, bias)
    if route == "native":
        return native.train_forward(x, weight, bias, eps)
    if route is None:
        return None
    return torch.ops.bnlab.bn_train_fwd(x, weight, bias, float(eps))


def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """The closed-form backward of Section 3 by the kernels, or None where they do not apply.

    Returns:
        ``(grad_x, grad_weight, grad_bias)`` as :func:`bnlab.core.batch_norm_backward`,
        or None.
    """
    route = None if grad_y.shape != x.shape else _route(x, grad_y, weight, mu_b, inv_std)
    if route == "native":
        return native.backward(grad_y, x, weight, mu_b, inv_std, needs_input_grad)
    if route is None:
        return None
    need_x, need_w, need_b = needs_input_grad
    grad_x, sum_dy_xhat, sum_dy = torch.ops.bnlab.bn_bwd(grad_y, x, weight, mu_b, inv_std, need_x)
    grad_w = sum_dy_xhat.to(weight.dtype) if need_w and weight is not None else None
    grad_b = None
    if need_b:
        grad_b = sum_dy.to(weight.dtype if weight is not None else grad_y.dtype)
    return (grad_x if need_x else None), grad_w, grad_b


def train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """A BN layer's whole training forward in one compiled call, or None where it does not apply.

    The op ``torch.ops.bnlab.bn_train`` (called here through the extension module's
    ``train_step``, which skips the dispatcher's boxing: a microsecond per call) runs
    Algorithm 1, records a C++ autograd node (its backward is the ``bn_bwd`` kernel; a
    differentiable re-derivation for double backward and batched gradients), increments
    ``num_batches_tracked`` and updates the running statistics in place as
    :func:`bnlab.core.update_running_stats` does
    (``momentum`` None: the cumulative average ``1 / num_batches_tracked``). Pass None
    buffers for a forward that must not update them.

    It applies where :func:`train_forward` does, with autograd recording allowed, but
    not while ``torch.compile`` traces (the Python path is what it traces).

    Returns:
        ``(y, mu_b, biased_var_b, n_skipped)``: n_skipped counts the channels whose
        running statistics were left unchanged because their batch statistics were not
        finite.
    """
    if not x.is_cpu or torch.compiler.is_compiling() or not _compiled_ready():
        return None
    if not _plain((x, weight, bias, running_mean, running_var, num_batches_tracked)):
        return None
    # The C++ side checks dtypes, sizes, devices and buffer layouts (None if unsuitable).
    return _state.module.train_step(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, float(eps)
    )


# The activation ids of bn_cpu.cpp's enum Act: bnlab.core.ACTIVATIONS, in order.
_ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def act_train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Training-mode BN followed by ``activation``, fused (one statistics pass and one
    output pass that applies the activation), by the CPU kernels; None where they do not
    apply (the caller composes :mod:`bnlab.core`'s BN and activation then).

    Returns:
        ``(y, mu_b, biased_var_b)``, y = f(BN(x)).
    """
    if _route(x, weight, bias) != "compiled":
        return None
    return torch.ops.bnlab.bn_act_train_fwd(
        x, weight, bias, float(eps), _ACT_IDS[activation], float(negative_slope)
    )


def act_backward(
    grad_y: Tensor,
    saved: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    activation: str,
    negative_slope: float,
    from_output: bool,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
    """The backward of y = f(BN(x)) by the CPU kernels, as
    :func:`bnlab.core.batch_norm_act_backward` computes it (``saved`` is x, or y when
    ``from_output``), or None where they do not apply.

    Returns:
        ``(grad_x, grad_weight, grad_bias)``; entries not needed are None.
    """
    if grad_y.shape != saved.shape:
        return None
    if _route(saved, grad_y, weight, bias, mu_b, inv_std) != "compiled":
        return None
    need_x, need_w, need_b = needs_input_grad
    grad_x, sum_dz_xhat, sum_dz = torch.ops.bnlab.bn_act_bwd(
        grad_y,
        saved,
        weight,
        bias,
        mu_b,
        inv_std,
        _ACT_IDS[activation],
        float(negative_slope),
        bool(from_output),
        need_x,
    )
    grad_w = sum_dz_xhat.to(weight.dtype) if need_w and weight is not None else None
    grad_b = None
    if need_b and bias is not None:
        grad_b = sum_dz.to(bias.dtype)
    return (grad_x if need_x else None), grad_w, grad_b


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """Inference BN (Algorithm 2, step 11) by the kernels, or None where they do not apply.

    Only where no gradient is needed (``torch.no_grad``, inference, or no input that
    requires grad): the op has no derivative, and the Python path's is exact.
    """
    if x.is_cpu and not torch.compiler.is_compiling():  # the fast entry (no boxing)
        tensors = (x, running_mean, running_var, weight, bias)
        if _records_grad(tensors) or not _compiled_ready() or not _plain(tensors):
            return None
        # The C++ side checks dtypes, sizes and devices (None if unsuitable).
        return _state.module.eval_forward(x, weight, bias, running_mean, running_var, float(eps))
    route = _route(x, running_mean, running_var, weight, bias)
    if route == "native":
        return native.eval_forward(x, running_mean, running_var, weight, bias, eps)
    if route is None:
        return None
    return torch.ops.bnlab.bn_eval(x, weight, bias, running_mean, running_var, float(eps))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(mu_b, biased_var_b)`` of ``x`` by the kernels (CPU), or None."""
    if _route(x) != "compiled":
        return None
    return torch.ops.bnlab.bn_stats(x)


def grad_sums(grad_y: Tensor, x: Tensor, mu_b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(sum_dy, sum_dy_xmu)`` per channel by the kernels (CPU), or None.

    ``bn_bwd``'s reduction pass alone (``need_x`` false), with inv_std = 1 so that its
    ``sum dy * (x - mu) * inv_std`` is ``sum_dy_xmu``.
    """
    if grad_y.shape != x.shape or _route(x, grad_y, mu_b) != "compiled":
        return None
    ones = torch.ones_like(mu_b)
    _, sum_dy_xmu, sum_dy = torch.ops.bnlab.bn_bwd(grad_y, x, None, mu_b, ones, False)
    return sum_dy, sum_dy_xmu


def input_grad(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mu_b: Tensor,
    inv_std: Tensor,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    m: int,
) -> Tensor | None:
    """dl/dx from sums reduced elsewhere (over ``m`` values) by the kernels (CPU), or None."""
    tensors = (grad_y, weight, mu_b, inv_std, sum_dy, sum_dy_xmu)
    if grad_y.shape != x.shape or m < 1 or _route(x, *tensors) != "compiled":
        return None
    return torch.ops.bnlab.bn_input_grad(
        grad_y, x, weight, mu_b, inv_std, sum_dy, sum_dy_xmu, int(m)
    )


def describe_without_loading() -> str:
    """Which CPU kernels this process would use, without building or loading them
    (for ``bnlab --version``): prebuilt, cached, built on first use, or none."""
    wanted = mode()
    if wanted == "torch":
        return "torch (pure PyTorch; BNLAB_BACKEND=torch)"
    if _state.tried:
        return describe("cpu")
    lib, reason = build.prebuilt_library()
    if lib is not None:
        return f"compiled (prebuilt in the installed package: {lib})"
    cached = build.cache_root() / build.library_name(build.compile_flags())
    if (cached / f"{cached.name}.so").exists():
        return f"compiled (cached: {cached / cached.name}.so; {reason})"
    return f"compiled on first use (a C++ compiler builds it, about 25 s; {reason})"


def describe(device: str = "cpu") -> str:
    """One line naming the kernels BN runs on for tensors on ``device`` in this process."""
    wanted = mode()
    if wanted == "torch":
        return "torch (pure PyTorch; BNLAB_BACKEND=torch)"
    if torch.device(device).type == "cuda":
        return "native (torch's fused CUDA kernels: native_batch_norm and its backward)"
    if torch.device(device).type != "cpu":
        return f"torch (pure PyTorch: no kernels for {device})"
    if _load():
        if _state.library is not None and _state.library.parent == build.PREBUILT_INFO.parent:
            how = "prebuilt in the installed package"
        elif _state.build_seconds:
            how = f"built in {_state.build_seconds:.1f} s"
        else:
            how = "loaded from cache"
        return f"compiled (bnlab C++ CPU kernels, {how}: {_state.library})"
    return f"torch (pure PyTorch; compiled backend unavailable: {_state.error})"


# --------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, so torch.compile can trace the ops
# --------------------------------------------------------------------------


def _kernel_output(x: Tensor) -> Tensor:
    """An empty tensor laid out as the kernels lay out an output like ``x``
    (``as_supported_layout`` in bn_cpu.cpp: x's own layout when it is contiguous or
    dense channels_last, else a copy in its suggested memory format)."""
    if x.is_contiguous() or (
        x.dim() in (4, 5)
        and x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    ):
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def _fake_train_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    acc = compute_dtype(x.dtype)
    c = x.shape[1]
    return _kernel_output(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_bwd(grad_y, x, weight, mean, inv_std, need_x: bool):
    acc = compute_dtype(x.dtype)
    c = x.shape[1]
    grad_x = _kernel_output(x) if need_x else x.new_empty((0,))
    return grad_x, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_eval(x, weight, bias, running_mean, running_var, eps: float):
    return _kernel_output(x)


def _fake_stats(x):
    acc = compute_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


def _fake_input_grad(grad_y, x, weight, mean, inv_std, sum_dy, sum_dy_xmu, m: int):
    return _kernel_output(x)


def _fake_act_train_fwd(x, weight, bias, eps: float, act: int, slope: float):
    return _fake_train_fwd(x, weight, bias, eps)


def _fake_act_bwd(grad_y, saved, weight, bias, mean, inv_std, act, slope, from_output, need_x):
    return _fake_bwd(grad_y, saved, weight, mean, inv_std, need_x)


def _register_fakes() -> None:
    torch.library.register_fake("bnlab::bn_act_train_fwd")(_fake_act_train_fwd)
    torch.library.register_fake("bnlab::bn_act_bwd")(_fake_act_bwd)
    torch.library.register_fake("bnlab::bn_train_fwd")(_fake_train_fwd)
    torch.library.register_fake("bnlab::bn_bwd")(_fake_bwd)
    torch.library.register_fake("bnlab::bn_eval")(_fake_eval)
    torch.library.register_fake("bnlab::bn_stats")(_fake_stats)
    torch.library.register_fake("bnlab::bn_input_grad")(_fake_input_grad)
