"""Report of ``bnlab reproduce batch-noise``: BN's batch-statistics noise against the shift
it removes.

Built from the run's records alone. Every probe value is per BN layer and per
seed (a mean over that seed's units). A seed's level of a measure is its mean
over the evaluations after step 0; a noise/shift ratio's level is its median
over those evaluations (the ratios span orders of magnitude over training).
Tables give mean ± std over seeds.

The shift over an evaluation interval is computed here from the population
statistics recorded at consecutive evaluations, with the formula of
``bnlab.experiments.batch_noise.stale_normalization_shift``:
(mu' - mu)^2 / (v + eps) + v' (1/sqrt(v + eps) - 1/sqrt(v' + eps))^2.
"""

from __future__ import annotations

import contextlib
import warnings
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
    diverged_copies,
    eval_curves,
    fmt_diverged,
    geometric_ci,
    judge,
    mean_std_ci,
    run_context,
)

__all__ = ["FILES", "build_report", "interval_shift", "summarize"]

FILES = ["summary.json", "batch_noise.png", "report.md", "report.html"]
# observed / predicted inside this band counts as following the sampling formulas
FORMULA_BAND = (0.8, 1.25)
LAYER_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
ARM_STYLES = ("-", "--", ":", "-.")
ARM_COLORS = ("#000000", "#ff7f0e", "#8c564b", "#17becf")  # apart from the layers'
MEASURES = (
    "ratio_mu",
    "ratio_var",
    "iid_ratio_mu",
    "iid_ratio_var",
    "rel_sd_mu",
    "pred_rel_sd_mu",
    "rel_sd_var",
    "pred_rel_sd_var",
    "kurtosis",
    "noise_own",
    "noise_total",
    "step_shift",
    "interval_shift",
)


def _arms(records: list[dict], config: dict) -> list[str]:
    """The recorded arms (one per mini-batch size m, ``bn-m60``), in the order of the
    config's ``batch_sizes``, any others after them.

    Raises:
        ReportError: a batch size of the config has no evaluation records.
    """
    order = [f"bn-m{m}" for m in config["batch_sizes"]]
    arms = recorded_arms(records, order)
    for arm in order:
        if arm not in arms:
            raise ReportError(
                f"no evaluation records for arm {arm!r}; the run is incomplete (resume it)"
            )
    return arms


def interval_shift(
    mean: np.ndarray, biased_var: np.ndarray, new_mean: np.ndarray, new_var: np.ndarray, eps: float
) -> np.ndarray:
    """Per unit, E[(x_hat_stale - x_hat_new)^2] for x with the new mean and variance,
    normalized with the old statistics and with its own (see the module docstring)."""
    inv_std, new_inv_std = 1 / np.sqrt(biased_var + eps), 1 / np.sqrt(new_var + eps)
    return (new_mean - mean) ** 2 * inv_std**2 + new_var * (inv_std - new_inv_std) ** 2


def _curves(records: list[dict], arm: str) -> dict:
    """``{"steps": (T,), "test_acc": (T, S), "layers": [...], measure: (L, T, S)}``."""
    try:
        acc = eval_curves(records, arm, ["test_acc"])
    except ValueError as e:
        raise ReportError(f"{e}; the run is incomplete (resume it)") from e
    evals = sorted(
        (r for r in records if r.get("kind") == "eval" and r.get("arm") == arm),
        key=lambda r: r["step"],
    )
    if any("noise" not in r for r in evals):
        raise ReportError(f"arm {arm!r} has evaluations without probe records; rerun it")
    layers = list(evals[0]["noise"])
    out: dict = {"steps": acc["steps"], "test_acc": acc["test_acc"], "layers": layers}
    for m in MEASURES:
        if m == "interval_shift":
            continue
        out[m] = np.array(
            [
                [[np.nan if v is None else v for v in r["noise"][n][m]] for r in evals]
                for n in layers
            ],
            dtype=float,
        )  # (L, T, S)
    shift = np.full_like(out["noise_own"], np.nan)
    for t in range(1, len(evals)):
        prev, cur = evals[t - 1], evals[t]
        for i, n in enumerate(layers):
            p, c = prev["population"][n], cur["population"][n]
            per_unit = interval_shift(
                np.array(p["mean"], dtype=float),
                np.array(p["biased_var"], dtype=float),
                np.array(c["mean"], dtype=float),
                np.array(c["biased_var"], dtype=float),
                float(cur["bn_eps"]),
            )  # (S, units)
            shift[i, t] = per_unit.mean(1)
    out["interval_shift"] = shift
    return out


