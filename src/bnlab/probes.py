"""Probes of internal covariate shift, loss-landscape smoothness and layer Jacobians.

The paper explains BN's speed-up by a reduction of internal covariate shift (ICS)
but never measures it. These probes measure it on any
model, in three ways, cheaply enough to run every few hundred training steps,
and test one more of the paper's conjectures:

* :func:`activation_snapshot` and :func:`distribution_shift`: the
  distributional shift of each BN layer's input (or, without BN, each
  nonlinearity's input) between two evaluation points, on a fixed probe batch:
  per-unit drift of the mean and of the variance, 1-D Wasserstein-1 distance,
  and the KL divergence of Gaussian fits.
* :func:`gradient_ics`: gradient-based ICS exactly as Santurkar et al. ("How Does
  Batch Normalization Help Optimization?", 2018) define it: ||G - G'||_2 and
  cos(G, G') per layer.
* :func:`smoothness`: the loss range, gradient predictiveness and effective
  beta-smoothness along the gradient (Santurkar et al. 2018).
* :func:`jacobian_singular_values` (and :func:`compute_layer_jacobians`): the
  singular values of the per-example Jacobians between consecutive BN inputs
  (or nonlinearity inputs), in the normalized coordinates of Section 3.3's
  conjecture that BN keeps them close to 1 (Ioffe & Szegedy 2015, Section 3.3).

None of them changes the model, its optimizer or the random state: they run the
model with ``torch.func.functional_call`` on detached parameters and cloned
buffers (so BN's running statistics and ``num_batches_tracked`` stay as they
were), take the optimizer's step on a deep copy of the optimizer, and restore
the CPU (and the model's CUDA devices') RNG state. Training with probes is
therefore bit-identical to training without them.

Seed-batched models (:mod:`bnlab.models.mlp`, :mod:`bnlab.models.inception`)
hold S independent copies in one module; every probe takes ``copies=S`` and
reports one value per copy. Copy k owns block k of every parameter's dim 0
(SeedBatchedLinear's (S, out, in) weight, a grouped convolution's (S * C_out,
...) weight, BN's (S * C,) gamma) and block k of every activation's dim 1
((N, S * C) or (N, S * C, H, W)).

Every result is JSON-friendly: a dict of lists of Python floats, one per copy
(:func:`compute_layer_jacobians`, the tensors behind one of them, excepted).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.graph import NONLINEAR_MODULES, is_batchnorm

__all__ = [
    "UnitStats",
    "activation_snapshot",
    "compute_layer_jacobians",
    "compute_unit_stats",
    "distribution_shift",
    "gaussian_kl",
    "gradient_ics",
    "ics_layers",
    "jacobian_singular_values",
    "probe_fingerprint",
    "smoothness",
    "unit_shift",
    "wasserstein_1d",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
LayerSpec = Sequence["str | type[nn.Module]"]

DEFAULT_QUANTILES = 1024
DEFAULT_FACTORS = (0.5, 1.0, 2.0, 3.0, 4.0)


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def _check_copies(copies: int) -> None:
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int (the model's S), got {copies!r}")


def _per_copy(t: Tensor, copies: int, what: str, dim: int = 0) -> Tensor:
    """(copies, -1): row k is copy k's block of ``t`` along ``dim``."""
    if t.dim() <= dim or t.shape[dim] % copies:
        raise ValueError(
            f"{what} has shape {tuple(t.shape)}: its dim {dim} is not a multiple of "
            f"copies={copies}, so it cannot be split into one block per copy; pass the "
            "model's number of seed-batched copies (1 for an ordinary model)"
        )
    if dim:
        t = t.movedim(dim, 0)
    return t.reshape(copies, -1)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


@contextlib.contextmanager
def _pinned_rng(devices: list[int]) -> Iterator[Callable[[], None]]:
    """Yield ``reset()``, which puts the RNG back to its state at entry; restore it on exit.

    Every forward of a probe starts from the same random state, which is the one
    the training step itself will start from: a dropout mask is the same for G
    and G' (and for the step that follows the probe).
    """
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)

        yield reset


def _forward(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x):
    """The model at ``params``; its buffers are cloned, so BN's running statistics and
    ``num_batches_tracked`` are updated on the clones, never on the model."""
    state = {**params, **{n: b.clone() for n, b in buffers.items()}}
    return functional_call(model, state, (x,))


