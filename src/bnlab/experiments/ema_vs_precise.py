"""Beyond the paper: evaluating with moving averages (EMA) or with precise BN statistics.

Algorithm 2 (steps 8-10) sets the inference statistics from many training
mini-batches with the final weights; the paper notes that moving averages kept
during training serve to watch a model as it trains, and that is what every
framework evaluates with. Wu & Johnson (2021, "Rethinking 'Batch' in
BatchNorm", Section 3) find the EMA inaccurate when the weights move fast
(large batches with the learning rate scaled up, few iterations, early
training): the EMA averages statistics of past weights, starts from the
initial (0, 1), and at large batch it has had few updates. Precise statistics
("PreciseBN", recomputed from training batches with the current weights)
match the weights they evaluate, and the EMA's shortfall shrinks at small
batch sizes, where there are many small steps.

This experiment trains the Section 4.1 network with BN (``bnlab.insert_batchnorm``,
Glorot's initialization) at a small and a large batch size for the same number of
epochs, the learning rate scaled linearly with the batch size (Goyal et al. 2017),
and evaluates every copy at every evaluation twice: with the EMA running
statistics (``momentum`` ``bn_momentum``, PyTorch's convention) and with precise
statistics (:attr:`bnlab.train.loop.TrainJob.precise_bn`, the paper's estimator
over ``precise_bn`` training examples). The EMA is restored after each precise
evaluation, so both evaluations see the same training run. Expected, from Wu &
Johnson: precise > EMA during training at the large batch, about equal at the
small one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data import load_mnist
from bnlab.distributed import DistInfo
from bnlab.experiments.mnist_kit import (
    DATA_HELP,
    check_data,
    config_job,
    load_arrays,
    parse_init,
    validate_common,
)
from bnlab.insert import insert_batchnorm
from bnlab.models import mnist_mlp
from bnlab.train.loop import TrainJob, evaluation

__all__ = [
    "Config",
    "PRESETS",
    "arm_name",
    "check_data",
    "lr_for",
    "parse_arm",
    "precise_batches",
    "steps_for",
]


@dataclass
class Config:
    """One EMA-against-precise-statistics run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None  # MNIST IDX folder; None: the packaged 5,000-digit subset
    batch_sizes: list[int] = field(default_factory=lambda: [32, 1024])  # small and large
    lr: float = 0.1  # SGD learning rate at the smallest batch size; scaled linearly
    epochs: float = 30.0  # passes over the training set, the same for every batch size
    seeds: int = 3  # independent copies per batch size
    momentum: float = 0.9  # SGD momentum
    bn_momentum: float = 0.1  # the EMA's momentum (PyTorch's convention)
    init: str = "glorot"  # weight initialization (so training starts at once)
    evals: int = 20  # evaluations per arm after step 0, evenly spaced
    precise_bn: int = 2_048  # training examples per precise recomputation (whole batches)
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "batch_sizes",
        "lr",
        "epochs",
        "seeds",
        "momentum",
        "bn_momentum",
        "init",
        "evals",
        "precise_bn",
    )


HELP = {
    "data": DATA_HELP,
    "batch_sizes": "mini-batch sizes to compare, comma-separated (the smallest and the "
    "largest are set against each other)",
    "lr": "SGD learning rate at the smallest batch size; batch size b gets lr * b / smallest",
    "epochs": "passes over the training set, the same for every batch size",
    "seeds": "independent copies per batch size",
    "momentum": "SGD momentum",
    "bn_momentum": "momentum of the BN moving averages (EMA), PyTorch's convention: "
    "new = (1 - momentum) * old + momentum * batch",
    "init": "weight initialization: 'glorot' or the std s of N(0, s^2)",
    "evals": "evaluations per batch size after step 0, evenly spaced",
    "precise_bn": "training examples for each recomputation of precise BN statistics "
    "(rounded up to whole batches of the arm's size)",
    "device": "cpu or cuda",
}

PRESETS = {
    "quick": {"batch_sizes": [32, 512], "epochs": 3.0, "evals": 6, "precise_bn": 1_024},
    "cpu": {},
    "gpu": {"device": "cuda", "batch_sizes": [32, 2048], "epochs": 60.0},
}


def arm_name(batch_size: int) -> str:
    """The arm of one batch size, e.g. ``batch32``."""
    return f"batch{batch_size}"


def parse_arm(name: str) -> int:
    """The inverse of :func:`arm_name`: the batch size."""
    return int(name.removeprefix("batch"))


