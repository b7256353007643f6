"""Report of ``bnlab reproduce dropout``: does BN regularize (Section 3.4)?

Built from the run's records alone. The generalization gap of a seed is its
training accuracy (on a fixed set of training images) minus its test accuracy,
both at the last evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.report import ReportError
from bnlab.report.render import (
    recorded_arms,
    render_template,
    report_from_records,
    save_figure,
    subplots,
)
from bnlab.report.stats import (
    Verdict,
    difference_ci,
    diverged_copies,
    eval_curves,
    fmt_diverged,
    fmt_pct,
    fmt_pp,
    judge,
    mean_std_ci,
    run_context,
)

__all__ = ["FILES", "build_report", "summarize"]

FILES = ["summary.json", "dropout.png", "report.md", "report.html"]
# The four arms: with and without BN, each with and without dropout, in the order the
# report shows them.
LABELS = {
    "none": "without BN",
    "none+dropout": "without BN, dropout",
    "bn": "with BN",
    "bn+dropout": "with BN, dropout",
}
COLORS = {"none": "#1f77b4", "none+dropout": "#17becf", "bn": "#d62728", "bn+dropout": "#ff7f0e"}


def _arms(records: list[dict]) -> list[str]:
    """The recorded arms, in ``LABELS``' order.

    Raises:
        ReportError: one of the four arms the comparisons need has no evaluation records.
    """
    arms = recorded_arms(records, LABELS)
    for arm in LABELS:
        if arm not in arms:
            raise ReportError(
                f"no evaluation records for arm {arm!r}; the run is incomplete (resume it)"
            )
    return arms


def summarize(records: list[dict], config: dict) -> dict:
    """Final test accuracy and generalization gap per arm; dropout's gain with and without BN."""
    out: dict = {"arms": {}}
    for arm in _arms(records):
        c = eval_curves(records, arm, ["test_acc", "train_acc"])
        test, train = c["test_acc"][-1], c["train_acc"][-1]
        out["arms"][arm] = {
            "final_test_acc": mean_std_ci(list(test), bounds=(0, 1)),
            "final_train_acc": mean_std_ci(list(train), bounds=(0, 1)),
            "gap": mean_std_ci(list(train - test), bounds=(-1, 1)),
            "steps_completed": int(c["steps"][-1]),
            "diverged": fmt_diverged(diverged_copies(records, arm)),
        }
        a = out["arms"][arm]
        a["test_text"], a["gap_text"] = fmt_pct(a["final_test_acc"]), fmt_pp(a["gap"])
    for norm in ("none", "bn"):  # dropout's gain in test accuracy, per seed
        with_d = np.array(out["arms"][f"{norm}+dropout"]["final_test_acc"]["values"])
        without = np.array(out["arms"][norm]["final_test_acc"]["values"])
        out[f"dropout_gain_{norm}"] = mean_std_ci(list(with_d - without), bounds=(-1, 1))
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _figure(records: list[dict], config: dict, path: Path) -> None:
    fig, (ax_acc, ax_gap) = subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for arm in _arms(records):
        c = eval_curves(records, arm, ["test_acc", "train_acc"])
        steps = c["steps"]
        for ax, values in ((ax_acc, c["test_acc"]), (ax_gap, c["train_acc"] - c["test_acc"])):
            mean = np.nanmean(100 * values, axis=1)
            lo, hi = np.nanmin(100 * values, axis=1), np.nanmax(100 * values, axis=1)
            ls = "--" if arm.endswith("dropout") else "-"
            ax.plot(steps, mean, ls, color=COLORS[arm], label=LABELS[arm])
            ax.fill_between(steps, lo, hi, color=COLORS[arm], alpha=0.15, linewidth=0)
    ax_acc.set_title("test accuracy (mean; band: min-max over seeds)")
    ax_acc.set_ylabel("%")
    ax_acc.set_ylim(0, 100)
    ax_gap.set_title("generalization gap: train minus test accuracy")
    ax_gap.set_ylabel("percentage points")
    ax_gap.axhline(0, color="gray", lw=0.8)
    for ax in (ax_acc, ax_gap):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Section 3.4: BN and dropout (p = {config['dropout']}), MNIST network, "
        f"{config['seeds']} seed(s) per arm"
    )
    save_figure(fig, path)


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts, decided by ``stats.judge``; every arm starts from the same
    weights, so seed ``k`` of one arm pairs with seed ``k`` of another."""
    arms = summary["arms"]
    context = run_context(config, steps=arms["bn"]["steps_completed"])
    gap_none, gap_bn = arms["none"]["gap"], arms["bn"]["gap"]
    gain_none, gain_bn = summary["dropout_gain_none"], summary["dropout_gain_bn"]
    no_gain = None
    if gain_none["mean"] <= 0:
        no_gain = (
            f"dropout does not help even without BN here (it changes test accuracy by "
            f"{fmt_pp(gain_none)} without BN), so there is no need for it that BN could "
            "reduce; try another --dropout or more --steps (--preset cpu)"
        )
    return [
        judge(
            "BN regularizes: a smaller generalization gap than the same network without BN",
            difference_ci(gap_none["values"], gap_bn["values"], bounds=(-1, 1)),
            claim="regularizes",
            context=context,
            null=0.0,
            unit="difference",
            result=f"gap {fmt_pp(gap_bn)} with BN, {fmt_pp(gap_none)} without (measured: "
            "the gap without BN minus with)",
        ),
        judge(
            "BN reduces the need for dropout: dropout adds less to a BN network",
            difference_ci(gain_none["values"], gain_bn["values"], bounds=(-1, 1)),
            claim="dropout",
            context=context,
            null=0.0,
            unit="difference",
            precondition=no_gain,
            result=f"dropout changes test accuracy by {fmt_pp(gain_bn)} with BN and by "
            f"{fmt_pp(gain_none)} without (measured: its gain without BN minus with)",
        ),
        judge(
            "BN without dropout is at least as accurate as the baseline with dropout",
            difference_ci(
                arms["bn"]["final_test_acc"]["values"],
                arms["none+dropout"]["final_test_acc"]["values"],
                bounds=(-1, 1),
            ),
            context=context,
            null=0.0,
            unit="difference",
            result=f"{arms['bn']['test_text']} against {arms['none+dropout']['test_text']} "
            "(measured: BN minus the baseline with dropout)",
        ),
    ]


def _markdown(summary: dict, config: dict, env: dict) -> str:
    """report.md: the words are templates/dropout.md.j2's."""
    return render_template(
        "dropout.md.j2",
        summary=summary,
        config=config,
        env=env,
        labels=LABELS,
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, dropout.png, report.md and report.html from the records."""
    return report_from_records(
        run_dir,
        "dropout",
        summarize,
        lambda r, s, c, p: _figure(r, c, p),
        _markdown,
        FILES[1],
        "bnlab: BN and dropout",
    )


# For `bnlab claims`: the figure that shows this run (each verdict names its claim).
FIGURE = "dropout.png"
