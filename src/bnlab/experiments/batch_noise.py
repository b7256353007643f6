"""BN normalizes with random statistics: is their noise small next to the shift it removes?

A standing objection to the paper's explanation: mu_B and sigma2_B are
themselves random (Algorithm 1), so BN may inject as much change into the
normalized activations as it removes, and the paper never shows that it reduces
internal covariate shift rather than reparameterizing it. This experiment trains
the Section 4.1 network with BN before each sigmoid (``bnlab.insert_batchnorm``),
one arm per mini-batch size m (``bn-m60``, ``bn-m8``), and at every evaluation
probes each BN layer's input x, per unit, without changing the training
trajectory:

- **population**: x on a fixed sample of N training images, run as one batch in
  training mode (every BN normalizes with the sample's statistics, the
  population statistics up to sampling); its mean mu, biased variance sigma^2
  and fourth central moment mu_4.
- **batch statistics**: K mini-batches of m images drawn i.i.d. (with
  replacement) from that sample by a generator seeded by the step (so the probe is
  resumable and independent of training's random state), each run through the
  network in training mode as a training step would; Var(mu_B) and
  Var(sigma2_B) across the K batches against the sampling formulas for i.i.d.
  draws, Var(mu_B) = sigma^2 / m and
  Var(sigma2_B) = (m-1)^2 / m^3 * (mu_4 - (m-3)/(m-1) * sigma^4), which is
  (mu_4 - sigma^4) / m for large m. At the first BN layer a batch's inputs are
  the population's rows, so the formulas are exact; deeper layers also carry
  the noise of the BN layers before them, shared by the whole batch.
- **noise BN injects**: per unit, the mean over the batches' elements of
  (x_hat_batch - x_hat_pop)^2 with x_hat_batch = (x - mu_B) / sqrt(sigma2_B + eps)
  and x_hat_pop = (x - mu) / sqrt(sigma^2 + eps) on the same x.
- **shift BN removes**: the change of the BN input's distribution that
  normalizing with stale statistics would leave. Measured in the same units as
  the noise: for x with mean mu' and biased variance v' (after), normalized once
  with the statistics before (mu, v) and once with its own,
  E[(x_hat_before - x_hat_after)^2] = (mu' - mu)^2 / (v + eps)
  + v' (1/sqrt(v + eps) - 1/sqrt(v' + eps))^2. Per step: the step's update is
  applied to a copy of the model and optimizer. Per evaluation interval: from the
  recorded population statistics of consecutive evaluations (in the report).

Glorot's initialization is the default, as in ``bnlab reproduce shift``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.distributed import DistInfo
from bnlab.experiments.mnist_kit import (
    DATA_HELP,
    accuracy,
    check_data,
    config_job,
    load_arrays,
    parse_init,
    validate_common,
)
from bnlab.graph import is_batchnorm
from bnlab.insert import insert_batchnorm
from bnlab.models import mnist_mlp
from bnlab.train.loop import TrainJob

__all__ = [
    "Config",
    "check_data",
    "PRESETS",
    "arm_name",
    "batch_noise_probe",
    "batch_stat_noise",
    "bn_inputs",
    "population_moments",
    "predicted_stat_variances",
    "stale_normalization_shift",
]


@dataclass
class Config:
    """One batch-noise run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None
    steps: int = 10_000
    seeds: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [60, 8])
    init: str = "glorot"
    lr: float = 0.01
    momentum: float = 0.9
    eval_every: int = 500
    draws: int = 50
    population_examples: int = 5_000
    checkpoint_every: int = 5_000
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "steps",
        "seeds",
        "batch_sizes",
        "init",
        "lr",
        "momentum",
        "eval_every",
        "draws",
        "population_examples",
    )


HELP = {
    "data": DATA_HELP,
    "steps": "training steps per arm",
    "seeds": "independent copies per arm",
    "batch_sizes": "mini-batch sizes m, one arm each (comma-separated)",
    "init": "initial weights: 'glorot', or a number s for N(0, s^2)",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "eval_every": "steps between evaluations, each with the batch-noise probe",
    "draws": "mini-batches K drawn at each probe to measure the batch statistics' variance",
    "population_examples": "training images (a fixed random subset) that stand for the population",
    "checkpoint_every": "steps between checkpoints (taken at the next evaluation)",
    "device": "cpu or cuda",
}

PRESETS = {
    "quick": {"steps": 200, "eval_every": 50, "draws": 30, "population_examples": 2_000},
    "cpu": {},
    "gpu": {"device": "cuda"},
}


