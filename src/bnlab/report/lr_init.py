"""Report of ``bnlab reproduce lr-init``: heatmaps over learning rate x initialization.

Built from the run's records alone (config.json, metrics.jsonl). A cell *trains*
when every seed's final test accuracy reaches the threshold (90%) and no seed
diverged; a diverged seed counts as failed, its accuracy is left out of means.
"""

from __future__ import annotations

import math
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
    diverged_copies,
    eval_curves,
    first_step_reaching,
    judge,
    mean_std_ci,
    run_context,
    speedup,
    speedup_estimate,
)

__all__ = ["FILES", "build_report", "summarize"]

FILES = ["summary.json", "lr_init.png", "report.md", "report.html"]
# The two normalizations every cell compares, in the order the report shows them.
NORM_LABELS = {"none": "without BN", "bn": "with BN"}


def _key(value) -> str:
    """A grid coordinate as a summary key: ``"0.01"``, ``"1"``, ``"glorot"``."""
    return "glorot" if value == "glorot" else f"{float(value):g}"


def _init_label(init) -> str:
    return "Glorot" if init == "glorot" else f"N(0, {float(init):g}²)"


def _cell(records: list[dict], name: str, steps: int, threshold: float) -> dict:
    try:
        c = eval_curves(records, name, ["test_acc"])
    except ValueError as e:
        raise ReportError(f"cell {name}: {e}; the run is incomplete (resume it)") from e
    acc = c["test_acc"]  # (T, S)
    diverged = diverged_copies(records, name)
    final = acc[-1].copy()
    for k in diverged:
        final[k] = np.nan
    healthy = [float(v) for v in final if math.isfinite(v)]
    reached = first_step_reaching(c["steps"], np.nan_to_num(acc, nan=0.0).T, threshold)
    for k in diverged:
        reached[k] = None
    return {
        "arm": name,
        "final_acc": mean_std_ci(healthy, bounds=(0, 1)) if healthy else None,
        "final_acc_per_seed": [None if not math.isfinite(v) else float(v) for v in final],
        "diverged": {str(k): v for k, v in diverged.items()},
        "steps_to_threshold": reached,
        "trains": bool(
            not diverged
            and all(math.isfinite(v) and v >= threshold for v in final)
            and int(c["steps"][-1]) == steps
        ),
    }


def _norms(records: list[dict]) -> list[str]:
    """The normalizations of the recorded cells (settings records), in ``NORM_LABELS``'
    order, others after.

    Raises:
        ReportError: no cell without BN, or none with it, was recorded.
    """
    found = {r["norm"] for r in records if r.get("kind") == "settings"}
    for norm in NORM_LABELS:
        if norm not in found:
            raise ReportError(f"no records of any cell {norm}; resume the run")
    return [*NORM_LABELS, *sorted(found - set(NORM_LABELS))]


def _shown(grid: dict) -> list[str]:
    """The grid's normalizations in ``NORM_LABELS``' order, others after (a summary read
    back from summary.json has its keys sorted)."""
    return [*(n for n in NORM_LABELS if n in grid), *sorted(set(grid) - set(NORM_LABELS))]


