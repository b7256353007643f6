"""Statistics every experiment's report shares: pure functions on lists and arrays.

Nothing here knows an experiment: seeds are the samples, curves are
``steps`` with one value per seed at each, and verdicts are plain text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "diverged_copies",
    "eval_curves",
    "fmt_diverged",
    "first_step_reaching",
    "fmt_pct",
    "fmt_steps",
    "mean_std_ci",
    "speedup",
    "verdict",
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


def mean_std_ci(values: Sequence[float]) -> dict:
    """Mean, sample std, n and the 95% Student-t interval of the mean.

    ``ci95 = mean ± t(0.975, n - 1) * std / sqrt(n)`` with the sample
    (``ddof=1``) std. Beyond 30 degrees of freedom the normal 1.96 stands in
    for t, which makes the interval up to 4% too narrow at df = 31.

    Args:
        values: one number per seed; NaN propagates into mean, std and ci95.

    Returns:
        ``{"mean", "std", "n", "ci95": [lo, hi], "values"}``, all plain floats;
        with one value ``std`` is 0.0 and ``ci95`` is None.

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
    t = _T95[n - 2] if 2 <= n <= 31 else 1.96
    half = t * std / math.sqrt(n) if n > 1 else float("nan")
    return {
        "mean": float(v.mean()),
        "std": std,
        "n": n,
        "ci95": [float(v.mean() - half), float(v.mean() + half)] if n > 1 else None,
        "values": [float(x) for x in v],
    }


def fmt_pct(d: dict | None) -> str:
    """A ``mean_std_ci`` of fractions as text: ``97.98% ± 0.15 (95% CI 97.61–98.35, n=3)``.

    None (or an empty dict) gives ``n/a``.
    """
    if not d:
        return "n/a"
    s = f"{100 * d['mean']:.2f}% ± {100 * d['std']:.2f}"
    if d.get("ci95"):
        s += f" (95% CI {100 * d['ci95'][0]:.2f}–{100 * d['ci95'][1]:.2f}, n={d['n']})"
    else:
        s += f" (n={d['n']})"
    return s


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


def verdict(ok: bool, text: str) -> str:
    """A claim's verdict: ``agrees: TEXT`` or ``does not agree: TEXT``."""
    return f"{'agrees' if ok else 'does not agree'}: {text}"
