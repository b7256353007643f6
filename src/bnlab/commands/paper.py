"""`bnlab reproduce paper`: every experiment of the lab, then the claims table, in one
resumable command that writes one ``index.html``.

Before any training it checks every experiment's options and data, then forecasts
each experiment's time on this machine from a short timed calibration
(:mod:`bnlab.experiments.estimate`) and prints the forecasts and their total. The
experiments then run one after the other into ``OUT/<experiment>/`` (each with its
progress bars); a finished one is skipped on ``--resume``, an interrupted one
continues from its checkpoints. At the end ``OUT/claims/`` holds the claims table
and ``OUT/index.html`` links every claim to its experiment's report and figure.
``OUT/paper.json`` records each experiment's forecast and measured time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bnlab.commands import HelpFormatter
from bnlab.commands.run import add_run_options, resume_command, run_from_cli
from bnlab.data import CIFARDataError, MNISTDataError
from bnlab.experiments.estimate import estimate, fmt_duration
from bnlab.experiments.protocol import DEFAULT_PRESET, PRESET_NAMES, config_from
from bnlab.lab import EXPERIMENTS, Experiment
from bnlab.report import ReportError
from bnlab.report.claims import build_claims
from bnlab.report.render import markdown_table, write_documents
from bnlab.run_folder import read_json, write_json

__all__ = ["add_parser"]

_NAME = "bnlab reproduce paper"
_DATA_ERRORS = (MNISTDataError, CIFARDataError)


def _configs(args: argparse.Namespace) -> dict[str, object]:
    """Every chosen experiment's config for the preset, with the data folders given."""
    chosen = list(EXPERIMENTS) if args.only is None else args.only
    unknown = [n for n in chosen if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"--only: unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    configs = {}
    for name in chosen:
        exp = EXPERIMENTS[name]
        data = args.cifar10 if exp.name == "inception" else args.mnist
        cfg = config_from(exp.run, args.preset, data=str(data) if data else None)
        if exp.name == "inception" and cfg.data is not None and not Path(cfg.data).exists():
            raise ValueError(
                f"the {args.preset} preset trains inception on CIFAR-10, which is not at "
                f"{cfg.data}: download it with `bnlab data download cifar10 --dir {cfg.data}` "
                "(or pass --cifar10 DIR), or run --preset quick (offline)"
            )
        exp.run.validate(cfg)
        exp.run.check_data(cfg)
        configs[name] = cfg
    return configs


def _index_markdown(
    preset: str, claims: dict, runs: dict[str, Path], times: dict[str, dict], root: Path
) -> str:
    """index.md: the claims, each linked to the report and figure of its experiment."""
    smoke = preset == "quick"
    rows = []
    for c in claims["claims"]:
        if not c["rows"]:
            rows.append((c["section"], c["claim"], "**not tested**", "—", "—"))
        for r in c["rows"]:
            key = r.get("experiment")  # None: a property checked now, not a run
            links = "checked now (`bnlab verify`)"
            if key in runs:
                rel = runs[key].relative_to(root)
                fig = Path(r["figure"]).name if r.get("figure") else None
                links = f"[report]({rel}/report.html)" + (f", [figure]({rel}/{fig})" if fig else "")
            rows.append((c["section"], c["claim"], f"**{r['label']}**", r["measurement"], links))
    lines = [
        "# The paper, reproduced: Ioffe & Szegedy (2015), Sections 3-4",
        "",
    ]
    if smoke:
        lines += [
            "**Smoke test: every experiment ran its `quick` preset.** This checks that the "
            "whole lab runs end to end; no verdict here tests the paper. Run "
            "`bnlab reproduce paper --preset cpu` for verdicts that do.",
            "",
        ]
    lines += [
        f"Preset `{preset}`. Each claim of the paper beside what bnlab measured, linked to "
        "the experiment report that holds the numbers, figures and settings. The full claims "
        "table, with our result and why a verdict is what it is: "
        "[claims/claims.html](claims/claims.html).",
        "",
        markdown_table(["where", "claim", "verdict", "measured", "evidence"], rows),
        "",
        "## Experiments",
        "",
        markdown_table(
            ["experiment", "report", "forecast", "measured"],
            [
                (
                    name,
                    f"[{runs[EXPERIMENTS[name].key].relative_to(root)}/report.html]"
                    f"({runs[EXPERIMENTS[name].key].relative_to(root)}/report.html)",
                    fmt_duration(t["forecast_seconds"]) if "forecast_seconds" in t else "—",
                    fmt_duration(t["measured_seconds"]) if "measured_seconds" in t else "—",
                )
                for name, t in times.items()
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("runs") / "paper" / time.strftime("%Y%m%d-%H%M%S"))
    log = (lambda *a, **k: None) if args.quiet else print
    try:
        configs = _configs(args)
    except (ValueError, *_DATA_ERRORS) as e:
        print(f"{_NAME}: error: {e}", file=sys.stderr)
        return 2
    if out.exists() and not args.resume and any(out.iterdir()):
        print(
            f"{_NAME}: error: --out {out} is not empty; pass --resume to continue the run "
            "there, or choose another --out",
            file=sys.stderr,
        )
        return 2
    record_path = out / "paper.json"
    record = read_json(record_path) if record_path.is_file() else {}
    if record and record.get("preset") != args.preset:
        print(
            f"{_NAME}: error: --out {out} holds a {record.get('preset')} run, not "
            f"{args.preset}; choose another --out",
            file=sys.stderr,
        )
        return 2
    times: dict[str, dict] = record.get("experiments", {})
    runs = {EXPERIMENTS[n].key: out / EXPERIMENTS[n].key for n in configs}
    pending = [n for n in configs if not _done(runs[EXPERIMENTS[n].key])]

    # Forecast from a timed calibration on this machine, before any training.
    if pending and not args.no_estimate:
        log(f"{_NAME} ({args.preset} preset): calibrating on this machine ...")
        total = 0.0
        for name in pending:
            est = estimate(EXPERIMENTS[name], configs[name], args.workers)
            times.setdefault(name, {})["forecast_seconds"] = round(est.seconds, 1)
            total += est.seconds
            log(
                f"  {name:>12}: about {fmt_duration(est.seconds):>9}  ({len(est.arms)} arms on "
                f"{est.workers} worker(s) x {est.threads} thread(s); calibration "
                f"{est.calibration_seconds:.0f} s)"
            )
        log(f"  {'total':>12}: about {fmt_duration(total)}")
    if args.estimate_only:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json(record_path, {"preset": args.preset, "experiments": times})

    # Every experiment, one after the other; each resumes where it stopped.
    for i, name in enumerate(configs, 1):
        exp: Experiment = EXPERIMENTS[name]
        run_dir = runs[exp.key]
        if _done(run_dir):
            log(f"[{i}/{len(configs)}] {name}: finished earlier, kept ({run_dir})")
            continue
        log(f"[{i}/{len(configs)}] {name}: {exp.title}")
        sub = argparse.Namespace(
            out=run_dir,
            resume=(run_dir / "config.json").is_file(),
            workers=args.workers,
            quiet=args.quiet,
            timeout=args.timeout,
            argv=[*args.argv],
        )
        t0 = time.perf_counter()
        result = run_from_cli(exp, configs[name], sub, _DATA_ERRORS)
        if isinstance(result, int):
            print(
                f"{_NAME}: stopped at {name}; continue with:\n  " + resume_command(args.argv, out),
                file=sys.stderr,
            )
            return result
        times.setdefault(name, {})["measured_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(record_path, {"preset": args.preset, "experiments": times})

    # The claims table, and the page that ties it together.
    try:
        claims = build_claims([runs[EXPERIMENTS[n].key] for n in configs], out / "claims")
        write_documents(
            out,
            _index_markdown(args.preset, claims, runs, times, out),
            f"bnlab: the paper reproduced ({args.preset} preset)",
            "index",
        )
    except ReportError as e:
        print(f"{_NAME}: error: {e}", file=sys.stderr)
        return 2
    tested = sum(bool(c["rows"]) for c in claims["claims"])
    log(f"{tested} of {len(claims['claims'])} claims tested; open {out / 'index.html'}")
    return 0


def _done(run_dir: Path) -> bool:
    """A finished experiment: its report was built and no worker error is left."""
    return (run_dir / "summary.json").is_file() and not any((run_dir / "work").glob("*.error"))


def add_parser(exps) -> None:
    """Register `paper` under `bnlab reproduce`."""
    p = exps.add_parser(
        "paper",
        help="every experiment, then the claims table and one index.html (resumable)",
        description=(__doc__ or "").strip(),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=DEFAULT_PRESET,
        help="quick: a smoke test of minutes (its verdicts test nothing); cpu: the "
        "documented runs on 2 CPU cores; gpu: one CUDA device (default: cpu)",
    )
    p.add_argument(
        "--mnist",
        type=Path,
        default=None,
        help="full MNIST (IDX files) for the MNIST experiments; default: the packaged "
        "5,000 digits (offline)",
    )
    p.add_argument(
        "--cifar10",
        type=Path,
        default=None,
        help="CIFAR-10 for inception (cpu and gpu presets; default: data/cifar10)",
    )
    p.add_argument(
        "--only",
        type=lambda t: [n.strip() for n in t.split(",") if n.strip()],
        default=None,
        help="comma-separated subset of the experiments: " + ", ".join(EXPERIMENTS),
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the forecast of each experiment's time and stop",
    )
    p.add_argument("--no-estimate", action="store_true", help="skip the calibration and forecast")
    add_run_options(p, "paper", "arms trained at once (processes)")
    p.set_defaults(func=_run)
