"""Population statistics for inference: Algorithm 2, steps 8-10.

With the trained parameters frozen, process several training mini-batches
and set each BN layer's inference statistics to

    E[x]   = E_B[mu_B]
    Var[x] = m / (m - 1) * E_B[sigma2_B]        (the unbiased estimate)

instead of relying on the moving averages kept during training, which lag
behind the final weights (as fvcore's ``precise_bn`` argues too).
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import bnlab.functional as BF
from bnlab.graph import is_batchnorm
from bnlab.nn.batchnorm import nonfinite_stats_message
from bnlab.nn.sync import SyncBatchNorm, global_moments, group_size

__all__ = ["LayerStats", "PopulationStatsReport", "recompute_population_stats"]

ESTIMATORS = ("paper", "pooled")


@dataclass
class LayerStats:
    """What one BN layer saw during the pass.

    Attributes:
        name: qualified name of the BN layer in the model.
        batches: mini-batches it was called on.
        values: sum over those batches of m (N times the spatial size, Section 3.2).
        mean_stderr, var_stderr: per-channel standard errors of E[x] and Var[x]
            (when ``compute_stderr`` or ``tol`` was given and at least 2 batches ran).
    """

    name: str
    batches: int = 0
    values: int = 0
    mean_stderr: Tensor | None = None
    var_stderr: Tensor | None = None


@dataclass
class PopulationStatsReport:
    """Returned by :func:`recompute_population_stats`.

    Attributes:
        estimator: ``"paper"`` or ``"pooled"``.
        batches: mini-batches processed.
        layers: one :class:`LayerStats` per BN layer that was reached.
        unreached: names of BN layers the forward never called (statistics unchanged).
        stopped_early: the ``tol`` criterion stopped the pass before the data ran out.
    """

    estimator: str
    batches: int
    layers: list[LayerStats] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    stopped_early: bool = False


class _Accumulator:
    """One BN layer's per-batch statistics (m_b, mu_b, sigma2_b), in float64."""

    def __init__(self, name: str, module: nn.Module):
        self.stats = LayerStats(name)
        # Processes a SyncBatchNorm (ours or PyTorch's) normalizes over; 1 for other BN.
        is_sync = isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))
        self.group = module.process_group if is_sync else None
        self.world_size = group_size(self.group) if is_sync else 1
        self.counts: list[int] = []
        self.means: list[Tensor] = []
        self.biased_vars: list[Tensor] = []
        self.finite: list[Tensor] = []  # (C,) bool per batch: its statistics are finite
        self.warned = False

    def add(self, x: Tensor) -> None:
        x = x.detach()
        if self.world_size > 1:
            # SyncBatchNorm under torch.distributed: the mini-batch B of Algorithm 2 is
            # the union of every process's slice, so record its statistics (one
            # all_gather besides the layer's own; the same on every process, and so
            # are the estimates).
            m, mu_b, biased_var_b = global_moments(x, self.group, self.world_size)
        else:
            BF.check_batch_norm_input(x, training=True)
            m = BF.num_values_per_channel(x)  # m' = N * spatial size for conv inputs (Sec. 3.2)
            if m == 0:
                return  # an empty batch says nothing about the population
            mu_b, biased_var_b = BF.compute_batch_stats(x)
        if m == 0:
            return  # every process's slice was empty
        finite = torch.isfinite(mu_b) & torch.isfinite(biased_var_b)
        if not self.warned and not bool(finite.all()):
            # As in the modules: a channel whose batch statistics overflowed or hold a
            # NaN leaves that batch out of its estimate, with one warning per layer.
            self.warned = True
            warnings.warn(
                nonfinite_stats_message(self.stats.name, mu_b, biased_var_b),
                RuntimeWarning,
                stacklevel=2,
            )
        self.counts.append(m)
        self.finite.append(finite)
        self.means.append(torch.where(finite, mu_b, 0).double())
        self.biased_vars.append(torch.where(finite, biased_var_b, 0).double())
        self.stats.batches += 1
        self.stats.values += m

    def _counts(self) -> Tensor:
        """(B, C) values per batch and channel: 0 where that batch's statistics were not finite."""
        m = torch.tensor(self.counts, dtype=torch.float64, device=self.means[0].device)
        return m.unsqueeze(1) * torch.stack(self.finite).to(m.dtype)

    def _weights(self) -> Tensor:
        n = self._counts()
        return n / n.sum(0)  # (B, C): each batch weighted by its m (NaN: no finite batch)

    def _unbiased_vars(self) -> Tensor:
        # Algorithm 2, step 10, per batch: m/(m-1) sigma2_B.
        return torch.stack([BF.unbiased_var(v, m) for v, m in zip(self.biased_vars, self.counts)])

    def estimate(self, estimator: str) -> tuple[Tensor, Tensor]:
        if estimator == "paper":
            # E[x] = E_B[mu_B], Var[x] = E_B[m/(m-1) sigma2_B] (Algorithm 2, step 10),
            # the expectation over batches weighted by m (exact for unequal sizes).
            w = self._weights()
            return (w * torch.stack(self.means)).sum(0), (w * self._unbiased_vars()).sum(0)
        # Pooled: mean and unbiased variance of all values of all batches together.
        total, mean, biased = BF.merge_moments(
            self._counts(), torch.stack(self.means), torch.stack(self.biased_vars)
        )
        return mean, biased * (total / (total - 1))

    def stderr(self) -> tuple[Tensor, Tensor] | None:
        """Standard errors of the weighted batch averages E_B[mu_B], E_B[unbiased var].

        With weights w_b = m_b / sum m: se^2 = B/(B-1) * sum_b w_b^2 (x_b - xbar)^2,
        which is std/sqrt(B) for equal batch sizes.
        """
        b = torch.stack(self.finite).sum(0).to(torch.float64)  # (C,) batches per channel
        if len(self.counts) < 2:
            return None
        w = self._weights()
        out = []
        for per_batch in (torch.stack(self.means), self._unbiased_vars()):
            avg = (w * per_batch).sum(0)
            out.append(((w * (per_batch - avg)).square().sum(0) * (b / (b - 1))).sqrt())
        return out[0], out[1]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])  # (inputs, targets): the inputs
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

    The model runs without gradients (its weights are frozen, step 8); only its
    BN layers normalize with batch statistics, as in training, so each layer
    sees the inputs it saw during training (step 9), while dropout and every
    other module stay in eval mode. A forward pre-hook on each BN layer records
    the mini-batch mean mu_B and biased variance sigma2_B of its input, per
    channel over m values (m = N for (N, C) input, m' = N * H * W for
    convolutional input, Section 3.2); for a fused BN + activation layer
    (:class:`bnlab.nn.BatchNormAct2d`) that is its input, before the activation, and its
    ``act`` and ``drop`` submodules stay in eval mode with the other modules. The layers'
    own running-statistic updates are disabled during the pass. Then (step 10)

    * ``estimator="paper"``: E[x] = E_B[mu_B] and Var[x] = E_B[m/(m-1) sigma2_B],
      each batch weighted by its m, so unequal batch sizes (a short last batch)
      are exact. For equal batch sizes this is what PyTorch's BN computes with
      ``momentum=None`` after ``reset_running_stats()``.
    * ``estimator="pooled"``: the mean and unbiased variance of all values of all
      batches pooled together, as if one huge batch. fvcore's precise BN pools
      the same way but keeps the biased variance; ours is Bessel-corrected,
      n/(n-1) times fvcore's for n pooled values. The means of the two
      estimators are equal. The pooled variance
      is the within-batch variance plus the spread of the batch means,
      ~ E_B[sigma2_B] + Var_B[mu_B]. For independent samples in well-shuffled
      batches both variances estimate the same Var[x]; they differ when the batch
      means vary more than sampling explains (unshuffled or class-sorted batches,
      correlated values within a batch such as the m' = N*H*W positions of a
      feature map): then the pooled one is larger, the paper's is the average
      variance a layer sees inside a mini-batch.

    Under ``torch.distributed``, a SyncBatchNorm layer (ours or PyTorch's) records
    the statistics of the global mini-batch, the union of every process's slice
    (one all_gather per layer and batch besides the layer's own), so every process
    must call this with its slice of the same batches, and all of them get the same
    estimates. Other BN layers use each process's own batches.

    Every module's ``training`` flag and every BN's momentum, running statistics
    and ``num_batches_tracked`` are restored before the new statistics are
    written, also when an exception is raised (then nothing changes).

    Args:
        model: the trained BN network (its parameters are not changed).
        batches: an iterable of training mini-batches: tensors, ``(inputs, targets)``
            tuples/lists whose first element is the input, or anything ``forward``
            understands.
        num_batches: use at most this many batches (default: all).
        forward: ``forward(model, batch)`` runs the model on one batch.
        estimator: ``"paper"`` or ``"pooled"`` (see above).
        progress: show a tqdm progress bar (only when stderr is a terminal).
        compute_stderr: report per-channel standard errors of the estimates, from the
            spread of the per-batch values (needs at least 2 batches).
        tol: stop once, for every layer and channel, the standard errors relative to
            sqrt(Var[x]) (for the mean) and to Var[x] (for the variance) are below ``tol``.
        min_batches: do not stop early before this many batches.

    Returns:
        A :class:`PopulationStatsReport`. BN layers the forward never reached are
        listed in ``unreached`` and warned about; their statistics are unchanged.

    Raises:
        ValueError: no BN layer with running statistics, an unknown estimator, a bad
            ``num_batches``/``tol``, no batches, or a batch with a single value per
            channel (the message names the batch).
        TypeError: a batch the default ``forward`` cannot feed.

    Example:
        >>> bn_net = bnlab.insert_batchnorm(net)   # ... then train it ...
        >>> report = recompute_population_stats(bn_net, train_loader, num_batches=100)
        >>> report.batches, report.unreached
        (100, [])
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and (
        isinstance(num_batches, bool)
        or not isinstance(num_batches, numbers.Integral)
        or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if tol is not None and not (isinstance(tol, numbers.Real) and tol > 0):
        raise ValueError(f"tol must be a positive number such as 0.01, got {tol!r}")
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of mini-batches (a list, a DataLoader), "
            f"got {type(batches).__name__}"
        )
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and m.track_running_stats]
    if not bns:
        raise ValueError(
            f"{type(model).__name__} has no BN layer with running statistics; nothing to "
            "recompute (did you mean to call bnlab.insert_batchnorm first?)"
        )
    forward = forward or _default_forward
    keep_stderr = compute_stderr or tol is not None
    accs = {m: _Accumulator(n or type(m).__name__, m) for n, m in bns}
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
    if hasattr(batches, "__len__"):
        total = len(batches) if total is None else min(total, len(batches))
    seen = 0
    stopped = False
    try:
        from tqdm.auto import tqdm

        for m in modes:  # flags set directly: no train() overrides (frozen BN) interfere
            m.training = False
        for _, m in bns:
            m.training = True  # batch statistics, as in training (Algorithm 2, step 9)
            m.momentum = 0.0  # ... but the running statistics stay put
        bar = tqdm(
            total=total,
            desc="population statistics",
            unit="batch",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
        )
        with torch.no_grad(), bar:
            for batch in batches:
                try:
                    forward(model, batch)
                except ValueError as e:
                    raise ValueError(f"batch {seen}: {e}") from e
                seen += 1
                bar.update(1)
                if num_batches is not None and seen >= num_batches:
                    break
                if (
                    tol is not None
                    and seen >= min_batches
                    and _check_now(seen)
                    and _converged(accs, tol)
                ):
                    stopped = True
                    break
        if seen == 0:
            raise ValueError(
                "recompute_population_stats got no batches (an empty iterable); pass "
                "training mini-batches"
            )
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for m, (momentum, rm, rv, nbt) in saved.items():
                m.momentum = momentum
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(nbt)
        for m, mode in modes.items():
            m.training = mode
    report = PopulationStatsReport(estimator, seen, stopped_early=stopped)
    for m, acc in accs.items():
        if acc.stats.batches == 0:
            report.unreached.append(acc.stats.name)
            continue
        mean, uvar = acc.estimate(estimator)
        seen_ok = torch.stack(acc.finite).any(0)  # channels with at least one finite batch
        with torch.no_grad():
            m.running_mean.copy_(torch.where(seen_ok, mean.to(m.running_mean), m.running_mean))
            m.running_var.copy_(torch.where(seen_ok, uvar.to(m.running_var), m.running_var))
        se = acc.stderr() if keep_stderr else None
        if se is not None:
            acc.stats.mean_stderr, acc.stats.var_stderr = se
        report.layers.append(acc.stats)
    if num_batches is not None and seen < num_batches and not stopped:
        warnings.warn(
            f"recompute_population_stats: num_batches={num_batches} was asked for but the "
            f"data held only {seen} batch(es); the estimates use those {seen}",
            stacklevel=2,
        )
    if report.unreached:
        warnings.warn(
            f"recompute_population_stats: BN layers never reached by the forward pass kept "
            f"their old statistics: {report.unreached}; check forward= or the model's branches",
            stacklevel=2,
        )
    return report


def _check_now(seen: int) -> bool:
    """Test convergence after every batch up to 100, then every (seen // 100)-th batch.

    Between 100 k and 100 (k + 1) batches that is about 100 / k tests (rounded
    up), so a decade of batches (from n to 10 n, n >= 100) holds about 285 of them
    (100 ln 10 ~ 230, plus the rounding), and as each test costs O(seen), all of
    them together cost O(100 * batches).
    """
    return seen <= 100 or seen % (seen // 100) == 0


def _converged(accs: dict, tol: float) -> bool:
    for acc in accs.values():
        if not acc.counts:
            continue  # unreached so far: no evidence either way
        se = acc.stderr()
        if se is None:
            return False
        _, uvar = acc.estimate("paper")
        # NaN (a channel with under 2 finite batches so far) counts as not converged.
        if not bool((se[0] / uvar.sqrt().clamp_min(1e-12) <= tol).all()):
            return False
        if not bool((se[1] / uvar.clamp_min(1e-12) <= tol).all()):
            return False
    return True
