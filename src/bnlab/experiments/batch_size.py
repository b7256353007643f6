"""BN as the mini-batch shrinks: from 256 examples to 2, at a fixed number of examples seen.

BN's statistics come from the mini-batch, so they get noisier as it shrinks
(Ioffe 2017 names small mini-batches as where BN falls short). This experiment
trains the Section 4.1 network at batch sizes from 256 down to 2, every run
seeing the same number of training examples (so smaller batches take more
steps), with these normalizations before each sigmoid:

- ``none``: no normalization (the reference every method should beat);
- ``bn``: Batch Normalization (``bnlab.insert_batchnorm``);
- ``brn``: Batch Renormalization (Ioffe 2017; ``bnlab.nn.BatchRenorm1d``), its
  warm-up and limits scaled to the run's length;
- ``ghost``: ghost batch normalization (Hoffer et al. 2017), statistics of
  sub-batches of ``ghost_batch`` examples (plain BN at or below that size);
- ``ln`` and ``gn``: torch's GroupNorm over each copy's 100 units in 1 group
  (LayerNorm) or in 10 groups of 10; they use no batch statistics at all.

The learning rate follows the linear scaling rule by default (``lr * batch /
60``, so every example moves the weights alike); ``--lr-scaling none`` keeps it.
The report draws final test accuracy against batch size per method.
"""

from __future__ import annotations

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
from bnlab.models.mlp import SeedBatchedLinear
from bnlab.nn import BatchRenorm1d, GhostBatchNorm1d
from bnlab.train.loop import TrainJob

__all__ = ["Config", "check_data", "NORMS", "PRESETS", "cell_name", "parse_cell", "with_norm"]

NORMS = ("none", "bn", "brn", "ghost", "ln", "gn")
REFERENCE_BATCH = 60  # the Figure 1 batch, at which the learning rate is --lr


@dataclass
class Config:
    """One batch-size sweep (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [256, 64, 16, 4, 2])
    norms: list[str] = field(default_factory=lambda: list(NORMS))
    examples: int = 120_000  # training examples every run sees
    seeds: int = 3
    init: str = "glorot"
    lr: float = 0.01  # at batch 60; scaled by --lr-scaling
    lr_scaling: str = "linear"
    momentum: float = 0.9
    ghost_batch: int = 8
    evals: int = 10  # evaluations per run, evenly spaced in examples seen
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "batch_sizes",
        "norms",
        "examples",
        "seeds",
        "init",
        "lr",
        "lr_scaling",
        "momentum",
        "ghost_batch",
        "evals",
    )


HELP = {
    "data": DATA_HELP,
    "batch_sizes": "mini-batch sizes, comma-separated",
    "norms": f"normalizations, comma-separated, of {', '.join(NORMS)}",
    "examples": "training examples every run sees (steps = examples / batch size)",
    "seeds": "independent copies per run",
    "init": "initial weights: 'glorot', or a number s for N(0, s^2)",
    "lr": f"SGD learning rate at batch size {REFERENCE_BATCH}",
    "lr_scaling": "'linear' (lr x batch / 60) or 'none'",
    "momentum": "SGD momentum",
    "ghost_batch": "examples per ghost batch (the ghost method)",
    "evals": "evaluations per run, evenly spaced",
    "device": "cpu or cuda",
}

PRESETS = {
    # quick: 12x fewer examples, so 10x the learning rate for the sigmoid network
    # without normalization to leave chance; batch 2 is where BN breaks down.
    "quick": {"batch_sizes": [64, 2], "examples": 10_000, "lr": 0.1, "evals": 2},
    "cpu": {},
    "gpu": {"device": "cuda"},
}


def cell_name(norm: str, batch: int) -> str:
    return f"{norm}-b{batch}"


def parse_cell(name: str) -> tuple[str, int]:
    norm, batch = name.rsplit("-b", 1)
    return norm, int(batch)


def steps_for(cfg: Config, batch: int) -> int:
    return max(1, cfg.examples // batch)


def lr_for(cfg: Config, batch: int) -> float:
    return cfg.lr * batch / REFERENCE_BATCH if cfg.lr_scaling == "linear" else cfg.lr


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    unknown = [n for n in cfg.norms if n not in NORMS]
    validate_common(
        cfg,
        [
            (
                bool(cfg.batch_sizes) and all(b >= 2 for b in cfg.batch_sizes),
                f"--batch-sizes must be at least 2 each (BN needs 2 values), got {cfg.batch_sizes}",
            ),
            (
                bool(cfg.norms) and not unknown,
                f"--norms: unknown {unknown}; choose from {', '.join(NORMS)}",
            ),
            (cfg.examples >= max(cfg.batch_sizes or [1]), "--examples must cover one batch"),
            (cfg.lr_scaling in ("linear", "none"), "--lr-scaling must be linear or none"),
            (cfg.ghost_batch >= 2, f"--ghost-batch must be at least 2, got {cfg.ghost_batch}"),
            (cfg.evals >= 1, f"--evals must be at least 1, got {cfg.evals}"),
        ],
    )


def arms(cfg: Config) -> list[str]:
    # Smallest batches (most steps) first, so the longest runs start early.
    return [cell_name(n, b) for b in sorted(cfg.batch_sizes) for n in cfg.norms]


def describe(cfg: Config) -> list[str]:
    steps = ", ".join(f"{b}: {steps_for(cfg, b):,} steps" for b in cfg.batch_sizes)
    return [
        f"batch_size: {len(cfg.norms)} normalizations x {len(cfg.batch_sizes)} batch sizes, "
        f"{cfg.examples:,} examples each ({steps}), {cfg.seeds} seed(s), lr scaling "
        f"{cfg.lr_scaling}"
    ]


def after_training(cfg: Config, out: Path, records: list[dict]) -> list[dict]:
    """One ``settings`` record per run, so the report needs no naming convention."""
    return [
        {
            "kind": "settings",
            "arm": arm,
            "norm": parse_cell(arm)[0],
            "batch_size": parse_cell(arm)[1],
            "steps": steps_for(cfg, parse_cell(arm)[1]),
            "lr": lr_for(cfg, parse_cell(arm)[1]),
        }
        for arm in arms(cfg)
    ]


def _group_norm(groups_per_copy: int):
    def make(lin: SeedBatchedLinear) -> nn.Module:
        return nn.GroupNorm(lin.copies * groups_per_copy, lin.out_features)

    return make


def with_norm(model: nn.Sequential, make) -> nn.Sequential:
    """``model`` with ``make(linear)`` after every hidden SeedBatchedLinear (before its
    sigmoid), whose bias is dropped as BN's insertion does (Section 3.2)."""
    layers = list(model)
    out = []
    for i, m in enumerate(layers):
        out.append(m)
        hidden = isinstance(m, SeedBatchedLinear) and i + 1 < len(layers)
        if hidden:
            m.bias = None
            out.append(make(m))
    return nn.Sequential(*out)


