"""`bnlab reproduce NAME` for the experiments beyond the paper's figures.

Each such experiment module defines ``Config`` (a dataclass), ``PRESETS``
(name -> field overrides: ``"quick"`` and ``"full"``) and ``HELP`` (field -> help
text); its options are derived from them here, so an experiment needs no CLI
code of its own. Lists are given comma-separated (``--lrs 0.01,0.1``).
At the end the command prints the module's ``summary_lines(summary)`` if it defines
one, else the summary's ``"lines"`` (name -> text), one per line, names aligned.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

from bnlab.commands import HelpFormatter, integer

__all__ = ["EXPERIMENTS", "add_parsers"]

# subcommand -> (module, one-line help)
EXPERIMENTS = {
    "lr-init": (
        "bnlab.experiments.lr_init",
        "Section 3.3: learning rates x initial weight scales, with and without BN",
    ),
    "shift": (
        "bnlab.experiments.shift",
        "Internal covariate shift measured: probes of shift, gradient ICS and smoothness",
    ),
    "batch-size": (
        "bnlab.experiments.batch_size",
        "BN as the mini-batch shrinks (256 to 2), beside Batch Renorm, ghost BN, LayerNorm "
        "and GroupNorm",
    ),
    "dropout": (
        "bnlab.experiments.dropout",
        "Section 3.4: BN with and without dropout against the baseline with and without it",
    ),
    "batch-noise": (
        "bnlab.experiments.batch_noise",
        "BN's batch-statistics noise against the sampling formulas and the shift it removes",
    ),
}

_SKIP = {"data"}  # given as --data with its own help


def _list_of(kind):
    def parse(text: str) -> list:
        out = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(kind(item))
            except ValueError:
                if kind is float and item.isidentifier():
                    out.append(item)  # a named setting, e.g. glorot; validate() checks it
                else:
                    raise argparse.ArgumentTypeError(
                        f"expected comma-separated {kind.__name__}s, got {item!r}"
                    ) from None
        return out

    return parse


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _option_type(f: dataclasses.Field):
    """The argparse type of a config field, from its default; None: not an option."""
    default = _default(f)
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return integer
    if isinstance(default, float):
        return float
    if isinstance(default, list):
        first = next((v for v in default if not isinstance(v, str)), "")
        return _list_of(type(first) if not isinstance(first, str) else str)
    return str


def _add_parser(exps, command: str, module_name: str, summary: str) -> None:
    from bnlab.commands.run import add_run_options

    module = importlib.import_module(module_name)
    doc = (module.__doc__ or "").strip()
    p = exps.add_parser(command, help=summary, description=doc, formatter_class=HelpFormatter)
    p.add_argument(
        "--preset",
        choices=list(module.PRESETS),
        default="full",
        help="a named size: quick is a smoke test of a few seconds, full the documented run; "
        "options given override it",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with the four MNIST IDX files (see `bnlab data download mnist`); "
        "default: the packaged 5,000-digit subset",
    )
    for f in dataclasses.fields(module.Config):
        if f.name in _SKIP or f.name.isupper():
            continue
        kind = _option_type(f)
        if kind is None:
            continue
        default = _default(f)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"{module.HELP.get(f.name, f.name)} (default: {shown}, or the preset's)",
        )
    add_run_options(p, module_name.rsplit(".", 1)[-1], "cells trained at once (processes)")
    p.set_defaults(func=_run, module=module_name, command_name=command)


def _summary_lines(module, summary: dict) -> list[str]:
    if hasattr(module, "summary_lines"):
        return module.summary_lines(summary)
    lines = summary.get("lines", {})
    width = max(map(len, lines), default=0)
    return [f"{name:>{width}}: {text}" for name, text in lines.items()]


def _run(args: argparse.Namespace) -> int:
    from bnlab.commands.run import run_from_cli
    from bnlab.data import MNISTDataError

    module = importlib.import_module(args.module)
    values = dict(module.PRESETS[args.preset])
    for f in dataclasses.fields(module.Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = str(given) if isinstance(given, Path) else given
    cfg = module.Config(**values)
    result = run_from_cli(args.module, cfg, args, (MNISTDataError,))
    if isinstance(result, int):
        return result
    out, summary = result
    if summary is None:  # a torchrun rank other than 0
        return 0
    if not args.quiet:
        for line in _summary_lines(module, summary):
            print(line)
        print(f"report: {out / 'report.html'} (also report.md, summary.json and figures)")
    return 0


def add_parsers(exps) -> None:
    """Register every experiment of :data:`EXPERIMENTS` under `bnlab reproduce`."""
    for command, (module_name, summary) in EXPERIMENTS.items():
        _add_parser(exps, command, module_name, summary)
