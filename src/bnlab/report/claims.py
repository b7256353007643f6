"""The claims table: every claim of the paper's Sections 3-4 beside our measurement.

``build_claims(run_dirs, out)`` reads finished run folders (any experiment with a
report: ``figure1``, ``inception``, ``lr_init``, ``dropout``, ``shift``, ...), takes
the structured verdicts (``bnlab.report.stats.Verdict``) from each ``summary.json``'s
``"verdicts"``, and files each under the claim it names. Verdicts of smoke-test runs
(the quick preset) are marked so in the table and the tally. The properties of the
transform itself (Algorithm 1, Section 3.3's scale invariance) are checked here
and now, in float64. A claim no run tests says "not tested". Rows a report has
beyond the paper's claims (ours, or Santurkar et al.'s) follow in their own table.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.lab import experiment_of
from bnlab.report import ReportError
from bnlab.report.render import markdown_table, write_documents
from bnlab.report.stats import Verdict
from bnlab.run_folder import read_json, write_json

__all__ = ["CLAIMS", "build_claims"]

# (id, where in the paper, the claim)
CLAIMS = [
    ("alg1-moments", "Section 3, Algorithm 1",
     "Normalized activations have zero mean and unit variance per feature over the mini-batch"),
    ("scale-invariance", "Section 3.3",
     "BN((aW)u) = BN(Wu): the output and the input gradient do not change with the weights' "
     "scale, and the weight gradient scales by 1/a"),
    ("fig1-faster", "Section 4.1, Figure 1(a)", "With BN the MNIST network trains faster"),
    ("fig1-accuracy", "Section 4.1, Figure 1(a)",
     "With BN the MNIST network reaches higher test accuracy"),
    ("fig1-stable", "Section 4.1, Figure 1(b, c)",
     "With BN the input distribution of a sigmoid is much more stable over training"),
    ("ics", "Sections 1-2",
     "BN reduces internal covariate shift (the change of layer-input distributions)"),
    ("higher-lr", "Section 3.3", "BN enables much higher learning rates"),
    ("init", "Sections 1, 3.3", "BN makes training less sensitive to the initialization"),
    ("regularizes", "Section 3.4", "BN regularizes the model"),
    ("dropout", "Sections 3.4, 4.2.1", "With BN, Dropout can be removed or reduced"),
    ("sigmoid", "Sections 1, 4.2.2",
     "BN makes saturating nonlinearities trainable (BN-x5-Sigmoid trains, Inception with "
     "sigmoids does not)"),
    ("inc-bn-baseline", "Section 4.2.2",
     "BN-Baseline reaches Inception's accuracy in under half the steps (13.3M vs 31.0M)"),
    ("inc-bn-x5", "Section 4.2.2", "BN-x5 reaches Inception's accuracy in 14x fewer steps"),
    ("inc-bn-x30", "Section 4.2.2", "BN-x30 starts slower but ends higher than BN-x5"),
    ("inc-x5-diverges", "Section 4.2.2",
     "Without BN, the x5 learning rate drives the parameters to infinity"),
    ("ensemble", "Section 4.2.3", "An ensemble of BN networks beats its best member"),
    ("shuffle", "Section 4.2.1",
     "Shuffling training examples more thoroughly adds about 1% validation accuracy"),
    ("jacobian", "Section 3.3",
     "(Conjecture) BN keeps the singular values of layer Jacobians close to 1"),
]  # fmt: skip

# An exact property holds when float64 rounding is all that is left.
EXACT = 1e-9


def _transform_rows() -> dict[str, list[dict]]:
    """Algorithm 1's moments and Section 3.3's scale invariance, checked now in float64."""
    from bnlab.verify import transform_properties

    checks = transform_properties("cpu")
    rows = {}
    for cid, name in (
        ("alg1-moments", "mean 0, variance 1 per channel (Alg. 1)"),
        ("scale-invariance", "scale invariance (Sec. 3.3)"),
    ):
        err = checks[name]
        status = "agrees" if err < EXACT else "does not agree"
        rows[cid] = [
            {
                "verdict": status,
                "label": status,
                "smoke": False,
                "measurement": f"{err:.1e} (exact property, tolerance {EXACT:.0e})",
                "result": f"largest deviation {err:.1e} in float64 (`bnlab verify`)",
                "why": "" if err < EXACT else f"the deviation exceeds {EXACT:.0e}",
                "source": "checked now",
            }
        ]
    return rows


def _run_rows(run_dir: Path) -> tuple[str, list[tuple[str | None, dict]]]:
    """The experiment of ``run_dir`` and its verdict rows, each with its claim id or None."""
    if not (run_dir / "summary.json").is_file():
        raise ReportError(f"{run_dir} has no summary.json: not a finished run (resume it first)")
    exp, config = experiment_of(run_dir)
    experiment, module = exp.key, exp.report
    summary = read_json(run_dir / "summary.json")
    rebuild = f"rebuild its report with `bnlab report {run_dir}`"
    if not isinstance(summary, dict) or "verdicts" not in summary:
        raise ReportError(
            f"{run_dir}/summary.json has no structured verdicts (an older bnlab wrote it); "
            + rebuild
        )
    try:
        verdicts = [Verdict.from_dict(d) for d in summary["verdicts"]]
    except (TypeError, ValueError) as e:
        raise ReportError(f"{run_dir}/summary.json has a damaged verdict ({e}); {rebuild}") from e
    known = {c[0] for c in CLAIMS}
    out = []
    for v in verdicts:
        row = {
            **v.to_dict(),
            "verdict": v.status,
            "label": v.label,
            "measurement": v.measurement(),
            "experiment": experiment,
            "source": f"{experiment}: {run_dir}",
            "figure": str(run_dir / module.FIGURE),
        }
        out.append((v.claim if v.claim in known else None, row))
    return experiment, out


def build_claims(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Write claims.json, claims.md and claims.html into ``out`` from ``run_dirs``.

    Returns:
        ``{"claims": [{"id", "section", "claim", "rows": [...]}], "other": [...]}``.

    Raises:
        ReportError: a folder is not a finished run of an experiment with a report.
    """
    out = Path(out)
    by_claim = _transform_rows()
    other = []
    for run_dir in map(Path, run_dirs):
        _, rows = _run_rows(run_dir)
        for cid, row in rows:
            (by_claim.setdefault(cid, []) if cid else other).append(row)
    table = [
        {"id": cid, "section": sec, "claim": text, "rows": by_claim.get(cid, [])}
        for cid, sec, text in CLAIMS
    ]
    result = {"claims": table, "other": other, "runs": [str(r) for r in run_dirs]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "claims.json", result)
    write_documents(out, _markdown(result), "bnlab: the paper's claims, measured", "claims")
    return result


