"""Statistics every experiment's report shares: pure functions on lists and arrays.

Nothing here knows an experiment: seeds are the samples, curves are
``steps`` with one value per seed at each. An *estimate* is a plain dict,
``{"mean", "n", "ci95": [lo, hi] or None, "values", ...}`` (``mean_std_ci``,
``ratio_ci``, ``geometric_ci``, ``proportion_ci``, ``speedup_estimate``), and a
claim's verdict is a ``Verdict``, decided by ``judge`` (one rule for every report)
and written to summary.json as a dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "MIN_SEEDS",
    "STATUSES",
    "Verdict",
    "combine",
    "difference_ci",
    "diverged_copies",
    "eval_curves",
    "first_step_reaching",
    "fmt_diverged",
    "fmt_estimate",
    "fmt_num",
    "fmt_pct",
    "fmt_pp",
    "fmt_steps",
    "geometric_ci",
    "is_smoke",
    "judge",
    "mean_std_ci",
    "proportion_ci",
    "ratio_ci",
    "run_context",
    "speedup",
    "speedup_estimate",
]

# Two-sided 95% Student-t critical values t(0.975, df) for df = 1..30.
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
_Z95 = 1.96

# Fewer samples than this give no interval worth the name (t(0.975, 1) = 12.7): the
# reports show the seeds' values instead, and a verdict on them is "inconclusive".
MIN_SEEDS = 3

# A verdict's status, from the strongest support of the paper to none.
STATUSES = ("agrees", "smaller than claimed", "does not agree", "inconclusive", "not measurable")
# When several parts must all hold (``combine``), the first of these that a part has wins.
_PRECEDENCE = ("does not agree", "not measurable", "inconclusive", "smaller than claimed", "agrees")

SMOKE_PRESET = "quick"

# unit -> (display scale, suffix, format spec, signed, the quantity's range)
_UNITS = {
    "fraction": (100.0, "%", ".2f", False, (0.0, 1.0)),
    "difference": (100.0, " pp", ".2f", True, (-1.0, 1.0)),
    "x": (1.0, "x", ".3g", False, (0.0, math.inf)),
    "steps": (1.0, "", ",.0f", False, (0.0, math.inf)),
    "": (1.0, "", ".3g", False, (-math.inf, math.inf)),
}


def _number(x: float, unit: str, sign: bool | None = None) -> str:
    """``x`` in ``unit``'s scale and format, without the suffix; ``sign``: a leading +
    (default: the unit's). A negative value that rounds to zero prints as zero."""
    scale, _, spec, signed, _ = _UNITS[unit]
    fmt = f"{'+' if (signed if sign is None else sign) else ''}{spec}"
    text = f"{scale * x:{fmt}}"
    return f"{0.0:{fmt}}" if text[0] == "-" and float(text.replace(",", "")) == 0 else text


def _t95(n: int) -> float:
    """t(0.975, n - 1); beyond 30 degrees of freedom the normal 1.96."""
    return _T95[n - 2] if 2 <= n <= 31 else _Z95


def _clip(ci: list[float], bounds: tuple[float, float] | None) -> tuple[list[float], bool]:
    if bounds is None:
        return ci, False
    lo, hi = max(ci[0], bounds[0]), min(ci[1], bounds[1])
    return [lo, hi], (lo, hi) != (ci[0], ci[1])


def mean_std_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict:
    """Mean, sample std, n and the 95% Student-t interval of the mean.

    ``ci95 = mean ± t(0.975, n - 1) * std / sqrt(n)`` with the sample
    (``ddof=1``) std. Beyond 30 degrees of freedom the normal 1.96 stands in
    for t, which makes the interval up to 4% too narrow at df = 31. The t-interval
    knows no range: ``bounds`` (an accuracy's ``(0, 1)``) clips it there, and
    ``"clipped": True`` says it was. With fewer than ``MIN_SEEDS`` values the
    interval is computed but neither shown (``fmt_estimate``) nor judged (``judge``).

    Args:
        values: one number per seed; NaN propagates into mean, std and ci95.
        bounds: the quantity's range, or None.

    Returns:
        ``{"mean", "std", "n", "ci95": [lo, hi], "values", "clipped"}``, all plain
        floats; with one value ``std`` is 0.0 and ``ci95`` is None.

    Raises:
        ValueError: ``values`` is empty.

    Example:
        >>> mean_std_ci([1.0, 2.0, 3.0])["ci95"]  # 2 ± 4.303 / sqrt(3)
        [-0.484..., 4.484...]
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        raise ValueError("mean_std_ci needs at least one value")
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    mean = float(v.mean())
    ci, clipped = None, False
    if n > 1:
        half = _t95(n) * std / math.sqrt(n)
        ci, clipped = _clip([mean - half, mean + half], bounds)
        ci = [float(x) for x in ci]
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "ci95": ci,
        "values": [float(x) for x in v],
        "clipped": clipped,
    }


def difference_ci(
    a: Sequence[float], b: Sequence[float], bounds: tuple[float, float] | None = None
) -> dict:
    """``mean(a) - mean(b)`` with its 95% interval.

    Paired (``a[k] - b[k]``, ``mean_std_ci`` of the differences) when ``a`` and ``b``
    have as many values, seed ``k`` with seed ``k``; otherwise Welch's interval with
    the Welch-Satterthwaite degrees of freedom (rounded down). ``bounds``: the
    difference's range (``(-1, 1)`` for accuracies).

    Raises:
        ValueError: ``a`` or ``b`` is empty.
    """
    if len(a) == 0 or len(b) == 0:
        raise ValueError("difference_ci needs values on both sides")
    if len(a) == len(b):
        return mean_std_ci([x - y for x, y in zip(a, b)], bounds)
    sa, sb = mean_std_ci(a), mean_std_ci(b)
    diff = sa["mean"] - sb["mean"]
    n = min(sa["n"], sb["n"])
    out = {"mean": diff, "std": None, "n": n, "ci95": None, "values": None, "clipped": False}
    if n > 1:
        va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
        se = math.sqrt(va + vb)
        den = va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1)
        df = int((va + vb) ** 2 / den) if den > 0 else n - 1
        half = _t95(max(df, 1) + 1) * se
        out["ci95"], out["clipped"] = _clip([diff - half, diff + half], bounds)
    return out


def geometric_ci(values: Sequence[float]) -> dict | None:
    """The geometric mean of positive values and its 95% t-interval on the log scale.

    For ratios that span orders of magnitude: the interval stays positive.

    Returns:
        An estimate (``"mean"`` the geometric mean, ``"std"`` None), or None when a
        value is not positive and finite.
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        return None
    logs = mean_std_ci(np.log(v))
    ci = None if logs["ci95"] is None else [math.exp(x) for x in logs["ci95"]]
    return {
        "mean": math.exp(logs["mean"]),
        "std": None,
        "n": len(v),
        "ci95": ci,
        "values": [float(x) for x in v],
        "method": "geometric",
    }


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float]) -> dict | None:
    """``mean(numerators) / mean(denominators)`` with a 95% interval that stays positive.

    The interval is the delta method on the log scale:
    ``Var(log R) ≈ Var(a)/(n a̅²) + Var(b)/(n b̅²) - 2 Cov(a, b)/(n a̅ b̅)``, the
    covariance term only when the two are paired (as many numerators as
    denominators, seed ``k`` with seed ``k``), with ``t(0.975, n - 1)``.

    Returns:
        An estimate with ``"values"`` the per-seed ratios (paired) or None, or None
        when a mean is not positive (no ratio to take).
    """
    a, b = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(a) == 0 or len(b) == 0 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    ma, mb = float(a.mean()), float(b.mean())
    if ma <= 0 or mb <= 0:
        return None
    ratio = ma / mb
    paired = len(a) == len(b)
    n = min(len(a), len(b))
    ci = None
    if n > 1:
        var = a.var(ddof=1) / (len(a) * ma**2) + b.var(ddof=1) / (len(b) * mb**2)
        if paired:
            var -= 2 * np.cov(a, b, ddof=1)[0, 1] / (n * ma * mb)
        half = _t95(n) * math.sqrt(max(float(var), 0.0))
        ci = [ratio * math.exp(-half), ratio * math.exp(half)]
    values = [float(x / y) if y > 0 else None for x, y in zip(a, b)] if paired else None
    return {"mean": ratio, "std": None, "n": n, "ci95": ci, "values": values, "method": "ratio"}