def _loss_per_copy(value: Tensor, copies: int, need_per_copy: bool) -> Tensor:
    """loss_fn's value as a (copies,) tensor (or a (1,) total)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(value).__name__}")
    if value.numel() == copies:
        return value.reshape(copies)
    if value.numel() == 1 and not need_per_copy:
        return value.reshape(1)
    raise ValueError(
        f"loss_fn returned shape {tuple(value.shape)}; "
        + (
            f"smoothness needs one loss per copy, a ({copies},) tensor"
            if need_per_copy
            else f"expected a scalar (the sum over copies) or a ({copies},) tensor"
        )
    )


def _check_batch(batch: object, probe: str) -> None:
    """Refuse a ``batch`` that is not an ``(x, y)`` pair, before any work is done."""
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"a tensor of shape {tuple(batch.shape)}"
            if isinstance(batch, Tensor)
            else f"a {type(batch).__name__}"
            + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        )
        raise TypeError(
            f"{probe}: batch must be the pair (x, y) the loss is computed on, got {got}; "
            "pass e.g. batch=(x, y) with the step's inputs and targets"
        )


def _check_optimizer_holds(optimizer: object, params: dict[str, Tensor], probe: str) -> None:
    """Refuse an optimizer that steps none of the model's trainable parameters.

    Its step would move nothing, so every layer would report "no shift" (l2 0,
    cos 1) whatever the model does.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{probe}: optimizer must be a torch.optim.Optimizer (the one training steps "
            f"with), got {type(optimizer).__name__}"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [n for n, p in params.items() if p.requires_grad]
    if trainable and not any(id(params[n]) in held for n in trainable):
        raise ValueError(
            f"{probe}: the optimizer holds none of the model's {len(trainable)} trainable "
            f"parameters (e.g. {trainable[0]!r}), so its step would move nothing and every "
            "layer would report no shift; pass the optimizer built on this model's "
            "parameters (e.g. torch.optim.SGD(model.parameters(), lr=...))"
        )


def _gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    wrt: Sequence[str],
    copies: int,
    need_per_copy: bool = False,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Per-copy losses and the gradient of their sum w.r.t. ``wrt`` at ``params``.

    A parameter the loss does not depend on gets None, as ``backward()`` leaves it.
    """
    x, y = batch
    wanted = set(wrt)
    leaves = {n: p.detach().requires_grad_(n in wanted) for n, p in params.items()}
    with torch.enable_grad():
        losses = _loss_per_copy(
            loss_fn(_forward(model, leaves, buffers, x), y), copies, need_per_copy
        )
        inputs = [leaves[n] for n in wrt]
        grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if inputs else ()
    return losses.detach(), dict(zip(wrt, grads))


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


@contextlib.contextmanager
def _recording_call_order(model: nn.Module) -> Iterator[dict[str, int]]:
    """Yield ``{module name: rank}``, filled in the order modules are first called.

    The execution order, not the registration order: :func:`bnlab.insert_batchnorm`
    registers the BN modules it adds to a torch.fx graph after every other module,
    though each runs right after its layer.
    """
    order: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in model.named_modules()]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------
# 1. Distributional shift of layer inputs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitStats:
    """One layer's input on the probe batch, per unit (a feature, or a channel).

    Units are dim 1 of the input; a unit's samples are its values over the batch
    (and over positions for (N, C, ...) inputs, the samples BN normalizes over,
    Section 3.2).

    Attributes:
        mean: (C,) float64, the per-unit mean, BN's mu_B (Algorithm 1).
        biased_var: (C,) float64, the per-unit variance dividing by ``count``
            (BN's sigma_B^2).
        quantiles: (C, Q) float64, the inverse empirical CDF at the midpoints
            (j + 1/2) / Q, j = 0..Q-1: the sorted samples themselves when
            Q = ``count`` (every sample kept), a Q-point discretization otherwise.
        count: samples per unit (N, or N times the positions).
        copies: seed-batched copies; copy k owns units [k C/S, (k+1) C/S).
        probe: a fingerprint of the probe batch the model ran on (set by
            :func:`activation_snapshot`; None for :func:`compute_unit_stats`), so
            that snapshots of different probe batches are not compared.
    """

    mean: Tensor
    biased_var: Tensor
    quantiles: Tensor
    count: int
    copies: int
    probe: str | None = None


def probe_fingerprint(x: Tensor) -> str:
    """A SHA-256 of a probe batch's shape, dtype and values (equal batches, equal prints)."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_unit_stats(x: Tensor, copies: int = 1, quantiles: int = DEFAULT_QUANTILES) -> UnitStats:
    """Per-unit statistics of one activation tensor (units on dim 1).

    Args:
        x: (N, C) or (N, C, *positions).
        copies: S; C must be a multiple of it.
        quantiles: Q, at most this many quantiles per unit (all samples if fewer).

    Returns:
        :class:`UnitStats`, float64.
    """
    _check_copies(copies)
    if x.dim() < 2:
        raise ValueError(f"expected an activation of shape (N, C, ...), got {tuple(x.shape)}")
    c = x.shape[1]
    _per_copy(x[:1], copies, "the activation", dim=1)
    v = x.detach().movedim(1, 0).reshape(c, -1).double()  # (C, N * positions)
    m = v.shape[1]
    if m == 0:
        raise ValueError("the probe batch is empty")
    q = min(m, int(quantiles))
    if q < 1:
        raise ValueError(f"quantiles must be at least 1, got {quantiles!r}")
    # Inverse empirical CDF at p_j = (j + 1/2) / q: sorted[ceil(p_j m) - 1], in integers.
    j = torch.arange(q, device=v.device)
    idx = ((2 * j + 1) * m + 2 * q - 1) // (2 * q) - 1
    srt = v.sort(dim=1).values
    return UnitStats(
        mean=v.mean(1),
        biased_var=v.var(1, correction=0),
        quantiles=srt[:, idx],
        count=m,
        copies=copies,
    )


def _snapshot_modules(model: nn.Module, layers: LayerSpec | None) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if layers is None:
        chosen = [(n, m) for n, m in named if is_batchnorm(m)]
        if not chosen:
            chosen = [(n, m) for n, m in named if isinstance(m, NONLINEAR_MODULES)]
        if not chosen:
            raise ValueError(
                "the model has no BN module and no nonlinearity module (nn.Sigmoid, nn.ReLU, "
                "...); pass layers= (module names or module types) to choose the inputs to probe"
            )
        return chosen
    modules = dict(named)
    chosen = []
    for spec in layers:
        if isinstance(spec, str):
            if spec not in modules:
                raise ValueError(f"layers: the model has no module named {spec!r}")
            chosen.append((spec, modules[spec]))
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            chosen.extend((n, m) for n, m in named if isinstance(m, spec))
        else:
            raise TypeError(f"layers entries are module names or nn.Module types, got {spec!r}")
    seen: set[str] = set()
    chosen = [(n, m) for n, m in chosen if not (n in seen or seen.add(n))]
    if not chosen:
        raise ValueError(f"layers={list(layers)!r} selects no module of the model")
    return chosen


def activation_snapshot(
    model: nn.Module,
    x: Tensor,
    layers: LayerSpec | None = None,
    copies: int = 1,
    *,
    training: bool = True,
    quantiles: int = DEFAULT_QUANTILES,
    seed: int | None = 0,
) -> dict[str, UnitStats]:
    """The input distribution of chosen layers on a fixed probe batch.

    The model runs once on ``x`` "as in training" (``training=True``: BN uses the
    probe batch's statistics, dropout is active with the RNG seeded by ``seed``, so
    successive snapshots see the same masks), and a forward pre-hook records each
    chosen module's input. Nothing changes: modes are restored, BN's running
    statistics are updated on clones, the RNG state is restored.

    Args:
        model: any module called as ``model(x)``.
        x: the probe batch; keep it fixed across snapshots. For a seed-batched
            model, (N, in) is shared by every copy.
        layers: module names, or module types (every module of that type), whose
            input is recorded. Default: every BN module (torch's or bnlab's); in a
            network without BN, every nonlinearity module (nn.Sigmoid, nn.ReLU, ...,
            ``bnlab.graph.NONLINEAR_MODULES``).
        copies: S of a seed-batched model.
        training: run in training mode (the default) or in eval mode.
        quantiles: at most this many quantiles per unit are kept (all samples
            when a unit has fewer), which bounds memory (C * Q * 8 bytes per layer)
            and makes :func:`wasserstein_1d` exact for small probe batches.
        seed: seeds the RNG for the probe's forward (None: the current state).

    Returns:
        ``{name: UnitStats}`` in call order. A module called k > 1 times records
        its later calls as ``"name:1"``, ``"name:2"``, ...

    Example:
        >>> before = activation_snapshot(model, x_probe, copies=3)
        >>> ...  # train a few hundred steps
        >>> shift = distribution_shift(before, activation_snapshot(model, x_probe, copies=3))
    """
    _check_copies(copies)
    targets = _snapshot_modules(model, layers)
    captured: dict[str, UnitStats] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            key = name if k == 0 else f"{name}:{k}"
            try:
                captured[key] = compute_unit_stats(args[0], copies, quantiles)
            except ValueError as e:
                raise ValueError(f"activation_snapshot: input of {name!r}: {e}") from None

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets]
    devices = _cuda_devices(model)
    try:
        model.train(training)
        with torch.no_grad(), _pinned_rng(devices):
            if seed is not None:
                torch.random.default_generator.manual_seed(int(seed))
                for d in devices:
                    with torch.cuda.device(d):
                        torch.cuda.manual_seed(int(seed))
            _forward(model, {}, dict(model.named_buffers()), x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    missing = [n for n, _ in targets if n not in calls]
    if missing:
        raise ValueError(f"activation_snapshot: these modules were not called: {missing}")
    if isinstance(x, Tensor):
        probe = probe_fingerprint(x)
        captured = {k: replace(v, probe=probe) for k, v in captured.items()}
    return captured


def wasserstein_1d(qa: Tensor, qb: Tensor) -> Tensor:
    """Per-unit 1-D Wasserstein-1 distance between two quantile tables.

    W1(P, Q) = integral over p in (0, 1) of |F_P^-1(p) - F_Q^-1(p)| dp. Each row of
    ``qa`` (Qa midpoint quantiles, see :class:`UnitStats`) is read as the step
    quantile function equal to ``qa[:, j]`` on [j / Qa, (j + 1) / Qa); the integral
    of the two step functions is exact, so for tables that keep every sample it is
    the exact W1 of the two empirical distributions (mean |sorted_a - sorted_b|
    for equal sample counts).

    Args:
        qa: (C, Qa); qb: (C, Qb).

    Returns:
        (C,) float64.
    """
    if qa.dim() != 2 or qb.dim() != 2 or qa.shape[0] != qb.shape[0]:
        raise ValueError(
            f"need (C, Qa) and (C, Qb) tables, got {tuple(qa.shape)}, {tuple(qb.shape)}"
        )
    na, nb = qa.shape[1], qb.shape[1]
    if na == nb:
        return (qa.double() - qb.double()).abs().mean(1)
    # Breakpoints j / na and k / nb, in units of 1 / (na nb), merged exactly.
    dev = qa.device
    ticks = torch.cat(
        [torch.arange(na + 1, device=dev) * nb, torch.arange(nb + 1, device=dev) * na]
    )
    ticks = torch.unique(ticks)  # sorted
    lo, hi = ticks[:-1], ticks[1:]
    width = (hi - lo).double() / (na * nb)
    ia = (lo + hi) // (2 * nb)  # floor(na * midpoint)
    ib = (lo + hi) // (2 * na)
    return ((qa[:, ia].double() - qb[:, ib].double()).abs() * width).sum(1)


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)), elementwise, closed form:

    1/2 * (log(var_q / var_p) + (var_p + (mean_p - mean_q)^2) / var_q - 1)
    """
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)


def unit_shift(prev: UnitStats, cur: UnitStats, eps: float = 1e-8) -> dict[str, Tensor]:
    """Per-unit shift of one layer's input between two snapshots.

    Args:
        prev, cur: the same layer's :class:`UnitStats` at two evaluation points.
        eps: added to both variances in the KL divergence, so that a constant
            unit gives a finite value (as BN's eps, Algorithm 1); 0 for the exact
            closed form.

    Returns:
        (C,) float64 tensors: ``mean_drift`` |mu_cur - mu_prev|, ``var_drift``
        |var_cur - var_prev| (biased variances), ``wasserstein`` W1(prev, cur)
        (:func:`wasserstein_1d`), ``kl`` KL(N_prev || N_cur) of the per-unit
        Gaussian fits N(mean, biased_var + eps) (:func:`gaussian_kl`).
    """
    if prev.mean.shape != cur.mean.shape or prev.copies != cur.copies:
        raise ValueError(
            f"snapshots differ: {prev.mean.numel()} units and {prev.copies} copies before, "
            f"{cur.mean.numel()} units and {cur.copies} copies now"
        )
    if prev.count != cur.count or (
        prev.probe is not None and cur.probe is not None and prev.probe != cur.probe
    ):
        raise ValueError(
            "the snapshots were taken on different probe batches "
            f"({prev.count} and {cur.count} samples per unit"
            + (", different values" if prev.count == cur.count else "")
            + "), so their difference mixes the batches' difference with the shift; take "
            "every snapshot on the same fixed probe batch x"
        )
    return {
        "mean_drift": (cur.mean - prev.mean).abs(),
        "var_drift": (cur.biased_var - prev.biased_var).abs(),
        "wasserstein": wasserstein_1d(prev.quantiles, cur.quantiles),
        "kl": gaussian_kl(prev.mean, prev.biased_var + eps, cur.mean, cur.biased_var + eps),
    }


def distribution_shift(
    prev: dict[str, UnitStats], cur: dict[str, UnitStats], eps: float = 1e-8
) -> dict[str, dict[str, list[float]]]:
    """Shift of every probed layer's input between two snapshots, averaged over units.

    Args:
        prev, cur: :func:`activation_snapshot` results for the same layers and
            probe batch at two evaluation points.
        eps: see :func:`unit_shift`.

    Returns:
        ``{layer: {"mean_drift": [...], "var_drift": [...], "wasserstein": [...],
        "kl": [...]}}``, each list one float per copy: the mean over that copy's
        units of the per-unit quantity of :func:`unit_shift`.

    Raises:
        ValueError: the snapshots hold different layers or shapes, or were taken
            on different probe batches.
    """
    if list(prev) != list(cur):
        raise ValueError(
            f"the snapshots hold different layers: {sorted(set(prev) ^ set(cur))} are in "
            "one only; take both with the same layers= and the same model structure"
        )
    out: dict[str, dict[str, list[float]]] = {}
    for name, p in prev.items():
        per_unit = unit_shift(p, cur[name], eps)
        out[name] = {k: v.reshape(p.copies, -1).mean(1).tolist() for k, v in per_unit.items()}
    return out


# --------------------------------------------------------------------------
# 2. Gradient-based internal covariate shift (Santurkar et al.)
# --------------------------------------------------------------------------


def ics_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """The layers of :func:`gradient_ics`: modules with a weight of dim >= 2.

    Linear, ConvNd, SeedBatchedLinear, ...; BN modules (whose gamma is 1-D) are
    never layers. The list is in registration order (``model.named_modules()``);
    :func:`gradient_ics` orders them by execution.

    Args:
        layers: module names to keep (each must own a ``weight`` parameter of
            dim >= 2); None for all.

    Returns:
        Module names in registration order.
    """
    params = dict(model.named_parameters())
    found = [
        name
        for name, m in model.named_modules()
        if not is_batchnorm(m)
        and f"{name}.weight" in params
        and params[f"{name}.weight"].dim() >= 2
    ]
    if layers is None:
        return found
    unknown = [n for n in layers if n not in found]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not modules with a weight parameter of dim >= 2; "
            f"the model's layers are {found}"
        )
    keep = set(layers)
    return [n for n in found if n in keep]


def _stepped_parameters(
    optimizer: torch.optim.Optimizer,
    params: dict[str, Tensor],
    grads: dict[str, Tensor | None],
) -> dict[str, Tensor]:
    """W(t+1): each parameter after ``optimizer.step()`` with ``grads``, on a deep copy.

    The copy carries the optimizer's state (momentum buffers, Adam moments, step
    counts) and hyperparameters, so the update is the one training would make;
    the optimizer itself is untouched. Parameters with a None gradient are skipped
    by the step, as in training.
    """
    name_of = {id(p): n for n, p in params.items()}
    try:
        shadow = copy.deepcopy(optimizer)
    except Exception as e:  # any failure means the probe cannot run
        raise TypeError(
            f"gradient_ics computes the step's update on a deep copy of the optimizer, "
            f"and copy.deepcopy({type(optimizer).__name__}) failed: {e}"
        ) from e
    # The copy's hooks would be the original's functions, which may act on the original.
    shadow._optimizer_step_pre_hooks.clear()
    shadow._optimizer_step_post_hooks.clear()
    moved: dict[str, Tensor] = {}
    for group, shadow_group in zip(optimizer.param_groups, shadow.param_groups):
        for p, sp in zip(group["params"], shadow_group["params"]):
            sp.grad = None
            name = name_of.get(id(p))
            g = grads.get(name) if name is not None else None
            if g is not None and p.requires_grad:
                sp.grad = g.detach().clone()
                moved[name] = sp
    # The class's step, not the instance attribute: an LR scheduler replaces the
    # instance's ``step`` with a wrapper bound to the original optimizer.
    type(shadow).step(shadow)
    return {n: sp.detach() for n, sp in moved.items()}


def _compare(g: Tensor | None, g2: Tensor | None, like: Tensor, copies: int, what: str):
    g = torch.zeros_like(like) if g is None else g
    g2 = torch.zeros_like(like) if g2 is None else g2
    a = _per_copy(g, copies, what).double()
    b = _per_copy(g2, copies, what).double()
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    cos = ((a * b).sum(1) / (norm_a * norm_b)).clamp(-1.0, 1.0)
    cos = torch.where((a == b).all(1), torch.ones_like(cos), cos)  # no shift, even at G = 0
    return {
        "l2": (a - b).norm(dim=1).tolist(),
        "cos": cos.tolist(),
        "grad_norm": norm_a.tolist(),
    }


def gradient_ics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    copies: int = 1,
    layers: Sequence[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Gradient-based internal covariate shift (Santurkar et al. 2018).

    For layer i at step t, with weights W_1..W_k and the step's batch (x, y):

        G  = dL/dW_i at (W_1(t), ..., W_k(t))
        G' = dL/dW_i at (W_1(t+1), ..., W_{i-1}(t+1), W_i(t), ..., W_k(t))
        ICS = ||G - G'||_2, and cos(G, G')          (no shift: 0 and 1)

    W(t+1) is the update ``optimizer.step()`` makes from the gradient of
    ``loss_fn`` on this batch (momentum, weight decay and per-group learning rates
    included), computed on a deep copy of the optimizer. The layers are
    :func:`ics_layers`, in forward order: the order in which modules are first
    called in the forward pass of G (recorded with hooks; for an ``nn.Sequential``
    it is the registration order, and parallel branches count in the order they
    run). "Layers 1..i-1" are all parameters of modules first called before layer
    i's module: their weights and biases, and the gamma and beta of the BN layers
    between them. Layer i's own parameters and everything called after it stay at
    W(t). A layer with no moved parameter before it (the first layer, or any layer
    when the earlier ones are frozen or have lr 0) gets G' = G exactly.

    Call it before the training step on that step's batch; the model runs in its
    current mode (train mode: BN uses batch statistics) from the RNG state the step
    will start from, so G is the step's own gradient (dropout masks included).
    Nothing changes: parameters are detached, BN buffers cloned, the optimizer
    deep-copied, the RNG restored; the model's ``.grad`` fields are not touched.

    Cost: one forward/backward for G, one optimizer step, and one
    forward/backward per layer whose earlier parameters moved.

    Args:
        model: called as ``model(x)``.
        loss_fn: ``(output, y) -> loss``, the loss whose gradient the optimizer
            steps on (same scaling as in training); a scalar, or a (copies,) tensor
            of per-copy losses that is summed (so each copy's gradient is its own).
        batch: ``(x, y)``, the step's batch.
        optimizer: the training optimizer over ``model``'s parameters; it must
            support ``copy.deepcopy`` and a closure-free ``step()``.
        copies: S of a seed-batched model; each layer weight's dim 0 splits into S
            blocks, one per copy.
        layers: layer names to report (see :func:`ics_layers`); None for all.

    Returns:
        ``{layer: {"l2": [...], "cos": [...], "grad_norm": [...]}}`` in forward
        order, each list one float per copy: ||G - G'||_2, cos(G, G') (1.0 when
        G' = G, even at G = 0; NaN when exactly one of them is 0), and ||G||_2.
    """
    _check_copies(copies)
    _check_batch(batch, "gradient_ics")
    names = ics_layers(model, layers)
    params = dict(model.named_parameters())
    _check_optimizer_holds(optimizer, params, "gradient_ics")
    buffers = dict(model.named_buffers())
    weights = {name: f"{name}.weight" for name in names}
    for w in weights.values():
        _per_copy(params[w], copies, w)
    trainable = [n for n, p in params.items() if p.requires_grad]
    wrt = list(dict.fromkeys(trainable + list(weights.values())))

    results: dict[str, dict[str, list[float]]] = {}
    with _pinned_rng(_cuda_devices(model)) as reset:
        reset()
        with _recording_call_order(model) as order:
            _, grads = _gradients(model, loss_fn, batch, params, buffers, wrt, copies)
        stepped = _stepped_parameters(optimizer, params, {n: grads[n] for n in trainable})
        changed = {n: t for n, t in stepped.items() if not torch.equal(t, params[n])}
        never = len(order)  # modules the forward did not call: they do not shift anything
        for name in sorted(weights, key=lambda n: order.get(n, never)):
            w = weights[name]
            rank = order.get(name, -1)
            earlier = {n: t for n, t in changed.items() if order.get(_owner(n), never) < rank}
            if earlier:
                reset()
                _, g2 = _gradients(
                    model, loss_fn, batch, {**params, **earlier}, buffers, [w], copies
                )
                g_prime = g2[w]
            else:  # nothing before this layer moved: G' = G
                g_prime = grads[w]
            results[name] = _compare(grads[w], g_prime, params[w], copies, w)
    return results


