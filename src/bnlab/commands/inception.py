"""`bnlab reproduce inception`: Section 4.2 (Figures 2, 3) and the 4.2.3 ensemble."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnlab.commands import HelpFormatter, integer
from bnlab.commands.run import add_run_options


def _run(args: argparse.Namespace) -> int:
    from bnlab.commands.run import run_from_cli
    from bnlab.data import CIFARDataError
    from bnlab.experiments.inception import NETWORKS, config_for

    name = "bnlab reproduce inception"
    data = str(args.data) if args.data is not None else None
    networks = None
    if args.networks is not None:
        networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    try:
        cfg = config_for(
            args.preset,
            data=data,
            networks=networks,
            steps=args.steps,
            seeds=args.seeds,
            control_seeds=args.control_seeds,
            batch_size=args.batch_size,
            width=args.width,
            depth=args.depth,
            base_lr=args.base_lr,
            eval_every=args.eval_every,
            eval_examples=args.eval_examples,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            bn_stats=args.bn_stats,
        )
    except ValueError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if cfg.data is not None and not Path(cfg.data).exists():
        print(
            f"{name}: error: no CIFAR-10 at {cfg.data}; download it with `bnlab data download "
            f"cifar10 --dir {cfg.data}`, pass --data DIR, or use --preset quick (offline)",
            file=sys.stderr,
        )
        return 2
    result = run_from_cli("bnlab.experiments.inception", cfg, args, (CIFARDataError,))
    if isinstance(result, int):
        return result
    out, summary = result
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if not args.quiet:
        for net, s in summary["networks"].items():
            line = f"{net:>18}: best test accuracy {s['best_text']}"
            if s.get("diverged"):
                line += f"; diverged ({s['diverged']})"
            print(line)
        if summary.get("ensemble"):
            e = summary["ensemble"]
            print(
                f"{'ensemble':>18}: top-1 error {100 * (1 - e['ensemble_top1']):.2f}%, "
                f"top-5 error {100 * (1 - e['ensemble_top5']):.2f}% "
                f"({len(e['members'])} members)"
            )
        print(f"report: {out / 'report.html'} (also report.md, figure2.png, summary.json)")
    unexpected = [
        n
        for n, s in summary["networks"].items()
        if s.get("diverged") and not NETWORKS[n].may_diverge
    ]
    if unexpected:
        print(
            f"{name}: {', '.join(unexpected)} diverged (see the report); lower --base-lr, or "
            "check the data",
            file=sys.stderr,
        )
        return 3
    return 0


def add_parser(experiments) -> None:
    """Register `inception` under `bnlab reproduce`."""
    from bnlab.experiments.inception import NETWORKS, PRESETS

    p = experiments.add_parser(
        "inception",
        help="Section 4.2 / Figures 2-3 and the 4.2.3 ensemble: Inception with and without BN",
        formatter_class=HelpFormatter,
        description="Train the networks of Section 4.2.2 (a small seed-batched Inception) "
        "and write config.json, env.json, metrics.jsonl, summary.json, figure2.png, report.md "
        "and report.html to --out. Presets: quick (offline, packaged MNIST digits as colour "
        "images, a few minutes: a smoke test), cpu (CIFAR-10 on 2 CPU cores, under 90 "
        "minutes), gpu (CIFAR-10, one CUDA device). Options left out take the preset's value."
        "\n\npresets:\n"
        + "\n".join(
            f"  {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items()
        )
        + "\n\nnetworks: "
        + ", ".join(NETWORKS),
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quick", help="default: quick")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="CIFAR-10: the cifar-10-batches-py folder, its parent, or the folder holding "
        "cifar-10-python.tar.gz (see `bnlab data download cifar10`)",
    )
    p.add_argument("--networks", default=None, help="comma-separated subset of the networks")
    p.add_argument("--steps", type=integer, default=None, help="training steps of every network")
    p.add_argument("--seeds", type=integer, default=None, help="seeds of each main network")
    p.add_argument(
        "--control-seeds",
        type=integer,
        default=None,
        help="seeds of controls and ensemble variants",
    )
    p.add_argument("--batch-size", type=integer, default=None, help="mini-batch (paper: 32)")
    p.add_argument("--width", type=integer, default=None, help="Inception width")
    p.add_argument("--depth", type=integer, default=None, help="Inception modules per stage")
    p.add_argument("--base-lr", type=float, default=None, help="inception's learning rate")
    p.add_argument("--eval-every", type=integer, default=None, help="steps between evaluations")
    p.add_argument(
        "--eval-examples",
        type=integer,
        default=None,
        help="test images per evaluation during training",
    )
    p.add_argument(
        "--checkpoint-every", type=integer, default=None, help="steps between checkpoints"
    )
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--bn-stats", choices=["sync", "ghost"], default=None, help="under torchrun")
    add_run_options(p, "inception", "networks trained at once (processes)")
    p.set_defaults(func=_run)