def proportion_ci(hits: int, n: int) -> dict | None:
    """A proportion ``hits / n`` with its 95% Wilson score interval (inside [0, 1], and
    meaningful at any n: 1 of 1 gives 0.21-1)."""
    if n <= 0:
        return None
    p, z2 = hits / n, _Z95**2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {
        "mean": p,
        "std": None,
        "n": n,
        "ci95": [max(0.0, center - half), min(1.0, center + half)],
        "values": None,
        "method": "wilson",
        "hits": hits,
    }


def _has_interval(d: dict) -> bool:
    """An interval to show and judge: a t-type one needs ``MIN_SEEDS`` samples; Wilson's,
    or one a verdict already kept (``"kept"``), holds at any n."""
    if not d.get("ci95"):
        return False
    return d.get("method") == "wilson" or bool(d.get("kept")) or d["n"] >= MIN_SEEDS


def fmt_estimate(d: dict | None, unit: str = "") -> str:
    """An estimate as text, by the one rule of every report.

    ``n >= MIN_SEEDS``: the value, ``± std`` where there is one, and the 95% interval,
    never outside the quantity's range (clipped there, and said so); fewer: the seeds'
    values instead of an interval. ``unit``: ``"fraction"`` (as %), ``"difference"``
    (of fractions, as signed percentage points), ``"x"`` (a ratio), ``"steps"`` or
    ``""`` (a plain number).

    Examples: ``97.98% ± 0.15 (95% CI 97.61–98.35, n=3)``, ``97.10%, 97.50% (n=2)``,
    ``at least 2.9x (95% lower bound 2.1, n=3)``, ``None`` or ``{}``: ``n/a``.
    """
    if not d or d.get("mean") is None:
        return "n/a"
    _, suffix, _, signed, (rlo, rhi) = _UNITS[unit]

    def num(x: float | None, sign: bool = signed) -> str:
        if x is None or not math.isfinite(x):
            return "n/a"
        return _number(x, unit, sign)

    n = d.get("n", 1)
    head = f"{num(d['mean'])}{suffix}"
    if d.get("lower_bound"):
        head = f"at least {head}"
    if d.get("method") == "wilson":
        ci = d["ci95"]
        return (
            f"{d['hits']} of {n} ({num(d['mean'])}{suffix}, 95% CI "
            f"{num(ci[0])}–{num(ci[1])}{suffix})"
        )
    if not _has_interval(d):
        values = d.get("values")
        if values and n > 1 and all(v is not None for v in values):
            return ", ".join(f"{num(v)}{suffix}" for v in values) + f" (n={n})"
        return f"{head} (n={n})"
    if d.get("std") is not None:
        head += f" ± {num(d['std'], sign=False)}"
    lo, hi = d["ci95"]
    if lo is not None and lo < rlo or hi is not None and hi > rhi:  # a summary of old
        lo, hi = max(lo, rlo), min(hi, rhi) if hi is not None else None
        clipped = True
    else:
        clipped = bool(d.get("clipped"))
    sep = " to " if signed else "–"  # "-7.48 to -2.52", not "-7.48–-2.52"
    note = f", clipped to the range {num(rlo)}{sep}{num(rhi)}{suffix}" if clipped else ""
    if hi is None:
        return f"{head} (95% lower bound {num(lo)}{suffix}{note}, n={n})"
    return f"{head} (95% CI {num(lo)}{sep}{num(hi)}{suffix}{note}, n={n})"