# --------------------------------------------------------------------------
# 3. Smoothness of the loss landscape along the gradient
# --------------------------------------------------------------------------


def smoothness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    lr: float,
    factors: Sequence[float] = DEFAULT_FACTORS,
    copies: int = 1,
) -> dict[str, list[float]]:
    """Loss landscape along the gradient at a training step (Santurkar et al. 2018).

    With g = grad L(w) on the batch (every parameter that requires grad), for each
    step size eta = f * lr, f in ``factors`` (Santurkar et al. use [1/2, 4] x lr):

        w'(eta)   = w - eta * g
        loss range       min / max over eta of L(w'(eta))
        grad_pred  = max over eta of ||grad L(w) - grad L(w'(eta))||_2
        beta       = max over eta of ||grad L(w) - grad L(w'(eta))||_2 / ||w - w'(eta)||_2

    Norms are over all of one copy's parameters; ||w - w'|| = eta ||g||. On a
    quadratic loss with Hessian H, beta = ||H g|| / ||g||. The model runs in its
    current mode, every evaluation from the same RNG state; nothing changes (see
    :func:`gradient_ics`).

    Args:
        model: called as ``model(x)``.
        loss_fn: ``(output, y) -> (copies,)`` per-copy losses (a scalar if
            copies == 1), scaled as in training.
        batch: ``(x, y)``.
        lr: the learning rate the step sizes are relative to.
        factors: step sizes in units of ``lr``, all > 0.
        copies: S of a seed-batched model; every trainable parameter's dim 0
            splits into S blocks.

    Returns:
        ``{"loss": [...], "loss_min": [...], "loss_max": [...], "grad_pred": [...],
        "beta": [...], "grad_norm": [...]}``, each one float per copy: L(w), the
        loss range over the step sizes, the gradient predictiveness, the effective
        beta-smoothness (NaN for a copy whose gradient is 0), and ||g||.
    """
    _check_copies(copies)
    _check_batch(batch, "smoothness")
    factors = [float(f) for f in factors]
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(f"factors must be a non-empty list of positive numbers, got {factors}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameter that requires grad")
    for n in trainable:
        _per_copy(params[n], copies, n)

    def per_copy_sq_norm(tensors: dict[str, Tensor]) -> Tensor:
        return sum(_per_copy(t, copies, n).double().pow(2).sum(1) for n, t in tensors.items())

    with _pinned_rng(_cuda_devices(model)) as reset:
        reset()
        loss0, g = _gradients(model, loss_fn, batch, params, buffers, trainable, copies, True)
        g = {n: torch.zeros_like(params[n]) if t is None else t for n, t in g.items()}
        g_norm = per_copy_sq_norm(g).sqrt()
        losses, changes, betas = [], [], []
        for f in factors:
            eta = f * float(lr)
            moved = {n: params[n].detach() - eta * g[n] for n in trainable}
            reset()
            loss, g2 = _gradients(
                model, loss_fn, batch, {**params, **moved}, buffers, trainable, copies, True
            )
            diff = {
                n: g[n] - (torch.zeros_like(g[n]) if g2[n] is None else g2[n]) for n in trainable
            }
            change = per_copy_sq_norm(diff).sqrt()
            losses.append(loss.double())
            changes.append(change)
            betas.append(change / (eta * g_norm))
    losses_t, changes_t, betas_t = torch.stack(losses), torch.stack(changes), torch.stack(betas)
    return {
        "loss": loss0.double().tolist(),
        "loss_min": losses_t.min(0).values.tolist(),
        "loss_max": losses_t.max(0).values.tolist(),
        "grad_pred": changes_t.max(0).values.tolist(),
        "beta": betas_t.max(0).values.tolist(),
        "grad_norm": g_norm.tolist(),
    }


