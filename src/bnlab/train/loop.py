"""The one training loop every bnlab experiment shares.

An experiment describes what is its own (model, optimizer, data, loss,
evaluation, final measurements) as a :class:`TrainJob`; :func:`train` does the
rest, the same way for every experiment:

- steps, with an optional learning-rate schedule, and the evaluation cadence
  (step 0, then every ``eval_every`` steps and the last step);
- JSON-lines records (``work/<name>.jsonl``: ``eval``, ``diverged`` and one
  ``final`` record), strict JSON (a non-finite number is written as null);
- atomic checkpoints taken right after an evaluation, and ``resume``, which
  continues exactly where an uninterrupted run would be (the per-step random
  state is derived from the step, so dropout needs no saved RNG);
- a progress bar;
- optionally, precise BN statistics at every evaluation (``TrainJob.precise_bn``):
  population statistics recomputed from training batches (Algorithm 2, steps
  8-10) and a second evaluation with them, beside the one with the moving
  averages (EMA);
- data parallelism under ``torchrun``: every process takes its slice of each
  global mini-batch, BN statistics are global (SyncBatchNorm) or per process
  ("ghost"), DDP averages gradients, rank 0 alone evaluates and writes;
- several independent copies of a network per process ("seeds" batched into
  one module, see :mod:`bnlab.models.mlp`): the loss is summed over copies so
  that each copy gets its own gradient, and each copy is watched separately;
- divergence: a copy whose loss becomes non-finite, or exceeds
  ``divergence_bound``, is recorded (``{"kind": "diverged", ...}`` with the
  first bad step) and the run stops cleanly once every copy has diverged.

Loss scaling, the rule that makes data-parallel updates equal single-process
ones: each process's loss is the sum of its rows' per-example losses times
``world_size / batch_size``; DDP's gradient average over processes then equals
the gradient of the global batch's mean loss, even for unequal slices.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bnlab.distributed import DistInfo, prepare_model, shard
from bnlab.graph import is_batchnorm
from bnlab.nn.sync import revert_sync_batchnorm
from bnlab.run_folder import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    to_strict_json,
)
from bnlab.stats.population import recompute_population_stats
from bnlab.train.schedule import BatchSchedule

__all__ = [
    "TrainJob",
    "TrainResult",
    "evaluation",
    "make_sgd",
    "precise_bn_fields",
    "train",
    "train_distributed",
]

_NEVER = 2**62  # "no bad step yet" in the per-copy divergence tensor (reduced with MIN)
_ALL = slice(None)  # every row of a batch: a single process


@dataclass
class TrainJob:
    """What one experiment arm brings to the shared loop.

    Attributes:
        name: the arm's name; records carry it as ``"arm"`` and files are
            ``work/<name>.jsonl`` and ``work/<name>.pt``.
        model: the network, all ``copies`` of it in one module.
        optimizer: over ``model``'s parameters.
        steps: training steps.
        batch_size: the global mini-batch of each copy.
        copies: independent copies (seeds) trained together in ``model``.
        batch: ``(step, rows) -> (x, y)``: this process's ``rows`` (a slice of
            the global batch) of step ``step``, on the model's device. Must be a
            pure function of the step, so that resuming sees the same data.
        loss: ``(output, y) -> (copies,)`` tensor: per copy, the SUM over this
            process's rows of the per-example loss.
        evaluate: ``model -> dict`` of fields for an ``eval`` record; called in
            eval mode under ``torch.no_grad()`` on rank 0.
        eval_every: steps between evaluations.
        checkpoint_every: steps between checkpoints (taken at the next evaluation).
        lr_at: optional ``step -> learning rate`` (every parameter group).
        finalize: optional ``model -> dict`` of fields for the ``final`` record,
            after the last step (rank 0, local BN statistics).
        divergence_bound: a copy whose mean per-example loss on a step is
            non-finite or above this has diverged.
        seed: base of the per-step random state (dropout, noise).
        probe: optional ``(model, step) -> dict`` of more fields for each ``eval``
            record, called in training mode with autograd on, before step ``step``
            trains (single-process runs only). It must leave the model, its
            optimizer and the random state as it found them (see :mod:`bnlab.probes`).
        precise_bn: at every evaluation (step ``s``), also evaluate with precise BN
            statistics: population statistics (Algorithm 2, steps 8-10,
            :func:`bnlab.recompute_population_stats`, the paper's estimator) from the
            ``precise_bn`` training batches ``batch(s), batch(s + 1), ...`` (so
            ``batch`` must accept steps up to ``steps + precise_bn - 1``), with the
            weights of step ``s``; ``evaluate``'s fields are then recorded a second
            time, prefixed ``precise_``. 0 (the default): off. As Wu & Johnson (2021,
            "Rethinking 'Batch' in BatchNorm", Section 3) recommend, precise
            statistics replace the moving averages (EMA) for evaluation only: the
            EMA running statistics are restored after it, so training, checkpoints
            and a resumed run continue from the EMA exactly as without precise BN.
            After the last step the model keeps the precise statistics (``finalize``,
            the final checkpoint and the returned model use them).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    batch_size: int
    copies: int
    batch: Callable[[int, slice], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], dict]
    eval_every: int
    checkpoint_every: int
    lr_at: Callable[[int], float] | None = None
    finalize: Callable[[nn.Module], dict] | None = None
    divergence_bound: float = math.inf
    seed: int = 0
    probe: Callable[[nn.Module, int], dict] | None = None
    precise_bn: int = 0


