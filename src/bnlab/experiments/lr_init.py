"""Section 3.3: "BN allows much higher learning rates and less careful initialization".

The paper asserts this and shows it only through the Inception runs (BN-x5,
BN-x30). This experiment measures it on the Section 4.1 network: a grid of SGD
learning rates x initial weight scales (N(0, s^2) for s from 0.001 to 1, plus
Glorot's normal initialization), each cell trained with and without BN from the
same weights, several seeds per cell. The report draws final accuracy, steps
to 90% and divergence as heatmaps and states three verdicts:

- higher learning rates: at each initialization, the largest learning rate at
  which the network still reaches 90% test accuracy, with BN against without;
- less careful initialization: at each learning rate, how many initial scales
  reach 90%, with BN against without;
- our Figure 1 disagreement (``bnlab reproduce figure1``'s report): without BN
  and with N(0, 0.01^2) weights the network sits at chance for ~12k steps, which
  the paper's Figure 1 does not show. With Glorot's initialization the baseline
  learns at once; does BN's speed-up survive there?

Every cell is one arm of the shared run folder (``bn-lr0.1-s0.01`` etc.), so
the grid runs in parallel worker processes and resumes like every experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

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
from bnlab.insert import insert_batchnorm
from bnlab.models import mnist_mlp
from bnlab.train.loop import TrainJob

__all__ = ["Config", "check_data", "PRESETS", "cell_name", "parse_cell"]

NORMS = ("none", "bn")


@dataclass
class Config:
    """One learning-rate x initialization grid run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None  # MNIST IDX folder; None: the packaged 5,000-digit subset
    lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    inits: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, "glorot"])
    steps: int = 5_000  # training steps per cell
    seeds: int = 3  # independent copies per cell
    batch_size: int = 60  # as Figure 1
    momentum: float = 0.9  # as Figure 1
    eval_every: int = 250  # steps between test evaluations
    checkpoint_every: int = 2_500
    threshold: float = 0.9  # the accuracy whose first step is reported
    divergence_loss: float = 100.0  # a mean training loss above this counts as diverged
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "lrs",
        "inits",
        "steps",
        "seeds",
        "batch_size",
        "momentum",
        "eval_every",
        "threshold",
        "divergence_loss",
    )


HELP = {
    "data": DATA_HELP,
    "lrs": "SGD learning rates of the grid, comma-separated",
    "inits": "initial weight scales s of N(0, s^2), comma-separated; 'glorot' for Glorot normal",
    "steps": "training steps per cell",
    "seeds": "independent copies per cell",
    "batch_size": "mini-batch size",
    "momentum": "SGD momentum",
    "eval_every": "steps between test evaluations",
    "checkpoint_every": "steps between checkpoints (taken at the next evaluation)",
    "threshold": "test accuracy a cell must reach in every seed to count as training",
    "divergence_loss": "a copy whose mean training loss on a step exceeds this has diverged "
    "(chance is ln 10 = 2.3)",
    "device": "cpu or cuda",
}

PRESETS = {
    "quick": {"lrs": [0.01, 1.0], "inits": [0.01, "glorot"], "steps": 800, "eval_every": 200},
    "cpu": {},
    "gpu": {"device": "cuda"},
}


def cell_name(norm: str, lr: float, init) -> str:
    """The arm name of one grid cell, e.g. ``bn-lr0.1-s0.01`` or ``none-lr1-glorot``."""
    return f"{norm}-lr{lr:g}-" + ("glorot" if init == "glorot" else f"s{init:g}")


def parse_cell(name: str) -> tuple[str, float, float | str]:
    """The inverse of :func:`cell_name`: ``(norm, lr, init)``."""
    norm, lr, init = name.split("-", 2)
    return norm, float(lr[2:]), "glorot" if init == "glorot" else float(init[1:])


def summary_lines(summary: dict) -> list[str]:
    """What `bnlab reproduce lr-init` prints at the end."""
    best = summary["max_lr_that_trains"]
    return [
        f"largest learning rate that trains, init {s}: without BN {best['none'][s] or '-'}, "
        f"with BN {best['bn'][s] or '-'}"
        for s in best["none"]
    ]


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    if not cfg.lrs or not all(isinstance(v, int | float) and math.isfinite(v) and v > 0
                              for v in cfg.lrs):  # fmt: skip
        raise ValueError(f"--lrs must be positive finite numbers, got {cfg.lrs}")
    if not cfg.inits:
        raise ValueError("--inits must name at least one initialization")
    for s in cfg.inits:
        try:
            parse_init(s)
        except ValueError:
            raise ValueError(f"--inits takes positive numbers or 'glorot', got {s!r}") from None
    validate_common(
        cfg,
        [
            (0 < cfg.threshold < 1, f"--threshold must be in (0, 1), got {cfg.threshold}"),
            (cfg.divergence_loss > math.log(10), "--divergence-loss must exceed chance (2.3)"),
        ],
    )


def arms(cfg: Config) -> list[str]:
    return [cell_name(n, lr, s) for n in NORMS for s in cfg.inits for lr in cfg.lrs]


def describe(cfg: Config) -> list[str]:
    return [
        f"lr_init: {len(cfg.lrs)} learning rates x {len(cfg.inits)} initializations x "
        f"{len(NORMS)} (with and without BN) = {len(arms(cfg))} cells, {cfg.seeds} seed(s) "
        f"each, {cfg.steps} steps",
    ]


def after_training(cfg: Config, out: Path, records: list[dict]) -> list[dict]:
    """One ``settings`` record per cell, so the report needs no naming convention."""
    return [
        {"kind": "settings", "arm": arm, **dict(zip(("norm", "lr", "init"), parse_cell(arm)))}
        for arm in arms(cfg)
    ]


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    norm, lr, init = parse_cell(arm)
    arrays = load_arrays(cfg.data, cfg.batch_size, cfg.seeds, cfg.device, info)
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=init)
    if norm == "bn":
        model = insert_batchnorm(model)
    model = model.to(arrays.device)

    def evaluate(m: nn.Module) -> dict:
        return {"test_acc": accuracy(m, arrays.x_test, arrays.y_test, cfg.seeds)}

    return config_job(
        cfg, arm, model, arrays, lr=lr, evaluate=evaluate, divergence_bound=cfg.divergence_loss
    )
