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

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bnlab.train.schedule import BatchSchedule

__all__ = ["BatchSchedule", "Figure1Config", "build_arm_model", "run_figure1", "validate"]

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

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in self.IDENTITY}


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
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.init_std > 0, f"--init-std must be positive, got {cfg.init_std}"),
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
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x).view(len(x), seeds, -1)
    finally:
        hook.remove()
        model.train(was_training)
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
    from bnlab.insert import insert_batchnorm
    from bnlab.models import mnist_mlp

    model = mnist_mlp(seeds=list(range(cfg.seeds)), init_std=cfg.init_std)
    return insert_batchnorm(model) if arm == "bn" else model


def make_optimizer(model: nn.Module, cfg: Figure1Config) -> torch.optim.Optimizer:
    """SGD with momentum, identical for both arms; PyTorch's momentum convention.

    buf = momentum * buf + grad; param -= lr * buf. The fused kernel (one call per
    step for every parameter) is used where this PyTorch has it for the device.
    """
    params = list(model.parameters())
    try:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused SGD for this device/version
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train_arm(
    arm: str,
    cfg: Figure1Config,
    out: Path,
    resume: bool,
    threads: int,
    progress: bool,
    position: int = 0,
    info=None,
) -> None:
    """Train every seed of one arm, logging to out/work/<arm>.jsonl, checkpointing.

    With ``info`` (a :class:`bnlab.distributed.DistInfo` of several processes, as
    under torchrun) every process takes its slice of each global mini-batch, BN
    statistics are global (SyncBatchNorm) and gradients are averaged by DDP;
    rank 0 alone evaluates, logs and checkpoints.
    """
    import torch.distributed as dist

    from bnlab.data import load_mnist
    from bnlab.distributed import DistInfo, prepare_model, shard
    from bnlab.nn.sync import revert_sync_batchnorm
    from bnlab.stats.population import recompute_population_stats
    from bnlab.train.io import atomic_write_text, load_checkpoint, read_jsonl, save_checkpoint

    torch.set_num_threads(threads)
    info = info or DistInfo()
    main, world = info.is_main, info.world_size
    parent = os.getppid()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path = work / f"{arm}.jsonl", work / f"{arm}.pt"
    data = load_mnist(cfg.data)
    dev = torch.device(cfg.device)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)
    seeds = list(range(cfg.seeds))
    schedule = BatchSchedule(len(x_train), cfg.batch_size, seeds)
    model = build_arm_model(arm, cfg).to(dev)
    opt = make_optimizer(model, cfg)
    start = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if state.get("done"):
            return
        kept = [r for r in read_jsonl(log_path) if r.get("kind") == "eval" and r["step"] <= start]
        if main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    elif main:
        log_path.unlink(missing_ok=True)
    net = prepare_model(model, info, stats=cfg.bn_stats)  # DDP (+ SyncBatchNorm) if world > 1
    part = shard(cfg.batch_size, info.rank, world)

    def log_eval(step: int, train_loss: float | None) -> None:
        ev = _evaluate(model, x_test, y_test, cfg.unit, cfg.seeds)
        _append(
            log_path, [{"kind": "eval", "arm": arm, "step": step, "train_loss": train_loss, **ev}]
        )

    if start == 0 and main:
        log_eval(0, None)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"{arm:>8} ({cfg.seeds} seeds)",
        position=position,
        unit="step",
        mininterval=1.0,
        leave=True,
        disable=not (progress and main and sys.stderr.isatty()),
    )
    loss_sum, loss_n = torch.zeros((), device=dev), 0
    s_count = cfg.seeds
    last_ckpt = start
    with bar:
        for step in range(start, cfg.steps):
            idx = schedule.indices(step)[part].to(dev)  # (b, S): this process's rows
            xb = x_train[idx].view(len(idx), -1)  # (b, S*784): seed k's batch in block k
            yb = y_train[idx].view(-1)
            logits = net(xb).view(-1, 10)
            # Sum over seeds of each seed's mean loss over the global batch (every copy
            # gets its own gradient), times world because DDP averages over processes.
            loss = TF.cross_entropy(logits, yb, reduction="sum") * (world / cfg.batch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            loss_n += 1
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                if main:
                    log_eval(done, (loss_sum / (loss_n * s_count)).item())
                loss_sum.zero_()
                loss_n = 0
                bar.update(done - bar.n)
                if world == 1 and os.getppid() != parent:  # launcher died: stop, not orphaned
                    return
                # Checkpoint only right after an evaluation, so a resumed run's loss
                # windows and records line up exactly with an uninterrupted run's.
                if done // cfg.checkpoint_every > last_ckpt // cfg.checkpoint_every and (
                    done < cfg.steps and main
                ):
                    save_checkpoint(
                        ckpt_path,
                        {"step": done, "model": model.state_dict(), "optimizer": opt.state_dict()},
                    )
                    last_ckpt = done
    if not main:
        return
    if world > 1:  # population statistics on rank 0 alone: local BN on a copy
        import copy

        model = revert_sync_batchnorm(copy.deepcopy(model))
    final = {
        "kind": "final",
        "arm": arm,
        "step": cfg.steps,
        "test_acc_moving_avg": _evaluate(model, x_test, y_test, cfg.unit, cfg.seeds)["test_acc"],
    }
    if arm == "bn":
        # Algorithm 2, steps 8-10: population statistics from training batches
        # (the batches that would follow the last step), weights frozen.
        pop = [
            x_train[schedule.indices(cfg.steps + k).to(dev)].view(cfg.batch_size, -1)
            for k in range(cfg.population_batches)
        ]
        recompute_population_stats(model, pop, progress=False)
        final["test_acc_population"] = _evaluate(model, x_test, y_test, cfg.unit, cfg.seeds)[
            "test_acc"
        ]
    _append(log_path, [final])
    save_checkpoint(
        ckpt_path,
        {
            "step": cfg.steps,
            "done": True,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
        },
    )