def summarize(records: list[dict], config: dict) -> dict:
    """Per cell (``grid[norm][init][lr]``): final accuracy, divergence, steps to the
    threshold; then what the verdicts need."""
    lrs, inits, thr = (
        [_key(x) for x in config["lrs"]],
        [_key(x) for x in config["inits"]],
        (config["threshold"]),
    )
    arms = {
        (r["norm"], _key(r["init"]), _key(r["lr"])): r["arm"]
        for r in records
        if r.get("kind") == "settings"
    }
    norms = _norms(records)
    grid: dict = {n: {s: {} for s in inits} for n in norms}
    for n in norms:
        for s in inits:
            for lr in lrs:
                if (n, s, lr) not in arms:
                    raise ReportError(
                        f"no records of the cell {n}, init {s}, lr {lr}; resume the run"
                    )
                grid[n][s][lr] = _cell(records, arms[(n, s, lr)], config["steps"], thr)

    def best_lr(norm, s):  # the largest learning rate that still trains
        ok = [float(lr) for lr in lrs if grid[norm][s][lr]["trains"]]
        return max(ok) if ok else None

    speedups = {}
    for s in inits:
        speedups[s] = {}
        for lr in lrs:
            base, bn = grid["none"][s][lr], grid["bn"][s][lr]
            speedups[s][lr] = speedup(
                base["steps_to_threshold"], bn["steps_to_threshold"], config["steps"]
            )
    out = {
        "threshold": thr,
        "grid": grid,
        "max_lr_that_trains": {n: {s: best_lr(n, s) for s in inits} for n in norms},
        "inits_that_train": {
            n: {lr: sum(grid[n][s][lr]["trains"] for s in inits) for lr in lrs} for n in norms
        },
        "speedup_bn_vs_none": speedups,
    }
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _grid(summary: dict, config: dict, norm: str, what: str) -> np.ndarray:
    lrs, inits = [_key(x) for x in config["lrs"]], [_key(x) for x in config["inits"]]
    grid = np.full((len(inits), len(lrs)), np.nan)
    for i, s in enumerate(inits):
        for j, lr in enumerate(lrs):
            c = summary["grid"][norm][s][lr]
            if what == "acc":
                grid[i, j] = c["final_acc"]["mean"] if c["final_acc"] else np.nan
            else:
                st = c["steps_to_threshold"]
                grid[i, j] = np.mean(st) if all(x is not None for x in st) else np.nan
    return grid


def _figure(summary: dict, config: dict, path: Path) -> None:
    lrs, inits = [_key(x) for x in config["lrs"]], [_key(x) for x in config["inits"]]
    norms = _shown(summary["grid"])
    fig, axes = subplots(
        2, len(norms), figsize=(5.5 * len(norms), 8.5), constrained_layout=True, squeeze=False
    )
    thr = 100 * config["threshold"]
    panels = [
        ("acc", "final test accuracy (%)", "viridis"),
        ("steps", f"steps to {thr:.0f}% (mean over seeds)", "magma_r"),
    ]
    for col, norm in enumerate(norms):
        for row, (what, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            grid = _grid(summary, config, norm, what)
            shown, top = (100 * grid, 100) if what == "acc" else (grid, config["steps"])
            im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=top, aspect="auto")
            fig.colorbar(im, ax=ax, shrink=0.85)
            ax.set_facecolor("#e8e8e8")  # cells without a value (never reached, diverged)
            for i, s in enumerate(inits):
                for j, lr in enumerate(lrs):
                    c = summary["grid"][norm][s][lr]
                    if c["diverged"]:
                        n = len(c["final_acc_per_seed"])
                        text, color = f"div {len(c['diverged'])}/{n}", "red"
                    elif math.isnan(grid[i, j]):
                        text, color = ("never" if what == "steps" else "–"), "black"
                    else:  # dark text on the light end of each colour map
                        light = (
                            shown[i, j] > 0.6 * top if what == "acc" else shown[i, j] < 0.4 * top
                        )
                        text, color = f"{shown[i, j]:,.0f}", "black" if light else "white"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
            ax.set_xticks(range(len(lrs)), lrs)
            ax.set_yticks(range(len(inits)), [_init_label(s) for s in inits])
            ax.set_xlabel(f"learning rate (SGD, momentum {config['momentum']:g})")
            ax.set_title(f"{NORM_LABELS.get(norm, norm)}: {title}")
    fig.suptitle(
        f"Section 3.3: learning rate x initialization, MNIST network, {config['steps']:,} steps, "
        f"{config['seeds']} seed(s) per cell ('div k/n': k seeds diverged)"
    )
    save_figure(fig, path)


def _fmt_speedup(d: dict | None) -> str:
    if d is None:
        return "not measurable"
    return f"{d['exact']:.1f}x" if "exact" in d else f"at least {d['at_least']:.1f}x"


