"""Section 3.4: "Batch Normalization regularizes the model and reduces the need for Dropout".

Four arms of the Section 4.1 network, trained from the same weights on the same
batches: without BN, without BN but with dropout after each hidden sigmoid, with
BN, and with BN and dropout. Evaluations record test accuracy and accuracy on a
fixed set of training images, so the report can set the generalization gap
(train minus test) beside the test accuracy. The verdicts: BN alone narrows the
gap, and dropout adds less to a BN network than to one without BN.

Glorot's initialization is the default here: with the Figure 1 N(0, 0.01^2)
weights the network without BN sits at chance for ~12k steps, which would
measure the plateau, not regularization.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
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

__all__ = ["ARMS", "Config", "check_data", "PRESETS"]

ARMS = ("none", "none+dropout", "bn", "bn+dropout")


@dataclass
class Config:
    """One dropout run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None
    steps: int = 10_000
    seeds: int = 3
    dropout: float = 0.5
    init: str = "glorot"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 60
    eval_every: int = 500
    train_eval_examples: int = 1_000
    checkpoint_every: int = 5_000
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "steps",
        "seeds",
        "dropout",
        "init",
        "lr",
        "momentum",
        "batch_size",
        "eval_every",
        "train_eval_examples",
    )


HELP = {
    "data": DATA_HELP,
    "steps": "training steps per arm",
    "seeds": "independent copies per arm",
    "dropout": "dropout probability after each hidden sigmoid in the dropout arms",
    "init": "initial weights: 'glorot', or a number s for N(0, s^2)",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "batch_size": "mini-batch size",
    "eval_every": "steps between evaluations",
    "train_eval_examples": "training images (a fixed random subset) for the train accuracy",
    "checkpoint_every": "steps between checkpoints (taken at the next evaluation)",
    "device": "cpu or cuda",
}

PRESETS = {"quick": {"steps": 300, "eval_every": 100}, "cpu": {}, "gpu": {"device": "cuda"}}


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    validate_common(
        cfg,
        [
            (0 < cfg.dropout < 1, f"--dropout must be in (0, 1), got {cfg.dropout}"),
            (cfg.train_eval_examples >= 1, "--train-eval-examples must be at least 1"),
        ],
    )


def arms(cfg: Config) -> tuple[str, ...]:
    return ARMS


def describe(cfg: Config) -> list[str]:
    return [
        f"dropout: {len(ARMS)} arms ({', '.join(ARMS)}) x {cfg.seeds} seed(s) x {cfg.steps} "
        f"steps, dropout p = {cfg.dropout}, init {cfg.init}, lr {cfg.lr}"
    ]


def summary_lines(summary: dict) -> list[str]:
    """What `bnlab reproduce dropout` prints at the end."""
    return [
        f"{arm:>13}: test {a['test_text']}, train-test gap {a['gap_text']}"
        for arm, a in summary["arms"].items()
    ]


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    arrays = load_arrays(cfg.data, cfg.batch_size, cfg.seeds, cfg.device, info)
    p = cfg.dropout if arm.endswith("+dropout") else 0.0
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=parse_init(cfg.init), dropout=p)
    if arm.startswith("bn"):
        with warnings.catch_warnings():  # its "model has Dropout" advice: here on purpose
            warnings.simplefilter("ignore", UserWarning)
            model = insert_batchnorm(model)
    model = model.to(arrays.device)
    # A fixed random subset of the training set (files may be sorted by class).
    pick = torch.randperm(len(arrays.x_train), generator=torch.Generator().manual_seed(0))
    pick = pick[: cfg.train_eval_examples].to(arrays.device)
    x_fit, y_fit = arrays.x_train[pick], arrays.y_train[pick]

    def evaluate(m: nn.Module) -> dict:
        return {
            "test_acc": accuracy(m, arrays.x_test, arrays.y_test, cfg.seeds),
            "train_acc": accuracy(m, x_fit, y_fit, cfg.seeds),
        }

    return config_job(cfg, arm, model, arrays, evaluate=evaluate)