# --------------------------------------------------------------------------
# 4. Singular values of the Jacobians between layers (Section 3.3)
# --------------------------------------------------------------------------

JACOBIAN_SCALES = ("normalized", "raw")
DEFAULT_JACOBIAN_EXAMPLES = 32
DEFAULT_JACOBIAN_MAX_ENTRIES = 1 << 24  # 16.8M Jacobian entries: 134 MB in float64
DEFAULT_BAND = (0.5, 2.0)
SINGULAR_VALUE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward at the next probed point."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


@contextlib.contextmanager
def _jacobian_modes(model: nn.Module, bn_training: bool) -> Iterator[None]:
    """Every module in eval mode but BN, in ``bn_training`` mode; all modes restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            m.training = bn_training and is_batchnorm(m)
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _per_copy_entries(t: Tensor, copies: int, what: str) -> Tensor:
    """(N, S * C, *positions) -> (N, S, C * prod(positions)): copy k's entries of each example.

    Copy k owns channels [k C, (k + 1) C) at every position, which are contiguous
    in the (N, S * C, *positions) layout once the example is fixed.
    """
    if t.dim() < 2:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected (N, C, ...)")
    _per_copy(t[:1], copies, what, dim=1)
    return t.reshape(t.shape[0], copies, -1)


def _unit_std(t: Tensor, copies: int) -> Tensor:
    """(S, C * prod(positions)): the probe batch's per-unit biased std, at every entry.

    A unit is a feature of an (N, C) activation and a channel of an (N, C, ...)
    one (over examples and positions), the units BN normalizes (Section 3.2).
    """
    dims = [0, *range(2, t.dim())]
    std = t.double().var(dim=dims, correction=0).sqrt()  # (S * C,)
    per_entry = std.reshape(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
    return per_entry.reshape(copies, -1)  # (S, C * prod(positions))


def _vjp_rows(out: Tensor, leaf: Tensor, copies: int) -> Tensor:
    """Per-example, per-copy Jacobians d out[n, copy k] / d leaf[n, copy k].

    The map from ``leaf`` to ``out`` acts on each example and each copy on its own
    (checked by the caller for examples; the seed-batched layout for copies), so
    one vector-Jacobian product whose cotangent is e_j in every example's and every
    copy's block gives row j of all E * S Jacobians at once: d_out products in all.

    Returns:
        (E, S, d_out, d_in) in ``out``'s dtype.
    """
    e = out.shape[0]
    d_out = out[0].numel() // copies
    d_in = leaf[0].numel() // copies
    eye = torch.eye(d_out, dtype=out.dtype, device=out.device)
    # (d_out, E, S, d_out): cotangent j is e_j in every (example, copy) block.
    cot = eye[:, None, None, :].expand(d_out, e, copies, d_out).reshape(d_out, *out.shape)
    try:
        (rows,) = torch.autograd.grad(out, leaf, cot, retain_graph=True, is_grads_batched=True)
    except (RuntimeError, NotImplementedError):
        # An op without a batching rule for its backward: one product per row.
        rows = torch.stack([torch.autograd.grad(out, leaf, c, retain_graph=True)[0] for c in cot])
    # (d_out, E, S, d_in) -> (E, S, d_out, d_in)
    return rows.reshape(d_out, e, copies, d_in).permute(1, 2, 0, 3)


def compute_layer_jacobians(
    model: nn.Module,
    x: Tensor,
    layers: LayerSpec | None = None,
    copies: int = 1,
    *,
    training: bool = True,
    scale: str = "normalized",
    examples: int | None = DEFAULT_JACOBIAN_EXAMPLES,
    max_entries: int = DEFAULT_JACOBIAN_MAX_ENTRIES,
) -> dict[str, Tensor]:
    """Per-example Jacobians between consecutive probed points (Section 3.3).

    The probed points are the inputs of the chosen modules, in the order the
    forward calls them: a_1, a_2, ..., a_P (default: every BN module's input, or
    in a network without BN every nonlinearity's input; see
    :func:`activation_snapshot`). For each consecutive pair and each probe
    example n, the Jacobian of the map a_i -> a_{i+1} at example n:

        raw:         J_n = d a_{i+1}(n) / d a_i(n)                      (d_out, d_in)
        normalized:  J_n = diag(1 / s_{i+1}) (d a_{i+1}(n) / d a_i(n)) diag(s_i)

    where s_i is a_i's per-unit standard deviation on the probe batch (biased; per
    feature, or per channel over examples and positions, as BN normalizes, Section
    3.2). "normalized" is the Jacobian between the standardized vectors
    a_hat = (a - mean) / s, the coordinates of the paper's argument (Section 3.3):
    for two consecutive layers with normalized inputs and z_hat = F(x_hat), if
    x_hat and z_hat are Gaussian, uncorrelated and F is locally linear,
    I = Cov[z_hat] = J Cov[x_hat] J^T = J J^T, so every singular value of J is 1.
    In a BN network probed at its BN inputs with ``training=True`` it is exactly
    d x_hat_{i+1} / d x_hat_i of Algorithm 1 (up to BN's eps); in a network
    without BN it is the same quantity for the same points, which makes the two
    comparable whatever the scale of the weights. Standardizing fixes the scale
    but not the shape: for a linear map between uncorrelated units every row of
    the normalized J has norm 1 (rms singular value 1 for d_out = d_in), so what
    the conjecture adds, and what this measures, is the spread (J J^T = I also
    needs the rows orthogonal: uncorrelated outputs) and the nonlinearity's
    slope. "raw" is the factor that backpropagation applies to dL/da_{i+1}
    (dL/da_i = J^T dL/da_{i+1}), which depends on the scale of the activations.

    The map includes everything the forward does between the two points: the
    BN of a_i (if a_i is a BN input), the nonlinearity, whose derivative is taken
    at example n (sigmoid' at each unit's value), and the next linear layer.
    Other inputs of a_{i+1} (a skip connection around a_i) are held at their
    values. A map between widths d_in != d_out has min(d_in, d_out) singular
    values; J J^T = I is then possible only for d_out <= d_in (J^T J = I otherwise).

    Batch statistics: with ``training=True`` every BN module normalizes with the
    probe batch's mean and biased variance, *held fixed*: J_n is the Jacobian of
    the per-example map that BN applies on this batch, as the paper's argument
    treats F (a function of one normalized vector), not of the whole batch's map,
    in which example n also moves mu_B and sigma_B (those terms are O(1/m), and
    the batch map's Jacobian is (m d_out) x (m d_in), no longer a layer's).
    Technically BN runs in eval mode with its running statistics replaced by the
    batch's; the probe checks that this reproduces the training forward at every
    probed point, and refuses BN variants whose training output is not
    (x - mu_B) / sqrt(sigma2_B + eps) (batch renormalization, ghost batches).
    With ``training=False`` BN uses its running statistics: the clean
    per-example map of the inference network (Algorithm 2, step 11). Every other
    module runs in eval mode in both cases: a dropout mask would make J a random
    matrix whose spectrum reflects the mask rather than the weights.

    Nothing changes: parameters are detached, buffers cloned, modes and the RNG
    state restored; the model's ``.grad`` fields are not touched.

    Cost: one forward of ``x``, then per pair one forward of the first E
    examples up to a_{i+1} and d_out vector-Jacobian products, batched into one
    backward of width d_out; memory E * S * d_out * (d_in + d_out) numbers. On
    the Section 4.1 MLP (784-100-100-100-10) with 3 copies, N = 60 and E = 32:
    about 50 ms on one CPU thread (:func:`jacobian_singular_values` adds about
    0.15 s of SVDs); the first call in a process also pays about 0.8 s of
    one-time imports for the batched backward.

    Args:
        model: called as ``model(x)``.
        x: the probe batch (N, ...) with N >= 2; its statistics are BN's batch
            statistics and the s_i of "normalized".
        layers: module names or types whose inputs are the probed points (at
            least two, each called once per forward); default as
            :func:`activation_snapshot`.
        copies: S of a seed-batched model: the Jacobian of copy k is the block of
            copy k's entries of a_{i+1} and a_i (copies never mix).
        training: BN with the probe batch's statistics held fixed (True), or
            with its running statistics (False).
        scale: ``"normalized"`` (default) or ``"raw"``, see above.
        examples: the Jacobians are taken at the first E = min(N, examples)
            examples of ``x`` (None: all N), which bounds the cost whatever N.
        max_entries: refuse a pair for which E * S * d_out * max(d_in, d_out)
            (the Jacobians' entries, and the cotangents') exceeds this; a feature
            map has d = C * H * W.

    Returns:
        ``{"a->b": J}`` for consecutive probed modules a, b (their names), J of
        shape (E, S, d_out, d_in), float64, d = a copy's entries of one example
        (C, or C * prod(positions)).

    Raises:
        ValueError: fewer than two probed points, a module called more than once,
            a point that does not depend on the one before, a BN module without
            running statistics or whose training forward is not plain BN, a unit
            with zero spread on the probe batch ("normalized"), too many entries.
    """
    _check_copies(copies)
    if scale not in JACOBIAN_SCALES:
        raise ValueError(f"scale must be one of {JACOBIAN_SCALES}, got {scale!r}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 2:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a probe batch tensor (N, ...) with N >= 2 examples, got {got}; the "
            "batch statistics and the per-unit spread need several examples"
        )
    n = x.shape[0]
    if examples is not None and (isinstance(examples, bool) or int(examples) < 1):
        raise ValueError(f"examples must be a positive int or None (all), got {examples!r}")
    e = n if examples is None else min(n, int(examples))
    targets = _snapshot_modules(model, layers)
    bn_modules = [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
    for name, m in bn_modules:
        if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
            raise ValueError(
                f"BN module {name!r} keeps no running statistics (track_running_stats=False), "
                "so it cannot hold the batch statistics fixed and would mix the examples; "
                "build it with track_running_stats=True"
            )

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    acts: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            acts[name] = args[0].detach()

        return hook

    def record_stats(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            a = args[0].detach()
            dims = [0, *range(2, a.dim())]
            stats[name] = (a.mean(dims), a.var(dims, correction=0))

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in targets]
    if training:
        handles += [m.register_forward_pre_hook(record_stats(name)) for name, m in bn_modules]
    results: dict[str, Tensor] = {}
    with _pinned_rng(_cuda_devices(model)), _jacobian_modes(model, training):
        try:
            with torch.no_grad(), _recording_call_order(model) as order:
                _forward(model, params, buffers, x)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name, _ in targets if name not in calls]
        if missing:
            raise ValueError(f"these probed modules were not called by the forward: {missing}")
        twice = [name for name, k in calls.items() if k > 1]
        if twice:
            raise ValueError(
                f"modules {twice} are called more than once per forward, so their input is not "
                "one point of the network; pass layers= with modules called once"
            )
        points = sorted(targets, key=lambda t: order[t[0]])
        if len(points) < 2:
            raise ValueError(
                f"the Jacobian probe needs at least two probed points, got {len(points)} "
                f"({[p for p, _ in points]}); pass layers= with two or more modules (e.g. "
                "every nonlinearity type)"
            )
        for name, _ in points:
            _per_copy_entries(acts[name], copies, f"the input of {name!r}")
        # BN in eval mode with the batch's statistics as its running ones: the
        # training forward's per-example affine map, now with the statistics fixed.
        state = dict(buffers)
        for name, (mu_b, biased_var_b) in stats.items():
            state[f"{name}.running_mean"] = mu_b
            state[f"{name}.running_var"] = biased_var_b
        std = {}
        if scale == "normalized":
            for name, _ in points:
                s = _unit_std(acts[name], copies)
                if not bool((s > 0).all()):
                    raise ValueError(
                        f"the input of {name!r} has {int((s == 0).sum())} entries whose unit is "
                        "constant on the probe batch, so it cannot be standardized; use a probe "
                        "batch with varied examples, or scale='raw'"
                    )
                std[name] = s
        for m in model.modules():
            m.training = False
        for (a, mod_a), (b, mod_b) in zip(points, points[1:]):
            d_in = acts[a][0].numel() // copies
            d_out = acts[b][0].numel() // copies
            # The Jacobians, and the d_out cotangents of the batched backward.
            entries = e * copies * d_out * max(d_in, d_out)
            if entries > max_entries:
                raise ValueError(
                    f"the Jacobians {a}->{b} need {e} examples x {copies} copies x {d_out} x "
                    f"max({d_in}, {d_out}) = {entries} entries, more than "
                    f"max_entries={max_entries}; "
                    "pass fewer examples=, layers= with smaller activations, or a larger "
                    "max_entries"
                )
            results[f"{a}->{b}"] = _pair_jacobian(
                model, params, state, x[:e], acts, a, mod_a, b, mod_b, copies, std
            )
    return results


def _pair_jacobian(
    model: nn.Module,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    x: Tensor,
    acts: dict[str, Tensor],
    a: str,
    mod_a: nn.Module,
    b: str,
    mod_b: nn.Module,
    copies: int,
    std: dict[str, Tensor],
) -> Tensor:
    """(E, S, d_out, d_in) float64: d a_b / d a_a at each of the E examples of ``x``."""
    e = x.shape[0]
    leaf = acts[a][:e].clone().requires_grad_(True)

    def replace(module: nn.Module, args: tuple) -> tuple:
        return (leaf, *args[1:])

    def reach(module: nn.Module, args: tuple) -> None:
        raise _Reached(args[0])

    handles = [mod_a.register_forward_pre_hook(replace), mod_b.register_forward_pre_hook(reach)]
    out = None
    try:
        with torch.enable_grad():
            _forward(model, params, state, x)
    except _Reached as r:
        out = r.value
    finally:
        for h in handles:
            h.remove()
    if out is None or not out.requires_grad:
        raise ValueError(f"the input of {b!r} does not depend on the input of {a!r}")
    want = acts[b][:e]
    tol = torch.finfo(want.dtype).eps ** 0.5 * max(1.0, float(want.abs().max()))
    if out.shape != want.shape or float((out.detach() - want).abs().max()) > tol:
        raise ValueError(
            f"the input of {b!r} at the first {e} probe examples, computed with the batch "
            "statistics held fixed, differs from the probe batch's forward: a module between "
            f"{a!r} and {b!r} mixes examples, or a BN variant's training output is not "
            "(x - mu_B) / sqrt(sigma2_B + eps) (batch renormalization, ghost batches); "
            "use training=False"
        )
    jac = _vjp_rows(out, leaf, copies).double()  # (E, S, d_out, d_in)
    if std:
        jac = jac * std[a][None, :, None, :] / std[b][None, :, :, None]
    return jac


def jacobian_singular_values(
    model: nn.Module,
    x: Tensor,
    layers: LayerSpec | None = None,
    copies: int = 1,
    *,
    training: bool = True,
    scale: str = "normalized",
    examples: int | None = DEFAULT_JACOBIAN_EXAMPLES,
    band: tuple[float, float] = DEFAULT_BAND,
    max_entries: int = DEFAULT_JACOBIAN_MAX_ENTRIES,
) -> dict[str, dict[str, list[float]]]:
    """Singular values of the layer Jacobians, summarized (Section 3.3's conjecture).

    Ioffe & Szegedy (2015), Section 3.3: "We further conjecture that Batch
    Normalization may lead the layer Jacobians to have singular values close to 1,
    which is known to be beneficial for training (Saxe et al., 2013)." The argument:
    between two consecutive layers with normalized inputs, z_hat = F(x_hat) ~
    J x_hat, and if x_hat, z_hat are Gaussian, uncorrelated and of unit variance,
    J J^T = I: every singular value of J is 1, which preserves gradient
    magnitudes in backpropagation. This probe measures those singular
    values on a trained or untrained model, with and without BN alike.

    For each consecutive pair of probed points and each copy, the singular values
    of the E per-example Jacobians of :func:`compute_layer_jacobians` (see there
    for the exact definition, the ``scale``, the treatment of batch statistics,
    and the cost; an SVD of E * S matrices of d_out x d_in is added) are pooled,
    E * min(d_out, d_in) values per copy, and summarized.

    Args:
        model, x, layers, copies, training, scale, examples, max_entries: see
            :func:`compute_layer_jacobians`.
        band: (lo, hi); ``frac_within`` is the fraction of singular values in
            [lo, hi].

    Returns:
        ``{"a->b": {"mean": [...], "rms": [...], "min": [...], "max": [...],
        "q05": [...], "q25": [...], "q50": [...], "q75": [...], "q95": [...],
        "frac_within": [...]}}`` in forward order, each list one float per copy:
        the mean, root mean square (= ||J||_F / sqrt(min(d_out, d_in)) averaged
        in the square over examples), extremes, quantiles (linear interpolation)
        and the fraction in ``band`` of that copy's pooled singular values.

    Example:
        >>> sv = jacobian_singular_values(model, x_probe, copies=3)
        >>> sv["1->4"]["q50"]  # median singular value of each copy's layer-1-to-2 map
    """
    lo, hi = (float(v) for v in band)
    if not 0 <= lo <= hi:
        raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi, got {band!r}")
    jacobians = compute_layer_jacobians(
        model,
        x,
        layers,
        copies,
        training=training,
        scale=scale,
        examples=examples,
        max_entries=max_entries,
    )
    out: dict[str, dict[str, list[float]]] = {}
    for pair, jac in jacobians.items():
        sv = torch.linalg.svdvals(jac)  # (E, S, min(d_out, d_in)), descending
        sv = sv.transpose(0, 1).reshape(copies, -1)  # (S, E * min(d_out, d_in))
        levels = torch.tensor(SINGULAR_VALUE_QUANTILES, dtype=sv.dtype, device=sv.device)
        q = torch.quantile(sv, levels, dim=1)
        summary = {
            "mean": sv.mean(1),
            "rms": sv.pow(2).mean(1).sqrt(),
            "min": sv.min(1).values,
            "max": sv.max(1).values,
            **{f"q{round(100 * p):02d}": q[k] for k, p in enumerate(SINGULAR_VALUE_QUANTILES)},
            "frac_within": ((sv >= lo) & (sv <= hi)).double().mean(1),
        }
        out[pair] = {k: v.tolist() for k, v in summary.items()}
    return out