def _sign(x: float) -> float:
    return float(x > 0) - float(x < 0)


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts, decided by ``stats.judge``. A grid claim's samples are the
    grid's rows: per initialization (per learning rate), +1 where BN does better, -1
    where it does worse, 0 for a tie."""
    lrs, inits = [_key(x) for x in config["lrs"]], [_key(x) for x in config["inits"]]
    context = run_context(config)
    best = summary["max_lr_that_trains"]
    fmt = lambda v: "none" if v is None else f"{v:g}"  # noqa: E731
    per_init = "; ".join(
        f"{_init_label(s)}: {fmt(best['none'][s])} without, {fmt(best['bn'][s])} with BN"
        for s in inits
    )
    none_trained = None
    if all(v is None for n in best for v in best[n].values()):  # nothing trained at all
        none_trained = (
            f"no cell reached {100 * config['threshold']:.0f}% in every seed within "
            f"{config['steps']:,} steps; train longer (--steps, or --preset cpu)"
        )
    higher = [_sign((best["bn"][s] or 0) - (best["none"][s] or 0)) for s in inits]
    rows = [
        judge(
            "BN allows higher learning rates",
            None if none_trained else mean_std_ci(higher, bounds=(-1, 1)),
            claim="higher-lr",
            context=context,
            null=0.0,
            samples="initializations",
            more="add initializations (--inits) or train longer (--steps)",
            missing=none_trained,
            result=f"the largest learning rate that trains is higher with BN at "
            f"{higher.count(1)} and lower at {higher.count(-1)} of {len(inits)} "
            f"initializations ({per_init}); measured: the mean of +1 (higher with BN), "
            "0, -1 over initializations",
        )
    ]
    counts = summary["inits_that_train"]
    wider = [_sign(counts["bn"][lr] - counts["none"][lr]) for lr in lrs]
    text = ", ".join(
        f"lr {lr}: {counts['none'][lr]} without / {counts['bn'][lr]} with BN" for lr in lrs
    )
    rows.append(
        judge(
            "BN allows less careful initialization",
            None if none_trained else mean_std_ci(wider, bounds=(-1, 1)),
            claim="init",
            context=context,
            null=0.0,
            samples="learning rates",
            more="add learning rates (--lrs) or train longer (--steps)",
            missing=none_trained,
            result=f"initializations (of {len(inits)}) that train: {text}; measured: the mean "
            "of +1 (more train with BN), 0, -1 over learning rates",
        )
    )
    if "0.01" in inits and "glorot" in inits:
        # Our Figure 1 disagreement: does BN's speed-up survive where the baseline learns at once?
        lr = "0.01" if "0.01" in lrs else lrs[0]
        s01, sg = (summary["speedup_bn_vs_none"][s][lr] for s in ("0.01", "glorot"))
        base, bn = (summary["grid"][n]["glorot"][lr]["steps_to_threshold"] for n in NORM_LABELS)
        text = (
            f"BN's speed-up to {100 * config['threshold']:.0f}%: "
            f"{_fmt_speedup(s01)} at N(0, 0.01²), {_fmt_speedup(sg)} at Glorot"
        )
        rows.append(
            judge(
                "BN's speed-up survives an initialization where the baseline learns at once "
                f"(lr {lr})",
                speedup_estimate(base, bn, config["steps"]),
                context=context,
                null=1.0,
                unit="x",
                missing="at Glorot some seed of one arm never reached "
                f"{100 * config['threshold']:.0f}%; train longer (--steps)",
                result=text + " (measured: at Glorot)",
            )
        )
    return rows


def _markdown(summary: dict, config: dict, env: dict) -> str:
    """report.md: the words are templates/lr_init.md.j2's."""
    return render_template(
        "lr_init.md.j2",
        summary=summary,
        config=config,
        env=env,
        norms=_shown(summary["grid"]),
        inits=[_key(x) for x in config["inits"]],
        lrs=[_key(x) for x in config["lrs"]],
        init_label=_init_label,
        divergence_loss=config.get("divergence_loss", math.inf),
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, lr_init.png, report.md and report.html from the records."""
    return report_from_records(
        run_dir,
        "lr-init",
        summarize,
        lambda r, s, c, p: _figure(s, c, p),
        _markdown,
        FILES[1],
        "bnlab: learning rate x initialization",
    )


# For `bnlab claims`: the figure that shows this run (each verdict names its claim).
FIGURE = "lr_init.png"
