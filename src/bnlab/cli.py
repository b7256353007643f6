"""The ``bnlab`` command.

Each subcommand lives in its own module, which provides
``add_parser(subparsers)`` that registers the subcommand and sets
``func(args) -> int`` as its handler. Building the parser imports every
such module, and some of them import torch (the experiments' configuration
classes give the options' defaults), so ``bnlab --help`` takes about as
long as ``import torch``: a second or two.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Modules that provide subcommands, in the order `bnlab --help` lists them.
COMMAND_MODULES = [
    "bnlab.commands.reproduce",
    "bnlab.commands.data",
    "bnlab.commands.ddp",
    "bnlab.commands.verify",
    "bnlab.commands.bench",
]


def version_text() -> str:
    """bnlab's version, torch's, and the BN kernels this process would use."""
    import torch

    from bnlab import __version__, backend

    return (
        f"bnlab {__version__}\ntorch {torch.__version__}\n"
        f"backend: {backend.describe_without_loading()}"
    )


class _VersionAction(argparse.Action):
    """``--version``: computed when asked (it looks for the kernels), not at start-up."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print bnlab's, torch's and the backend's versions and exit",
            **kwargs,
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())  # stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch Normalization (Ioffe & Szegedy, 2015): the library's checks "
        "and the paper's experiments.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The (sub)parser of the subcommand ``args`` selected, e.g. `bnlab reproduce figure1`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _leaf_parser(action.choices[chosen], args)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"bnlab: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the usage of the subcommand they were given to
        _leaf_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = argv  # so that a run can print the exact command that resumes it
    warnings.formatwarning = _format_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
