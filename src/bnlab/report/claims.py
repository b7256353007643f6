"""The claims table: every claim of the paper's Sections 3-4 beside our measurement.

``build_claims(run_dirs, out)`` reads finished run folders (any experiment with a
report: ``figure1``, ``inception``, ``lr_init``, ``dropout``, ``shift``, ...), takes
each report's verdict rows from its ``summary.json`` (``verdict_rows``), and
files them under the claims they test (``CLAIM_IDS``). The properties of the
transform itself (Algorithm 1, Section 3.3's scale invariance) are checked here
and now, in float64. A claim no run tests says "not tested". Rows a report has
beyond the paper's claims (ours, or Santurkar et al.'s) follow in their own table.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from bnlab.report import EXPERIMENTS, ReportError
from bnlab.report.render import markdown_table, write_documents
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
    from bnlab.verify import _properties

    checks = dict(_properties("cpu"))
    rows = {}
    for cid, name in (
        ("alg1-moments", "mean 0, variance 1 per channel (Alg. 1)"),
        ("scale-invariance", "scale invariance (Sec. 3.3)"),
    ):
        err = checks[name]
        rows[cid] = [
            {
                "verdict": "agrees" if err < EXACT else "does not agree",
                "result": f"largest deviation {err:.1e} in float64 (`bnlab verify`)",
                "source": "checked now",
            }
        ]
    return rows


def _run_rows(run_dir: Path) -> tuple[str, list[tuple[str | None, dict]]]:
    """The experiment of ``run_dir`` and its verdict rows, each with its claim id or None."""
    if not (run_dir / "summary.json").is_file():
        raise ReportError(f"{run_dir} has no summary.json: not a finished run (resume it first)")
    config = read_json(run_dir / "config.json")
    experiment = config.get("experiment")
    if experiment not in EXPERIMENTS:
        raise ReportError(f"{run_dir}: experiment {experiment!r} has no report")
    module = importlib.import_module(EXPERIMENTS[experiment])
    if not hasattr(module, "verdict_rows"):
        raise ReportError(f"{run_dir}: the {experiment} report has no verdicts for this table")
    summary = read_json(run_dir / "summary.json")
    try:
        rows = module.verdict_rows(summary, config["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{run_dir}/summary.json lacks what its verdicts need ({e})") from e
    out = []
    for title, text in rows:
        verdict, _, result = text.partition(": ")
        if verdict not in ("agrees", "does not agree", "not tested", "not measurable"):
            verdict, result = "not measurable", text
        cid = next((c for k, c in module.CLAIM_IDS.items() if title.startswith(k)), None)
        out.append(
            (
                cid,
                {
                    "verdict": verdict,
                    "result": result,
                    "title": title,
                    "source": f"{experiment}: {run_dir}",
                    "figure": str(run_dir / module.FIGURE),
                },
            )
        )
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
            rows.append((c["section"], c["claim"], "**not tested**", "no run in this table"))
        for r in c["rows"]:
            rows.append((c["section"], c["claim"], f"**{r['verdict']}**", _cell(r)))
    counts = {}
    for c in result["claims"]:
        verdicts = {r["verdict"] for r in c["rows"]} or {"not tested"}
        key = verdicts.pop() if len(verdicts) == 1 else "mixed"
        counts[key] = counts.get(key, 0) + 1
    lines = [
        "# The paper's claims, measured",
        "",
        "Ioffe & Szegedy (2015), Sections 3-4, claim by claim, beside what bnlab measured "
        "(every number from the run folders below; mean ± std over seeds with n, as each "
        "report gives it).",
        "",
        "Tally: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".",
        "",
        markdown_table(["where", "claim", "verdict", "our measurement"], rows),
        "",
    ]
    if result["other"]:
        lines += [
            "## Further measurements (beyond the paper's own claims)",
            "",
            markdown_table(
                ["measurement", "verdict", "our result"],
                [(r["title"], f"**{r['verdict']}**", _cell(r)) for r in result["other"]],
            ),
            "",
        ]
    lines += ["## Runs", "", *[f"- `{r}`" for r in result["runs"]], ""]
    return "\n".join(lines)


def _cell(row: dict) -> str:
    text = row["result"].replace("|", "/")
    source = row["source"]
    if row.get("figure"):
        source += f", figure `{Path(row['figure']).name}`"
    return f"{text} ({source})"