def _later(steps: np.ndarray) -> np.ndarray:
    later = steps > 0
    return later if later.any() else np.ones_like(later, dtype=bool)


def summarize(records: list[dict], config: dict) -> dict:
    """Per arm and BN layer: each measure's level, and the noise/shift ratios."""
    out: dict = {"arms": {}, "lines": {}}
    for arm in _arms(records, config):
        c = _curves(records, arm)
        later = _later(c["steps"])
        layers = {}
        with _nan_quiet():
            for i in range(len(c["layers"])):
                d = {}
                for m in MEASURES:
                    d[m] = mean_std_ci([float(v) for v in np.nanmean(c[m][i][later], axis=0)])
                for key, shift in (("step", "step_shift"), ("interval", "interval_shift")):
                    ratio = c["noise_own"][i] / c[shift][i]  # (T, S)
                    d[f"noise_per_{key}_shift"] = mean_std_ci(
                        [float(v) for v in np.nanmedian(ratio[later], axis=0)]
                    )
                layers[f"BN {i + 1}"] = d
        with _nan_quiet():  # geometric mean over layers, mean over seeds: (T,)
            ratio = np.nanmean(
                np.exp(np.nanmean(np.log(c["noise_own"] / c["interval_shift"]), axis=0)), axis=1
            )
        below = [int(s) for s, r in zip(c["steps"], ratio) if np.isfinite(r) and r < 1]
        a = {
            "batch_size": int(arm.removeprefix("bn-m")),
            # the last evaluation whose interval shift exceeded the noise (None: none did)
            "interval_shift_exceeds_noise_until": max(below) if below else None,
            "layers": layers,
            "final_test_acc": mean_std_ci(list(c["test_acc"][-1]), bounds=(0, 1)),
            "diverged": fmt_diverged(diverged_copies(records, arm)),
            "steps_completed": int(c["steps"][-1]),
        }
        out["arms"][arm] = a
        acc = a["final_test_acc"]
        ls = list(layers.values())
        out["lines"][arm] = (
            f"test {100 * acc['mean']:.2f}%; Var(mu_B)/formula "
            + ", ".join(f"{d['ratio_mu']['mean']:.3g}" for d in ls)
            + "; Var(sigma2_B)/formula "
            + ", ".join(f"{d['ratio_var']['mean']:.3g}" for d in ls)
            + "; noise/shift per step "
            + ", ".join(f"{d['noise_per_step_shift']['mean']:.3g}" for d in ls)
            + f", per {config['eval_every']} steps "
            + ", ".join(f"{d['noise_per_interval_shift']['mean']:.3g}" for d in ls)
            + " (BN layers 1..L)"
        )
    out["verdicts"] = [v.to_dict() for v in _verdicts(out, config)]
    return out


