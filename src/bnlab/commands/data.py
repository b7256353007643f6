"""`bnlab data download mnist` and `bnlab data download cifar10`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnlab.commands import HelpFormatter, positive_float, positive_int


def _quiet_log(*args) -> None:
    pass


def _download(args: argparse.Namespace) -> int:
    from bnlab.data.download import (
        CIFAR10_MIRRORS,
        DEFAULT_MIRRORS,
        DownloadError,
        download_cifar10,
        download_mnist,
    )

    common = dict(
        retries=args.retries,
        timeout=args.timeout,
        progress=not args.quiet,
        log=_quiet_log if args.quiet else print,
    )
    try:
        if args.dataset == "mnist":
            path = download_mnist(args.dir, mirrors=args.mirror or DEFAULT_MIRRORS, **common)
            ready = f"MNIST ready in {path}; use it with `bnlab reproduce figure1 --data {path}`"
        else:
            path = download_cifar10(
                args.dir, layout=args.layout, mirrors=args.mirror or CIFAR10_MIRRORS, **common
            )
            ready = (
                f"CIFAR-10 ready in {path}; use it with "
                f"`bnlab reproduce inception --data {path.parent}`"
            )
    except DownloadError as e:
        print(f"bnlab data download: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(ready)
    return 0


def _add_common(p: argparse.ArgumentParser, default_dir: str) -> None:
    p.add_argument("--dir", type=Path, default=Path(default_dir), help="target folder")
    p.add_argument(
        "--mirror",
        action="append",
        default=None,
        help="base URL to fetch from (repeatable); default: the usual public mirrors",
    )
    p.add_argument("--retries", type=positive_int, default=3, help="tries per mirror and file")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        help="seconds each network operation may wait (a stalled mirror fails after this)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_download)


def add_parser(subparsers) -> None:
    d = subparsers.add_parser(
        "data", help="download data sets", description="Download and verify data sets."
    )
    sets = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    dl = sets.add_parser("download", help="download a data set")
    which = dl.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    m = which.add_parser(
        "mnist",
        formatter_class=HelpFormatter,
        help="the four MNIST IDX files, verified by MD5",
        description="Download the four MNIST IDX files (gzip), verify each against the MD5 of "
        "the published original, and write them atomically; partial downloads resume.",
    )
    _add_common(m, "data/mnist")
    c = which.add_parser(
        "cifar10",
        formatter_class=HelpFormatter,
        help="the CIFAR-10 archive, verified by MD5",
        description="Download the CIFAR-10 archive (170 MB), verify it against the published "
        "MD5, and write it atomically; a partial download resumes. It stays packed: "
        "`--data DIR` reads it in place.",
    )
    _add_common(c, "data/cifar10")
    c.add_argument(
        "--layout",
        choices=("python", "binary"),
        default="python",
        help="cifar-10-python.tar.gz (pickled batches) or cifar-10-binary.tar.gz",
    )