def build_model(norm: str, batch: int, cfg: Config) -> nn.Module:
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=parse_init(cfg.init))
    steps = steps_for(cfg, batch)
    if norm == "none":
        return model
    if norm == "bn":
        return insert_batchnorm(model)
    if norm == "ln":
        return with_norm(model, _group_norm(1))
    if norm == "gn":
        return with_norm(model, _group_norm(10))
    if norm == "brn":
        # The paper's schedule (plain BN for 5k steps, rmax -> 3 by 40k, dmax -> 5 by
        # 25k), scaled to this run's length as if it were 50k steps long.
        scale = steps / 50_000
        return with_norm(
            model,
            lambda lin: BatchRenorm1d(
                lin.out_features,
                warmup_steps=int(5_000 * scale),
                rmax_steps=max(1, int(40_000 * scale)),
                dmax_steps=max(1, int(25_000 * scale)),
            ),
        )
    if norm == "ghost":
        return with_norm(
            model,
            lambda lin: GhostBatchNorm1d(lin.out_features, virtual_batch_size=cfg.ghost_batch),
        )
    raise ValueError(f"unknown normalization {norm!r}")


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    norm, batch = parse_cell(arm)
    arrays = load_arrays(cfg.data, batch, cfg.seeds, cfg.device, info)
    model = build_model(norm, batch, cfg).to(arrays.device)
    steps = steps_for(cfg, batch)
    every = max(1, steps // cfg.evals)

    def evaluate(m: nn.Module) -> dict:
        return {"test_acc": accuracy(m, arrays.x_test, arrays.y_test, cfg.seeds)}

    return config_job(
        cfg,
        arm,
        model,
        arrays,
        steps=steps,
        batch_size=batch,
        lr=lr_for(cfg, batch),
        eval_every=every,
        checkpoint_every=every * max(1, cfg.evals // 2),
        evaluate=evaluate,
    )
