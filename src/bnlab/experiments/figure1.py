"""Section 4.1, Figure 1: MNIST, a 3-hidden-layer sigmoid MLP with and without BN.

Claim reproduced: the BN network trains faster and reaches higher test
accuracy (Figure 1a), and the input distribution of a sigmoid in the last
hidden layer is much more stable with BN (Figures 1b, 1c: its 15th, 50th and
85th percentiles over training).

Protocol (Section 4.1 of the paper; what it leaves unstated is chosen as in a
public PyTorch reproduction of Figure 1): 784-100-100-100-10, sigmoid
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
from bnlab.experiments.mnist_kit import DATA_HELP, config_job, load_arrays
from bnlab.insert import format_summary, insert_batchnorm, insertion_summary
from bnlab.models import mnist_mlp
from bnlab.stats.population import recompute_population_stats
from bnlab.train.loop import TrainJob, evaluation
from bnlab.train.schedule import BatchSchedule

__all__ = [
    "HELP",
    "PRESETS",
    "BatchSchedule",
    "Config",
    "build_arm_model",
    "validate",
]

ARMS = ("baseline", "bn")


@dataclass
class Config:
    """Resolved configuration of one Figure 1 run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None  # folder with the MNIST IDX files; None: packaged 5k subset
    steps: int = 30_000  # training steps per arm (paper: 50,000; the gpu preset)
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
        "preset",
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


HELP = {
    "data": DATA_HELP,
    "steps": "training steps per arm (the paper: 50,000)",
    "seeds": "independent runs per arm",
    "batch_size": "mini-batch size (the paper: 60; at least 2 for BN)",
    "lr": "SGD learning rate (unstated in the paper)",
    "momentum": "SGD momentum (unstated in the paper)",
    "init_std": "std of the Gaussian initial weights",
    "eval_every": "steps between test-set evaluations",
    "checkpoint_every": "steps between checkpoints (taken at the next evaluation)",
    "unit": "index of the last-hidden-layer sigmoid tracked in Figure 1(b, c)",
    "population_batches": "training batches for the final population statistics (Alg. 2)",
    "thresholds": "test accuracies whose first step is reported, comma-separated",
    "device": "cpu or cuda",
    "bn_stats": "under torchrun: BN statistics of the global batch (sync: SyncBatchNorm) "
    "or of each process's slice (ghost)",
}

# quick: a smoke test (BN's lead is visible: without BN the network sits at chance for
# thousands of steps); cpu: 30,000 steps x 3 seeds on 2 cores; gpu: the paper's 50,000.
PRESETS = {
    "quick": {"steps": 2_000, "seeds": 2, "eval_every": 200, "checkpoint_every": 1_000},
    "cpu": {},
    "gpu": {"steps": 50_000, "device": "cuda"},
}


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    checks = [
        (cfg.preset in PRESETS, f"--preset must be one of {list(PRESETS)}, got {cfg.preset!r}"),
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


def build_arm_model(arm: str, cfg: Config) -> nn.Module:
    """The baseline network for all seeds, or its BN version (Algorithm 2, steps 1-2)."""
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=cfg.init_std)
    return insert_batchnorm(model) if arm == "bn" else model


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
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


def check_data(cfg: Config) -> None:
    """Fail fast, before any output, on missing or corrupt MNIST files."""
    if cfg.data is not None:
        load_mnist_dir(cfg.data)


def describe(cfg: Config) -> list[str]:
    lines = [
        f"figure1 ({cfg.preset} preset): {cfg.seeds} seed(s) x {len(ARMS)} arms x "
        f"{cfg.steps} steps",
        "BN arm: " + format_summary(insertion_summary(build_arm_model("bn", cfg))),
    ]
    if cfg.seeds > 1:
        lines.append(
            f"(features count all {cfg.seeds} seeds, trained together as independent copies)"
        )
    return lines


def arms(cfg: Config) -> tuple[str, ...]:
    return ARMS


def summary_lines(summary: dict) -> list[str]:
    """What `bnlab reproduce figure1` prints at the end."""
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    f = lambda d: f"{100 * d['mean']:.2f}% ± {100 * d['std']:.2f} (n={d['n']})"  # noqa: E731
    lines = [
        f"final test accuracy: without BN {f(base['final_test_acc'])}, "
        f"with BN {f(bn['final_test_acc'])}"
    ]
    if "final_test_acc_population_stats" in bn:
        lines.append(f"with BN, population statistics: {f(bn['final_test_acc_population_stats'])}")
    return lines


def exit_status(summary: dict) -> tuple[int, str] | None:
    """A diverged arm is a result to report, but not a successful run: status 3."""
    if summary.get("diverged"):
        what = "; ".join(f"{arm}: {text}" for arm, text in summary["diverged"].items())
        return 3, f"diverged ({what}); lower --lr"
    return None
