"""Gradient accumulation that batch normalization respects.

Gradient accumulation splits one optimizer step's mini-batch B into k
micro-batches B_1..B_k, runs forward and backward on each, and steps once. The
gradients then add up to those of B, but a BN layer in training mode would fold
k sets of statistics into its running averages, k times per optimizer step:
with PyTorch's momentum convention (``new = (1 - momentum) * old + momentum *
batch``) the running statistics move ``1 - (1 - momentum)^k`` of the way
instead of ``momentum``, lean towards the last micro-batch, carry the unbiased
correction m_i/(m_i - 1) of each small micro-batch instead of m/(m - 1), and
``num_batches_tracked`` counts micro-batches, so ``momentum=None`` (the
cumulative average) averages over micro-batches.

Inside :func:`accumulate` every BN layer records the count m_i, mean mu_i and
biased variance sigma2_i of each micro-batch it normalizes (Algorithm 1, lines
1-2). At the end of the block its running statistics are put back as they were
and updated once, from the moments of the union (``bnlab.functional.merge_moments``,
the parallel form of Chan et al., exact for unequal sizes)

    m        = sum_i m_i
    mu_B     = sum_i m_i mu_i / m
    sigma2_B = sum_i m_i (sigma2_i + (mu_i - mu_B)^2) / m

with the unbiased correction m/(m - 1) of the whole count (Algorithm 2, step 10)
and one ``num_batches_tracked`` step: ``running_mean``, ``running_var`` and
``num_batches_tracked`` end exactly as after one forward of the whole mini-batch.

Normalization itself stays per micro-batch: each micro-batch is still
normalized with its own mu_i and sigma2_i (Algorithm 1 on B_i), so the
outputs and gradients are those of k batches of size m_i, not of one batch of
size m. That is what accumulation is; only the running statistics (what
inference uses) are made batch-size independent. A consequence: a BN layer
behind another one sees inputs that were normalized per micro-batch, so its
running statistics are exactly those of the union of the inputs *it saw*,
which differ (slightly) from what it would see in one forward of the whole
batch; the first BN layer's, or any layer's whose input no BN precedes, are
equal to one forward of the whole batch. For the forward of the whole
batch, use a bigger batch or :class:`bnlab.nn.SyncBatchNorm` across processes.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

import bnlab.functional as BF
from bnlab.graph import is_batchnorm
from bnlab.nn.batchnorm import _in_backward_pass
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnlab.nn.sync import SyncBatchNorm, _collective, group_size

__all__ = ["BatchNormAccumulation", "accumulate"]

# Layers whose running-statistics update is not one Algorithm 1 batch per forward:
# ghost BN updates once per ghost batch, Batch Renorm's forward reads its running
# statistics (r and d), so neither equals "one big batch" by merging moments.
_REFUSED = (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
)

# BN layers inside an active block, to refuse nesting (weak: a dropped model leaves).
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass
class _Layer:
    """What one BN layer saw in the block."""

    name: str
    module: nn.Module
    calls: int = 0  # calls since the model's last forward: this call's position
    # (position, m, mu_b, biased_var_b) per recorded call, statistics in float64.
    parts: list[tuple[int, int, Tensor, Tensor]] = field(default_factory=list)
    saved: tuple[Tensor, Tensor, Tensor | None] | None = None  # state before its first call

    def group(self):
        """The process group its statistics span (a SyncBatchNorm across > 1 process), or
        None for a per-process layer."""
        m = self.module
        if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) and group_size(m.process_group) > 1:
            return m.process_group if m.process_group is not None else dist.group.WORLD
        return None


class BatchNormAccumulation:
    """The context manager :func:`accumulate` returns; see there.

    Attributes:
        model: the module given to :func:`accumulate`.
        micro_batches: the expected number of model forwards, or None (no check).
        micro_batches_seen: the model's forwards in the block (in training mode, not
            counting a checkpoint's recomputation); read it after the block.
        updated: names of the BN layers updated at the end of the block.
    """

    def __init__(self, model: nn.Module, micro_batches: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"accumulate needs the model (an nn.Module), got {type(model).__name__}"
            )
        if micro_batches is not None and (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, numbers.Integral)
            or micro_batches < 1
        ):
            raise ValueError(
                f"micro_batches must be a positive int (forwards per optimizer step) or None, "
                f"got {micro_batches!r}"
            )
        self.model = model
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        self.micro_batches_seen = 0
        self.updated: list[str] = []
        self._layers: dict[nn.Module, _Layer] = {}
        self._hooks: list = []
        self._inside = False

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> BatchNormAccumulation:
        if self._inside:
            raise RuntimeError("this accumulate() block is already active; nesting is refused")
        layers = {}
        for name, m in self.model.named_modules():
            if not (is_batchnorm(m) and m.track_running_stats and m.running_mean is not None):
                continue
            if isinstance(m, _REFUSED):
                raise TypeError(
                    f"accumulate: {type(m).__name__} '{name}' has no one-update-per-step form "
                    "(ghost BN updates once per ghost batch; Batch Renorm's forward reads its "
                    "running statistics). Accumulate with plain BN layers, or let this layer "
                    "update per micro-batch outside accumulate"
                )
            if m in _ACTIVE:
                raise RuntimeError(
                    f"accumulate: BN layer '{name}' is already inside an accumulate() block; "
                    "nesting is refused (it would merge a step's statistics twice). Enter "
                    "accumulate once per optimizer step, around all of its micro-batches"
                )
            layers[m] = _Layer(name or type(m).__name__, m)
        self.micro_batches_seen = 0
        self.updated = []
        self._layers = {}
        self._inside = True
        if not any(layer.module.training for layer in layers.values()):
            return self  # eval mode (or no BN layer): a no-op, no hooks, no collectives
        self._layers = layers
        _ACTIVE.update(layers)
        # The model's hook first: it resets the call positions before any layer's hook.
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward))
        for m in layers:
            self._hooks.append(m.register_forward_pre_hook(self._on_layer_forward))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        try:
            if exc_type is not None:
                self._restore()  # no partial update: the state before the block
                return False
            try:
                self._update()
            except BaseException:
                self._restore()
                raise
            return False
        finally:
            _ACTIVE.difference_update(self._layers)
            self._layers = {}
            self._inside = False

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args) -> None:
        if _in_backward_pass():  # torch.utils.checkpoint recomputing a forward
            return
        self.micro_batches_seen += 1
        for layer in self._layers.values():
            layer.calls = 0

    def _on_layer_forward(self, module: nn.Module, args) -> None:
        # The layers' own condition for updating running statistics (a training-mode
        # forward that is not a checkpoint's recomputation, PyTorch issue 96136).
        if not (module.training and module.track_running_stats) or _in_backward_pass():
            return
        x = args[0] if args else None
        if not isinstance(x, Tensor):
            return
        layer = self._layers[module]
        if layer.saved is None:
            # Taken here, not at entry: under DDP the first forward broadcasts rank 0's
            # buffers before the layer runs, and one big batch would start from those.
            nbt = module.num_batches_tracked
            layer.saved = (
                module.running_mean.detach().clone(),
                module.running_var.detach().clone(),
                None if nbt is None else nbt.detach().clone(),
            )
        with torch.no_grad():
            x = x.detach()
            m = BF.num_values_per_channel(x)  # m' = N * spatial size (Section 3.2)
            if m == 0:
                zeros = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                mu_b, biased_var_b = zeros, zeros
            else:
                mu_b, biased_var_b = BF.compute_batch_stats(x)
        layer.parts.append((layer.calls, m, mu_b.double(), biased_var_b.double()))
        layer.calls += 1

    # ------------------------------------------------------------------ the update
    def _restore(self) -> None:
        with torch.no_grad():
            for layer in self._layers.values():
                if layer.saved is None:
                    continue
                rm, rv, nbt = layer.saved
                m = layer.module
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nbt is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(nbt)

    def _merged(self, layer: _Layer) -> list[tuple[int, Tensor, Tensor]]:
        """Per call position: (m, mu_B, sigma2_B) of the union of the micro-batches,
        across the process group for a SyncBatchNorm."""
        # Calls outside a forward of the model (a layer called directly) are one position.
        positions = 1 + max((p for p, *_ in layer.parts), default=-1)
        if not self.micro_batches_seen:
            positions = min(positions, 1)
        group = layer.group()
        c = layer.module.num_features
        device = layer.module.running_mean.device
        if group is not None:
            # Every process of the group runs this for every such layer, in module order.
            world = group_size(group)
            p = torch.tensor([positions], dtype=torch.int64, device=device)
            _collective(
                "all_reduce of micro-batch counts",
                lambda: dist.all_reduce(p, op=dist.ReduceOp.MAX, group=group),
                world,
            )
            positions = int(p.item())
        out = []
        for pos in range(positions):
            mine = [
                part for part in layer.parts if (part[0] if self.micro_batches_seen else 0) == pos
            ]
            if mine:
                counts = torch.tensor([float(n) for _, n, _, _ in mine], dtype=torch.float64)
                total, mean, biased_var = BF.merge_moments(
                    counts.to(device),
                    torch.stack([mu for _, _, mu, _ in mine]),
                    torch.stack([v for _, _, _, v in mine]),
                )
            else:
                total = torch.zeros((), dtype=torch.float64, device=device)
                mean = torch.zeros(c, dtype=torch.float64, device=device)
                biased_var = torch.zeros(c, dtype=torch.float64, device=device)
            if group is not None:
                local = torch.cat([total.reshape(1), mean, biased_var])
                gathered = [torch.empty_like(local) for _ in range(world)]
                _collective(
                    "all_gather of accumulated batch statistics",
                    lambda g=gathered, t=local: dist.all_gather(g, t, group=group),
                    world,
                )
                g = torch.stack(gathered)  # (world, 1 + 2C): count, mean, biased variance
                total, mean, biased_var = BF.merge_moments(g[:, 0], g[:, 1 : c + 1], g[:, c + 1 :])
            out.append((int(total.item()), mean, biased_var))
        return out

    def _update(self) -> None:
        merged = {m: self._merged(layer) for m, layer in self._layers.items()}
        recorded = any(layer.parts for layer in self._layers.values())
        if (
            recorded
            and self.micro_batches is not None
            and self.micro_batches_seen != self.micro_batches
        ):
            warnings.warn(
                f"accumulate: expected {self.micro_batches} micro-batches, the model ran "
                f"{self.micro_batches_seen} forward(s) in the block; the running statistics "
                "were updated once from the micro-batches it saw. Pass the number of "
                "forwards per optimizer step (or micro_batches=None to skip this check)",
                RuntimeWarning,
                stacklevel=3,
            )
        self._restore()
        with torch.no_grad():
            for m, parts in merged.items():
                if not parts:
                    continue
                for total, mean, biased_var in parts:  # one update per call position
                    momentum = BF._count_batch(m.num_batches_tracked, m.momentum)
                    if total > 0:  # an empty batch counts but changes nothing, as in torch
                        BF.update_running_stats(
                            m.running_mean, m.running_var, mean, biased_var, total, momentum
                        )
                self.updated.append(self._layers[m].name)


def accumulate(model: nn.Module, micro_batches: int | None = None) -> BatchNormAccumulation:
    """Update BN running statistics once per optimizer step under gradient accumulation.

    Enter it once per optimizer step, around that step's micro-batch forwards (and
    backwards); at the end of the block every BN layer of ``model`` that ran in
    training mode updates its running statistics once, from the exactly merged
    moments of its micro-batches (see this module's docstring), so
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` equal those after one
    forward of the whole mini-batch, for unequal micro-batch sizes too. Each
    micro-batch is still *normalized* with its own statistics (that is accumulation).

    Layers: bnlab's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and fused
    ``BatchNormAct1d/2d/3d`` (the moments of the layer's input, before its activation,
    as its own update takes them), and torch's
    ``BatchNorm1d/2d/3d`` (lazy ones once materialized) and ``SyncBatchNorm``. Ghost BN
    and Batch Renorm are refused (TypeError): their updates are not one per batch of
    Algorithm 1. Frozen layers and layers in eval mode are left alone.

    Semantics:

    * ``momentum`` (PyTorch's convention) applies once per step; ``momentum=None``
      (cumulative average) counts optimizer steps, as it counts batches without
      accumulation.
    * Eval mode: when no BN layer is in training mode at entry, the block does nothing
      (no hooks). The modes at entry decide; do not switch them inside the block.
    * Micro-batch count: each forward of ``model`` is one micro-batch. When
      ``micro_batches`` is given and the block saw another number of forwards, the
      statistics of the forwards it saw are merged and a RuntimeWarning says so: the
      gradients of those forwards were accumulated too (a short last step of an
      epoch is legitimate), and an exit cannot undo them. Pass None for no check.
    * An exception inside the block restores every running statistic and
      ``num_batches_tracked`` to their values before the block: no partial update.
    * Nesting (entering for a model whose BN layers are already inside a block) is
      refused with a RuntimeError.
    * A layer called several times per forward (shared weights) gets one update per
      call position, each from that position's calls merged over the micro-batches,
      as one forward of the whole batch would do. A layer called outside a forward
      of ``model`` (no model forward at all in the block) has its calls merged into one.
    * ``torch.utils.checkpoint`` recomputations are not counted.

    Across processes: a plain BN layer under DDP keeps per-process statistics, as
    without accumulation: each process merges its own micro-batches (DDP's buffer
    broadcast from rank 0 at the first forward is the starting point, as for one big
    batch). A ``SyncBatchNorm`` (bnlab's or torch's) in a group of more than one
    process normalizes each micro-batch with its global moments, as always; its running
    statistics are updated at the end of the block from the union of every process's
    micro-batches (this process's micro-batches merged, then one all_gather per layer
    and an all_reduce of the call count), identical on every process and equal to one
    forward of the whole global batch. Every process of the group must then leave the
    block normally (a process that raises inside it would leave the others waiting
    in that all_gather, as in any collective). Gradient synchronization is DDP's
    business (``ddp.no_sync()`` for all but the last micro-batch).

    Eager mode only: the moments are recorded by forward pre-hooks, which cost one
    more pass over each BN input per micro-batch.

    Args:
        model: the network (or its DDP wrapper) whose forwards are the micro-batches.
        micro_batches: the number of forwards expected per block, or None.

    Returns:
        A context manager; ``micro_batches_seen`` and ``updated`` tell, after the block,
        what it saw and which layers it updated.

    Raises:
        TypeError: ``model`` is not a module, or holds ghost BN or Batch Renorm layers.
        ValueError: ``micro_batches`` is not a positive int.
        RuntimeError: nested blocks.

    Example:
        >>> for step in range(steps):
        ...     with bnlab.accumulate(model, micro_batches=4):
        ...         for xb, yb in zip(x.chunk(4), y.chunk(4)):
        ...             loss_fn(model(xb), yb).mul(len(xb) / len(x)).backward()
        ...     opt.step()
        ...     opt.zero_grad()
    """
    return BatchNormAccumulation(model, micro_batches)
