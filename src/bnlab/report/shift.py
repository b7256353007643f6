"""Report of ``bnlab reproduce shift``: internal covariate shift, measured.

Built from the run's records alone. Each probe value is averaged over the
probed layers (for gradient ICS, over the linear layers after the first: the
first layer has no earlier layer, so its ICS is 0 by definition), giving one
curve per seed; a seed's level is the mean of its curve over the evaluations
after step 0, and the tables give mean ± std over seeds.
"""

from __future__ import annotations

import math
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
    combine,
    difference_ci,
    diverged_copies,
    eval_curves,
    first_step_reaching,
    fmt_diverged,
    fmt_num,
    fmt_steps,
    judge,
    mean_std_ci,
    ratio_ci,
    run_context,
    speedup_estimate,
)

__all__ = ["FILES", "build_report", "summarize"]

FILES = ["summary.json", "shift.png", "report.md", "report.html"]
# Every arm the experiment may run, in the order the report shows them: the MNIST
# network's, then the Inception ones (``--networks``).
LABELS = {
    "none": "MNIST net without BN",
    "bn": "MNIST net with BN",
    "noisy-bn": "MNIST net, BN + noise (Santurkar)",
    "inception-none": "Inception without BN",
    "inception-bn": "Inception with BN",
}
COLORS = {
    "none": "#1f77b4",
    "bn": "#d62728",
    "noisy-bn": "#9467bd",
    "inception-none": "#17becf",
    "inception-bn": "#ff7f0e",
}


# The arms each network's verdicts compare (config.json's "networks" names the networks).
COMPARED = {"mlp": ("none", "bn", "noisy-bn"), "inception": ("inception-none", "inception-bn")}


def _arms(records: list[dict], config: dict) -> list[str]:
    """The recorded arms, in ``LABELS``' order.

    Raises:
        ReportError: an arm that the verdicts of one of the run's networks compare has
            no evaluation records.
    """
    arms = recorded_arms(records, LABELS)
    for network in config.get("networks", ["mlp"]):
        for arm in COMPARED.get(network, ()):
            if arm not in arms:
                raise ReportError(
                    f"no evaluation records for arm {arm!r}; the run is incomplete (resume it)"
                )
    return arms


THRESHOLD = 0.9
# measure -> (label, how it is read from one eval record: a value per copy)
MEASURES = {
    "w1": "per-step shift of nonlinearity inputs: Wasserstein-1",
    "kl": "per-step shift of nonlinearity inputs: Gaussian KL",
    "mean_drift": "per-step drift of nonlinearity-input means",
    "ics_cos": "gradient ICS: cos(G, G')",
    "ics_1mcos": "gradient ICS: 1 - cos(G, G')",
    "ics_rel": "gradient ICS: ‖G − G'‖ / ‖G‖",
    "beta": "effective beta-smoothness",
    "grad_pred": "gradient predictiveness max ‖g − g'‖",
}


def _layer_mean(per_layer: dict, key: str, skip_first: bool = False) -> list[float]:
    """Per copy, the mean over layers of ``per_layer[layer][key]`` (NaN-aware)."""
    names = list(per_layer)[1:] if skip_first and len(per_layer) > 1 else list(per_layer)
    values = np.array([[np.nan if v is None else v for v in per_layer[n][key]] for n in names])
    with np.errstate(all="ignore"):
        return list(np.nanmean(values, axis=0))


def _probe_curves(records: list[dict], arm: str) -> dict:
    evals = sorted(
        (r for r in records if r.get("kind") == "eval" and r.get("arm") == arm),
        key=lambda r: r["step"],
    )
    if not evals or "shift" not in evals[0]:
        raise ReportError(f"no probe records for arm {arm!r}; the run is incomplete (resume it)")
    out: dict = {"steps": np.array([r["step"] for r in evals])}
    rows: dict[str, list] = {m: [] for m in MEASURES if m != "ics_1mcos"}
    for r in evals:
        rows["w1"].append(_layer_mean(r["shift"], "wasserstein"))
        rows["kl"].append(_layer_mean(r["shift"], "kl"))
        rows["mean_drift"].append(_layer_mean(r["shift"], "mean_drift"))
        rows["ics_cos"].append(_layer_mean(r["ics"], "cos", skip_first=True))
        rel = {
            n: {
                "rel": [
                    None if (a is None or not b) else a / b for a, b in zip(v["l2"], v["grad_norm"])
                ]
            }
            for n, v in r["ics"].items()
        }
        rows["ics_rel"].append(_layer_mean(rel, "rel", skip_first=True))
        rows["beta"].append([np.nan if v is None else v for v in r["smoothness"]["beta"]])
        rows["grad_pred"].append([np.nan if v is None else v for v in r["smoothness"]["grad_pred"]])
    for m, v in rows.items():
        out[m] = np.array(v, dtype=float)  # (T, S)
    out["ics_1mcos"] = 1.0 - out["ics_cos"]
    return out