def arm_name(batch_size: int) -> str:
    return f"bn-m{batch_size}"


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    sizes = list(cfg.batch_sizes)
    validate_common(
        cfg,
        [
            (len(sizes) >= 1, "--batch-sizes needs at least one size"),
            (
                all(isinstance(m, int) and m >= 2 for m in sizes),
                f"--batch-sizes must be integers of at least 2 for BN, got {sizes}",
            ),
            (len(set(sizes)) == len(sizes), f"--batch-sizes has a size twice: {sizes}"),
            (cfg.draws >= 2, f"--draws must be at least 2 (a variance needs two), got {cfg.draws}"),
            (
                cfg.population_examples >= 2 * max(sizes, default=2),
                "--population-examples must be at least twice the largest batch size",
            ),
        ],
    )


def arms(cfg: Config) -> list[str]:
    return [arm_name(m) for m in cfg.batch_sizes]


def describe(cfg: Config) -> list[str]:
    return [
        f"batch-noise: BN network, batch sizes {', '.join(map(str, cfg.batch_sizes))} x "
        f"{cfg.seeds} seed(s) x {cfg.steps} steps; every {cfg.eval_every} steps {cfg.draws} "
        f"mini-batches against a {cfg.population_examples:,}-image population"
    ]


# --------------------------------------------------------------------------
# The statistics (pure functions on tensors; units on the last dim)
# --------------------------------------------------------------------------


def population_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit mean, biased variance sigma^2 and fourth central moment mu_4.

    Args:
        x: (N, C): N samples of C units.

    Returns:
        Three (C,) float64 tensors.
    """
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.pow(2).mean(0), centred.pow(4).mean(0)


def predicted_stat_variances(biased_var: Tensor, mu4: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Var(mu_B) and Var(sigma2_B) over mini-batches of m i.i.d. draws (the sampling formulas).

    Var(mu_B) = sigma^2 / m. For the biased batch variance of Algorithm 1,
    sigma2_B = (m-1)/m * s^2, and Var(s^2) = mu_4 / m - sigma^4 (m-3) / (m (m-1)), so
    Var(sigma2_B) = (m-1)^2 / m^3 * (mu_4 - (m-3)/(m-1) * sigma^4), which tends to
    (mu_4 - sigma^4) / m as m grows (2 (m-1) sigma^4 / m^2 for a Gaussian).

    Args:
        biased_var: (C,) sigma^2; mu4: (C,) mu_4; m: the batch size (>= 2).

    Returns:
        Two (C,) tensors: the predicted Var(mu_B) and Var(sigma2_B).
    """
    if m < 2:
        raise ValueError(f"m must be at least 2, got {m}")
    var_mu = biased_var / m
    var_var = (m - 1) ** 2 / m**3 * (mu4 - (m - 3) / (m - 1) * biased_var**2)
    return var_mu, var_var


def stale_normalization_shift(
    mean: Tensor, biased_var: Tensor, new_mean: Tensor, new_biased_var: Tensor, eps: float
) -> Tensor:
    """Per unit, E[(x_hat_stale - x_hat_new)^2] for x ~ the new distribution: the shift that
    re-normalizing removes, in units of the normalized activation.

    x_hat_stale = (x - mean) / sqrt(biased_var + eps), x_hat_new = (x - new_mean) /
    sqrt(new_biased_var + eps); with x = new_mean + sqrt(new_biased_var) z:
    E[...] = (new_mean - mean)^2 / (biased_var + eps)
    + new_biased_var * (1 / sqrt(biased_var + eps) - 1 / sqrt(new_biased_var + eps))^2.
    Zero when nothing moved; a mean shifted by 0.1 sigma gives 0.01.
    """
    inv_std = (biased_var + eps).rsqrt()
    new_inv_std = (new_biased_var + eps).rsqrt()
    return (new_mean - mean) ** 2 * inv_std**2 + new_biased_var * (inv_std - new_inv_std) ** 2


