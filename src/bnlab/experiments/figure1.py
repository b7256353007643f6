"""Section 4.1, Figure 1: MNIST, a 3-hidden-layer sigmoid MLP with and without BN.

Claim reproduced: the BN network trains faster and reaches higher test
accuracy (Figure 1a), and the input distribution of a sigmoid in the last
hidden layer is much more stable with BN (Figures 1b, 1c: its 15th, 50th and
85th percentiles over training).

Protocol (PAPER.md, Section 6; what the paper leaves unstated is chosen as in
a public PyTorch reproduction, PAPER.md Section 10): 784-100-100-100-10, sigmoid
hidden units, weights N(0, 0.01^2), biases 0, cross-entropy, mini-batches of 60,
50,000 steps, SGD with momentum 0.9 and learning rate 0.01, identical for both
arms. The BN arm is ``bnlab.insert_batchnorm`` of the baseline network, so both
start from the same weights; both see the same batch order per seed. All seeds
of an arm train together as independent copies (``bnlab.models.mlp``), and the
two arms run in parallel worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bnlab.data import load_mnist_dir
from bnlab.distributed import DistInfo
from bnlab.experiments.mnist import config_job, load_arrays
from bnlab.experiments.runner import run_experiment
from bnlab.insert import format_summary, insert_batchnorm, insertion_summary
from bnlab.models import mnist_mlp
from bnlab.stats.population import recompute_population_stats
from bnlab.train.loop import TrainJob, evaluation
from bnlab.train.schedule import BatchSchedule

__all__ = [
    "BatchSchedule",
    "Figure1Config",
    "build_arm_model",
    "run_figure1",
    "validate",
]

ARMS = ("baseline", "bn")
FULL_STEPS = 50_000
PACKAGED_STEPS = 30_000


@dataclass
class Figure1Config:
    """Resolved configuration of one Figure 1 run (saved as config.json)."""

    data: str | None = None  # folder with the MNIST IDX files; None: packaged 5k subset
    steps: int = FULL_STEPS  # training steps per arm (paper: 50,000)
    seeds: int = 3  # independent runs per arm (seeds 0..seeds-1)
    batch_size: int = 60  # paper: 60
    lr: float = 0.01  # SGD learning rate (unstated in the paper)
    momentum: float = 0.9  # SGD momentum (unstated in the paper)
    init_std: float = 0.01  # std of the Gaussian initial weights ("small random")
    eval_every: int = 500  # steps between test evaluations
    checkpoint_every: int = 5_000  # steps between atomic checkpoints (taken at evaluations)
    unit: int = 0  # sigmoid unit of the last hidden layer tracked in Figure 1(b, c)
    population_batches: int = 100  # training batches for the final population statistics
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.97])
    device: str = "cpu"
    bn_stats: str = "sync"  # under torchrun: global batch statistics, or per-process "ghost"

    # Keys that define the experiment: a run directory only resumes the same ones.
    IDENTITY = (
        "data",
        "steps",
        "seeds",
        "batch_size",
        "lr",
        "momentum",
        "init_std",
        "eval_every",
        "unit",
        "population_batches",
        "thresholds",
        "bn_stats",
    )


def validate(cfg: Figure1Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    checks = [
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (cfg.seeds >= 1, f"--seeds must be at least 1, got {cfg.seeds}"),
        (
            cfg.batch_size >= 2,
            f"--batch-size must be at least 2: the BN arm normalizes over "
            f"the mini-batch, which needs 2 or more examples "
            f"(got {cfg.batch_size})",
        ),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be positive and finite, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (
            math.isfinite(cfg.init_std) and cfg.init_std > 0,
            f"--init-std must be positive and finite, got {cfg.init_std}",
        ),
        (cfg.eval_every >= 1, f"--eval-every must be at least 1, got {cfg.eval_every}"),
        (
            cfg.checkpoint_every >= 1,
            f"--checkpoint-every must be at least 1, got {cfg.checkpoint_every}",
        ),
        (0 <= cfg.unit < 100, f"--unit must be in 0..99 (a hidden unit), got {cfg.unit}"),
        (
            cfg.population_batches >= 1,
            f"--population-batches must be at least 1, got {cfg.population_batches}",
        ),
        (cfg.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {cfg.device!r}"),
        (
            cfg.bn_stats in ("sync", "ghost"),
            f"--bn-stats must be sync or ghost, got {cfg.bn_stats!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")


# ---------------------------------------------------------------- one arm


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, unit: int, seeds: int) -> dict:
    """Test accuracy per seed and percentiles of the tracked sigmoid's input."""
    sigmoids = [m for m in model if isinstance(m, nn.Sigmoid)]
    captured = {}
    hook = sigmoids[-1].register_forward_hook(lambda m, inp, out: captured.update(z=inp[0]))
    try:
        with evaluation(model):
            logits = model(x).view(len(x), seeds, -1)
    finally:
        hook.remove()
    acc = (logits.argmax(-1) == y.unsqueeze(1)).double().mean(0)
    z = captured["z"].view(len(x), seeds, -1)[:, :, unit].double()
    q = torch.quantile(z, torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64), dim=0)
    return {
        "test_acc": acc.tolist(),
        "p15": q[0].tolist(),
        "p50": q[1].tolist(),
        "p85": q[2].tolist(),
    }