def _jacobian_summary(records: list[dict], arm: str) -> dict:
    """Per seed, over the evaluations after step 0 and every pair of probed points: the
    fraction of the layer Jacobians' singular values in [0.5, 2] and their median (in
    units of each point's std). Empty for an arm probed without Jacobians."""
    evals = [
        r for r in records if r.get("kind") == "eval" and r.get("arm") == arm and "jacobian" in r
    ]
    later = [r for r in evals if r["step"] > 0] or evals
    if not later:
        return {}
    out = {}
    for key, name, bounds in (
        ("frac_within", "jacobian_within", (0.0, 1.0)),
        ("q50", "jacobian_median", (0.0, math.inf)),
    ):
        rows = [[r["jacobian"][p][key] for p in r["jacobian"]] for r in later]  # (T, P, S)
        with np.errstate(all="ignore"):
            per_seed = np.nanmean(np.array(rows, dtype=float), axis=(0, 1))
        out[name] = mean_std_ci([float(v) for v in per_seed], bounds=bounds)
    return out


def summarize(records: list[dict], config: dict) -> dict:
    """Per arm: accuracy, steps to 90%, and each probe's level (mean over evaluations)."""
    out: dict = {"arms": {}, "lines": {}}
    for arm in _arms(records, config):
        try:
            acc = eval_curves(records, arm, ["test_acc"])
        except ValueError as e:
            raise ReportError(f"{e}; the run is incomplete (resume it)") from e
        probes = _probe_curves(records, arm)
        later = probes["steps"] > 0
        if not later.any():
            later = np.ones_like(later, dtype=bool)
        a = {
            "final_test_acc": mean_std_ci(list(acc["test_acc"][-1]), bounds=(0, 1)),
            "steps_to_90": first_step_reaching(
                acc["steps"], np.nan_to_num(acc["test_acc"]).T, THRESHOLD
            ),
            "diverged": fmt_diverged(diverged_copies(records, arm)),
        }
        with np.errstate(all="ignore"):
            for m in MEASURES:
                per_seed = np.nanmean(probes[m][later], axis=0)
                a[m] = mean_std_ci([float(v) for v in per_seed])
        a.update(_jacobian_summary(records, arm))
        out["arms"][arm] = a
        acc_d = a["final_test_acc"]
        out["lines"][arm] = (
            f"test {100 * acc_d['mean']:.2f}% ± {100 * acc_d['std']:.2f}, per-step shift (KL) "
            f"{a['kl']['mean']:.2e}, gradient ICS 1 - cos {1 - a['ics_cos']['mean']:.2e}, "
            f"beta {a['beta']['mean']:.3g}"
        )
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


def _figure(records: list[dict], config: dict, path: Path) -> None:
    panels = ["acc", "w1", "kl", "ics_1mcos", "ics_rel", "beta"]
    fig, axes = subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    arms = _arms(records, config)
    for arm in arms:
        acc = eval_curves(records, arm, ["test_acc"])
        probes = _probe_curves(records, arm)
        for ax, name in zip(axes.flat, panels):
            steps, values = (
                (acc["steps"], 100 * acc["test_acc"])
                if name == "acc"
                else (probes["steps"], probes[name])
            )
            if name not in ("acc", "ics_1mcos"):
                keep = steps > 0  # step 0's shift is that of the very first update
                steps, values = steps[keep], values[keep]
            with np.errstate(all="ignore"):
                mean = np.nanmean(values, axis=1)
                lo, hi = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
            ls = "--" if arm.startswith("inception") else "-"
            color = COLORS.get(arm)
            ax.plot(steps, mean, ls, color=color, label=LABELS.get(arm, arm))
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    titles = {"acc": "test accuracy (%)", **MEASURES}
    for ax, name in zip(axes.flat, panels):
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if name in ("w1", "kl", "ics_1mcos", "ics_rel", "beta"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        "Internal covariate shift, measured: "
        + (
            "MNIST network and small Inception (dashed)"
            if any(a.startswith("inception") for a in arms)
            else "MNIST network"
        )  # fmt: skip
        + f", {config['seeds']} seed(s) per arm "
        "(line: mean, band: min-max over seeds; probes at each evaluation)"
    )
    save_figure(fig, path)


def _fmt(d: dict) -> str:
    return fmt_num(d)


def _mean_steps(steps):
    return None if any(s is None for s in steps) else float(np.mean(steps))


def _less(none: dict, bn: dict, key: str, title: str, context: dict, **kw) -> Verdict:
    """BN lowers ``key``: the ratio without / with BN over seeds (paired: the arms share
    their seeds' initial weights and batches) excludes 1."""
    return judge(
        title,
        ratio_ci(none[key]["values"], bn[key]["values"]),
        context=context,
        null=1.0,
        unit="x",
        **kw,
    )