def lr_for(cfg: Config, batch_size: int) -> float:
    """The linear scaling rule: ``lr * batch_size / min(batch_sizes)``."""
    return cfg.lr * batch_size / min(cfg.batch_sizes)


def steps_for(cfg: Config, batch_size: int, train_examples: int) -> int:
    """Steps of ``epochs`` passes over ``train_examples`` at ``batch_size`` (at least 1)."""
    return max(1, round(cfg.epochs * (train_examples // batch_size)))


def precise_batches(cfg: Config, batch_size: int) -> int:
    """Batches of ``batch_size`` that hold ``precise_bn`` examples (rounded up)."""
    return -(-cfg.precise_bn // batch_size)


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    sizes = cfg.batch_sizes
    if (
        not isinstance(sizes, list)
        or len(set(sizes)) < 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 2 for b in sizes)
    ):
        raise ValueError(
            f"--batch-sizes needs at least two different sizes >= 2 (a small and a large "
            f"one), got {sizes}"
        )
    try:
        parse_init(cfg.init)
    except ValueError as e:
        raise ValueError(str(e)) from None
    epochs_ok = math.isfinite(cfg.epochs) and cfg.epochs > 0
    validate_common(
        cfg,
        [
            (epochs_ok, f"--epochs must be > 0, got {cfg.epochs}"),
            (0 < cfg.bn_momentum <= 1, f"--bn-momentum must be in (0, 1], got {cfg.bn_momentum}"),
            (cfg.evals >= 1, f"--evals must be at least 1, got {cfg.evals}"),
            (cfg.precise_bn >= 2, f"--precise-bn must be >= 2 examples, got {cfg.precise_bn}"),
        ],
    )


def arms(cfg: Config) -> list[str]:
    return [arm_name(b) for b in sorted(set(cfg.batch_sizes))]


def describe(cfg: Config) -> list[str]:
    sizes = sorted(set(cfg.batch_sizes))
    return [
        f"ema_vs_precise: batch sizes {', '.join(map(str, sizes))} (learning rate "
        + ", ".join(f"{lr_for(cfg, b):g}" for b in sizes)
        + f"), {cfg.epochs:g} epochs, {cfg.seeds} seed(s) each; every evaluation with EMA "
        f"and with precise statistics ({cfg.precise_bn:,} examples)",
    ]


def after_training(cfg: Config, out: Path, records: list[dict]) -> list[dict]:
    """One ``settings`` record per arm: batch size, learning rate, steps, training-set size."""
    n = len(load_mnist(cfg.data).x_train)
    return [
        {
            "kind": "settings",
            "arm": arm_name(b),
            "batch_size": b,
            "lr": lr_for(cfg, b),
            "steps": steps_for(cfg, b, n),
            "precise_batches": precise_batches(cfg, b),
            "train_examples": n,
        }
        for b in sorted(set(cfg.batch_sizes))
    ]


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    b = parse_arm(arm)
    arrays = load_arrays(cfg.data, b, cfg.seeds, cfg.device, info)
    n = len(arrays.x_train)
    if b > n:
        raise ValueError(f"batch size {b} exceeds the {n:,} training images; use smaller ones")
    steps = steps_for(cfg, b, n)
    torch.manual_seed(0)
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=parse_init(cfg.init))
    model = insert_batchnorm(model, momentum=cfg.bn_momentum).to(arrays.device)
    x_test, y_test, seeds = arrays.x_test, arrays.y_test, cfg.seeds

    def evaluate(m: nn.Module) -> dict:
        """Each copy's test accuracy and mean test cross-entropy, with the BN statistics
        the model holds (the EMA, or the precise ones in the loop's second evaluation)."""
        with evaluation(m):
            logits = m(x_test).view(len(x_test), seeds, -1)  # (N, S, 10)
        labels = y_test.unsqueeze(1).expand(-1, seeds)  # (N, S)
        loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(0)
        acc = (logits.argmax(-1) == labels).double().mean(0)
        return {"test_acc": acc.tolist(), "test_loss": loss.tolist()}

    job = config_job(
        cfg,
        arm,
        model,
        arrays,
        steps=steps,
        batch_size=b,
        lr=lr_for(cfg, b),
        eval_every=max(1, steps // cfg.evals),
        checkpoint_every=max(1, steps // 2),
        evaluate=evaluate,
    )
    job.precise_bn = precise_batches(cfg, b)
    return job
