"""`bnlab train-ddp`: data-parallel training of the Section 4.1 BN network under torchrun."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from bnlab.commands import HelpFormatter


def _problems(args: argparse.Namespace, world: int) -> list[str]:
    """What is wrong with the options, each with its fix (empty when they are usable)."""
    # Every process normalizes over at least 2 values: the whole batch (sync) or its slice.
    per_process = 2 if args.stats == "ghost" else 1
    least = max(2, per_process * world)
    checks = [
        (args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
        (
            args.batch_size >= least,
            f"--batch-size must be at least {least} for {world} process(es) with "
            f"--stats {args.stats} (BN needs 2 values per batch"
            + (" on every process" if args.stats == "ghost" else ", and each process a sample")
            + f"), got {args.batch_size}",
        ),
        (args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.timeout > 0, f"--timeout must be positive (seconds), got {args.timeout}"),
        (args.log_every >= 1, f"--log-every must be at least 1, got {args.log_every}"),
    ]
    return [msg for ok, msg in checks if not ok]


def _out_problem(out: Path) -> str | None:
    """Why the model cannot be saved to ``out`` (checked before training), or None."""
    from bnlab.run_folder import folder_problem

    if out.is_dir():
        return f"--out {out} is a folder; give a file name, e.g. {out / 'model.pt'}"
    problem = folder_problem(out.parent)
    return f"--out {out}: {problem}; choose a writable path" if problem else None


def _run(args: argparse.Namespace) -> int:
    import torch

    problems = _problems(args, int(os.environ.get("WORLD_SIZE", "1")))
    if args.out is not None and int(os.environ.get("RANK", "0")) == 0:
        problems += [p for p in [_out_problem(args.out)] if p]
    if problems:
        print("bnlab train-ddp: error: " + "; ".join(problems), file=sys.stderr)
        return 2

    from bnlab.data import MNISTDataError, load_mnist
    from bnlab.distributed import init_distributed
    from bnlab.insert import insert_batchnorm
    from bnlab.models import mnist_mlp
    from bnlab.nn.sync import CollectiveError
    from bnlab.run_folder import save_checkpoint
    from bnlab.train.loop import train_distributed

    try:
        info = init_distributed(timeout=args.timeout)
        data = load_mnist(args.data)
    except (ValueError, MNISTDataError) as e:
        print(f"bnlab train-ddp: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = insert_batchnorm(mnist_mlp(seeds=[0]))
    log = print if info.is_main and not args.quiet else (lambda *a: None)
    log(
        f"train-ddp: {info.world_size} process(es), BN statistics: {args.stats}, "
        f"global batch {args.batch_size}, {args.steps} steps; {data.description}"
    )
    t0 = time.perf_counter()
    try:
        model = train_distributed(
            model,
            data.x_train,
            data.y_train,
            info=info,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            stats=args.stats,
            log_every=args.log_every,
            log=log,
        )
    except CollectiveError as e:
        print(f"bnlab train-ddp (rank {info.rank}): error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    if info.is_main:
        net = model.eval()
        with torch.no_grad():
            acc = (net(data.x_test.to(info.device)).argmax(1).cpu() == data.y_test).float().mean()
        log(
            f"done in {seconds:.1f} s ({1e3 * seconds / args.steps:.2f} ms/step); test "
            f"accuracy {100 * acc:.2f}% (moving-average BN statistics)"
        )
        if args.out:
            try:
                save_checkpoint(Path(args.out), {"step": args.steps, "model": net.state_dict()})
            except OSError as e:
                print(
                    f"bnlab train-ddp: error: cannot save the model to {args.out} "
                    f"({e.strerror or e})",
                    file=sys.stderr,
                )
                return 1
            log(f"checkpoint: {args.out}")
    if torch.distributed.is_initialized():
        del model  # with DDP's reference cycles freed below, while gloo can take the GIL
        torch.distributed.destroy_process_group()
        gc.collect()  # not at interpreter shutdown, where gloo's threads abort the process
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-ddp",
        help="data-parallel training of the MNIST BN network (launch with torchrun)",
        formatter_class=HelpFormatter,
        description="Train the Section 4.1 network with BN on MNIST with DistributedDataParallel "
        "when launched by torchrun (one process otherwise). Each process takes a slice of every "
        "global mini-batch; BN statistics are global (SyncBatchNorm) or per process (ghost). "
        "Example: torchrun --nproc-per-node 2 -m bnlab.cli train-ddp --steps 2000",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="MNIST IDX folder; default: the packaged 5,000-digit subset",
    )
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=int, default=60, help="global mini-batch size")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    p.add_argument(
        "--stats",
        choices=["sync", "ghost"],
        default="sync",
        help="BN statistics over the global batch (sync) or each process's slice",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a collective waits for a peer before the job fails",
    )
    p.add_argument("--log-every", type=int, default=500, help="steps between log lines")
    p.add_argument("--out", type=Path, default=None, help="rank 0 saves the model here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
