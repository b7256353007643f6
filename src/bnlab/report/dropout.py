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
    environment_line,
    markdown_table,
    report_from_records,
    save_figure,
    subplots,
)
from bnlab.report.stats import diverged_copies, eval_curves, fmt_diverged, mean_std_ci, verdict

__all__ = ["FILES", "build_report", "summarize"]

FILES = ["summary.json", "dropout.png", "report.md", "report.html"]
ARMS = ("none", "none+dropout", "bn", "bn+dropout")
LABELS = {
    "none": "without BN",
    "none+dropout": "without BN, dropout",
    "bn": "with BN",
    "bn+dropout": "with BN, dropout",
}
COLORS = {"none": "#1f77b4", "none+dropout": "#17becf", "bn": "#d62728", "bn+dropout": "#ff7f0e"}
PAPER_CLAIMS = [
    "Section 3.4: a training example is seen in conjunction with other examples in the "
    "mini-batch, so the network no longer produces deterministic values for it; this "
    "regularizes, and in a Batch-Normalized network Dropout can be removed or reduced.",
    "Section 4.2.1: removing Dropout from BN-Inception does not hurt, and speeds up training.",
]


def _pct(d: dict) -> str:
    return f"{100 * d['mean']:.2f}% ± {100 * d['std']:.2f} (n={d['n']})"


def _pp(d: dict) -> str:
    return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} pp (n={d['n']})"


def summarize(records: list[dict], config: dict) -> dict:
    """Final test accuracy and generalization gap per arm; dropout's gain with and without BN."""
    out: dict = {"arms": {}}
    for arm in ARMS:
        try:
            c = eval_curves(records, arm, ["test_acc", "train_acc"])
        except ValueError as e:
            raise ReportError(f"{e}; the run is incomplete (resume it)") from e
        test, train = c["test_acc"][-1], c["train_acc"][-1]
        out["arms"][arm] = {
            "final_test_acc": mean_std_ci(list(test)),
            "final_train_acc": mean_std_ci(list(train)),
            "gap": mean_std_ci(list(train - test)),
            "steps_completed": int(c["steps"][-1]),
            "diverged": fmt_diverged(diverged_copies(records, arm)),
        }
        a = out["arms"][arm]
        a["test_text"], a["gap_text"] = _pct(a["final_test_acc"]), _pp(a["gap"])
    for norm in ("none", "bn"):  # dropout's gain in test accuracy, per seed
        with_d = np.array(out["arms"][f"{norm}+dropout"]["final_test_acc"]["values"])
        without = np.array(out["arms"][norm]["final_test_acc"]["values"])
        out[f"dropout_gain_{norm}"] = mean_std_ci(list(with_d - without))
    return out


def _figure(records: list[dict], config: dict, path: Path) -> None:
    fig, (ax_acc, ax_gap) = subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for arm in ARMS:
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


def _verdicts(summary: dict) -> list[tuple[str, str]]:
    arms = summary["arms"]
    gap_none, gap_bn = arms["none"]["gap"], arms["bn"]["gap"]
    gain_none, gain_bn = summary["dropout_gain_none"], summary["dropout_gain_bn"]
    return [
        (
            "BN regularizes: a smaller generalization gap than the same network without BN",
            verdict(
                gap_bn["mean"] < gap_none["mean"],
                f"gap {_pp(gap_bn)} with BN, {_pp(gap_none)} without",
            ),
        ),
        (
            "BN reduces the need for dropout: dropout adds less to a BN network",
            verdict(
                gain_bn["mean"] < gain_none["mean"],
                f"dropout changes test accuracy by {_pp(gain_bn)} with BN and by "
                f"{_pp(gain_none)} without",
            )
            if gain_none["mean"] > 0
            else "not measurable: dropout does not help even without BN here (it changes "
            f"test accuracy by {_pp(gain_none)} without BN, {_pp(gain_bn)} with); try another "
            "--dropout or more --steps",
        ),
        (
            "BN without dropout is at least as accurate as the baseline with dropout",
            verdict(
                arms["bn"]["final_test_acc"]["mean"]
                >= arms["none+dropout"]["final_test_acc"]["mean"],
                f"{arms['bn']['test_text']} against {arms['none+dropout']['test_text']}",
            ),
        ),
    ]


def _markdown(summary: dict, config: dict, env: dict) -> str:
    rows = [
        (
            LABELS[arm],
            a["test_text"],
            _pct(a["final_train_acc"]),
            a["gap_text"],
            a["diverged"] or "no",
        )
        for arm, a in summary["arms"].items()
    ]
    data = config["data"] or "the packaged MNIST subset (4,000 training, 1,000 test images)"
    init = "Glorot normal" if config["init"] == "glorot" else f"N(0, {config['init']}²)"
    return "\n".join(
        [
            "# Section 3.4: does Batch Normalization regularize?",
            "",
            *[f"- Paper: {c}" for c in PAPER_CLAIMS],
            "",
            "![BN and dropout](dropout.png)",
            "",
            "## Verdicts",
            "",
            markdown_table(["claim", "our result"], _verdicts(summary)),
            "",
            "## Our numbers (last evaluation)",
            "",
            markdown_table(
                ["arm", "test accuracy", "train accuracy", "gap (train - test)", "diverged"],
                rows,
            ),
            "",
            "## What was run",
            "",
            f"- **Data:** {data}; train accuracy on a fixed random "
            f"{config['train_eval_examples']:,} of the training images.",
            f"- **Network:** the Figure 1 network (784-100-100-100-10, sigmoid), {init} initial "
            f"weights; dropout p = {config['dropout']} after each hidden sigmoid in the dropout "
            "arms; BN before each sigmoid in the BN arms. Every arm starts from the same weights.",
            f"- **Training:** {config['steps']:,} steps, batch {config['batch_size']}, SGD lr "
            f"{config['lr']} momentum {config['momentum']}; {config['seeds']} seed(s) per arm "
            "(mean ± std, n).",
            environment_line(env),
            "",
        ]
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


# For `bnlab claims`: the figure that shows this run, and which claim of
# bnlab.report.claims.CLAIMS each verdict row (by the start of its title) tests.
FIGURE = "dropout.png"
CLAIM_IDS = {
    "BN regularizes": "regularizes",
    "BN reduces the need for dropout": "dropout",
}


def verdict_rows(summary: dict, config: dict) -> list[tuple[str, str]]:
    """The report's verdict rows, (claim, "agrees: ..."), from summary.json and config."""
    return _verdicts(summary)
