"""The scaffold of every distributed test: checks run on a few gloo processes (CPU).

``run_on_gloo(checks, *args, world=2)`` spawns ``world`` processes that join one gloo
group (rendezvous through a file in a fresh temporary folder) and each call
``checks(rank, *args)``. A rank that fails reports its traceback to the parent instead
of leaving the others waiting; the test fails with every failing rank's traceback, and
otherwise gets ``{rank: what checks returned}``. ``checks`` and its arguments travel to
the processes by pickle: a module-level function of a test module.

``spawn`` is the raw form for a test that needs its own worker (one that must not join
the collective, say): ``target(rank, path, results, *args)`` puts ``(rank, value)`` on
``results``.
"""

from __future__ import annotations

import gc
import os
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["init_gloo", "run_on_gloo", "spawn"]


def init_gloo(rank: int, world: int, path: str, timeout: float = 60) -> None:
    """Join the gloo group of ``world`` processes that meet at the file ``path``; a
    collective waits at most ``timeout`` seconds."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{path}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )


def spawn(target, *args, world: int = 2, wait: float = 240) -> dict:
    """Start ``world`` processes of ``target(rank, path, results, *args)``; return what
    each put on ``results`` as ``{rank: value}`` (waiting at most ``wait`` seconds each)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=target, args=(r, path, results, *args)) for r in range(world)]
        for p in procs:
            p.start()
        out = dict(results.get(timeout=wait) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return out


def _worker(rank, path, results, checks, args, world, timeout):
    try:
        init_gloo(rank, world, path, timeout)
        results.put((rank, ("ok", checks(rank, *args))))
    except BaseException as e:  # report to the parent instead of hanging the other ranks
        results.put((rank, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            gc.collect()  # free what holds the group now, not at interpreter shutdown


def run_on_gloo(checks, *args, world: int = 2, timeout: float = 60, wait: float = 240) -> dict:
    """Run ``checks(rank, *args)`` on ``world`` gloo processes; fail with every failing
    rank's traceback, else return ``{rank: what checks returned}``."""
    out = spawn(_worker, checks, args, world, timeout, world=world, wait=wait)
    failed = {r: text for r, (status, text) in sorted(out.items()) if status != "ok"}
    assert not failed, "\n".join(f"rank {r}: {text}" for r, text in failed.items())
    return {r: value for r, (_, value) in sorted(out.items())}
