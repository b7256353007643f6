"""Section 4.2 report: Figure 2 (accuracy over steps), the Figure 3 table, the ensemble.

``build_report(run_dir)`` reads ``config.json``, ``env.json`` and
``metrics.jsonl`` (``eval``, ``diverged``, ``final``, ``settings`` and
``ensemble`` records) and writes ``summary.json``, ``figure2.png``,
``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import math
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
    difference_ci,
    diverged_copies,
    eval_curves,
    first_step_reaching,
    fmt_diverged,
    fmt_pct,
    fmt_steps,
    judge,
    mean_std_ci,
    proportion_ci,
    run_context,
    speedup,
    speedup_estimate,
)
from bnlab.run_folder import write_json

__all__ = ["FILES", "PAPER_FIGURE3", "build_report", "summarize"]

FILES = ("summary.json", "figure2.png", "report.md", "report.html")
REFERENCE = "inception"
CHANCE = 0.1
# Figure 3 of the paper (ImageNet): steps to reach Inception's 72.2%, and max top-1.
PAPER_FIGURE3 = {
    "inception": ("31.0M", "72.2%"),
    "bn-baseline": ("13.3M", "72.7%"),
    "bn-x5": ("2.1M", "73.0%"),
    "bn-x30": ("2.7M", "74.8%"),
    "bn-x5-sigmoid": ("never", "69.8%"),
}
COLORS = {
    "inception": "#d62728",
    "bn-baseline": "#1f77b4",
    "bn-x5": "#2ca02c",
    "bn-x30": "#9467bd",
    "bn-x5-sigmoid": "#ff7f0e",
    "inception-x5": "#8c564b",
    "inception-sigmoid": "#7f7f7f",
    "bn-x30-init": "#bcbd22",
    "bn-x30-dropout": "#17becf",
}


def _curves(records: list[dict], name: str) -> dict:
    try:
        c = eval_curves(records, name, ["test_acc", "train_loss"])
    except ValueError as e:
        raise ReportError(f"network {name!r}: {e}") from e
    return {"steps": c["steps"], "acc": c["test_acc"], "loss": c["train_loss"]}


def summarize(records: list[dict], config: dict) -> dict:
    """Headline numbers from the records (what summary.json holds)."""
    names = [n for n in config["networks"] if any(r.get("arm") == n for r in records)]
    if not names:
        raise ReportError("the run has no evaluation records of any network")
    settings = {r["arm"]: r for r in records if r.get("kind") == "settings"}
    target, ref, ref_ok = None, None, []
    if REFERENCE in names:  # a subset without it (--networks) has no Figure 3 target
        ref = _curves(records, REFERENCE)
        bad = diverged_copies(records, REFERENCE)
        ref_ok = [k for k in range(ref["acc"].shape[1]) if k not in bad]
        ref_best = [float(np.nanmax(ref["acc"][:, k])) for k in ref_ok]
        # The target of Figure 3: Inception's best accuracy. With several seeds we take
        # the lowest of their bests, so that every Inception seed reaches it.
        target = min(ref_best) if ref_best else None
    out: dict = {"target_acc": target, "networks": {}}
    for name in names:
        c = _curves(records, name)
        bad = diverged_copies(records, name)
        ok = [k for k in range(c["acc"].shape[1]) if k not in bad]
        finals = [r for r in records if r.get("kind") == "final" and r["arm"] == name]
        best = [float(np.nanmax(c["acc"][:, k])) for k in ok]
        s: dict = {
            "seeds": int(c["acc"].shape[1]),
            "steps_completed": int(c["steps"][-1]),
            "best_test_acc": mean_std_ci(best, bounds=(0, 1)) if best else None,
            "diverged_at": {str(k): v for k, v in sorted(bad.items())},
            "diverged": fmt_diverged(bad) or None,
        }
        s["best_text"] = fmt_pct(s["best_test_acc"]) if best else "n/a (every seed diverged)"
        if finals:
            f = finals[-1]
            s["final_test_acc"] = mean_std_ci([f["test_acc_full"][k] for k in ok], bounds=(0, 1))
            s["final_top5"] = mean_std_ci([f["test_top5_full"][k] for k in ok], bounds=(0, 1))
        if target is not None and ok:
            reached = first_step_reaching(c["steps"], c["acc"][:, ok].T, target)
            s["steps_to_target"] = reached
            ref_steps = first_step_reaching(ref["steps"], ref["acc"][:, ref_ok].T, target)
            s["speedup_vs_inception"] = speedup(ref_steps, reached, int(ref["steps"][-1]))
        if name in settings:
            s["settings"] = {k: v for k, v in settings[name].items() if k not in ("kind", "arm")}
        out["networks"][name] = s
    ens = [r for r in records if r.get("kind") == "ensemble"]
    out["ensemble"] = {k: v for k, v in ens[-1].items() if k != "kind"} if ens else None
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _best(summary: dict, name: str) -> float | None:
    s = summary["networks"].get(name)
    return s["best_test_acc"]["mean"] if s and s["best_test_acc"] else None


def _speedup_text(s: dict) -> str:
    sp = s.get("speedup_vs_inception")
    if not sp:
        return "not measurable" if s.get("steps_to_target") else "n/a"
    return f"{sp['exact']:.1f}x" if "exact" in sp else f"at least {sp['at_least']:.1f}x"


# The paper's speed-ups (Section 4.2.2, Figure 3): Inception's 31.0M steps to 72.2% over
# each network's.
PAPER_SPEEDUP = {"bn-baseline": (31.0 / 13.3, "inc-bn-baseline"), "bn-x5": (14.0, "inc-bn-x5")}


def _context(summary: dict, config: dict, name: str) -> dict:
    s = summary["networks"][name]
    return run_context(config, steps=s["steps_completed"], seeds=s["seeds"])


def _best_values(s: dict) -> list[float]:
    return s["best_test_acc"]["values"] if s["best_test_acc"] else []


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts, decided by ``stats.judge`` from the summary's numbers."""
    nets = summary["networks"]
    out = []
    ref = nets.get(REFERENCE)
    for name, (claimed, cid) in PAPER_SPEEDUP.items():
        if name not in nets or summary["target_acc"] is None:  # needs inception in the run
            continue
        s = nets[name]
        at_chance = None
        if summary["target_acc"] <= 2 * CHANCE:
            at_chance = (
                f"Inception never left chance (its best, the target, is "
                f"{_target_text(summary)}) in {ref['steps_completed']:,} steps: there is no "
                "accuracy of the baseline to reach; run longer: --preset cpu (or more --steps)"
            )
        estimate = speedup_estimate(
            ref["steps_to_target"], s.get("steps_to_target") or [], ref["steps_completed"]
        )
        out.append(
            judge(
                f"{name} reaches Inception's best accuracy in fewer steps (paper: "
                f"{claimed:.3g}x, {PAPER_FIGURE3[name][0]} vs 31.0M)",
                estimate,
                claim=cid,
                claimed=claimed,
                context=_context(summary, config, name),
                null=1.0,
                unit="x",
                precondition=at_chance,
                missing=f"{name} did not reach {_target_text(summary)} in every seed, or "
                "Inception reached it in some seeds only; train longer (--steps)",
                result=(f"{_speedup_text(s)} fewer" if estimate else "no speed-up measured:")
                + f" steps to {_target_text(summary)} (per seed: "
                f"inception {fmt_steps(ref['steps_to_target'])}, {name} "
                f"{fmt_steps(s.get('steps_to_target') or [])})",
            )
        )
    if "bn-x30" in nets and "bn-x5" in nets:
        a, b = _best_values(nets["bn-x30"]), _best_values(nets["bn-x5"])
        out.append(
            judge(
                "bn-x30 ends higher than bn-x5 (paper: 74.8% vs 73.0%)",
                difference_ci(a, b, bounds=(-1, 1)) if a and b else None,
                claim="inc-bn-x30",
                context=_context(summary, config, "bn-x30"),
                null=0.0,
                unit="difference",
                missing="every seed of one of them diverged",
                result=f"best test accuracy {nets['bn-x30']['best_text']} vs "
                f"{nets['bn-x5']['best_text']} (measured: bn-x30 minus bn-x5)",
            )
        )
    if "inception-x5" in nets:
        s = nets["inception-x5"]
        low = sum(v < 2 * CHANCE for v in _best_values(s))
        fails = len(s["diverged_at"]) + low
        out.append(
            judge(
                "Inception without BN at 5x the learning rate diverges (paper: parameters "
                "reach infinity)",
                proportion_ci(fails, s["seeds"]),
                claim="inc-x5-diverges",
                claimed=1.0,
                context=_context(summary, config, "inception-x5"),
                null=0.0,
                unit="fraction",
                result=(f"diverged: {s['diverged']}" if s["diverged"] else "no seed diverged")
                + f"; {low} seed(s) stayed at chance; best test accuracy {s['best_text']} "
                "(measured: the share of seeds that failed)",
            )
        )
    if "bn-x5-sigmoid" in nets and "inception-sigmoid" in nets:
        bs, ns = nets["bn-x5-sigmoid"], nets["inception-sigmoid"]
        trains = sum(v > 2 * CHANCE for v in _best_values(bs))
        stays = len(ns["diverged_at"]) + sum(v <= 2 * CHANCE for v in _best_values(ns))
        parts = [
            judge(
                "bn-x5-sigmoid trains",
                proportion_ci(trains, bs["seeds"]),
                context=_context(summary, config, "bn-x5-sigmoid"),
                null=0.0,
                claimed=1.0,
                unit="fraction",
            ),
            judge(
                "inception-sigmoid stays at chance",
                proportion_ci(stays, ns["seeds"]),
                context=_context(summary, config, "inception-sigmoid"),
                null=0.0,
                claimed=1.0,
                unit="fraction",
            ),
        ]
        out.append(
            combine(
                "With sigmoids, BN trains (paper: 69.8%) while Inception stays at chance",
                parts,
                claim="sigmoid",
                result=f"bn-x5-sigmoid best {bs['best_text']} (above "
                f"{200 * CHANCE:.0f}% in {trains} of {bs['seeds']} seeds), inception-sigmoid "
                f"best {ns['best_text']} (at chance in {stays} of {ns['seeds']}; chance "
                f"{100 * CHANCE:.0f}%)",
            )
        )
    e = summary.get("ensemble")
    if e:
        best1, best5 = max(e["member_top1"]), max(e["member_top5"])
        result = (
            f"top-1 error {100 * (1 - e['ensemble_top1']):.2f}% vs best member "
            f"{100 * (1 - best1):.2f}%; top-5 error {100 * (1 - e['ensemble_top5']):.2f}% vs "
            f"{100 * (1 - best5):.2f}% (measured: top-1 accuracy, ensemble minus best member)"
        )
        images = e.get("examples")
        out.append(
            judge(
                "The ensemble of bn-x30 variants beats every member (paper: top-5 error 4.9% "
                "vs 7.82% single-crop)",
                _accuracy_difference(e["ensemble_top1"], best1, images),
                claim="ensemble",
                context=run_context(config, seeds=len(e["members"])),
                null=0.0,
                unit="difference",
                samples="test images" if images else "evaluations",
                precondition=None
                if images
                else "the ensemble was scored once and its record does not say on how many "
                "test images, so the difference has no interval (records of this bnlab lack "
                "`examples`)",
                result=result,
            )
        )
    return out


