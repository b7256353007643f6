"""How long a run will take on this machine, from a short timed calibration.

For every arm of an experiment the calibration builds the arm's job as a worker
would (data, model, optimizer), times a few training steps of the shared loop
(:func:`bnlab.train.loop.sgd_step`, after one warm-up step), one evaluation with its
probes (:func:`bnlab.train.loop.evaluate_job`), one precise-BN evaluation where the
job has one, and the final measurement (``job.finalize``: timed on the first arm,
scaled for the others by their evaluation time). It runs in as many
worker processes, with as many threads each, as the run itself will use, so the
timings include the slowdown of sharing the machine.

Every arm of a run trains in a fresh worker process, which starts Python, imports
torch and bnlab, loads the data, builds the job and pays for its first step and
evaluation; the calibration's processes do that once and then hold the data
(measured: 0.25 s to build a later MNIST arm where a fresh worker takes 2 s). So
the cold start is timed apart, from spawning as many fresh processes as the run has
workers, side by side, to the end of their first step and first evaluation, and an
arm then takes

    cold start + (steps - 1) * step + (steps / eval_every) * evaluation + final

With one worker (``--workers 1``) the arms train in the calling process, one after
the other, and an arm takes build + steps * step + (steps / eval_every + 1) *
evaluation + final.

The arms are scheduled on the workers as the runner does: each free worker takes
the next arm. What the calibration does not see (figures and report, an ensemble
evaluated after training, other load on the machine) is not in the estimate; it is
a forecast, and `bnlab reproduce paper` records it beside the measured time.
Its known bias: for steps of a few milliseconds (the MNIST experiments) the 3 steps
after the warm-up run up to 2x slower than the steady state, so those arms' step
time is high, while some other cost of a real run is not seen (measured on 2 cores,
the cpu preset: figure1 and lr-init took 8-12% longer than forecast, ema-vs-precise
46% less).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnlab.distributed import DistInfo
from bnlab.experiments.runner import worker_layout
from bnlab.train.loop import evaluate_job, precise_bn_fields, sgd_step
from bnlab.train.loop import evaluation as evaluation_mode

__all__ = ["ArmEstimate", "Estimate", "cold_start_seconds", "estimate", "fmt_duration"]


@dataclass
class ArmEstimate:
    """One arm's forecast: its parts in seconds, measured on this machine."""

    arm: str
    steps: int
    build_seconds: float  # the job's build in a warm process (data already loaded)
    step_seconds: float
    eval_seconds: float
    evals: int
    final_seconds: float
    seconds: float


@dataclass
class Estimate:
    """An experiment's forecast: its arms, scheduled on ``workers`` processes."""

    experiment: str
    preset: str
    workers: int
    threads: int
    arms: list[ArmEstimate] = field(default_factory=list)
    seconds: float = 0.0  # the whole run's wall time: the busiest worker's
    calibration_seconds: float = 0.0
    cold_start_seconds: float = 0.0  # a fresh worker: start, imports, data, build, first
    # step and evaluation (0 with one worker: the arms train in the calling process)


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12.5 min`` or ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cold_start_seconds(exp, cfg, arms: list[str], threads: int = 1) -> float:
    """Seconds from spawning fresh worker processes, one per arm of ``arms`` at once (as
    the runner starts its workers side by side), to the end of the last one's first
    training step and first evaluation."""
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(arms), mp_context=ctx) as pool:
        calls = [pool.submit(_calibrate_arm, exp, cfg, a, threads, 1, False) for a in arms]
        timed = [f.result() for f in calls]
    # the calibration also timed one steady step after the first: not part of the start
    return time.perf_counter() - t0 - max(a.step_seconds for a in timed)


def _makespan(seconds: list[float], workers: int) -> float:
    """Wall time of running jobs in order on ``workers``: each free worker takes the next."""
    free = [0.0] * workers
    for s in seconds:
        start = heapq.heappop(free)
        heapq.heappush(free, start + s)
    return max(free)


def _calibrate_arm(
    exp, cfg, arm: str, threads: int, steps: int, time_final: bool = True
) -> ArmEstimate:
    """Time one arm's parts in this process, with ``threads`` threads (a worker's);
    ``time_final=False`` leaves the final measurement at 0 (the caller scales it)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        t0 = time.perf_counter()
        job = exp.run.build_job(arm, cfg, DistInfo(), Path(tmp))
        job.model.train()
        build = time.perf_counter() - t0
        timed = max(1, min(steps, job.steps - 1))
        sgd_step(job, job.model, 0)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        for k in range(1, timed + 1):
            sgd_step(job, job.model, k)
        step = (time.perf_counter() - t0) / timed
        t0 = time.perf_counter()
        evaluate_job(job, 0)
        if job.precise_bn:
            precise_bn_fields(job, 0)
        evaluation = time.perf_counter() - t0
        t0 = time.perf_counter()
        if job.finalize is not None and time_final:
            with evaluation_mode(job.model):
                job.finalize(job.model)
        final = time.perf_counter() - t0 if time_final else 0.0
    evals = job.steps // job.eval_every + 1
    # the steady state after the cold start's first step and evaluation (added later)
    total = (job.steps - 1) * step + (evals - 1) * evaluation + final
    return ArmEstimate(arm, job.steps, build, step, evaluation, evals, final, total)


def estimate(exp, cfg, workers: int = 2, steps: int = 3) -> Estimate:
    """Forecast the wall time of ``exp`` (a :class:`bnlab.lab.Experiment`) with ``cfg``.

    Args:
        exp: the experiment.
        cfg: its config (already validated; its data present).
        workers: ``--workers``: arms trained at once; the calibration runs in as many
            processes (one process where the run uses one).
        steps: training steps timed per arm (after one warm-up step).

    Returns:
        The :class:`Estimate`; nothing is written and this process's state is left
        as it was.
    """
    arms = list(exp.run.arms(cfg))
    device = getattr(cfg, "device", "cpu")
    workers, threads = worker_layout(len(arms), workers, device)
    result = Estimate(exp.name, getattr(cfg, "preset", "?"), workers, threads)
    t_start = time.perf_counter()
    # The final measurement (often the whole test set) is timed on the first arm only;
    # the others' is scaled by their evaluation time, as it is a larger evaluation.
    calls = [(exp, cfg, a, threads, steps, i == 0) for i, a in enumerate(arms)]
    if workers == 1:
        saved = torch.get_num_threads()
        try:
            found = [_calibrate_arm(*call) for call in calls]
        finally:
            torch.set_num_threads(saved)
    else:  # as the run: `workers` processes at once, sharing the machine
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            found = list(pool.map(_calibrate_arm, *zip(*calls)))
    # One worker trains the arms in this process: each arm pays its build. More
    # workers start a fresh process per arm: each pays a cold start (timed once, with
    # as many workers starting side by side as the run has).
    cold = cold_start_seconds(exp, cfg, arms[:workers], threads) if workers > 1 else 0.0
    first = found[0]
    for a in found:
        if a is not first and first.eval_seconds > 0:
            a.final_seconds = first.final_seconds * a.eval_seconds / first.eval_seconds
            a.seconds += a.final_seconds
        # the first step and evaluation: in the cold start, or timed like the others
        a.seconds += cold if workers > 1 else a.build_seconds + a.step_seconds + a.eval_seconds
    result.cold_start_seconds = cold
    result.arms = found
    result.seconds = _makespan([a.seconds for a in result.arms], workers)
    result.calibration_seconds = time.perf_counter() - t_start
    return result
