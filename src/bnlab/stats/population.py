"""Population statistics for inference: Algorithm 2, steps 8-10.

With the trained parameters frozen, process several training mini-batches
and set each BN layer's inference statistics to

    E[x]   = E_B[mu_B]
    Var[x] = m / (m - 1) * E_B[sigma2_B]        (the unbiased estimate)

instead of relying on the moving averages kept during training, which lag
behind the final weights (as fvcore's ``precise_bn`` argues too).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.graph import is_batchnorm

__all__ = ["LayerStats", "PopulationStatsReport", "recompute_population_stats"]

ESTIMATORS = ("paper", "pooled")


@dataclass
class LayerStats:
    """What was seen by one BN layer during the pass."""

    name: str
    batches: int = 0
    values: int = 0  # sum over batches of m (N * spatial size)
    mean_stderr: Tensor | None = None  # per channel, when requested
    var_stderr: Tensor | None = None


@dataclass
class PopulationStatsReport:
    """Returned by :func:`recompute_population_stats`."""

    estimator: str
    batches: int
    layers: list[LayerStats] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    stopped_early: bool = False


class _Accumulator:
    """Per-layer running sums over mini-batches (weighted by each batch's m)."""

    def __init__(self, name: str, keep_batches: bool):
        self.stats = LayerStats(name)
        self.keep = keep_batches
        self.means: list[Tensor] = []
        self.unbiased_vars: list[Tensor] = []
        self.counts: list[int] = []
        self.sum_mean: Tensor | None = None
        self.sum_uvar: Tensor | None = None
        self.pooled: tuple[Tensor, Tensor, Tensor] | None = None  # (count, mean, biased var)

    def add(self, x: Tensor) -> None:
        F.check_batch_norm_input(x, training=True)
        m = F.num_values_per_channel(x)
        mu_b, biased_var_b = F.compute_batch_stats(x.detach())
        mu_b, biased_var_b = mu_b.double(), biased_var_b.double()
        uvar = F.unbiased_var(biased_var_b, m)  # Algorithm 2, step 10
        if self.sum_mean is None:
            self.sum_mean, self.sum_uvar = m * mu_b, m * uvar
            self.pooled = (torch.tensor([m], dtype=torch.float64), mu_b, biased_var_b)
        else:
            self.sum_mean += m * mu_b
            self.sum_uvar += m * uvar
            n0, mu0, v0 = self.pooled
            total, mean, var = F.merge_moments(
                torch.cat([n0, torch.tensor([m], dtype=torch.float64)]),
                torch.stack([mu0, mu_b]),
                torch.stack([v0, biased_var_b]),
            )
            self.pooled = (total.reshape(1), mean, var)
        self.stats.batches += 1
        self.stats.values += m
        if self.keep:
            self.means.append(mu_b)
            self.unbiased_vars.append(uvar)
            self.counts.append(m)

    def estimate(self, estimator: str) -> tuple[Tensor, Tensor]:
        if estimator == "paper":  # weighted by m, exact for unequal batch sizes
            n = self.stats.values
            return self.sum_mean / n, self.sum_uvar / n
        total, mean, biased = self.pooled  # variance of all samples pooled together
        n = total.item()
        return mean, biased * (n / (n - 1))

    def stderr(self) -> tuple[Tensor, Tensor] | None:
        """Standard errors of the E_B[.] estimates from the spread across batches."""
        b = len(self.means)
        if b < 2:
            return None
        means, uvars = torch.stack(self.means), torch.stack(self.unbiased_vars)
        return means.std(0) / math.sqrt(b), uvars.std(0) / math.sqrt(b)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(
        f"recompute_population_stats cannot feed a batch of type {type(batch).__name__} to "
        "the model; pass forward=lambda model, batch: model(...) to say how"
    )


def recompute_population_stats(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    estimator: str = "paper",
    progress: bool = True,
    compute_stderr: bool = False,
    tol: float | None = None,
    min_batches: int = 2,
) -> PopulationStatsReport:
    """Set every BN layer's running statistics to population estimates (Algorithm 2, steps 8-10).

    The model runs with gradients off; only its BN layers normalize with batch
    statistics (as in training, so each layer sees the inputs it saw during
    training), while dropout and every other module stay in eval mode. Each BN
    layer's per-batch mean mu_B and biased variance sigma2_B (over m = N * spatial
    values per channel, Section 3.2) are accumulated, then

    * ``estimator="paper"``: E[x] = E_B[mu_B], Var[x] = E_B[m/(m-1) sigma2_B],
      each batch weighted by its m (exact for unequal batch sizes);
    * ``estimator="pooled"``: mean and unbiased variance of all values of all
      batches pooled together, as if one huge batch. It adds the spread of the
      batch means to the variance, so it is slightly larger than the paper's
      estimate, by about Var[mu_B].

    Every module's train/eval mode and every BN's momentum and
    ``num_batches_tracked`` are restored afterwards, even on error.

    Args:
        model: the trained BN network (its parameters are not changed).
        batches: an iterable of training mini-batches (tensors, or tuples whose first
            element is the input, or anything ``forward`` understands).
        num_batches: use at most this many batches (default: all).
        forward: ``forward(model, batch)`` runs the model on one batch.
        estimator: ``"paper"`` or ``"pooled"``.
        progress: show a progress bar (only when stderr is a terminal).
        compute_stderr: report per-channel standard errors of the estimates.
        tol: stop once, for every layer and channel, the standard errors relative to
            sqrt(Var[x]) (mean) and Var[x] (variance) fall below ``tol``.
        min_batches: do not stop early before this many batches.

    Returns:
        A :class:`PopulationStatsReport`; BN layers the forward never reached are
        listed in ``unreached`` (and warned about), their statistics unchanged.

    Raises:
        ValueError: no BN layer in the model, an unknown estimator, no batches, or a
            batch with a single value per channel.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.track_running_stats]
    if not bns:
        raise ValueError(
            f"{type(model).__name__} has no BN layer with running statistics; nothing to "
            "recompute (did you mean to call bnlab.insert_batchnorm first?)"
        )
    forward = forward or _default_forward
    keep = compute_stderr or tol is not None
    accs = {m: _Accumulator(n, keep) for n, m in bns}
    modes = {m: m.training for m in model.modules()}
    saved = {
        m: (
            m.momentum,
            m.running_mean.clone(),
            m.running_var.clone(),
            m.num_batches_tracked.clone(),
        )
        for _, m in bns
    }
    hooks = [m.register_forward_pre_hook(lambda mod, args: accs[mod].add(args[0])) for _, m in bns]
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    seen = 0
    stopped = False
    success = False
    try:
        from tqdm.auto import tqdm

        model.eval()
        for _, m in bns:
            m.train()
            m.momentum = 0.0  # batch statistics are used but running ones stay put
        bar = tqdm(
            total=total,
            desc="population statistics",
            unit="batch",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
        )
        with torch.no_grad(), bar:
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                try:
                    forward(model, batch)
                except ValueError as e:
                    raise ValueError(f"batch {seen}: {e}") from e
                seen += 1
                bar.update(1)
                if tol is not None and seen >= min_batches and _converged(accs, tol):
                    stopped = True
                    break
        if seen == 0:
            raise ValueError("recompute_population_stats got no batches; pass training batches")
        success = True
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, rm, rv, nbt) in saved.items():
            m.momentum = momentum
            with torch.no_grad():
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(nbt)
        for m, mode in modes.items():
            m.train(mode)
    report = PopulationStatsReport(estimator, seen, stopped_early=stopped)
    if not success:
        return report
    for m, acc in accs.items():
        if acc.stats.batches == 0:
            report.unreached.append(acc.stats.name)
            continue
        mean, uvar = acc.estimate(estimator)
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(uvar.to(m.running_var.dtype))
        se = acc.stderr() if keep else None
        if se is not None:
            acc.stats.mean_stderr, acc.stats.var_stderr = (t.float() for t in se)
        report.layers.append(acc.stats)
    if report.unreached:
        warnings.warn(
            f"BN layers never reached by the forward pass kept their old statistics: "
            f"{report.unreached}",
            stacklevel=2,
        )
    return report


def _converged(accs: dict, tol: float) -> bool:
    for acc in accs.values():
        se = acc.stderr()
        if se is None:
            return False
        mean, uvar = acc.estimate("paper")
        if (se[0] / uvar.sqrt().clamp_min(1e-12)).max() > tol:
            return False
        if (se[1] / uvar.clamp_min(1e-12)).max() > tol:
            return False
    return True