def _accuracy_difference(a: float, b: float, images: int | None) -> dict:
    """Two accuracies on the same ``images`` test images: their difference with the normal
    interval of two independent proportions (conservative: the two share their images)."""
    d = {"mean": a - b, "std": None, "n": images or 1, "ci95": None, "values": None}
    if images:
        half = 1.96 * math.sqrt((a * (1 - a) + b * (1 - b)) / images)
        d["ci95"] = [max(-1.0, a - b - half), min(1.0, a - b + half)]
    return d


def _target_text(summary: dict) -> str:
    t = summary["target_acc"]
    return "n/a" if t is None else f"{100 * t:.2f}%"


def _figure(records: list[dict], summary: dict, path: Path) -> None:
    fig, (ax, bx) = subplots(1, 2, figsize=(14, 5))
    for name, s in summary["networks"].items():
        c = _curves(records, name)
        color = COLORS.get(name)
        m = np.nanmean(c["acc"], axis=1)
        label = f"{name} (n={s['seeds']})" + (" - diverged" if s["diverged"] else "")
        ax.plot(c["steps"], m, color=color, label=label)
        if c["acc"].shape[1] > 1:
            lo, hi = np.nanmin(c["acc"], axis=1), np.nanmax(c["acc"], axis=1)
            ax.fill_between(c["steps"], lo, hi, color=color, alpha=0.15, lw=0)
        bx.plot(c["steps"], c["loss"], color=color, label=name)
    if summary["target_acc"] is not None:
        ax.axhline(summary["target_acc"], color="k", ls=":", lw=1, label="Inception's best")
    ax.set(xlabel="training step", ylabel="test accuracy (top-1)", title="(a) Test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    bx.set(
        xlabel="training step",
        ylabel="training loss since the last evaluation (mean of seeds)",
        title="(b) Training loss",
    )
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    fig.suptitle(
        "Figure 2 reproduction: small Inception with and without BN "
        "(line: mean over seeds; band: min-max)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def _markdown(summary: dict, config: dict, env: dict, data: str) -> str:
    cfg = config["config"]
    nets = summary["networks"]
    target = _target_text(summary)
    rows = []
    for name, s in nets.items():
        paper = PAPER_FIGURE3.get(name, ("-", "-"))
        steps = s.get("steps_to_target")
        rows.append(
            [
                f"**{name}**",
                s["seeds"],
                fmt_steps(steps) if steps else "n/a",
                _speedup_text(s),
                s["best_text"],
                fmt_pct(s.get("final_test_acc")),
                s["diverged"] or "no",
                paper[0],
                paper[1],
            ]
        )
    fig3 = markdown_table(
        [
            "network",
            "seeds",
            f"steps to {target} (per seed)",
            "speed-up vs inception",
            "best test acc. (during training)",
            "final test acc. (all test images)",
            "diverged",
            "paper: steps to 72.2%",
            "paper: max top-1",
        ],
        rows,
    )
    setting_rows = []
    for name, s in nets.items():
        st = s.get("settings")
        if st:
            setting_rows.append(
                [
                    name,
                    "yes" if st["bn"] else "no",
                    st["activation"],
                    f"{st['lr']:g} (x{st['lr_mult']:g})",
                    f"{st['final_lr']:.3g}",
                    f"{st['weight_decay']:g}",
                    f"{st['dropout']:g}",
                    "yes" if st["lrn"] else "no",
                    st["shuffle"],
                    st["augment"],
                    f"{st['init_gain']:g}",
                    f"{st['params_per_copy']:,}",
                ]
            )
    settings = markdown_table(
        [
            "network",
            "BN",
            "nonlinearity",
            "initial lr",
            "final lr",
            "L2",
            "dropout",
            "LRN",
            "shuffle",
            "augmentation",
            "init gain",
            "parameters",
        ],
        setting_rows,
    )
    claims = (
        verdict_table(summary["verdicts"])
        if summary["verdicts"]
        else "No claim can be tested with these networks alone (each compares two or more)."
    )
    lines = [
        "# Section 4.2 reproduction: Inception with Batch Normalization",
        "",
        *smoke_banner(cfg),
        f"Data: {data}. Preset `{cfg['preset']}`: {cfg['steps']:,} steps per network, "
        f"mini-batch {cfg['batch_size']}, SGD with momentum {cfg['momentum']}, Inception width "
        f"{cfg['width']} and depth {cfg['depth']}; {cfg['seeds']} seed(s) per main network, "
        f"{cfg['control_seeds']} per control and ensemble variant. During training every "
        f"{cfg['eval_every']:,} steps accuracy is measured on the first "
        f"{cfg['eval_examples']:,} test images; the final accuracy on all of them.",
        "",
        "![Figure 2](figure2.png)",
        "",
        "## Claims",
        "",
        claims,
        "",
        "## Figure 3: steps to reach Inception's best accuracy",
        "",
        f"The target is Inception's best test accuracy during training, {target} (the lowest "
        "of its seeds' bests, so that every Inception seed reaches it). A speed-up 'at least' "
        "means Inception never reached the target in the steps run. Accuracies are "
        "mean ± std over seeds with the 95% t-interval (with fewer than 3 seeds, each seed's "
        "value instead); diverged seeds are left out. The "
        "paper's numbers are for ImageNet with a 13.6M-parameter network and are not "
        "directly comparable.",
        "",
        fig3,
        "",
    ]
    ref = nets.get("inception", {})
    if ref.get("steps_to_target") and all(
        x == ref["steps_completed"] for x in ref["steps_to_target"]
    ):
        lines += [
            "Inception reached its best only at its last step: it was still improving, so "
            "a longer run would raise the target and the step counts of every network.",
            "",
        ]
    e = summary.get("ensemble")
    if e:
        member_rows = [
            [m, f"{100 * (1 - a):.2f}%", f"{100 * (1 - b):.2f}%"]
            for m, a, b in zip(e["members"], e["member_top1"], e["member_top5"])
        ]
        member_rows.append(
            [
                "**ensemble (mean of probabilities)**",
                f"**{100 * (1 - e['ensemble_top1']):.2f}%**",
                f"**{100 * (1 - e['ensemble_top5']):.2f}%**",
            ]
        )
        lines += [
            "## Section 4.2.3: the ensemble",
            "",
            "Members: bn-x30's seeds and its variants (bn-x30-init: 1.5x larger initial "
            "convolution weights; bn-x30-dropout: 10% dropout), each at its last step, "
            "single-crop on all test images. The paper: top-5 error 4.9% for its ensemble of "
            "six vs 7.82% for a single network.",
            "",
            markdown_table(["member", "top-1 error", "top-5 error"], member_rows),
            "",
        ]
    lines += [
        "## Settings of each network (Sections 4.2.1 and 4.2.2)",
        "",
        f"Base learning rate {cfg['base_lr']:g}, L2 {cfg['weight_decay']:g}, exponential "
        f"decay to {cfg['decay']:g}x over the run for Inception (6x faster where stated). "
        "'shard' shuffling permutes only within 10 fixed shards each epoch; 'epoch' "
        "reshuffles everything.",
        "",
        settings,
        "",
        "## Environment",
        "",
        f"bnlab {env.get('bnlab')}, torch {env.get('torch')}, {env.get('platform')}, "
        f"{env.get('cpu_count')} CPU cores, CUDA: {env.get('cuda') or 'none'}; training "
        f"took {env.get('train_seconds_last_session', 'n/a')} s (last session).",
        "",
    ]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, figure2.png, report.md and report.html from the records.

    Raises:
        ReportError: the folder lacks config.json or metrics.jsonl, or the records
            are incomplete.
    """
    run_dir = Path(run_dir)
    config, env, records = read_run(run_dir, "inception")
    summary = summarize(records, config["config"])
    data = next((r["data"] for r in records if r.get("kind") == "settings" and "data" in r), None)
    summary["data"] = data or str(config["config"].get("data"))
    write_json(run_dir / "summary.json", summary)
    _figure(records, summary, run_dir / "figure2.png")
    write_documents(run_dir, _markdown(summary, config, env, summary["data"]), "bnlab: Section 4.2")
    return summary


# For `bnlab claims`: the figure that shows this run (each verdict names its claim).
FIGURE = "figure2.png"
