"""Does BN work by reducing internal covariate shift? Measured, not assumed.

The paper (Sections 1-2) says BN speeds training by reducing internal covariate
shift (ICS), but never measures ICS. Santurkar et al. (2018)
did, and found BN networks show similar or higher gradient-based ICS; they argue
BN makes the loss landscape smoother instead (Santurkar et al. 2018, "How Does
Batch Normalization Help Optimization?"). This
experiment trains the Section 4.1 network three ways and probes it at every
evaluation with :mod:`bnlab.probes`:

- ``none``: no BN; ``bn``: BN before each sigmoid (``bnlab.insert_batchnorm``);
- ``noisy-bn``: BN followed by Santurkar's noise, a random scale and shift drawn
  afresh at every step, which *adds* distributional shift on purpose.

Probes at step t, on that step's batch, never changing the training trajectory:

- distributional shift of each sigmoid's input caused by the step t -> t+1 (its
  update applied to a copy): per-unit mean and variance drift, 1-D Wasserstein
  distance and Gaussian KL, on a fixed set of training images;
- gradient-based ICS of each linear layer (Santurkar's ||G - G'||, cos(G, G'));
- smoothness along the gradient: loss range, gradient predictiveness and
  effective beta-smoothness for step sizes in [1/2, 4] x the learning rate;
- (MNIST network) the singular values of the Jacobians between consecutive BN
  inputs (sigmoid inputs without BN), in units of each point's standard deviation:
  Section 3.3 conjectures BN keeps them close to 1
  (:func:`bnlab.probes.jacobian_singular_values`).

The small Inception of Section 4.2 (``bnlab reproduce inception``'s networks
``inception`` and ``bn-baseline``, the quick preset's size and its offline data:
the packaged digits as 32x32 colour images) is probed the same way, with ReLU
inputs in place of sigmoid inputs, as the arms ``inception-none`` and
``inception-bn`` (``--networks mlp`` leaves them out).

Glorot's initialization is the default for the MNIST network: with Figure 1's N(0, 0.01^2) the
network without BN sits at chance for ~12k steps (see ``bnlab reproduce
lr-init``), and its probes would describe that plateau.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bnlab import probes
from bnlab.distributed import DistInfo
from bnlab.experiments import inception
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

__all__ = ["ARMS", "Config", "check_data", "NoisyShift", "PRESETS", "add_noise_after_bn"]

ARMS = ("none", "bn", "noisy-bn")  # the MNIST network
INCEPTION_ARMS = {"inception-none": "inception", "inception-bn": "bn-baseline"}  # arm -> network


@dataclass
class Config:
    """One shift run (saved as config.json)."""

    preset: str = "cpu"  # quick (a smoke test), cpu (the documented run), gpu
    data: str | None = None
    steps: int = 10_000
    seeds: int = 3
    init: str = "glorot"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 60
    eval_every: int = 500
    probe_examples: int = 1_000
    checkpoint_every: int = 5_000
    networks: list[str] = field(default_factory=lambda: ["mlp", "inception"])
    inception_steps: int = 2_000
    device: str = "cpu"

    IDENTITY = (
        "preset",
        "data",
        "networks",
        "inception_steps",
        "steps",
        "seeds",
        "init",
        "lr",
        "momentum",
        "batch_size",
        "eval_every",
        "probe_examples",
    )


HELP = {
    "data": DATA_HELP,
    "steps": "training steps per arm",
    "seeds": "independent copies per arm",
    "init": "initial weights: 'glorot', or a number s for N(0, s^2)",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "batch_size": "mini-batch size",
    "eval_every": "steps between evaluations, each with every probe",
    "probe_examples": "training images (a fixed random subset) on which shift is measured",
    "networks": "mlp (the Figure 1 network) and/or inception (the small Section 4.2 network)",
    "inception_steps": "training steps of the Inception arms (quick preset's size, batch 32)",
    "checkpoint_every": "steps between checkpoints (taken at the next evaluation)",
    "device": "cpu or cuda",
}

PRESETS = {
    "quick": {"steps": 200, "eval_every": 100, "probe_examples": 200, "inception_steps": 100},
    "cpu": {},
    "gpu": {"device": "cuda"},
}


class NoisyShift(nn.Module):
    """Santurkar et al.'s "noisy BN" noise, put after a BN layer (Santurkar et al. 2018, Section 2).

    In training, at every call (step) and for each copy: mu ~ U(-0.5, 0.5) and
    sigma ~ U(1, 1.25); then per element shift ~ U(mu - 0.1, mu + 0.1) and scale ~
    N(sigma, 0.1), and ``y = x * scale + shift``. Identity in evaluation. Draws from
    torch's global generator, which the shared loop seeds per step, so runs resume
    exactly.
    """

    def __init__(self, copies: int = 1):
        super().__init__()
        self.copies = copies

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        n, width = x.shape[0], x.shape[1]
        per_copy = (1, self.copies, width // self.copies)  # copy k's units are block k
        mu = torch.empty(per_copy[:2] + (1,), device=x.device).uniform_(-0.5, 0.5)
        sigma = torch.empty(per_copy[:2] + (1,), device=x.device).uniform_(1.0, 1.25)
        shift = mu + torch.empty((n, *per_copy[1:]), device=x.device).uniform_(-0.1, 0.1)
        scale = sigma + 0.1 * torch.randn((n, *per_copy[1:]), device=x.device)
        return (x.view(n, *per_copy[1:]) * scale + shift).view_as(x)

    def extra_repr(self) -> str:
        return f"copies={self.copies}"


def add_noise_after_bn(model: nn.Sequential, copies: int) -> nn.Sequential:
    """A copy of ``model`` with a :class:`NoisyShift` after every BN layer."""
    layers = []
    for m in model:
        layers.append(m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__:
            layers.append(NoisyShift(copies))
    return nn.Sequential(*layers)


def validate(cfg: Config) -> None:
    """Reject invalid options up front with one clear message (ValueError)."""
    unknown = [n for n in cfg.networks if n not in ("mlp", "inception")]
    validate_common(
        cfg,
        [
            (cfg.probe_examples >= 2, "--probe-examples must be at least 2"),
            (bool(cfg.networks) and not unknown, f"--networks: unknown {unknown}; mlp, inception"),
            (cfg.inception_steps >= 1, "--inception-steps must be at least 1"),
        ],
    )


def arms(cfg: Config) -> list[str]:
    return [*(ARMS if "mlp" in cfg.networks else ()),
            *(INCEPTION_ARMS if "inception" in cfg.networks else ())]  # fmt: skip


def describe(cfg: Config) -> list[str]:
    return [
        f"shift: {len(arms(cfg))} arms ({', '.join(arms(cfg))}) x {cfg.seeds} seed(s), "
        f"{cfg.steps} steps (MNIST) / {cfg.inception_steps} (Inception), probed every "
        f"{cfg.eval_every} steps"
    ]


def build_arm_model(arm: str, cfg: Config) -> nn.Module:
    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=parse_init(cfg.init))
    if arm != "none":
        model = insert_batchnorm(model)
    if arm == "noisy-bn":
        model = add_noise_after_bn(model, cfg.seeds)
    return model


def build_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    if arm in INCEPTION_ARMS:
        return _inception_job(arm, cfg, info, work)
    arrays = load_arrays(cfg.data, cfg.batch_size, cfg.seeds, cfg.device, info)
    model = build_arm_model(arm, cfg).to(arrays.device)
    pick = torch.randperm(len(arrays.x_train), generator=torch.Generator().manual_seed(0))
    x_probe = arrays.x_train[pick[: cfg.probe_examples].to(arrays.device)]

    def evaluate(m: nn.Module) -> dict:
        return {"test_acc": accuracy(m, arrays.x_test, arrays.y_test, cfg.seeds)}

    job = config_job(cfg, arm, model, arrays, evaluate=evaluate)
    job.probe = _probe(job, x_probe, nn.Sigmoid, jacobians=True)
    return job


def _inception_job(arm: str, cfg: Config, info: DistInfo, work: Path) -> TrainJob:
    """The Section 4.2 network of ``arm`` as ``bnlab reproduce inception --preset quick``
    trains it, probed at ReLU inputs on a fixed training batch (step 0's, augmented)."""
    network = INCEPTION_ARMS[arm]
    icfg = inception.config_for(
        "quick",
        networks=[network],
        steps=cfg.inception_steps,
        seeds=cfg.seeds,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        device=cfg.device,
    )
    job = inception.build_job(network, icfg, info, work)
    job.name, job.finalize = arm, None  # its own records; no ensemble here
    x_probe = job.batch(0, slice(None))[0]
    job.probe = _probe(job, x_probe, nn.ReLU, jacobians=False)  # (N, C, H, W): too large
    return job


def _probe(job: TrainJob, x_probe: Tensor, nonlinearity: type[nn.Module], jacobians: bool):
    """The probe of every evaluation: the per-step shift of the inputs of every
    ``nonlinearity`` module on ``x_probe``, gradient ICS and smoothness on the step's
    batch, and (``jacobians``) the singular values of the layer Jacobians on ``x_probe``."""

    def mean_loss(out: Tensor, y: Tensor) -> Tensor:  # per copy, as the optimizer sees it
        return job.loss(out, y) / job.batch_size

    def probe(m: nn.Module, step: int) -> dict:
        batch = job.batch(step, slice(None))
        lr = job.optimizer.param_groups[0]["lr"] if job.lr_at is None else job.lr_at(step)
        layers, copies = [nonlinearity], job.copies
        before = probes.activation_snapshot(m, x_probe, layers, copies, seed=2 * step)
        # The step t -> t+1 applied to a copy of the model and its optimizer state.
        with torch.random.fork_rng(devices=[]):
            m2, opt2 = copy.deepcopy((m, job.optimizer))
            for group in opt2.param_groups:
                group["lr"] = lr
            opt2.zero_grad(set_to_none=True)
            mean_loss(m2(batch[0]), batch[1]).sum().backward()
            opt2.step()
        after = probes.activation_snapshot(m2, x_probe, layers, copies, seed=2 * step + 1)
        fields = {
            "shift": probes.distribution_shift(before, after),
            "ics": probes.gradient_ics(m, mean_loss, batch, job.optimizer, copies),
            "smoothness": probes.smoothness(m, mean_loss, batch, lr, copies=copies),
        }
        if jacobians:  # Section 3.3's conjecture: between BN inputs (or sigmoid inputs)
            fields["jacobian"] = probes.jacobian_singular_values(m, x_probe, copies=copies)
        return fields

    return probe