def fmt_pct(d: dict | None) -> str:
    """An estimate of fractions (accuracies) as percentages, by ``fmt_estimate``'s rule:
    ``97.98% ± 0.15 (95% CI 97.61–98.35, n=3)``; ``97.10%, 97.50% (n=2)``; ``n/a``."""
    return fmt_estimate(d, "fraction")


def fmt_pp(d: dict | None) -> str:
    """An estimate of differences of fractions as signed percentage points."""
    return fmt_estimate(d, "difference")


def fmt_num(d: dict | None) -> str:
    """An estimate of a plain number (3 significant digits)."""
    return fmt_estimate(d, "")


def eval_curves(records: Sequence[dict], arm: str, fields: Sequence[str]) -> dict:
    """An arm's evaluation records as arrays, in step order.

    Returns:
        ``{"steps": (T,), field: (T, S) or (T,) for each of fields}``: one row per
        evaluated step, one column per seed; null (a diverged network's non-finite
        value) reads as NaN.

    Raises:
        ValueError: ``arm`` has no evaluation records.
    """
    evals = sorted(
        (r for r in records if r.get("kind") == "eval" and r.get("arm") == arm),
        key=lambda r: r["step"],
    )
    if not evals:
        raise ValueError(f"no evaluation records for arm {arm!r}")
    out = {"steps": np.array([r["step"] for r in evals])}
    for f in fields:
        out[f] = np.array([r[f] for r in evals], dtype=float)  # None -> nan
    return out


