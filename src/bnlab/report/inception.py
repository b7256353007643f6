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
    render_template,
    save_figure,
    subplots,
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
# The same steps in millions, for the figure (bn-x5-sigmoid never reaches 72.2%).
PAPER_STEPS_M = {"inception": 31.0, "bn-baseline": 13.3, "bn-x5": 2.1, "bn-x30": 2.7}
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
    "bn-x5-shard": "#e377c2",  # its own colour: matplotlib's next one is bn-baseline's blue
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
    if ref is not None and ref_ok:
        out["plateau"] = plateau(ref["steps"], ref["acc"][:, ref_ok])
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


# Inception has plateaued when its best test accuracy in the last quarter of the run is
# within this of its best in the first three quarters, in every seed.
PLATEAU_TOLERANCE = 0.005


def plateau(steps, acc) -> dict:
    """Whether the reference's accuracy stopped rising: per seed, the best test accuracy
    in the last quarter of the steps run minus the best before it.

    Section 4.2's speed-ups are against Inception's *maximum* accuracy; a baseline
    still rising when the run ends makes them measure the step budget as much as BN.

    Args:
        steps: ``(T,)`` evaluated steps; acc: ``(T, S)`` test accuracy per seed.

    Returns:
        ``{"plateaued": bool, "rise": [per seed], "tolerance": PLATEAU_TOLERANCE,
        "after_step": the first step of the last quarter}``.
    """
    steps = np.asarray(steps)
    acc = np.asarray(acc, dtype=float)
    cut = 0.75 * steps[-1]
    late, early = steps > cut, steps <= cut
    if not late.any() or not early.any():
        return {"plateaued": False, "rise": None, "tolerance": PLATEAU_TOLERANCE,
                "after_step": int(cut)}  # fmt: skip
    with np.errstate(all="ignore"):
        rise = np.nanmax(acc[late], axis=0) - np.nanmax(acc[early], axis=0)
    return {
        "plateaued": bool(np.all(rise < PLATEAU_TOLERANCE)),
        "rise": [float(r) for r in rise],
        "tolerance": PLATEAU_TOLERANCE,
        "after_step": int(cut),
    }


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


def _train_longer(config: dict) -> str:
    """What to run when Inception had not plateaued (said by a verdict and the report)."""
    if config.get("preset") == "long":
        return "train Inception longer (more --steps)"
    return (
        "run --preset long (3.2x the cpu preset's steps) or train Inception longer (more --steps)"
    )


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
        plateau_info = summary.get("plateau") or {}
        if at_chance is None and plateau_info and not plateau_info["plateaued"]:
            rise = ", ".join(f"{100 * r:+.1f} pp" for r in plateau_info["rise"] or [])
            at_chance = (
                f"Inception had not plateaued: its best accuracy still rose in the last "
                f"quarter of the run ({rise} per seed, after step "
                f"{plateau_info['after_step']:,}), so its best is not its maximum and the "
                f"speed-up measures the step budget as much as BN; {_train_longer(config)}"
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
                "Inception reached it in some seeds only; train longer (--steps, or --bn-steps "
                "where the BN networks stopped early)",
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
    if "bn-x5" in nets and "bn-x5-shard" in nets:
        a, b = _best_values(nets["bn-x5"]), _best_values(nets["bn-x5-shard"])
        out.append(
            judge(
                "Shuffling training examples more thoroughly adds about 1% accuracy "
                "(Section 4.2.1)",
                difference_ci(a, b, bounds=(-1, 1)) if a and b else None,
                claim="shuffle",
                claimed=0.01,
                context=_context(summary, config, "bn-x5"),
                null=0.0,
                unit="difference",
                missing="every seed of bn-x5 or bn-x5-shard diverged",
                result=f"best test accuracy with a full reshuffle every epoch (bn-x5) "
                f"{nets['bn-x5']['best_text']}, with within-shard shuffling only "
                f"(bn-x5-shard) {nets['bn-x5-shard']['best_text']} (measured: bn-x5 minus "
                "bn-x5-shard)",
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


def _paper_marks(summary: dict) -> dict[str, float]:
    """Network -> the step at which it would reach Inception's best if it kept the paper's
    ratio to Inception (Figure 3: steps to 72.2%, each over Inception's 31.0M), scaled to
    the steps our Inception took; empty when Inception did not reach its target in every
    seed. The paper's accuracies are ImageNet's and are not drawn."""
    ref = summary["networks"].get(REFERENCE)
    reached = ref.get("steps_to_target") if ref else None
    if not reached or any(x is None for x in reached):
        return {}
    ours = float(np.mean(reached))
    return {
        name: ours * PAPER_STEPS_M[name] / PAPER_STEPS_M[REFERENCE]
        for name in summary["networks"]
        if name in PAPER_STEPS_M and name != REFERENCE
    }


def _figure(records: list[dict], summary: dict, path: Path) -> None:
    """Figure 2: (a) test accuracy, mean over seeds with the seeds' min-max band, the
    target (Inception's best) and, on it, where the paper's step ratios put each BN
    network; (b) training loss. One legend, below both panels."""
    fig, (ax, bx) = subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    for name, s in summary["networks"].items():
        c = _curves(records, name)
        color = COLORS.get(name)
        m = np.nanmean(c["acc"], axis=1)
        label = f"{name} (n={s['seeds']})" + (" - diverged" if s["diverged"] else "")
        ax.plot(c["steps"], m, color=color, label=label)
        if c["acc"].shape[1] > 1:
            lo, hi = np.nanmin(c["acc"], axis=1), np.nanmax(c["acc"], axis=1)
            ax.fill_between(c["steps"], lo, hi, color=color, alpha=0.15, lw=0)
        bx.plot(c["steps"], c["loss"], color=color)
    target = summary["target_acc"]
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=1, label="target: Inception's best")
        marks = _paper_marks(summary)
        for name, step in marks.items():
            ax.plot(step, target, "v", color=COLORS.get(name), mec="k", ms=9, zorder=5)
        if marks:  # one legend entry for the markers, each in its network's colour
            ax.plot(
                [],
                [],
                "v",
                color="white",
                mec="k",
                ms=9,
                label="paper (Figure 3): each BN network's steps to the target,\n"
                "our Inception's x the paper's ratio (13.3M, 2.1M, 2.7M : 31.0M)",
            )
    ax.set(xlabel="training step", ylabel="test accuracy (top-1)", title="(a) Test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    bx.set(
        xlabel="training step",
        ylabel="training loss since the last evaluation (mean of seeds)",
        title="(b) Training loss",
    )
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "Figure 2 reproduction: small Inception with and without BN "
        "(line: mean over seeds; band: min-max)",
        fontsize=11,
    )
    save_figure(fig, path)


def _markdown(summary: dict, config: dict, env: dict, data: str) -> str:
    """report.md: the words are templates/inception.md.j2's."""
    ref = summary["networks"].get(REFERENCE, {})
    reached = ref.get("steps_to_target")
    return render_template(
        "inception.md.j2",
        summary=summary,
        config=config["config"],
        env=env,
        data=data,
        target=_target_text(summary),
        paper=PAPER_FIGURE3,
        speedup=_speedup_text,
        train_longer=_train_longer(config["config"]),
        still_improving=bool(reached) and all(x == ref["steps_completed"] for x in reached),
    )


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