@dataclass
class TrainResult:
    """How a job ended: the trained model (not DDP-wrapped; its BN layers SyncBatchNorm
    when several processes used global statistics) and each copy's first bad step."""

    model: nn.Module
    diverged_at: list[int | None]

    @property
    def all_diverged(self) -> bool:
        return all(s is not None for s in self.diverged_at)


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float = 0.0):
    """SGD with momentum, PyTorch's convention: buf = momentum * buf + grad; p -= lr * buf.

    The fused kernel (one call per step for every parameter) is used where this
    PyTorch has it for the device.
    """
    params = list(model.parameters())
    kw = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    try:
        return torch.optim.SGD(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused SGD for this device/version
        return torch.optim.SGD(params, **kw)


@contextlib.contextmanager
def evaluation(model: nn.Module):
    """Eval mode and no autograd inside; the model's modes are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def sgd_step(
    job: TrainJob, net: nn.Module, step: int, rows: slice = _ALL, world: int = 1, rank: int = 0
) -> Tensor:
    """Training step ``step`` of ``job``: its random state, learning rate, this process's
    ``rows`` of the batch, loss, backward and optimizer step.

    Args:
        net: ``job.model``, or its DDP wrapper.
        rows, world, rank: this process's slice of the global batch, the number of
            processes and this one's rank (a single process: every row).

    Returns:
        ``(copies,)``: each copy's share of the global mean loss (detached).
    """
    torch.manual_seed(job.seed * 1_000_003 + step * world + rank)
    if job.lr_at is not None:
        lr = job.lr_at(step)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
    scale = world / job.batch_size  # summed per-example losses -> share of the global mean
    xb, yb = job.batch(step, rows)
    per_copy = job.loss(net(xb), yb)  # (copies,): summed over this process's rows
    job.optimizer.zero_grad(set_to_none=True)
    (per_copy.sum() * scale).backward()
    job.optimizer.step()
    return per_copy.detach() * scale


def evaluate_job(job: TrainJob, step: int, probe: bool = True) -> dict:
    """The fields of an ``eval`` record: ``job.evaluate`` in eval mode without autograd,
    then ``job.probe`` (if any, and ``probe``) in training mode, before step ``step``."""
    model = job.model
    with evaluation(model):
        fields = job.evaluate(model)
    if job.probe is not None and probe:
        was_training = model.training
        model.train()
        try:
            fields.update(job.probe(model, step))
        finally:
            model.train(was_training)
    return fields


def precise_bn_fields(
    job: TrainJob, step: int, rows: slice = _ALL, main: bool = True, keep: bool = False
) -> dict:
    """``job.evaluate`` with precise BN statistics, its fields prefixed ``precise_``.

    Recomputes every BN layer's population statistics (Algorithm 2, steps 8-10) from
    the ``job.precise_bn`` training batches of steps ``step, step + 1, ...`` with the
    current weights, evaluates (in eval mode, without autograd), then puts the moving
    averages (EMA) back, unless ``keep``. Under torch.distributed every process must
    call it (a SyncBatchNorm's statistics span every process's ``rows``); only ``main``
    evaluates.

    Returns:
        ``{"precise_" + name: value}`` for ``job.evaluate``'s fields; empty unless ``main``.
    """
    model = job.model
    ema = [
        (m, m.running_mean.clone(), m.running_var.clone())
        for m in model.modules()
        if is_batchnorm(m) and m.track_running_stats and m.running_mean is not None
    ]
    try:
        recompute_population_stats(
            model,
            (job.batch(step + i, rows) for i in range(job.precise_bn)),
            job.precise_bn,
            progress=False,
        )
        fields = {}
        if main:
            with evaluation(model):
                fields = {f"precise_{k}": v for k, v in job.evaluate(model).items()}
    finally:
        if not keep:
            with torch.no_grad():
                for m, mean, var in ema:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
    return fields


def _bar_size() -> dict:
    """tqdm's ``ncols``/``nrows``: the terminal's, or 100 x 40 where the terminal reports
    a size of 0, as a pseudo-terminal without a size does (``script``, ``ssh -T``, some
    CI and notebook runners): tqdm would then take every bar for off-screen and draw
    nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return {}
    return {
        "ncols": None if size.columns > 0 else 100,
        "nrows": None if size.lines > 0 else 40,
    }


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(to_strict_json(r)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train(
    job: TrainJob,
    work: Path | None,
    *,
    resume: bool = False,
    info: DistInfo | None = None,
    bn_stats: str = "sync",
    progress: bool = True,
    position: int = 0,
    on_record: Callable[[dict], None] | None = None,
    log: Callable[[str], object] | None = None,
) -> TrainResult:
    """Train ``job`` (or continue it from its checkpoint), logging and checkpointing.

    Args:
        job: the arm to train.
        work: folder for ``<name>.jsonl`` and ``<name>.pt``; None writes no
            files (records only go to ``on_record``).
        resume: continue from ``work/<name>.pt`` when it exists.
        info: this process's place in a torchrun job (default: a single process).
        bn_stats: with several processes, "sync" (global batch statistics) or
            "ghost" (each process's slice).
        progress: show a progress bar (rank 0, on a terminal).
        position: the bar's line, when several jobs run side by side.
        on_record: also called with every record rank 0 writes.
        log: receives rank 0's messages (the step a resumed run continues from).

    Returns:
        The trained model (without its DDP wrapper) and each copy's first bad step.
    """
    info = info or DistInfo()
    main, world = info.is_main, info.world_size
    if isinstance(job.precise_bn, bool) or not (
        isinstance(job.precise_bn, int) and job.precise_bn >= 0
    ):
        raise ValueError(
            f"TrainJob.precise_bn must be a number of batches >= 0 (0: off), got {job.precise_bn!r}"
        )
    parent = os.getppid()
    log_path = ckpt_path = None
    if work is not None:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        log_path, ckpt_path = work / f"{job.name}.jsonl", work / f"{job.name}.pt"
    model, opt, dev = job.model, job.optimizer, info.device
    first_bad = torch.full((job.copies,), _NEVER, dtype=torch.int64, device=dev)
    start = 0
    if resume and ckpt_path is not None and ckpt_path.exists():
        start, done = _resume(job, ckpt_path, log_path, first_bad, main, log)
        if done:
            return TrainResult(model, _bad_steps(first_bad))
    elif main and log_path is not None:
        log_path.unlink(missing_ok=True)
    net = prepare_model(model, info, stats=bn_stats)  # DDP (+ SyncBatchNorm) if world > 1
    rows = shard(job.batch_size, info.rank, world)

    def write(records: list[dict]) -> None:
        if not main:
            return
        if log_path is not None:
            _append(log_path, records)
        for r in records:
            if on_record is not None:
                on_record(r)

    def log_eval(step: int, train_loss: float | None) -> None:
        fields = evaluate_job(job, step, probe=world == 1) if main else {}
        if job.precise_bn:  # every process: SyncBatchNorm statistics span them all
            fields.update(precise_bn_fields(job, step, rows, main, keep=step == job.steps))
        if main:
            write(
                [
                    {
                        "kind": "eval",
                        "arm": job.name,
                        "step": step,
                        "train_loss": train_loss,
                        **fields,
                    }
                ]
            )

    reported = {k for k, s in enumerate(_bad_steps(first_bad)) if s is not None}
    if start == 0:
        log_eval(0, None)
    bar = tqdm(
        total=job.steps,
        initial=start,
        desc=f"{job.name:>8} ({job.copies} seed{'s' if job.copies > 1 else ''})",
        position=position,
        unit="step",
        mininterval=1.0,
        # The rate over the whole run, evaluations included: tqdm's default moving
        # average jumps after each evaluation pause (an ETA of 1:53:02 for 30 min left).
        smoothing=0,
        leave=True,
        disable=not (progress and main and sys.stderr.isatty()),
        **_bar_size(),
    )
    loss_sum = torch.zeros(job.copies, dtype=torch.float64, device=dev)
    loss_n = 0
    last_ckpt = start
    model.train()
    with bar:
        for step in range(start, job.steps):
            per_copy = sgd_step(job, net, step, rows, world, info.rank)
            # Divergence, watched per copy without a device sync: remember the first
            # step whose local loss was non-finite or past the bound.
            bad = ~torch.isfinite(per_copy) | (per_copy > job.divergence_bound)
            first_bad = torch.where(bad & (first_bad == _NEVER), step + 1, first_bad)
            loss_sum += per_copy
            loss_n += 1
            done = step + 1
            bar.update(1)  # every step: tqdm itself limits redraws (mininterval)
            if world == 1 and os.getppid() != parent:  # launcher died: stop, not orphaned
                return TrainResult(model, _bad_steps(first_bad))
            if done % job.eval_every and done != job.steps:
                continue
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
                dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            bad_steps = _bad_steps(first_bad)
            alive = [k for k, s in enumerate(bad_steps) if s is None]
            new = sorted(k for k, s in enumerate(bad_steps) if s is not None and k not in reported)
            if new:
                write(
                    [
                        {
                            "kind": "diverged",
                            "arm": job.name,
                            "step": done,
                            "copies": new,
                            "first_bad_step": [bad_steps[k] for k in new],
                        }
                    ]
                )
                reported.update(new)
            window = [loss_sum[k].item() / loss_n for k in alive]
            log_eval(done, sum(window) / len(window) if window else None)
            loss_sum.zero_()
            loss_n = 0
            if not alive:
                break  # every copy diverged: nothing left to train
            # Checkpoint only right after an evaluation, so a resumed run's loss
            # windows and records line up exactly with an uninterrupted run's.
            if (
                done // job.checkpoint_every > last_ckpt // job.checkpoint_every
                and done < job.steps
                and main
                and ckpt_path is not None
            ):
                save_checkpoint(ckpt_path, _state(done, model, opt, first_bad, job.name))
                last_ckpt = done
    bad_steps = _bad_steps(first_bad)
    if not main:
        return TrainResult(model, bad_steps)
    final_model = model
    if world > 1:  # final measurements on rank 0 alone: local BN on a copy
        final_model = revert_sync_batchnorm(copy.deepcopy(model))
    if job.finalize is not None and not all(s is not None for s in bad_steps):
        write([{"kind": "final", "arm": job.name, "step": job.steps, **job.finalize(final_model)}])
    if ckpt_path is not None:
        save_checkpoint(
            ckpt_path, {**_state(job.steps, final_model, opt, first_bad, job.name), "done": True}
        )
    return TrainResult(model, bad_steps)


def _resume(
    job: TrainJob,
    ckpt_path: Path,
    log_path: Path,
    first_bad: Tensor,
    main: bool,
    log: Callable[[str], object] | None,
) -> tuple[int, bool]:
    """Restore ``job`` from its checkpoint and trim its records to the checkpoint's step.

    ``first_bad`` is filled in place. Returns the step to continue from and whether the
    arm had already finished.

    Raises:
        CheckpointError: the checkpoint does not fit the job, or the records it
            belongs to are gone.
    """
    state = load_checkpoint(ckpt_path)
    _restore(state, job, ckpt_path)
    if "first_bad" in state:
        first_bad.copy_(state["first_bad"])
    start = int(state["step"])
    if state.get("done"):
        return start, True
    kept = [
        r
        for r in read_jsonl(log_path, warn=False)  # a torn last line: normal after a kill
        if r.get("kind") in ("eval", "diverged") and r["step"] <= start
    ]
    if main and not any(r.get("kind") == "eval" and r["step"] == start for r in kept):
        # Never report a curve with a hole: the checkpoint's records are gone.
        raise CheckpointError(
            f"{log_path} lacks the records up to step {start} that belong to checkpoint "
            f"{ckpt_path}; delete {ckpt_path} and rerun with --resume to retrain "
            f"{job.name!r} from the start"
        )
    if main:
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        if log is not None:
            log(f"{job.name}: resumed from step {start:,} of {job.steps:,} ({ckpt_path})")
    return start, False


def _bad_steps(first_bad: Tensor) -> list[int | None]:
    return [None if s == _NEVER else int(s) for s in first_bad.tolist()]


def _restore(state: dict, job: TrainJob, path: Path) -> None:
    """Load a checkpoint into ``job``'s model and optimizer, or say why it does not fit."""
    arm = state.get("arm", job.name)  # checkpoints before the "arm" field: trust the file name
    if arm != job.name:
        raise CheckpointError(
            f"checkpoint {path} belongs to arm {arm!r}, not {job.name!r} (was it copied or "
            f"renamed?); delete it and rerun with --resume to retrain {job.name!r} from step 0"
        )
    try:
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit {job.name!r}'s network ({first}): it comes from "
            f"another run or configuration; delete it and rerun with --resume to retrain "
            f"{job.name!r} from step 0"
        ) from e


def _state(step: int, model: nn.Module, opt, first_bad: Tensor, arm: str) -> dict:
    return {
        "arm": arm,
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "first_bad": first_bad.cpu(),
    }


def train_distributed(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    info: DistInfo,
    steps: int,
    batch_size: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    stats: str = "sync",
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """SGD with cross-entropy on (x, y), every process taking its slice of each global batch.

    A thin use of :func:`train` for one network: every process must pass the same
    data, model initialization and arguments. The global batch of each step is
    that of single-process training with :class:`bnlab.train.schedule.BatchSchedule`,
    so the result equals single-process training up to float rounding.

    Returns:
        The trained model (not DDP-wrapped; with SyncBatchNorm layers when
        ``stats="sync"`` and there are several processes).
    """
    if batch_size < info.world_size:
        raise ValueError(
            f"batch_size {batch_size} is smaller than the {info.world_size} "
            "processes; every process needs a slice"
        )
    schedule = BatchSchedule(len(x), batch_size, [seed])

    def batch(step: int, rows: slice) -> tuple[Tensor, Tensor]:
        idx = schedule.indices(step)[rows, 0]
        return x[idx].to(info.device), y[idx].to(info.device)

    def report(record: dict) -> None:
        if record["kind"] == "eval" and record["train_loss"] is not None:
            log(f"step {record['step']}/{steps}: train loss {record['train_loss']:.4f}")
        elif record["kind"] == "diverged":
            log(f"diverged at step {record['first_bad_step'][0]}")

    model = model.to(info.device)
    job = TrainJob(
        name="train-ddp",
        model=model,
        optimizer=make_sgd(model, lr, momentum),
        steps=steps,
        batch_size=batch_size,
        copies=1,
        batch=batch,
        loss=lambda out, yb: F.cross_entropy(out, yb, reduction="sum").view(1),
        evaluate=lambda m: {},
        eval_every=log_every or steps,
        checkpoint_every=steps,
        seed=seed,
    )
    return train(job, None, info=info, bn_stats=stats, progress=False, on_record=report).model