def fmt_steps(steps: Sequence[int | None]) -> str:
    """Per-seed steps as text, None as ``never``: ``1,500, never``."""
    return ", ".join("never" if x is None else f"{x:,}" for x in steps)


def first_step_reaching(
    steps: Sequence[int], values_per_seed: Sequence[Sequence[float]], threshold: float
) -> list[int | None]:
    """Per seed, the first evaluated step whose value is >= ``threshold``.

    Args:
        steps: the evaluated steps, ascending.
        values_per_seed: seed ``s``'s value at ``steps[t]`` is ``values_per_seed[s][t]``.
            NaN never reaches the threshold.
        threshold: the value to reach.

    Returns:
        One entry per seed: the step, or None where that seed never reaches it.

    Shape:
        steps: ``(T,)``; values_per_seed: ``(S, T)``; result: ``S`` entries.

    Raises:
        ValueError: a seed's values do not line up with ``steps``.
    """
    steps = np.asarray(steps)
    if len(values_per_seed) == 0:
        return []
    v = np.asarray(values_per_seed, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(steps):
        raise ValueError(
            f"values_per_seed must be (seeds, {len(steps)}) to match steps, got {v.shape}"
        )
    out: list[int | None] = []
    for curve in v:
        hit = np.flatnonzero(curve >= threshold)
        out.append(int(steps[hit[0]]) if len(hit) else None)
    return out


def speedup(
    reference_steps: Sequence[int | None],
    other_steps: Sequence[int | None],
    reference_completed: int,
) -> dict | None:
    """How many times fewer steps ``other`` needs than ``reference`` to reach a target.

    Args:
        reference_steps: per seed, the step the reference reached the target
            (``first_step_reaching``), None where it never did.
        other_steps: the same for the compared run.
        reference_completed: the steps the reference ran.

    Returns:
        ``{"exact": mean(reference_steps) / mean(other_steps)}`` when every seed
        of both reached the target; ``{"at_least": reference_completed /
        mean(other_steps)}`` when no reference seed reached it but every other
        seed did (the reference would need more steps than it ran, so the ratio
        is only bounded from below); None otherwise (not measurable), including
        no seeds and a mean of 0 steps for ``other``.
    """
    if not reference_steps or not other_steps or any(x is None for x in other_steps):
        return None
    other = np.mean(other_steps)
    if other == 0:
        return None
    if all(x is not None for x in reference_steps):
        return {"exact": float(np.mean(reference_steps) / other)}
    if all(x is None for x in reference_steps):
        return {"at_least": float(reference_completed / other)}
    return None


def speedup_estimate(
    reference_steps: Sequence[int | None],
    other_steps: Sequence[int | None],
    reference_completed: int,
) -> dict | None:
    """``speedup`` as an estimate with its 95% interval, for ``judge``.

    An exact speed-up is ``ratio_ci(reference_steps, other_steps)``. A lower bound
    (no reference seed reached the target) has ``"lower_bound": True`` and the
    interval ``[reference_completed / upper 95% limit of mean(other_steps), None]``.
    None where ``speedup`` is None.
    """
    found = speedup(reference_steps, other_steps, reference_completed)
    if found is None:
        return None
    if "exact" in found:
        return ratio_ci(reference_steps, other_steps)
    other = mean_std_ci(other_steps)
    hi = other["ci95"][1] if other["ci95"] else None
    return {
        "mean": found["at_least"],
        "std": None,
        "n": other["n"],
        "ci95": [reference_completed / hi, None] if hi and hi > 0 else None,
        "values": [reference_completed / x if x else None for x in other_steps],
        "method": "ratio",
        "lower_bound": True,
    }


def diverged_copies(records: Sequence[dict], arm: str) -> dict[int, int]:
    """Copy (seed index) -> first bad step of ``arm``, from the loop's ``diverged`` records."""
    out: dict[int, int] = {}
    for r in records:
        if r.get("kind") == "diverged" and r.get("arm") == arm:
            out.update(zip(r["copies"], r["first_bad_step"]))
    return dict(sorted(out.items()))


def fmt_diverged(copies: dict[int, int]) -> str:
    """``seed 1 at step 1,200, seed 2 at step 900`` (empty string: none diverged)."""
    return ", ".join(f"seed {k} at step {v:,}" for k, v in copies.items())


# ---------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """One claim's verdict, as summary.json holds it (``to_dict``/``from_dict``).

    Attributes:
        claim: the claim id of ``bnlab.report.claims.CLAIMS``; None for measurements
            beyond the paper's claims.
        title: the claim as the report words it.
        status: one of ``STATUSES``.
        measured: the effect measured (in ``unit``), None if not measurable.
        interval: its 95% interval ``[lo, hi]`` (``hi`` None: a lower bound), None
            where there is none (fewer than ``MIN_SEEDS`` samples).
        claimed: the paper's value of the effect; None for a claim of direction only.
        null: the value of no effect (0 for a difference, 1 for a ratio).
        unit: ``"fraction"``, ``"difference"``, ``"x"``, ``"steps"`` or ``""``.
        n: the samples behind ``interval``; ``samples`` says what they are.
        values: the samples' values (shown instead of an interval when n < 3).
        seeds: the run's seeds per arm; steps: its training steps; preset: its
            preset (``"quick"``, ``"cpu"``, ``"gpu"``; None: unknown).
        smoke: the run is a smoke test (the quick preset): its verdict does not test
            the paper.
        result: what was measured, in words and numbers.
        why: why the status is not "agrees", in words a user can act on.
    """

    claim: str | None
    title: str
    status: str
    measured: float | None = None
    interval: list[float | None] | None = None
    claimed: float | None = None
    null: float | None = None
    unit: str = ""
    n: int = 0
    samples: str = "seeds"
    values: list[float | None] | None = None
    lower_bound: bool = False
    seeds: int | None = None
    steps: int | None = None
    preset: str | None = None
    smoke: bool = False
    result: str = ""
    why: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}, got {self.status!r}")
        if self.unit not in _UNITS:
            raise ValueError(f"verdict unit must be one of {sorted(_UNITS)}, got {self.unit!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        """A verdict from its dict; keys this bnlab does not know are ignored.

        Raises:
            ValueError: ``d`` lacks ``claim``, ``title`` or ``status``, or has an
                unknown status.
        """
        if not isinstance(d, dict) or not {"claim", "title", "status"} <= set(d):
            raise ValueError(f"not a verdict (needs claim, title and status): {d!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def label(self) -> str:
        """The status, marked ``(smoke test)`` for a quick-preset run."""
        return f"{self.status} (smoke test)" if self.smoke else self.status

    def measurement(self) -> str:
        """The measured value with its interval or the seeds' values (``fmt_estimate``)."""
        if self.measured is None:
            return "n/a"
        d = {
            "mean": self.measured,
            "n": self.n,
            "ci95": self.interval,
            "values": self.values,
            "lower_bound": self.lower_bound,
            "kept": self.interval is not None,
        }
        text = fmt_estimate(d, self.unit)
        if self.samples != "seeds":
            text = text.replace(f"n={self.n})", f"n={self.n} {self.samples})")
        return text


def is_smoke(preset: str | None) -> bool:
    """A run of the quick preset is a smoke test; a missing preset is unknown, not smoke."""
    return preset == SMOKE_PRESET


def run_context(config: dict, steps: int | None = None, seeds: int | None = None) -> dict:
    """What every verdict of a run carries: ``{"seeds", "steps", "preset"}`` from its config
    (config.json's ``"config"``); ``preset`` is None where the config has none."""
    return {
        "seeds": seeds if seeds is not None else config.get("seeds"),
        "steps": steps if steps is not None else config.get("steps"),
        "preset": config.get("preset"),
    }


def _fmt_value(x: float, unit: str) -> str:
    return _number(x, unit) + _UNITS[unit][1]


def judge(
    title: str,
    estimate: dict | None,
    *,
    context: dict,
    null: float,
    claim: str | None = None,
    claimed: float | None = None,
    higher_is_better: bool = True,
    band: tuple[float, float] | None = None,
    unit: str = "",
    result: str = "",
    precondition: str | None = None,
    missing: str | None = None,
    samples: str = "seeds",
    more: str = "run more seeds (--seeds) or longer (--steps)",
) -> Verdict:
    """The verdict on a claim from an estimate of its effect: the one rule of every report.

    With ``lo, hi`` the 95% interval and ``m`` the measured effect (for a claim that
    ``higher_is_better``; mirrored otherwise):

    - **not measurable**: no estimate (``estimate`` None or not finite), and no
      failed precondition to explain it; ``missing`` says why.
    - **inconclusive**: a ``precondition`` failed (it is the ``why``: e.g. the
      baseline never left chance), fewer than ``MIN_SEEDS`` samples (no interval),
      an interval that includes ``null`` (``lo <= null <= hi``: the run cannot tell
      an effect from none), or a lower bound below the claimed value.
    - **agrees**: ``lo > null`` (no effect and the opposite excluded) and ``m``
      reaches ``claimed`` (any ``m`` for a claim of direction, ``claimed`` None).
    - **smaller than claimed**: ``lo > null`` but ``m < claimed`` (1.7x is not 14x).
    - **does not agree**: ``hi < null``: the interval excludes every effect in the
      claim's direction (the opposite holds).

    With ``band = (a, b)`` the claim is that the effect lies in the band: agrees
    when the interval is inside it, does not agree when it is wholly outside.

    Args:
        title: the claim as the report words it.
        estimate: ``mean_std_ci``, ``ratio_ci``, ``geometric_ci``, ``proportion_ci``
            or ``speedup_estimate`` of the effect.
        context: ``run_context(config)``.
        null: the effect's value under no effect.
        claim: the claim id (``bnlab.report.claims.CLAIMS``), None beyond the paper.
        claimed: the paper's value of the effect, None for a claim of direction.
        unit: how the effect is shown (``fmt_estimate``).
        result: the measurement in words, shown beside the status.
        precondition: why the claim cannot be judged in this run (inconclusive, with or
            without an estimate), or None.
        missing: why there is no estimate (the ``why`` of "not measurable").
        samples: what the estimate's samples are, for messages.
        more: how to get a tighter interval, for messages.

    Returns:
        The verdict, with ``why`` empty only when it agrees.
    """
    preset = context.get("preset")
    v = Verdict(
        claim=claim,
        title=title,
        status="not measurable",
        claimed=claimed,
        null=null,
        unit=unit,
        samples=samples,
        seeds=context.get("seeds"),
        steps=context.get("steps"),
        preset=preset,
        smoke=is_smoke(preset),
        result=result,
    )
    m = None if estimate is None else estimate.get("mean")
    if m is None or not math.isfinite(m):
        if precondition:
            v.status = "inconclusive"
        v.why = precondition or missing or "nothing to measure in this run"
        return v
    v.measured, v.n = float(m), int(estimate["n"])
    v.values = estimate.get("values")
    v.lower_bound = bool(estimate.get("lower_bound"))
    if _has_interval(estimate):
        v.interval = list(estimate["ci95"])
    v.status = "inconclusive"
    if precondition:
        v.why = precondition
        return v
    if v.interval is None:
        v.why = (
            f"only {v.n} {samples}: too few for a 95% interval (at least {MIN_SEEDS} "
            f"needed), so chance cannot be ruled out; {more}"
        )
        return v
    lo, hi = v.interval
    sep = " to " if _UNITS[unit][3] else "–"
    ci_text = (
        f"the 95% interval {_fmt_value(lo, unit)}{sep}{_fmt_value(hi, unit)}"
        if hi is not None
        else f"the 95% lower bound {_fmt_value(lo, unit)}"
    )
    if band is not None:
        a, b = band
        if hi is not None and a <= lo and hi <= b:
            v.status, v.why = "agrees", ""
        elif (hi is not None and hi < a) or lo > b:
            v.status = "does not agree"
            v.why = f"{ci_text} lies outside {_fmt_value(a, unit)}–{_fmt_value(b, unit)}"
        else:
            v.why = (
                f"{ci_text} overlaps the edge of {_fmt_value(a, unit)}–{_fmt_value(b, unit)}; "
                + more
            )
        return v
    sign = 1.0 if higher_is_better else -1.0
    if sign < 0:  # mirror, so that "beyond" is always "above"
        lo, hi = (-hi if hi is not None else -math.inf), -lo
    m_s, null_s = sign * v.measured, sign * null
    claimed_s = None if claimed is None else sign * claimed
    if lo > null_s:
        if claimed_s is None or m_s >= claimed_s:
            v.status, v.why = "agrees", ""
        elif v.lower_bound:
            v.why = (
                f"only a lower bound ({_fmt_value(v.measured, unit)}): the reference never "
                f"reached the target in the steps run, and the bound is below the paper's "
                f"{_fmt_value(claimed, unit)}; run longer (--steps) to measure it"
            )
        else:
            v.status = "smaller than claimed"
            v.why = (
                f"{ci_text} excludes no effect ({_fmt_value(null, unit)}), but "
                f"{_fmt_value(v.measured, unit)} falls short of the paper's "
                f"{_fmt_value(claimed, unit)}"
            )
            if hi is not None and hi >= claimed_s:
                v.why += f" (the interval still reaches it: {more})"
    elif hi is not None and hi < null_s:
        v.status = "does not agree"
        v.why = f"{ci_text} excludes the claimed effect: it points the other way"
    else:
        v.why = (
            f"{ci_text} includes {_fmt_value(null, unit)} (no effect): the {samples} "
            f"disagree or the effect is small; {more}"
        )
        if claimed_s is not None and hi is not None and hi < claimed_s:
            v.why += f" (it also excludes the paper's {_fmt_value(claimed, unit)})"
    return v


def combine(
    title: str, parts: Sequence[Verdict], claim: str | None = None, result: str = ""
) -> Verdict:
    """One verdict on a claim made of parts that must all hold.

    The status is the weakest part's (``does not agree``, then ``not measurable``,
    ``inconclusive``, ``smaller than claimed``, ``agrees``); measured value, interval
    and unit are that part's, and ``why`` joins the whys of every part with that
    status.

    Raises:
        ValueError: no parts.
    """
    if not parts:
        raise ValueError("combine needs at least one verdict")
    status = next(s for s in _PRECEDENCE if any(p.status == s for p in parts))
    deciding = [p for p in parts if p.status == status]
    first = deciding[0]
    out = Verdict.from_dict(first.to_dict())
    out.title, out.claim, out.result = title, claim, result or first.result
    out.why = "; ".join(f"{p.title}: {p.why}" for p in deciding if p.why)
    return out