def batch_stat_noise(
    x_pop: Tensor, x_batches: Tensor, idx: Tensor, eps: float
) -> dict[str, Tensor]:
    """The noise of one BN layer's batch statistics, per unit, against its population.

    Args:
        x_pop: (N, C) the layer's input on the population (every earlier BN
            normalizing with population statistics).
        x_batches: (K, m, C) its input in K training-mode forwards of mini-batches of m.
        idx: (K, m) the population rows of each mini-batch (``x_pop[idx]`` is what
            the batches would give without the noise of earlier BN layers).
        eps: the BN layer's eps.

    Returns:
        (C,) float64 tensors:
        ``mean``, ``biased_var``, ``kurtosis`` (mu_4 / sigma^4) of the population;
        ``var_mu``, ``var_var``: Var(mu_B), Var(sigma2_B) across the K batches
        (unbiased over K); ``pred_var_mu``, ``pred_var_var``: the sampling formulas
        (:func:`predicted_stat_variances`); ``iid_var_mu``, ``iid_var_var``: the
        same variances of the population rows ``x_pop[idx]``;
        ``noise_own``: mean over the batches' elements of
        (x_hat_batch - x_hat_pop)^2 on the same inputs (this layer's statistics
        alone); ``noise_total``: the same against x_hat_pop of ``x_pop[idx]``
        (with the noise the earlier layers passed on).
    """
    k, m, c = x_batches.shape
    if k < 2:
        raise ValueError(f"need at least 2 mini-batches to estimate a variance, got {k}")
    xb = x_batches.double()
    mean, biased_var, mu4 = population_moments(x_pop)
    mu_b = xb.mean(1)  # (K, C)
    var_b = xb.var(1, correction=0)
    x_ref = x_pop.double()[idx]  # (K, m, C)
    pred_mu, pred_var = predicted_stat_variances(biased_var, mu4, m)
    x_hat_batch = (xb - mu_b.unsqueeze(1)) * (var_b.unsqueeze(1) + eps).rsqrt()
    inv_std = (biased_var + eps).rsqrt()
    return {
        "mean": mean,
        "biased_var": biased_var,
        "kurtosis": mu4 / biased_var**2,
        "var_mu": mu_b.var(0),
        "var_var": var_b.var(0),
        "pred_var_mu": pred_mu,
        "pred_var_var": pred_var,
        "iid_var_mu": x_ref.mean(1).var(0),
        "iid_var_var": x_ref.var(1, correction=0).var(0),
        "noise_own": (x_hat_batch - (xb - mean) * inv_std).pow(2).mean((0, 1)),
        "noise_total": (x_hat_batch - (x_ref - mean) * inv_std).pow(2).mean((0, 1)),
    }


# --------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------


def bn_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Each BN layer's input when ``model`` runs on ``x`` in training mode (batch statistics).

    Nothing changes: BN's running statistics are updated on cloned buffers, modes
    are restored. Returns ``{module name: (N, C) input}`` in call order.
    """
    captured: dict[str, Tensor] = {}
    targets = [(n, mod) for n, mod in model.named_modules() if is_batchnorm(mod)]
    if not targets:
        raise ValueError("the model has no BN layer to probe")

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured.setdefault(name, args[0].detach())

        return hook

    modes = [(mod, mod.training) for mod in model.modules()]
    handles = [mod.register_forward_pre_hook(make_hook(n)) for n, mod in targets]
    try:
        model.train()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with torch.no_grad():
            functional_call(model, buffers, (x,))
    finally:
        for h in handles:
            h.remove()
        for mod, mode in modes:
            mod.training = mode
    return captured


def _per_copy(t: Tensor, copies: int) -> list[float]:
    """(C,) -> one value per copy: the mean over that copy's block of units (NaN-aware)."""
    return t.reshape(copies, -1).nanmean(1).tolist()


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a / b, torch.full_like(a, math.nan))


