"""The lab's one registry: every experiment, its config, its report and the claims it tests.

An experiment is two modules and one line here. The experiment module
(``bnlab.experiments.NAME``) defines:

- ``Config``: a dataclass (saved as ``config.json``) with a ``preset`` field and
  ``IDENTITY``, the keys a run folder may only be resumed with;
- ``PRESETS``: ``{"quick": {...}, "cpu": {...}, "gpu": {...}}``, field overrides.
  The names mean the same everywhere: ``quick`` is a smoke test of minutes
  (its verdicts test nothing), ``cpu`` the documented run on 2 CPU cores, ``gpu``
  the run for one CUDA device. ``cpu`` is every experiment's default;
- ``HELP``: field -> help text (``bnlab reproduce NAME --help`` is derived from
  ``Config``, ``PRESETS`` and ``HELP``; no experiment writes CLI code);
- ``validate(cfg)``, ``check_data(cfg)``, ``arms(cfg)``, ``describe(cfg)`` and
  ``build_job(arm, cfg, info, work)`` (see :mod:`bnlab.experiments.runner`), and
  optionally ``after_training(cfg, out, records)``, ``summary_lines(summary)``
  (what the command prints at the end) and ``exit_status(summary)`` (a nonzero
  status and its message for a result that is not a success, e.g. divergence).

The report module (``bnlab.report.NAME``) defines ``build_report(run_dir) ->
summary``, ``FILES`` (what it writes) and ``FIGURE`` (the figure of its verdicts).

The runner, the CLI, ``bnlab report`` and ``bnlab claims`` read :data:`EXPERIMENTS`;
nothing else lists experiments.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bnlab.experiments import (
    batch_noise,
    batch_size,
    dropout,
    ema_vs_precise,
    figure1,
    inception,
    lr_init,
    shift,
)
from bnlab.experiments.protocol import DEFAULT_PRESET, config_from
from bnlab.report import ReportError
from bnlab.report import batch_noise as batch_noise_report
from bnlab.report import batch_size as batch_size_report
from bnlab.report import dropout as dropout_report
from bnlab.report import ema_vs_precise as ema_vs_precise_report
from bnlab.report import figure1 as figure1_report
from bnlab.report import inception as inception_report
from bnlab.report import lr_init as lr_init_report
from bnlab.report import shift as shift_report
from bnlab.run_folder import read_json

__all__ = ["EXPERIMENTS", "Experiment", "build_report", "experiment_of", "report_files"]


@dataclass(frozen=True)
class Experiment:
    """One experiment of the lab.

    Attributes:
        name: its command, ``bnlab reproduce NAME``.
        key: its name in run folders (``config.json``'s ``"experiment"``) and the
            default ``runs/KEY/<timestamp>``.
        title: one line: what it reproduces or measures.
        run: the experiment module (see this module's docstring).
        report: the report module.
        claims: ids of the paper's claims it tests (``bnlab.report.claims.CLAIMS``).
    """

    name: str
    key: str
    title: str
    run: ModuleType
    report: ModuleType
    claims: tuple[str, ...] = ()

    def __reduce__(self):
        # Worker processes receive the record: its modules travel by name.
        return (
            _rebuild,
            (self.name, self.key, self.title, self.run.__name__, self.report.__name__, self.claims),
        )

    def config(self, preset: str = DEFAULT_PRESET, **overrides):
        """The ``Config`` of ``preset`` with ``overrides`` (None values are ignored)."""
        return config_from(self.run, preset, **overrides)


def _rebuild(name, key, title, run, report, claims) -> Experiment:
    return Experiment(
        name, key, title, importlib.import_module(run), importlib.import_module(report), claims
    )


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "figure1",
            "figure1",
            "Section 4.1 / Figure 1: MNIST MLP with and without BN",
            figure1,
            figure1_report,
            ("fig1-faster", "fig1-accuracy", "fig1-stable"),
        ),
        Experiment(
            "inception",
            "inception",
            "Section 4.2 / Figures 2-3 and the 4.2.3 ensemble: Inception with and without BN",
            inception,
            inception_report,
            (
                "inc-bn-baseline",
                "inc-bn-x5",
                "inc-bn-x30",
                "inc-x5-diverges",
                "sigmoid",
                "ensemble",
            ),
        ),  # fmt: skip
        Experiment(
            "lr-init",
            "lr_init",
            "Section 3.3: learning rates x initial weight scales, with and without BN",
            lr_init,
            lr_init_report,
            ("higher-lr", "init"),
        ),
        Experiment(
            "dropout",
            "dropout",
            "Section 3.4: BN with and without dropout against the baseline with and without it",
            dropout,
            dropout_report,
            ("regularizes", "dropout"),
        ),
        Experiment(
            "shift",
            "shift",
            "Internal covariate shift measured: probes of shift, gradient ICS and smoothness",
            shift,
            shift_report,
            ("ics",),
        ),
        Experiment(
            "batch-size",
            "batch_size",
            "BN as the mini-batch shrinks (256 to 2), beside Batch Renorm, ghost BN, LayerNorm "
            "and GroupNorm",
            batch_size,
            batch_size_report,
        ),
        Experiment(
            "batch-noise",
            "batch_noise",
            "BN's batch-statistics noise against the sampling formulas and the shift it removes",
            batch_noise,
            batch_noise_report,
        ),
        Experiment(
            "ema-vs-precise",
            "ema_vs_precise",
            "Evaluating with moving averages (EMA) or precise BN statistics, at a small and a "
            "large batch size (Wu & Johnson 2021)",
            ema_vs_precise,
            ema_vs_precise_report,
        ),
    )
}


def experiment_of(run_dir: str | Path) -> tuple[Experiment, dict]:
    """The experiment whose run ``run_dir`` holds, and its ``config.json``.

    Raises:
        ReportError: no readable ``config.json``, or one that names no known experiment.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir} has no config.json: not a bnlab run folder "
            "(`bnlab reproduce EXPERIMENT --out DIR` writes one)"
        )
    try:
        config = read_json(path)
    except ValueError as e:
        raise ReportError(str(e)) from e
    key = config.get("experiment") if isinstance(config, dict) else None
    if not isinstance(key, str):
        raise ReportError(f'{path} names no experiment (no "experiment" string)')
    for exp in EXPERIMENTS.values():
        if exp.key == key:
            return exp, config
    raise ReportError(
        f"{path} names experiment {key!r}, which has no report; known: "
        + ", ".join(sorted(e.key for e in EXPERIMENTS.values()))
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build the report of the run in ``run_dir`` from its records alone.

    Returns:
        The experiment's summary, as written to ``run_dir/summary.json``; the
        files written are :func:`report_files`.

    Raises:
        ReportError: ``config.json`` is missing, is not valid JSON, names no known
            experiment, or the records are incomplete.
    """
    exp, _ = experiment_of(run_dir)
    return exp.report.build_report(Path(run_dir))


def report_files(run_dir: str | Path) -> list[Path]:
    """The files :func:`build_report` writes into ``run_dir``, in order."""
    exp, _ = experiment_of(run_dir)
    return [Path(run_dir) / name for name in exp.report.FILES]
