"""Per-step cost of SyncBatchNorm over local ("ghost") BN on 2 CPU processes (gloo).

For the paper's MNIST MLP (784-100-100-100-10, BN before each sigmoid, global
batch 60) and a small convnet (global batch 32 of 3x32x32), times DDP training
steps with global statistics (SyncBatchNorm) and with per-process statistics
in the same run, and prints the ratio. Also the single-process step for scale.

    python benchmarks/bench_sync.py [--steps 200] [--procs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnlab.distributed import DistInfo, prepare_model, shard
from bnlab.insert import insert_batchnorm
from bnlab.models.mlp import mnist_mlp


def mlp() -> nn.Module:
    return insert_batchnorm(mnist_mlp())  # the Section 4.1 network, BN before each sigmoid


def convnet() -> nn.Module:
    return insert_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 10),
        )
    )


MODELS = {"mnist_mlp": (mlp, (784,), 60), "convnet": (convnet, (3, 32, 32), 32)}


def _time_steps(model, x, y, steps) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 10):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, path, steps, queue):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{path}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    info = DistInfo(rank=rank, world_size=world)
    for name, (build, shape, batch) in MODELS.items():
        torch.manual_seed(0)
        part = shard(batch, rank, world)
        x = torch.randn(part.stop - part.start, *shape)
        y = torch.randint(0, 10, (len(x),))
        for stats in ("sync", "ghost"):
            torch.manual_seed(0)
            dist.barrier()
            t = _time_steps(prepare_model(build(), info, stats=stats), x, y, steps)
            if rank == 0:
                queue.put((name, stats, t))
    dist.barrier()  # no rank tears down while a peer still talks to it
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    results = {}
    torch.set_num_threads(1)
    for name, (build, shape, batch) in MODELS.items():
        torch.manual_seed(0)
        results[(name, "single process")] = _time_steps(
            build(), torch.randn(batch, *shape), torch.randint(0, 10, (batch,)), args.steps
        )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rdzv")
        procs = [
            ctx.Process(target=_worker, args=(r, args.procs, path, args.steps, queue))
            for r in range(args.procs)
        ]
        for pr in procs:
            pr.start()
        for _ in range(len(MODELS) * 2):
            name, stats, t = queue.get(timeout=600)
            results[(name, stats)] = t
        for pr in procs:
            pr.join()
    print(
        f"torch {torch.__version__}, {args.procs} gloo processes x 1 thread, median of "
        f"{args.steps} steps"
    )
    print(f"{'model':<12}{'single ms':>11}{'ghost ms':>10}{'sync ms':>9}{'sync/ghost':>12}")
    for name in MODELS:
        s, g, y = (results[(name, k)] * 1e3 for k in ("single process", "ghost", "sync"))
        print(f"{name:<12}{s:>11.2f}{g:>10.2f}{y:>9.2f}{y / g:>12.2f}")


if __name__ == "__main__":
    main()
