"""What every `bnlab reproduce EXPERIMENT` command does around its experiment:
choose the run folder, run it, and turn failures into one message and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bnlab.experiments.runner import run_experiment
from bnlab.train.io import CheckpointError


def run_from_cli(
    module: str, cfg, args: argparse.Namespace, data_errors: tuple = ()
) -> tuple[Path, dict | None] | int:
    """Run experiment ``module`` with ``cfg`` and the common options of ``args``.

    Returns:
        (run folder, summary; None on torchrun ranks other than 0), or the exit
        status after printing why it failed: 2 for bad options, data or files, 1 for
        a failed worker or peer.
    """
    experiment = module.rsplit(".", 1)[-1]
    name = f"bnlab reproduce {experiment}"
    if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            f"{name}: error: under torchrun pass --out DIR, so that every process writes "
            "to the same run folder",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or Path("runs") / experiment / time.strftime("%Y%m%d-%H%M%S"))
    log = (lambda *a, **k: None) if args.quiet else print
    try:
        summary = run_experiment(
            module,
            cfg,
            out,
            resume=args.resume,
            workers=args.workers,
            progress=not args.quiet,
            log=log,
            timeout=args.timeout,
        )
    except (ValueError, CheckpointError, *data_errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a worker or peer failed; the message says which and where
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    return out, summary
