"""How long a run will take on this machine, from a short timed calibration.

For every arm of an experiment the calibration builds the arm's job as a worker
would (data, model, optimizer), times a few training steps of the shared loop
(:func:`bnlab.train.loop.sgd_step`, after one warm-up step) and one evaluation
with its probes (:func:`bnlab.train.loop.evaluate_job`), with the threads a
worker would get. An arm then takes

    build + steps * step time + (steps / eval_every + 2) * evaluation time

(the evaluations of the run, at step 0 and the final one included), and the arms
are scheduled on the workers as the runner does: each free worker takes the next
arm. Process start-up is measured once per machine (a fresh interpreter
importing bnlab) and added per arm. What the calibration does not see (a report's
figures, an ensemble's evaluation after training, other load on the machine) is
not in the estimate; it is a forecast, and `bnlab reproduce paper` prints it
beside the measured time.
"""

from __future__ import annotations

import heapq
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnlab.distributed import DistInfo
from bnlab.train.loop import evaluate_job, sgd_step

__all__ = ["ArmEstimate", "Estimate", "estimate", "fmt_duration", "startup_seconds"]


@dataclass
class ArmEstimate:
    """One arm's forecast: its parts in seconds, measured on this machine."""

    arm: str
    steps: int
    build_seconds: float
    step_seconds: float
    eval_seconds: float
    evals: int
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


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12.5 min`` or ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def startup_seconds() -> float:
    """Seconds a fresh worker process takes to start and import bnlab's experiments."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import bnlab.lab"],
        check=False,
        capture_output=True,
        timeout=300,
    )
    return time.perf_counter() - t0


def _worker_layout(arms: int, workers: int, device: str) -> tuple[int, int]:
    """(workers, threads per worker) as :func:`bnlab.experiments.runner.run_experiment`
    chooses them for a single-process run."""
    workers = 1 if device == "cuda" else max(1, min(workers, arms))
    threads = max(1, (os.cpu_count() or 1) // workers)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit():
        threads = max(1, min(threads, int(cap)))
    return workers, threads


def _makespan(seconds: list[float], workers: int) -> float:
    """Wall time of running jobs in order on ``workers``: each free worker takes the next."""
    free = [0.0] * workers
    for s in seconds:
        start = heapq.heappop(free)
        heapq.heappush(free, start + s)
    return max(free)


def estimate(exp, cfg, workers: int = 2, steps: int = 3, startup: float = 0.0) -> Estimate:
    """Forecast the wall time of ``exp`` (a :class:`bnlab.lab.Experiment`) with ``cfg``.

    Args:
        exp: the experiment.
        cfg: its config (already validated; its data present).
        workers: ``--workers``: arms trained at once.
        steps: training steps timed per arm (after one warm-up step).
        startup: seconds a worker process takes to start (:func:`startup_seconds`).

    Returns:
        The :class:`Estimate`; nothing is written and no global state is left changed
        (torch's thread count is restored).
    """
    arms = list(exp.run.arms(cfg))
    device = getattr(cfg, "device", "cpu")
    workers, threads = _worker_layout(len(arms), workers, device)
    result = Estimate(exp.name, getattr(cfg, "preset", "?"), workers, threads)
    saved_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
            for arm in arms:
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
                evaluation = time.perf_counter() - t0
                evals = job.steps // job.eval_every + 2
                total = startup + build + job.steps * step + evals * evaluation
                result.arms.append(
                    ArmEstimate(arm, job.steps, build, step, evaluation, evals, total)
                )
                del job
    finally:
        torch.set_num_threads(saved_threads)
    result.seconds = _makespan([a.seconds for a in result.arms], workers)
    result.calibration_seconds = time.perf_counter() - t_start
    return result