def _rounded(t: Tensor, copies: int) -> list[list[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in t.reshape(copies, -1).tolist()]


def batch_noise_probe(
    model: nn.Module,
    x_pop: Tensor,
    batch_size: int,
    draws: int,
    copies: int,
    seed: int,
    stepped: Callable[[], nn.Module] | None = None,
) -> dict:
    """Measure every BN layer's batch-statistics noise and the shift it removes.

    Args:
        model: a BN network (seed-batched: copy k owns block k of each BN's units).
        x_pop: (N, in) the population images, shared by every copy.
        batch_size: m.
        draws: K mini-batches, drawn i.i.d. from the population rows by a generator
            seeded with ``seed`` (the global random state is neither used nor changed).
        copies: S.
        stepped: optional ``() -> model`` after the training step's update (a copy);
            its BN inputs on the population give the per-step shift.

    Returns:
        ``{"noise": {layer: {measure: [one float per copy]}}, "population": {layer:
        {"mean": [[per unit] per copy], "biased_var": [...]}}}``. Measures (means
        over a copy's units): ``ratio_mu``, ``ratio_var`` (observed / predicted
        Var(mu_B), Var(sigma2_B)), ``iid_ratio_mu``, ``iid_ratio_var`` (the same for
        the population rows), ``rel_sd_mu`` sqrt(Var(mu_B)) / sigma, ``rel_sd_var``
        sqrt(Var(sigma2_B)) / sigma^2, ``pred_rel_sd_mu``, ``pred_rel_sd_var``,
        ``kurtosis``, ``noise_own``, ``noise_total`` and, with ``stepped``,
        ``step_shift`` (see :func:`batch_stat_noise`, :func:`stale_normalization_shift`).
    """
    eps = {n: float(mod.eps) for n, mod in model.named_modules() if is_batchnorm(mod)}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        pop = bn_inputs(model, x_pop)
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(len(x_pop), (draws, batch_size), generator=gen)
        seen = [bn_inputs(model, x_pop[row.to(x_pop.device)]) for row in idx]
        after = bn_inputs(stepped(), x_pop) if stepped is not None else None
    noise: dict[str, dict[str, list[float]]] = {}
    population: dict[str, dict[str, list[list[float]]]] = {}
    for name, x in pop.items():
        xb = torch.stack([s[name] for s in seen])  # (K, m, C)
        st = batch_stat_noise(x, xb, idx.to(x.device), eps[name])
        sd, var = st["biased_var"].sqrt(), st["biased_var"]
        out = {
            "ratio_mu": _ratio(st["var_mu"], st["pred_var_mu"]),
            "ratio_var": _ratio(st["var_var"], st["pred_var_var"]),
            "iid_ratio_mu": _ratio(st["iid_var_mu"], st["pred_var_mu"]),
            "iid_ratio_var": _ratio(st["iid_var_var"], st["pred_var_var"]),
            "rel_sd_mu": _ratio(st["var_mu"].sqrt(), sd),
            "rel_sd_var": _ratio(st["var_var"].sqrt(), var),
            "pred_rel_sd_mu": _ratio(st["pred_var_mu"].sqrt(), sd),
            "pred_rel_sd_var": _ratio(st["pred_var_var"].clamp_min(0).sqrt(), var),
            "kurtosis": st["kurtosis"],
            "noise_own": st["noise_own"],
            "noise_total": st["noise_total"],
        }
        if after is not None:
            new_mean, new_var, _ = population_moments(after[name])
            out["step_shift"] = stale_normalization_shift(
                st["mean"], var, new_mean, new_var, eps[name]
            )
        noise[name] = {k: _per_copy(v, copies) for k, v in out.items()}
        population[name] = {
            "mean": _rounded(st["mean"], copies),
            "biased_var": _rounded(var, copies),
        }
    return {"noise": noise, "population": population, "bn_eps": next(iter(eps.values()))}


def _batch_size(arm: str) -> int:
    return int(arm.removeprefix("bn-m"))


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    m = _batch_size(arm)
    arrays = load_arrays(cfg.data, m, cfg.seeds, cfg.device, info)
    model = insert_batchnorm(mnist_mlp(seeds=list(range(cfg.seeds)), init_std=parse_init(cfg.init)))
    model = model.to(arrays.device)
    pick = torch.randperm(len(arrays.x_train), generator=torch.Generator().manual_seed(0))
    x_pop = arrays.x_train[pick[: cfg.population_examples].to(arrays.device)]

    def evaluate(net: nn.Module) -> dict:
        return {"test_acc": accuracy(net, arrays.x_test, arrays.y_test, cfg.seeds)}

    job = config_job(cfg, arm, model, arrays, batch_size=m, evaluate=evaluate)

    def probe(net: nn.Module, step: int) -> dict:
        def stepped() -> nn.Module:
            # The step t -> t+1 (the loop's loss: each copy's mean) on a copy of the
            # model and its optimizer state.
            xb, yb = job.batch(step, slice(None))
            net2, opt2 = copy.deepcopy((net, job.optimizer))
            net2.train()
            opt2.zero_grad(set_to_none=True)
            (job.loss(net2(xb), yb).sum() / m).backward()
            opt2.step()
            return net2

        return batch_noise_probe(
            net, x_pop, m, cfg.draws, cfg.seeds, seed=1_000_003 + step, stepped=stepped
        )

    job.probe = probe
    return job