def _worker(arm, cfg, out, resume, threads, progress, position):
    try:
        train_arm(arm, cfg, out, resume, threads, progress, position)
    except BaseException as e:
        (out / "work" / f"{arm}.error").write_text(
            f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
        )
        raise SystemExit(1) from e


# ---------------------------------------------------------------- the whole run


def _env() -> dict:
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    from bnlab import __version__

    return {
        "bnlab": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_revision": rev,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_out_dir(out: Path, cfg: Figure1Config, resume: bool) -> bool:
    """Check ``out`` may hold this run; returns whether there is work to resume.

    Raises:
        ValueError: ``out`` holds another experiment or other files, or holds this
            run but ``--resume`` was not given.
    """
    config_path = out / "config.json"
    if config_path.exists():
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is corrupt; choose another --out") from e
        if saved.get("experiment") != "figure1":
            raise ValueError(
                f"--out {out} holds a different experiment "
                f"({saved.get('experiment')!r}); choose another --out"
            )
        diff = {
            k: (saved.get("config", {}).get(k), v)
            for k, v in cfg.identity().items()
            if saved.get("config", {}).get(k) != v
        }
        if diff:
            details = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"--out {out} holds a run with another configuration ({details}); "
                "choose another --out, or repeat the original options"
            )
        if not resume:
            raise ValueError(
                f"--out {out} already holds this run; pass --resume to continue "
                "it, or choose another --out"
            )
        return True
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"--out {out} is not empty and holds no bnlab run; choose a new or empty folder"
        )
    return False


def run_figure1(
    cfg: Figure1Config,
    out: Path,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
    log=print,
    timeout: float = 300.0,
) -> dict:
    """Run (or resume) the Figure 1 experiment in ``out`` and build its report.

    Launched under ``torchrun`` with several processes, the arms train one after
    the other, each data-parallel over all processes (DDP with SyncBatchNorm);
    rank 0 writes every file. Otherwise the two arms run in ``workers`` processes.

    Returns:
        The summary (as written to ``out/summary.json``); None on ranks other than 0.
    """
    import torch.distributed as dist

    from bnlab.distributed import init_distributed
    from bnlab.report.figure1 import build_report
    from bnlab.train.io import read_jsonl, write_json

    info = init_distributed(timeout=timeout)  # a single process unless torchrun started us
    main, world = info.is_main, info.world_size

    validate(cfg)
    if cfg.data is not None:
        from bnlab.data import load_mnist_dir

        load_mnist_dir(cfg.data)  # fail fast, before any output, on missing/corrupt files
    out = Path(out)
    resuming = prepare_out_dir(out, cfg, resume)  # every rank checks before rank 0 writes
    if world > 1:
        dist.barrier()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if main and not resuming:
        write_json(
            out / "config.json", {"experiment": "figure1", "config": dataclasses.asdict(cfg)}
        )
        write_json(out / "env.json", _env())
        (out / "work").mkdir(exist_ok=True)
        for arm in ARMS:
            (out / "work" / f"{arm}.error").unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    cores = os.cpu_count() or 1
    workers = 1 if world > 1 else max(1, min(workers, len(ARMS)))
    threads = max(1, cores // workers)
    if world > 1:
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if main:
        stats = "SyncBatchNorm" if cfg.bn_stats == "sync" else "per-process ghost BN statistics"
        how = (
            f"{world} data-parallel processes (DDP, {stats})"
            if world > 1
            else f"{workers} worker(s)"
        )
        log(
            f"figure1: {cfg.seeds} seed(s) x {len(ARMS)} arms x {cfg.steps} steps, {how} x "
            f"{threads} thread(s), output in {out}"
        )
        from bnlab.insert import format_summary, insertion_summary

        log("BN arm: " + format_summary(insertion_summary(build_arm_model("bn", cfg))))
        if cfg.seeds > 1:
            log(f"(features count all {cfg.seeds} seeds, trained together as independent copies)")
    t0 = time.perf_counter()
    if workers == 1 or cfg.device == "cuda":
        for i, arm in enumerate(ARMS):
            train_arm(arm, cfg, out, resuming, threads, progress, i, info)
    else:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(arm, cfg, out, resuming, threads, progress, i))
            for i, arm in enumerate(ARMS)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        errors = [(out / "work" / f"{a}.error") for a in ARMS]
        failed = [e.read_text().splitlines()[0] for e in errors if e.exists()]
        if failed or any(p.exitcode != 0 for p in procs):
            raise RuntimeError(
                "a training worker failed: "
                + "; ".join(failed or ["killed"])
                + f" (details in {out / 'work'}); fix it and rerun with --resume"
            )
    elapsed = time.perf_counter() - t0
    if not main:
        return None
    records = [r for arm in ARMS for r in read_jsonl(out / "work" / f"{arm}.jsonl")]
    from bnlab.train.io import atomic_write_text

    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    env = json.loads((out / "env.json").read_text())
    env["train_seconds_last_session"] = round(elapsed, 1)
    write_json(out / "env.json", env)
    return build_report(out)