def build_arm_model(arm: str, cfg: Figure1Config) -> nn.Module:
    """The baseline network for all seeds, or its BN version (Algorithm 2, steps 1-2)."""
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=cfg.init_std)
    return insert_batchnorm(model) if arm == "bn" else model


def build_job(arm: str, cfg: Figure1Config, info: DistInfo, work: Path) -> TrainJob:
    """One arm as a job for the shared loop: every seed trains as a copy in one model."""
    arrays = load_arrays(cfg.data, cfg.batch_size, cfg.seeds, cfg.device, info)
    dev, x_train = arrays.device, arrays.x_train
    model = build_arm_model(arm, cfg).to(dev)

    def evaluate(m: nn.Module) -> dict:
        return _evaluate(m, arrays.x_test, arrays.y_test, cfg.unit, cfg.seeds)

    def finalize(m: nn.Module) -> dict:
        final = {"test_acc_moving_avg": evaluate(m)["test_acc"]}
        if arm == "bn":
            # Algorithm 2, steps 8-10: population statistics from training batches
            # (the batches that would follow the last step), weights frozen.
            pop = [
                x_train[arrays.schedule.indices(cfg.steps + k).to(dev)].view(cfg.batch_size, -1)
                for k in range(cfg.population_batches)
            ]
            recompute_population_stats(m, pop, progress=False)
            final["test_acc_population"] = evaluate(m)["test_acc"]
        return final

    return config_job(cfg, arm, model, arrays, evaluate=evaluate, finalize=finalize)


# ---------------------------------------------------------------- the whole run


def check_data(cfg: Figure1Config) -> None:
    """Fail fast, before any output, on missing or corrupt MNIST files."""
    if cfg.data is not None:
        load_mnist_dir(cfg.data)


def describe(cfg: Figure1Config) -> list[str]:
    lines = [
        f"figure1: {cfg.seeds} seed(s) x {len(ARMS)} arms x {cfg.steps} steps",
        "BN arm: " + format_summary(insertion_summary(build_arm_model("bn", cfg))),
    ]
    if cfg.seeds > 1:
        lines.append(
            f"(features count all {cfg.seeds} seeds, trained together as independent copies)"
        )
    return lines


def arms(cfg: Figure1Config) -> tuple[str, ...]:
    return ARMS


def run_figure1(
    cfg: Figure1Config,
    out: Path,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
    log=print,
    timeout: float = 300.0,
) -> dict | None:
    """Run (or resume) the Figure 1 experiment in ``out`` and build its report.

    Launched under ``torchrun`` with several processes, the arms train one after
    the other, each data-parallel over all processes (DDP with SyncBatchNorm);
    rank 0 writes every file. Otherwise the two arms run in ``workers`` processes.

    Returns:
        The summary (as written to ``out/summary.json``); None on ranks other than 0.
    """
    return run_experiment(__name__, cfg, out, resume, workers, progress, log, timeout)
