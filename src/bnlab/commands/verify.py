"""`bnlab verify`: run :mod:`bnlab.verify`'s checks on this machine and print the table."""

from __future__ import annotations

import argparse

from bnlab.verify import DTYPES, format_table, run_checks


def _run(args: argparse.Namespace) -> int:
    try:
        results = run_checks(args.device, args.dtype)
    except ValueError as e:
        print(f"bnlab verify: error: {e}")
        return 2
    print(format_table(results, args.device))
    return 0 if all(r.passed for r in results) else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check this BN implementation against float64 and PyTorch on this machine",
        description="Check bnlab's batch norm on this machine: gradcheck of the explicit "
        "backward, parity with torch.nn.BatchNorm1d/2d/3d (outputs, gradients, running "
        "statistics), low-precision accuracy against float64, and the paper's properties. "
        "Exit status 0 when every check passes.",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device to run the checks on (default: cpu)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="input dtypes to check against float64 (default: float32 bfloat16)",
    )
    p.set_defaults(func=_run)
