"""`bnlab data download mnist`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _download(args: argparse.Namespace) -> int:
    from bnlab.data.download import DEFAULT_MIRRORS, DownloadError, download_mnist

    try:
        path = download_mnist(
            args.dir,
            mirrors=args.mirror or DEFAULT_MIRRORS,
            retries=args.retries,
            progress=not args.quiet,
            log=(lambda *a: None) if args.quiet else print,
        )
    except DownloadError as e:
        print(f"bnlab data download: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"MNIST ready in {path}; use it with `bnlab reproduce figure1 --data {path}`")
    return 0


def add_parser(subparsers) -> None:
    d = subparsers.add_parser(
        "data", help="download data sets", description="Download and verify data sets."
    )
    sets = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    dl = sets.add_parser("download", help="download a data set")
    which = dl.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    m = which.add_parser(
        "mnist",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the four MNIST IDX files, verified by MD5",
        description="Download the four MNIST IDX files (gzip), verify each against the MD5 of "
        "the published original, and write them atomically; partial downloads resume.",
    )
    m.add_argument("--dir", type=Path, default=Path("data/mnist"), help="target folder")
    m.add_argument(
        "--mirror",
        action="append",
        default=None,
        help="base URL to fetch from (repeatable); default: the usual public mirrors",
    )
    m.add_argument("--retries", type=int, default=3, help="tries per mirror and file")
    m.add_argument("--quiet", action="store_true", help="no progress output")
    m.set_defaults(func=_download)
