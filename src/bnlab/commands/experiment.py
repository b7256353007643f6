"""`bnlab reproduce NAME` for every experiment of the lab (:data:`bnlab.lab.EXPERIMENTS`).

Each experiment module defines ``Config`` (a dataclass), ``PRESETS`` (``quick``,
``cpu``, ``gpu``: field overrides) and ``HELP`` (field -> help text); its options are
derived from them here, so an experiment needs no CLI code of its own. Lists are
given comma-separated (``--lrs 0.01,0.1``). At the end the command prints the
module's ``summary_lines(summary)`` if it defines one, else the summary's
``"lines"`` (name -> text), one per line, names aligned; a module's
``exit_status(summary)`` turns a result that is not a success (a diverged network)
into a nonzero status and its message.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from bnlab.commands import HelpFormatter, integer
from bnlab.commands.run import add_run_options, run_from_cli
from bnlab.data import CIFARDataError, MNISTDataError
from bnlab.experiments.protocol import DEFAULT_PRESET, config_from
from bnlab.lab import EXPERIMENTS, Experiment

__all__ = ["add_parsers"]

_SKIP = {"preset"}  # given as --preset, with the presets' table in the help


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


def _presets_help(module) -> str:
    return "\n".join(
        f"  {name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
        for name, values in module.PRESETS.items()
    )


def _add_parser(exps, exp: Experiment) -> None:
    module = exp.run
    doc = (module.__doc__ or "").strip()
    p = exps.add_parser(
        exp.name,
        help=exp.title,
        description=f"{doc}\n\npresets (options given override them):\n{_presets_help(module)}",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=list(module.PRESETS),
        default=DEFAULT_PRESET,
        help="quick: a smoke test of minutes (its verdicts test nothing); cpu: the "
        "documented run on 2 CPU cores; gpu: one CUDA device (default: cpu)",
    )
    for f in dataclasses.fields(module.Config):
        if f.name in _SKIP or f.name.isupper():
            continue
        default = _default(f)
        if f.name == "data":
            kind = Path
        else:
            kind = _option_type(f)
        if kind is None:
            continue
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = module.HELP.get(f.name, f.name)
        if "default" not in text:
            text += f" (default: {shown}, or the preset's)"
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=text)
    add_run_options(p, exp.key, "arms trained at once (processes)")
    p.set_defaults(func=_run, experiment=exp)


def _summary_lines(module, summary: dict) -> list[str]:
    if hasattr(module, "summary_lines"):
        return module.summary_lines(summary)
    lines = summary.get("lines", {})
    width = max(map(len, lines), default=0)
    return [f"{name:>{width}}: {text}" for name, text in lines.items()]


def _run(args: argparse.Namespace) -> int:
    exp: Experiment = args.experiment
    module = exp.run
    given = {}
    for f in dataclasses.fields(module.Config):
        value = getattr(args, f.name, None) if f.name not in _SKIP else None
        if value is not None:
            given[f.name] = str(value) if isinstance(value, Path) else value
    name = f"bnlab reproduce {exp.name}"
    try:
        cfg = config_from(module, args.preset, **given)
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    result = run_from_cli(exp, cfg, args, (MNISTDataError, CIFARDataError))
    if isinstance(result, int):
        return result
    out, summary = result
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if not args.quiet:
        for line in _summary_lines(module, summary):
            print(line)
        files = ", ".join(n for n in exp.report.FILES if n != "report.html")
        print(f"report: {out / 'report.html'} (also {files})")
    status = getattr(module, "exit_status", lambda s: None)(summary)
    if status is not None:
        code, message = status
        print(f"{name}: {message}", file=sys.stderr)
        return code
    return 0


def add_parsers(exps) -> None:
    """Register every experiment of :data:`bnlab.lab.EXPERIMENTS` under `bnlab reproduce`."""
    for exp in EXPERIMENTS.values():
        _add_parser(exps, exp)