def _pair_rows(none: dict, bn: dict, where: str, inputs: str, context: dict) -> list[Verdict]:
    """The shift, gradient-ICS and smoothness verdicts comparing a network with and without
    BN; each measures how many times larger the quantity is without BN."""
    ics_title = f"BN reduces gradient-based ICS (Santurkar et al. found it does not){where}"
    return [
        _less(
            none,
            bn,
            "kl",
            f"BN reduces the distributional shift of nonlinearity inputs (Sections 1-2){where}",
            context,
            claim="ics",
            result=f"per-step shift of the {inputs}, Gaussian KL (scale-free): "
            f"{_fmt(bn['kl'])} with BN, {_fmt(none['kl'])} without (Wasserstein-1, in the "
            f"inputs' own units: {_fmt(bn['w1'])} with, {_fmt(none['w1'])} without); "
            "measured: KL without / with BN",
        ),
        combine(
            ics_title,
            [
                _less(none, bn, "ics_1mcos", "1 - cos(G, G') lower with BN", context),
                _less(none, bn, "ics_rel", "‖G − G'‖/‖G‖ lower with BN", context),
            ],
            result=f"1 - cos(G, G') {_fmt(bn['ics_1mcos'])} with BN, "
            f"{_fmt(none['ics_1mcos'])} without; ‖G − G'‖/‖G‖ {_fmt(bn['ics_rel'])} with, "
            f"{_fmt(none['ics_rel'])} without; measured: without / with BN",
        ),
        _less(
            none,
            bn,
            "beta",
            f"BN makes the loss landscape smoother (Santurkar et al.){where}",
            context,
            result=f"effective beta-smoothness {_fmt(bn['beta'])} with BN, {_fmt(none['beta'])} "
            f"without; gradient predictiveness {_fmt(bn['grad_pred'])} with, "
            f"{_fmt(none['grad_pred'])} without; measured: beta without / with BN",
        ),
    ]


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts, decided by ``stats.judge`` from the summary's numbers."""
    a = summary["arms"]
    context = run_context(config)
    rows = []
    if "bn" in a:
        none, bn, noisy = a["none"], a["bn"], a["noisy-bn"]
        steps_text = (
            f"steps to 90%: {fmt_steps(noisy['steps_to_90'])} with noise, "
            f"{fmt_steps(bn['steps_to_90'])} with BN, {fmt_steps(none['steps_to_90'])} without"
        )
        bn_slow = None
        if _mean_steps(bn["steps_to_90"]) is None:
            bn_slow = (
                f"BN itself did not reach 90% in every seed ({steps_text}), so there is no "
                "speed to keep; train longer (--steps, or --preset cpu)"
            )
        faster = speedup_estimate(none["steps_to_90"], noisy["steps_to_90"], config["steps"])
        parts = [
            judge(
                "the noise adds shift",
                ratio_ci(noisy["kl"]["values"], bn["kl"]["values"]),
                context=context,
                null=1.0,
                unit="x",
            ),
            judge(
                "BN with noise trains faster than no BN",
                faster,
                context=context,
                null=1.0,
                unit="x",
                precondition=bn_slow,
                missing="the speed-up has no value: BN with noise missed 90% in some seed, or "
                "the network without BN reached it in some seeds only; train longer (--steps)",
            ),
        ]
        rows += _pair_rows(none, bn, "", "sigmoid inputs", context)
        if "jacobian_within" in bn and "jacobian_within" in none:
            rows.append(
                judge(
                    "BN keeps the singular values of layer Jacobians close to 1 "
                    "(Section 3.3's conjecture)",
                    difference_ci(
                        bn["jacobian_within"]["values"],
                        none["jacobian_within"]["values"],
                        bounds=(-1, 1),
                    ),
                    context=context,
                    null=0.0,
                    claim="jacobian",
                    unit="difference",
                    result="share of the singular values in [0.5, 2] (Jacobians between "
                    "consecutive BN inputs, or sigmoid inputs without BN, in units of each "
                    f"point's std): {_fmt(bn['jacobian_within'])} with BN, "
                    f"{_fmt(none['jacobian_within'])} without; median singular value "
                    f"{_fmt(bn['jacobian_median'])} with, {_fmt(none['jacobian_median'])} "
                    "without; measured: the share with BN minus without",
                )
            )
        rows.insert(
            2,
            combine(
                "BN with noise added after it (more shift) still trains faster than no BN "
                "(Santurkar et al.)",
                parts,
                result=f"shift (KL) {_fmt(noisy['kl'])} with noise vs {_fmt(bn['kl'])} with "
                f"BN alone; {steps_text}",
            ),
        )
    if "inception-bn" in a:
        rows += _pair_rows(
            a["inception-none"], a["inception-bn"], ", Inception", "ReLU inputs", context
        )
    return rows


def _markdown(summary: dict, config: dict, env: dict) -> str:
    """report.md: the words are templates/shift.md.j2's."""
    return render_template(
        "shift.md.j2",
        summary=summary,
        config=config,
        env=env,
        labels={arm: LABELS.get(arm, arm) for arm in summary["arms"]},
        inception="inception" in config.get("networks", ["mlp"]),
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, shift.png, report.md and report.html from the records."""
    return report_from_records(
        run_dir,
        "shift",
        summarize,
        lambda r, s, c, p: _figure(r, c, p),
        _markdown,
        FILES[1],
        "bnlab: internal covariate shift",
    )


# For `bnlab claims`: the figure that shows this run (each verdict names its claim).
FIGURE = "shift.png"
