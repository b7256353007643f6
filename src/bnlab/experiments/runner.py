"""Run an experiment's arms and build its report: the run folder every experiment shares.

An experiment is a :class:`bnlab.lab.Experiment` record: its ``key`` names it in
run folders, its ``run`` module defines a config dataclass (with ``IDENTITY``, the
keys a run folder may only be resumed with) and the functions:

- ``validate(cfg)``: raise ValueError with one clear message for bad options;
- ``check_data(cfg)``: fail fast, before any output, on missing/corrupt data;
- ``arms(cfg)``: the arms to train, in order;
- ``describe(cfg)``: start-up lines for the log;
- ``build_job(arm, cfg, info, work)``: a :class:`bnlab.train.loop.TrainJob`;
- optionally ``after_training(cfg, out, records) -> list[dict]``: records
  computed from every arm's outputs (an ensemble, say);

and its ``report`` module builds the report (``build_report(run_dir)``).
:func:`run_experiment` then checks and locks the output folder, writes
``config.json`` and ``env.json``, trains the arms (in parallel worker processes, or
one after the other data-parallel under ``torchrun``), merges ``work/<arm>.jsonl``
into ``metrics.jsonl`` and builds the report from those records alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bnlab.distributed import DistInfo, decided_on_main, init_distributed
from bnlab.run_folder import (
    LOCK_NAME,
    atomic_write_text,
    folder_problem,
    locked_folder,
    read_json,
    read_jsonl,
    write_json,
)
from bnlab.train.loop import train

__all__ = [
    "Interrupted",
    "WorkerError",
    "env_info",
    "prepare_out_dir",
    "run_experiment",
    "worker_layout",
]


class WorkerError(RuntimeError):
    """A training worker failed; the message says which arm and why."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (Ctrl-C's SIGINT, or SIGTERM); ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _sigterm_interrupts():
    """Within the block, SIGTERM stops the run as Ctrl-C does (workers stopped, the resume
    command printed), instead of killing the process silently."""

    def stop(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_semaphore_tracker() -> None:
    """Give tqdm a thread lock in worker processes.

    tqdm's default write lock is a multiprocessing semaphore; a worker stopped by a
    signal cannot release it, and Python's resource tracker then warns about a
    "leaked semaphore" at shutdown. Spawned workers share nothing with their parent,
    so a thread lock serves the same purpose.
    """
    tqdm.set_lock(threading.RLock())


def env_info() -> dict:
    """Versions, machine and git revision, saved as env.json beside each run."""
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


def prepare_out_dir(out: Path, experiment: str, identity: dict, resume: bool) -> bool:
    """Check ``out`` may hold this run; returns whether there is work to resume.

    Raises:
        ValueError: ``out`` holds another experiment or other files, holds this
            run but ``--resume`` was not given, or cannot be written.
    """
    config_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    if resume and not config_path.exists():
        where = "does not exist" if not out.exists() else "holds no bnlab run (no config.json)"
        raise ValueError(
            f"--resume: --out {out} {where}, so there is nothing to continue; check the "
            "path, or leave out --resume to start a new run"
        )
    if config_path.exists():
        try:
            saved = read_json(config_path)
        except ValueError as e:
            raise ValueError(f"{e}; choose another --out") from e
        if saved.get("experiment") != experiment:
            raise ValueError(
                f"--out {out} holds a different experiment "
                f"({saved.get('experiment')!r}); choose another --out"
            )
        diff = {
            k: (saved.get("config", {}).get(k), v)
            for k, v in identity.items()
            if not _same_setting(k, saved.get("config", {}).get(k), v)
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
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(
            f"--out {out} is not empty and holds no bnlab run; choose a new or empty folder"
        )
    return False


def _same_setting(key: str, saved, now) -> bool:
    """Whether a saved identity setting equals the current one; data folders compare as
    resolved paths (``data/mnist`` and its absolute form are the same folder)."""
    if key == "data" and isinstance(saved, str) and isinstance(now, str):
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


def worker_layout(arms: int, workers: int, device: str, world: int = 1) -> tuple[int, int]:
    """(processes training arms at once, torch threads in each) for a run.

    One process per arm up to ``workers`` on the CPU, one on CUDA or under torchrun
    (``world`` > 1, where each of the node's processes gets its share of the cores);
    the cores are shared out evenly, and ``OMP_NUM_THREADS`` caps the threads, as
    torch honours it.
    """
    cores = os.cpu_count() or 1
    workers = 1 if world > 1 or device == "cuda" else max(1, min(workers, arms))
    threads = max(1, cores // workers)
    if world > 1:
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit():  # the user's cap, as torch honours it
        threads = max(1, min(threads, int(cap)))
    return workers, threads


def _locked_set_up(
    exp, name: str, cfg, out: Path, identity: dict, resume: bool, hold: contextlib.ExitStack
) -> bool:
    """Lock ``out`` for this run (the lock stays on ``hold``), then set it up.

    The folder is created (and found writable) before anything else; if it was
    created here and the run is refused, it is removed again: no output is left.
    """
    created = not out.exists()
    try:
        _check_writable(out)
        hold.enter_context(locked_folder(out))
        return _set_up_out_dir(exp, name, cfg, out, identity, resume)
    except BaseException:
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _set_up_out_dir(exp, name: str, cfg, out: Path, identity: dict, resume: bool) -> bool:
    """Check ``out`` (:func:`prepare_out_dir`), then write ``config.json`` and ``env.json``
    for a new run and clear old worker errors; returns whether the run resumes."""
    resuming = prepare_out_dir(out, name, identity, resume)
    if not resuming:
        write_json(out / "config.json", {"experiment": name, "config": dataclasses.asdict(cfg)})
        write_json(out / "env.json", env_info())
    work = out / "work"
    work.mkdir(exist_ok=True)
    for arm in exp.run.arms(cfg):  # every start, resumes included, begins clean
        (work / f"{arm}.error").unlink(missing_ok=True)
    return resuming


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there, or say why not (before any training)."""
    problem = folder_problem(out)
    if problem:
        raise ValueError(
            f"--out {out}: {problem}; choose a writable --out (or run from a folder you "
            "can write to)"
        )


def _train_arm(exp, arm, cfg, out, resume, threads, progress, position, info=None):
    torch.set_num_threads(threads)
    info = info or DistInfo()
    work = out / "work"
    job = exp.run.build_job(arm, cfg, info, work)
    train(
        job,
        work,
        resume=resume,
        info=info,
        bn_stats=getattr(cfg, "bn_stats", "sync"),
        progress=progress,
        position=position,
        log=tqdm.write if progress else None,
    )


def _worker(exp, arm, cfg, out, resume, threads, progress, position):
    _quiet_semaphore_tracker()
    try:
        _train_arm(exp, arm, cfg, out, resume, threads, progress, position)
    except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent reports it once
        raise SystemExit(130) from None
    except BaseException as e:
        # Best effort: with a full disk this write fails too, and the parent falls
        # back to the exit status (the traceback is on stderr either way).
        try:
            (out / "work" / f"{arm}.error").write_text(
                f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
            )
        except OSError:
            pass
        raise SystemExit(1) from e


def _run_pool(exp, arms, cfg, out, resume, workers, threads, progress) -> None:
    """Train ``arms`` in at most ``workers`` processes at a time; raise if any failed."""
    ctx = mp.get_context("spawn")
    pending = list(arms)
    running: dict[int, tuple[str, mp.Process]] = {}  # progress-bar line -> (arm, process)
    finished: list[tuple[str, int | None]] = []
    try:
        while pending or running:
            for slot in range(workers):
                if slot not in running and pending:
                    arm = pending.pop(0)
                    p = ctx.Process(
                        target=_worker,
                        args=(exp, arm, cfg, out, resume, threads, progress, slot),
                    )
                    p.start()
                    running[slot] = (arm, p)
            for slot, (arm, p) in list(running.items()):
                p.join(timeout=0.1)
                if not p.is_alive():
                    finished.append((arm, p.exitcode))
                    del running[slot]
            if any(code != 0 for _, code in finished):
                break  # fail fast; the other arms keep their checkpoints for --resume
    finally:
        for _, p in running.values():
            if p.is_alive():
                p.terminate()
        for _, p in running.values():
            p.join(timeout=5)
    failed, details = [], []
    for arm, code in finished:
        if code == 0:
            continue
        err = out / "work" / f"{arm}.error"
        try:
            text = err.read_text().strip() if err.exists() else ""
        except OSError:
            text = ""
        if text:
            failed.append(f"{arm}: {text.splitlines()[0]}")
            details.append(str(err))
        elif code is not None and code < 0:
            failed.append(f"{arm}: the worker was killed by {signal.Signals(-code).name}")
        else:
            failed.append(f"{arm}: the worker exited with status {code} (its error is above)")
    if failed:
        where = f" (details in {', '.join(details)})" if details else ""
        raise WorkerError(
            "a training worker failed: "
            + "; ".join(failed)
            + where
            + "; fix the cause, then resume the run (--resume)"
        )


def run_experiment(
    exp,
    cfg,
    out: Path,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
    log=print,
    timeout: float = 300.0,
) -> dict | None:
    """Run (or resume) an experiment in ``out`` and build its report.

    Args:
        exp: the :class:`bnlab.lab.Experiment` (``bnlab.lab.EXPERIMENTS["figure1"]``);
            its ``key`` names the experiment in config.json.
        cfg: its config dataclass.
        out: the run folder.
        resume: continue the run in ``out`` from its checkpoints.
        workers: arms trained at once in separate processes (single-process runs).
        progress: progress bars.
        log: where start-up lines go.
        timeout: under torchrun, seconds a collective waits for its peers.

    Returns:
        The summary (as written to ``out/summary.json``); None on ranks other than 0.
    """
    name = exp.key
    info = init_distributed(timeout=timeout)  # a single process unless torchrun started us
    # The main process holds the run folder's lock until the report is written.
    with _sigterm_interrupts(), contextlib.ExitStack() as hold:
        try:
            main, world = info.is_main, info.world_size
            exp.run.validate(cfg)
            exp.run.check_data(cfg)
            out = Path(out)
            identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k in cfg.IDENTITY}
            resuming = decided_on_main(
                lambda: _locked_set_up(exp, name, cfg, out, identity, resume, hold), info
            )
            work = out / "work"
            arms = exp.run.arms(cfg)
            workers, threads = worker_layout(
                len(arms), workers, getattr(cfg, "device", "cpu"), world
            )
            if main:
                if world > 1:
                    stats = (
                        "SyncBatchNorm"
                        if getattr(cfg, "bn_stats", "sync") == "sync"
                        else "per-process ghost BN statistics"
                    )
                    how = f"{world} data-parallel processes (DDP, {stats})"
                else:
                    how = f"{workers} worker(s)"
                log(f"{name}: {len(arms)} arms, {how} x {threads} thread(s), output in {out}")
                for line in exp.run.describe(cfg):
                    log(line)
            t0 = time.perf_counter()
            if workers == 1:
                for i, arm in enumerate(arms):
                    _train_arm(exp, arm, cfg, out, resuming, threads, progress, i, info)
            else:
                _run_pool(exp, arms, cfg, out, resuming, workers, threads, progress)
            elapsed = time.perf_counter() - t0
            if not main:
                return None
            records = [r for arm in arms for r in read_jsonl(work / f"{arm}.jsonl")]
            after = getattr(exp.run, "after_training", None)
            if after is not None:
                records += after(cfg, out, records)
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            env = read_json(out / "env.json")
            env["train_seconds_last_session"] = round(elapsed, 1)
            write_json(out / "env.json", env)
            return exp.report.build_report(out)
        finally:
            # Leave no process group behind: gloo's threads alive at interpreter exit can
            # abort the process ("terminate called without an active exception"). DDP's
            # reference cycles keep the group alive until a garbage collection; collect now,
            # while a gloo thread finishing a collective can still take the GIL to free its
            # tensors (at interpreter shutdown it cannot, and the process aborts).
            if info.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
                gc.collect()
