"""What every `bnlab reproduce EXPERIMENT` command does around its experiment:
the options every experiment shares, the run folder, and turning failures and
interruptions into one message and an exit status."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import time
from pathlib import Path

from bnlab.commands import positive_float, positive_int
from bnlab.experiments.runner import Interrupted, run_experiment
from bnlab.run_folder import CheckpointError

__all__ = ["add_run_options", "resume_command", "run_from_cli"]


def add_run_options(p: argparse.ArgumentParser, experiment: str, workers_help: str) -> None:
    """The options of the run folder and its processes, the same for every experiment."""
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=300.0,
        help="under torchrun: seconds a collective waits for a dead or stalled peer",
    )
    p.add_argument("--workers", type=positive_int, default=2, help=workers_help)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: runs/{experiment}/<timestamp>)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoints"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def resume_command(argv: list[str] | None, out: Path) -> str:
    """The command that continues the run in ``out``: ``argv`` (the options as given,
    without the program name) with ``--out out --resume`` in place of any given."""
    kept, skip = [], False
    for arg in argv or []:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not (arg == "--resume" or arg.startswith("--out=")):
            kept.append(arg)
    return shlex.join(["bnlab", *kept, "--out", str(out), "--resume"])


def _os_error_message(e: OSError, out: Path) -> str:
    where = e.filename or out
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {where}"
    return f"cannot write {where} ({e.strerror or e})"


def run_from_cli(
    exp, cfg, args: argparse.Namespace, data_errors: tuple = ()
) -> tuple[Path, dict | None] | int:
    """Run experiment ``exp`` (a :class:`bnlab.lab.Experiment`) with ``cfg`` and the
    common options of ``args``.

    Returns:
        (run folder, summary; None on torchrun ranks other than 0), or the exit
        status after printing why it failed: 2 for bad options, data or files, 1 for
        a failed worker or peer or a failed write, 128 + the signal's number when
        interrupted (130 for Ctrl-C, 143 for SIGTERM).
    """
    experiment = exp.key
    name = f"bnlab reproduce {exp.name}"
    if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            f"{name}: error: under torchrun pass --out DIR, so that every process writes "
            "to the same run folder",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or Path("runs") / experiment / time.strftime("%Y%m%d-%H%M%S"))
    log = (lambda *a, **k: None) if args.quiet else print
    started = False

    def started_log(*a, **k):  # the run folder exists once the first line is logged
        nonlocal started
        started = True
        log(*a, **k)

    resume = resume_command(getattr(args, "argv", None) or name.split()[1:], out)
    try:
        summary = run_experiment(
            exp,
            cfg,
            out,
            resume=args.resume,
            workers=args.workers,
            progress=not args.quiet,
            log=started_log,
            timeout=args.timeout,
        )
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        what = "interrupted" if signum == 2 else f"stopped by {e}"
        if started:
            print(
                f"\n{name}: {what}; every finished checkpoint is kept in {out}. "
                f"Continue with:\n  {resume}",
                file=sys.stderr,
            )
        else:
            print(f"\n{name}: {what} before training started", file=sys.stderr)
        return 128 + signum
    except (ValueError, CheckpointError, *data_errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, say: training so far is checkpointed
        print(
            f"{name}: error: {_os_error_message(e, out)}. Free some space (or fix the "
            f"cause), then continue with:\n  {resume}",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:  # a worker or peer failed; the message says which and where
        print(f"{name}: {e}\nContinue with:\n  {resume}", file=sys.stderr)
        return 1
    return out, summary