def _markdown(result: dict) -> str:
    rows = []
    for c in result["claims"]:
        if not c["rows"]:
            rows.append(
                (c["section"], c["claim"], "**not tested**", "—", "no run in this table", "—")
            )
        for r in c["rows"]:
            rows.append((c["section"], c["claim"], f"**{r['label']}**", *_cells(r)))
    counts = {}
    for c in result["claims"]:
        labels = {r["label"] for r in c["rows"]} or {"not tested"}
        key = labels.pop() if len(labels) == 1 else "mixed"
        counts[key] = counts.get(key, 0) + 1
    smoke = any(r.get("smoke") for c in result["claims"] for r in c["rows"]) or any(
        r.get("smoke") for r in result["other"]
    )
    lines = [
        "# The paper's claims, measured",
        "",
        "Ioffe & Szegedy (2015), Sections 3-4, claim by claim, beside what bnlab measured "
        "(every number from the run folders below). *measured*: the effect with its 95% "
        "interval and n, or each seed's value where fewer than 3 seeds give no interval. A "
        "verdict *agrees* only when the effect reaches the paper's and its interval excludes "
        "no effect; *smaller than claimed*: a real effect below the paper's; *does not agree*: "
        "the interval excludes the claimed effect; *inconclusive*: the run cannot tell (the "
        "*why* column says what to run).",
        "",
    ]
    if smoke:
        lines += [
            "**Rows marked (smoke test) come from runs of the `quick` preset: they check that "
            "an experiment runs, and do not test the paper.** Run those experiments with "
            "`--preset cpu` for verdicts that do.",
            "",
        ]
    lines += [
        "Tally: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".",
        "",
        markdown_table(
            ["where", "claim", "verdict", "measured", "our result (source)", "why"], rows
        ),
        "",
    ]
    if result["other"]:
        lines += [
            "## Further measurements (beyond the paper's own claims)",
            "",
            markdown_table(
                ["measurement", "verdict", "measured", "our result (source)", "why"],
                [(r["title"], f"**{r['label']}**", *_cells(r)) for r in result["other"]],
            ),
            "",
        ]
    lines += ["## Runs", "", *[f"- `{r}`" for r in result["runs"]], ""]
    return "\n".join(lines)


def _cells(row: dict) -> tuple[str, str, str]:
    """A row's measured value (interval and n, or the seeds' values), result with its
    source, and why."""
    source = row["source"]
    if row.get("figure"):
        source += f", figure `{Path(row['figure']).name}`"
    if row.get("seeds") is not None:
        source += f"; {row['seeds']} seed(s)"
    if row.get("steps") is not None:
        source += f", {row['steps']:,} steps"
    if row.get("preset"):
        source += f", preset {row['preset']}"
    text = f"{row['result']} ({source})".replace("|", "/")
    why = (row.get("why") or "—").replace("|", "/")
    return row.get("measurement", "n/a").replace("|", "/"), text, why
