"""Reports built only from a run folder's records (``config.json``, ``metrics.jsonl``).

Each experiment has a report module here (``bnlab.report.figure1``, ...) with
``build_report(run_dir) -> summary``, ``FILES`` (what it writes) and ``FIGURE``;
:mod:`bnlab.lab` ties it to its experiment (``bnlab.lab.build_report(run_dir)``
rebuilds any run's report). Shared parts live beside them: ``stats`` (statistics
and verdicts on plain lists/arrays) and ``render`` (figures, Markdown tables,
report.md/report.html).
"""

from __future__ import annotations

from pathlib import Path

from bnlab.run_folder import read_json, read_jsonl

__all__ = ["ReportError", "read_run"]


class ReportError(ValueError):
    """A run folder without the records a report needs."""


def read_run(run_dir: Path, experiment: str) -> tuple[dict, dict, list[dict]]:
    """config.json, env.json (empty if absent) and the records of a finished run.

    Raises:
        ReportError: config.json or metrics.jsonl is missing.
    """
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
