"""Reports built only from a run folder's records (``config.json``, ``metrics.jsonl``).

``build_report(run_dir)`` reads ``run_dir/config.json``, looks up its
``"experiment"`` in ``EXPERIMENTS`` and calls that experiment's report module;
``report_files(run_dir)`` lists the files that call writes.
Shared parts live beside it: ``stats`` (statistics and verdicts on plain
lists/arrays) and ``render`` (figures, Markdown tables, report.md/report.html).

A new experiment adds one entry to ``EXPERIMENTS``; its module provides
``build_report(run_dir) -> dict`` (the summary) and ``FILES``, the names of the
files that ``build_report`` writes into the run folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = ["EXPERIMENTS", "ReportError", "build_report", "read_run", "report_files"]

# experiment name (config.json's "experiment") -> its report module, imported on first use
EXPERIMENTS = {
    "figure1": "bnlab.report.figure1",
    "inception": "bnlab.report.inception",
    "lr_init": "bnlab.report.lr_init",
    "dropout": "bnlab.report.dropout",
    "shift": "bnlab.report.shift",
    "batch_size": "bnlab.report.batch_size",
    "batch_noise": "bnlab.report.batch_noise",
}


class ReportError(ValueError):
    """A run folder without the records a report needs."""


def build_report(run_dir: str | Path) -> dict:
    """(Re)build the report of the run in ``run_dir`` from its records.

    Args:
        run_dir: the ``--out`` folder of a ``bnlab reproduce EXPERIMENT`` run.

    Returns:
        The experiment's summary, as written to ``run_dir/summary.json``; the
        files written are ``report_files(run_dir)``.

    Raises:
        ReportError: ``config.json`` is missing, is not valid JSON, names no
            experiment or one without a report, or the records are incomplete.
    """
    return _report_module(Path(run_dir)).build_report(Path(run_dir))


def read_run(run_dir: Path, experiment: str) -> tuple[dict, dict, list[dict]]:
    """config.json, env.json (empty if absent) and the records of a finished run.

    Raises:
        ReportError: config.json or metrics.jsonl is missing.
    """
    from bnlab.run_folder import read_json, read_jsonl

    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).exists():
            raise ReportError(
                f"{run_dir} has no {name}: not a finished {experiment} run (resume it with "
                f"`bnlab reproduce {experiment} --resume --out DIR` and its options)"
            )
    config = read_json(run_dir / "config.json")
    env_path = run_dir / "env.json"
    env = read_json(env_path) if env_path.exists() else {}
    return config, env, read_jsonl(run_dir / "metrics.jsonl")


def report_files(run_dir: str | Path) -> list[Path]:
    """The files ``build_report(run_dir)`` writes, in the order it writes them.

    Raises:
        ReportError: as ``build_report``, for config.json.
    """
    run_dir = Path(run_dir)
    return [run_dir / name for name in _report_module(run_dir).FILES]


def _report_module(run_dir: Path) -> ModuleType:
    """The report module of the experiment that ``run_dir/config.json`` names."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir} has no config.json: not a bnlab run folder "
            "(`bnlab reproduce EXPERIMENT --out DIR` writes one)"
        )
    from bnlab.run_folder import read_json

    try:
        config = read_json(path)
    except ValueError as e:
        raise ReportError(str(e)) from e
    experiment = config.get("experiment") if isinstance(config, dict) else None
    if not isinstance(experiment, str):
        raise ReportError(f'{path} names no experiment (no "experiment" string)')
    if experiment not in EXPERIMENTS:
        raise ReportError(
            f"{path} names experiment {experiment!r}, which has no report; known: "
            + ", ".join(sorted(EXPERIMENTS))
        )
    return importlib.import_module(EXPERIMENTS[experiment])
