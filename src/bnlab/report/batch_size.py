"""Report of ``bnlab reproduce batch-size``: final accuracy against mini-batch size.

Built from the run's records alone. Every run saw the same number of training
examples; its level is the test accuracy at its last evaluation (mean ± std over
seeds). A diverged seed counts with the accuracy its broken network has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.report import ReportError
from bnlab.report.render import (
    render_template,
    report_from_records,
    save_figure,
    subplots,
)
from bnlab.report.stats import (
    Verdict,
    combine,
    difference_ci,
    diverged_copies,
    eval_curves,
    fmt_diverged,
    fmt_pct,
    judge,
    mean_std_ci,
    run_context,
)

__all__ = ["FILES", "build_report", "summarize"]

FILES = ["summary.json", "batch_size.png", "report.md", "report.html"]
LABELS = {
    "none": "no normalization",
    "bn": "Batch Norm",
    "brn": "Batch Renorm",
    "ghost": "ghost BN",
    "ln": "LayerNorm (GroupNorm, 1 group)",
    "gn": "GroupNorm (10 groups)",
}
COLORS = {
    "none": "#7f7f7f",
    "bn": "#d62728",
    "brn": "#ff7f0e",
    "ghost": "#9467bd",
    "ln": "#2ca02c",
    "gn": "#1f77b4",
}
# The paper's own mini-batch for the MNIST network (Section 4.1), marked on the figure.
PAPER_BATCH = 60


def _pct(d: dict | None) -> str:
    return "—" if d is None else fmt_pct(d)


def summarize(records: list[dict], config: dict) -> dict:
    """Per normalization and batch size: final test accuracy; then the verdicts' inputs."""
    settings = {(r["norm"], r["batch_size"]): r for r in records if r.get("kind") == "settings"}
    grid: dict = {}
    for norm in config["norms"]:
        grid[norm] = {}
        for b in sorted(config["batch_sizes"]):
            s = settings.get((norm, b))
            if s is None:
                raise ReportError(f"no records of {norm} at batch {b}; resume the run")
            try:
                c = eval_curves(records, s["arm"], ["test_acc"])
            except ValueError as e:
                raise ReportError(f"{e}; the run is incomplete (resume it)") from e
            grid[norm][str(b)] = {
                "final_test_acc": mean_std_ci(
                    list(np.nan_to_num(c["test_acc"][-1])), bounds=(0, 1)
                ),
                "steps": s["steps"],
                "lr": s["lr"],
                "diverged": fmt_diverged(diverged_copies(records, s["arm"])),
            }
    lines = {
        norm: ", ".join(f"b{b}: {_pct(v['final_test_acc'])}" for b, v in runs.items())
        for norm, runs in grid.items()
    }
    out = {"grid": grid, "lines": lines}
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _figure(summary: dict, config: dict, path: Path) -> None:
    fig, ax = subplots(figsize=(10, 5), constrained_layout=True)
    sizes = sorted(config["batch_sizes"])
    for norm, runs in summary["grid"].items():
        acc = [runs[str(b)]["final_test_acc"] for b in sizes]
        mean = [100 * a["mean"] for a in acc]
        lo = [100 * min(a["values"]) for a in acc]
        hi = [100 * max(a["values"]) for a in acc]
        ax.plot(sizes, mean, "o-", color=COLORS.get(norm), label=LABELS.get(norm, norm))
        ax.fill_between(sizes, lo, hi, color=COLORS.get(norm), alpha=0.15, linewidth=0)
    if sizes[0] <= PAPER_BATCH <= sizes[-1]:  # within the sweep: where the paper trains
        ax.axvline(
            PAPER_BATCH, color="k", ls=":", lw=1, label=f"paper: batch {PAPER_BATCH} (Section 4.1)"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.invert_xaxis()  # the batch shrinks from left to right
    ax.set_xlabel("mini-batch size (every run sees the same number of examples)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(
        f"BN as the mini-batch shrinks: MNIST network, {config['examples']:,} examples, "
        f"{config['seeds']} seed(s); band: min-max",
        fontsize=10,
    )
    save_figure(fig, path)


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts (none of them the paper's own: it does not vary the batch
    size), decided by ``stats.judge`` on per-seed accuracy differences."""
    grid = summary["grid"]
    sizes = sorted(config["batch_sizes"])
    small, large = str(sizes[0]), str(sizes[-1])
    steps = max(runs[str(b)]["steps"] for runs in grid.values() for b in sizes)
    context = run_context(config, steps=steps)
    rows = []

    def acc(norm: str, b: str) -> dict:
        return grid[norm][b]["final_test_acc"]

    def better(title: str, a: tuple[str, str], b: tuple[str, str], result: str) -> Verdict:
        return judge(
            title,
            difference_ci(acc(*a)["values"], acc(*b)["values"], bounds=(-1, 1)),
            context=context,
            null=0.0,
            unit="difference",
            result=result,
        )

    if "bn" in grid and len(sizes) > 1:
        rows.append(
            better(
                "BN degrades as the mini-batch shrinks (Ioffe 2017)",
                ("bn", large),
                ("bn", small),
                f"{_pct(acc('bn', large))} at batch {large}, {_pct(acc('bn', small))} at batch "
                f"{small} (measured: the first minus the second)",
            )
        )
    for norm, name, title in (
        ("ln", "LayerNorm",
         "LayerNorm, which uses no batch statistics, beats BN at the smallest batch"),
        ("brn", "Batch Renorm",
         "Batch Renorm recovers accuracy BN loses at the smallest batch (Ioffe 2017)"),
    ):  # fmt: skip
        if norm in grid and "bn" in grid:
            rows.append(
                better(
                    title,
                    (norm, small),
                    ("bn", small),
                    f"at batch {small}: {_pct(acc(norm, small))} with {name}, "
                    f"{_pct(acc('bn', small))} with BN (measured: {name} minus BN)",
                )
            )
    if "ghost" in grid and "bn" in grid and int(large) > config["ghost_batch"]:
        rows.append(
            better(
                f"Ghost batches of {config['ghost_batch']} help BN at the largest batch "
                "(Hoffer et al. 2017)",
                ("ghost", large),
                ("bn", large),
                f"at batch {large}: {_pct(acc('ghost', large))} with ghost BN, "
                f"{_pct(acc('bn', large))} with BN (measured: ghost BN minus BN)",
            )
        )
    if "none" in grid and "bn" in grid:
        parts = [better(f"at batch {b}", ("bn", b), ("none", b), "") for b in map(str, sizes)]
        beats = [b for b in map(str, sizes) if acc("bn", b)["mean"] > acc("none", b)["mean"]]
        rows.append(
            combine(
                "BN beats no normalization at every batch size",
                parts,
                result=f"BN higher on average at batch sizes {', '.join(beats) or 'none'} of "
                f"{', '.join(map(str, sizes))} (measured: BN minus no normalization)",
            )
        )
    return rows


def _markdown(summary: dict, config: dict, env: dict) -> str:
    """report.md: the words are templates/batch_size.md.j2's."""
    return render_template(
        "batch_size.md.j2",
        summary=summary,
        config=config,
        env=env,
        sizes=sorted(config["batch_sizes"]),
        labels=LABELS,
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, batch_size.png, report.md and report.html from the records."""
    return report_from_records(
        run_dir,
        "batch-size",
        summarize,
        lambda r, s, c, p: _figure(s, c, p),
        _markdown,
        FILES[1],
        "bnlab: BN and the batch size",
    )


# For `bnlab claims`: the figure of this run's verdicts (none of them is one of the
# paper's own claims: the paper does not vary the batch size).
FIGURE = "batch_size.png"