@contextlib.contextmanager
def _nan_quiet():
    """NaN-aware statistics of an all-NaN slice (step 0 has no interval shift) are NaN,
    without numpy's warning."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _mean_over_seeds(values: np.ndarray) -> np.ndarray:
    with _nan_quiet():
        return np.nanmean(values, axis=-1)


def _figure(records: list[dict], config: dict, path: Path) -> None:
    fig, axes = subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    (ax_mu, ax_var, ax_noise), (ax_step, ax_int, ax_ratio) = axes
    layer_handles: dict[str, object] = {}
    arms = _arms(records, config)
    for j, arm in enumerate(arms):
        c = _curves(records, arm)
        steps, m = c["steps"], int(arm.removeprefix("bn-m"))
        style = ARM_STYLES[j % len(ARM_STYLES)]
        color = ARM_COLORS[j % len(ARM_COLORS)]
        for i, _ in enumerate(c["layers"]):
            lc = LAYER_COLORS[i % len(LAYER_COLORS)]
            for ax, key in ((ax_mu, "ratio_mu"), (ax_var, "ratio_var"), (ax_noise, "noise_own")):
                (h,) = ax.plot(steps, _mean_over_seeds(c[key][i]), style, color=lc)
                layer_handles.setdefault(f"BN {i + 1}", h)
        with _nan_quiet():
            noise = np.nanmean(c["noise_own"], axis=0)  # mean over layers: (T, S)
            step_shift = np.nanmean(c["step_shift"], axis=0)
            int_shift = np.nanmean(c["interval_shift"], axis=0)
            r_step = np.exp(np.nanmean(np.log(c["noise_own"] / c["step_shift"]), axis=0))
            r_int = np.exp(np.nanmean(np.log(c["noise_own"] / c["interval_shift"]), axis=0))
        later = steps > 0
        for ax, shift, ratio, ls in (
            (ax_step, step_shift, r_step, "--"),
            (ax_int, int_shift, r_int, ":"),
        ):
            ax.plot(steps, _mean_over_seeds(noise), "-", color=color, label=f"noise, m={m}")
            ax.plot(
                steps[later], _mean_over_seeds(shift)[later], ls, color=color, label=f"shift, m={m}"
            )
            ax_ratio.plot(
                steps[later],
                _mean_over_seeds(ratio)[later],
                ls,
                color=color,
                label=f"m={m}, " + ("per step" if ls == "--" else f"per {config['eval_every']}"),
            )
    for ax in (ax_mu, ax_var):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhspan(*FORMULA_BAND, color="gray", alpha=0.1, lw=0)
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_mu.set_title("Var(mu_B): observed / formula sigma²/m")
    ax_var.set_title("Var(sigma2_B): observed / formula ≈ (mu_4 − sigma⁴)/m")
    ax_noise.set_title("noise BN injects: E(x̂_batch − x̂_pop)²")
    ax_step.set_title(
        "noise vs shift removed per training step\n(E(x̂ stale − x̂ new)², mean over layers)"
    )
    ax_int.set_title(f"noise vs shift removed per {config['eval_every']} steps (mean over layers)")
    ax_ratio.set_title("noise / shift removed (geometric mean over layers)")
    for ax in axes.flat:
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    arm_handles = [
        ax_mu.plot([], [], ARM_STYLES[j % len(ARM_STYLES)], color="black", label=f"m={m}")[0]
        for j, m in enumerate(int(arm.removeprefix("bn-m")) for arm in arms)
    ]
    ax_mu.legend(
        list(layer_handles.values()) + arm_handles,
        list(layer_handles) + [h.get_label() for h in arm_handles],
        fontsize=8,
        ncol=2,
    )
    for ax in (ax_step, ax_int, ax_ratio):
        ax.legend(fontsize=8)
    fig.suptitle(
        f"BN's batch-statistics noise: MNIST network with BN, {config['seeds']} seed(s), "
        f"{config['draws']} mini-batches per probe (lines: mean over seeds; gray band: "
        f"{FORMULA_BAND[0]}-{FORMULA_BAND[1]} x the formula)"
    )
    save_figure(fig, path)


def _by_layer(summary: dict, key: str) -> str:
    parts = []
    for a in summary["arms"].values():
        values = ", ".join(f"{d[key]['mean']:.3g}" for d in a["layers"].values())
        parts.append(f"m={a['batch_size']}: {values}")
    return "; ".join(parts)


def _verdicts(summary: dict, config: dict) -> list[Verdict]:
    """The report's verdicts (a question the paper leaves open, beyond its own claims),
    decided by ``stats.judge`` per arm and BN layer on the seeds' levels (geometric
    intervals: the ratios span orders of magnitude) and combined: every layer must hold."""
    lo, hi = FORMULA_BAND
    arms = list(summary["arms"].values())
    steps = max((a["steps_completed"] for a in arms), default=None)
    context = run_context(config, steps=steps)
    ratios = [
        (a["batch_size"], name, key, d[key]["mean"])
        for a in arms
        for name, d in a["layers"].items()
        for key in ("ratio_mu", "ratio_var")
    ]
    off = [(m, n, k, r) for m, n, k, r in ratios if not lo <= r <= hi]
    first_ok = all(lo <= r <= hi for m, n, k, r in ratios if n == "BN 1")
    why = ""
    if off and first_ok:
        why = (
            " The first BN layer, whose batch holds independent rows (the formulas' premise), "
            "follows them; deeper layers do not: the BN before them sets each batch's mean and "
            "variance, so their inputs within a batch are not independent draws (the same rows "
            "with population statistics upstream give Var(mu_B)/formula "
            + _by_layer(summary, "iid_ratio_mu")
            + ")."
        )
    formula_text = (
        f"observed / predicted, mean over evaluations and seeds (BN layers 1..L); Var(mu_B): "
        f"{_by_layer(summary, 'ratio_mu')}; Var(sigma2_B): {_by_layer(summary, 'ratio_var')}. "
        f"Agreement means within {lo}-{hi} x everywhere." + why
    )
    parts = [
        judge(
            f"m={a['batch_size']}, {name}, {key}",
            geometric_ci(d[key]["values"]),
            context=context,
            null=1.0,
            band=FORMULA_BAND,
            unit="x",
        )
        for a in arms
        for name, d in a["layers"].items()
        for key in ("ratio_mu", "ratio_var")
    ]
    rows = [
        combine(
            "The batch statistics' noise follows the sampling formulas: Var(mu_B) = sigma²/m, "
            "Var(sigma2_B) ≈ (mu_4 − sigma⁴)/m",
            parts,
            result=formula_text,
        )
    ]
    for key, what in (
        ("step", "per training step"),
        ("interval", f"over one evaluation interval ({config['eval_every']:,} steps)"),
    ):
        text = (
            f"noise / removed shift (median over evaluations, mean over seeds; BN layers 1..L): "
            f"{_by_layer(summary, f'noise_per_{key}_shift')}; small means below 1 in every layer"
        )
        if key == "interval":
            until = [
                f"m={a['batch_size']}: "
                + (
                    f"step {a['interval_shift_exceeds_noise_until']:,}"
                    if a["interval_shift_exceeds_noise_until"] is not None
                    else "none"
                )
                for a in arms
            ]
            text += (
                "; the shift exceeded the noise (geometric mean over layers, mean over seeds) "
                f"last at the evaluation of (out of {config['steps']:,} steps) " + ", ".join(until)
            )
        parts = [
            judge(
                f"m={a['batch_size']}, {name}",
                geometric_ci(d[f"noise_per_{key}_shift"]["values"]),
                context=context,
                null=1.0,
                higher_is_better=False,
                unit="x",
                missing="no finite ratio (no shift measured); train longer (--steps)",
            )
            for a in arms
            for name, d in a["layers"].items()
        ]
        rows.append(
            combine(
                f"The noise BN adds is small compared with the shift it removes, {what}",
                parts,
                result=text,
            )
        )
    return rows


def _markdown(summary: dict, config: dict, env: dict) -> str:
    """report.md: the words are templates/batch_noise.md.j2's."""
    return render_template(
        "batch_noise.md.j2",
        summary=summary,
        config=config,
        env=env,
    )


def build_report(run_dir: str | Path) -> dict:
    """(Re)build summary.json, batch_noise.png, report.md and report.html from the records."""
    return report_from_records(
        run_dir,
        "batch_noise",
        summarize,
        lambda r, s, c, p: _figure(r, c, p),
        _markdown,
        FILES[1],
        "bnlab: batch-statistics noise",
    )


# For `bnlab claims`: the figure of this run's verdicts (a question the paper leaves open,
# beyond its own claims: they go to the further table).
FIGURE = "batch_noise.png"
