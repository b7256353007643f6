"""`bnlab reproduce EXPERIMENT`, `bnlab report RUN_DIR` and `bnlab claims RUN_DIR...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnlab.commands import experiment as experiment_commands
from bnlab.commands import paper
from bnlab.lab import build_report, report_files
from bnlab.report import ReportError
from bnlab.report.claims import build_claims


def _run_report(args: argparse.Namespace) -> int:
    try:
        build_report(args.run_dir)
        files = report_files(args.run_dir)
    except (ReportError, ValueError, KeyError) as e:
        print(f"bnlab report: error: {e}", file=sys.stderr)
        return 2
    print(f"rebuilt {args.run_dir}/" + ", ".join(f.name for f in files))
    return 0


def _run_claims(args: argparse.Namespace) -> int:
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
    exps = rep.add_subparsers(dest="experiment_name", metavar="EXPERIMENT", required=True)
    experiment_commands.add_parsers(exps)
    paper.add_parser(exps)

    r = subparsers.add_parser(
        "report",
        help="rebuild a run's figures and report from its records, without training",
        description="Rebuild summary.json, the figures, report.md and report.html of any "
        "`bnlab reproduce` run folder from its config.json and metrics.jsonl (after a bnlab "
        "upgrade, say), without training.",
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
