"""Shared report code: statistics on plain lists/arrays, JSON strictness, rendering, dispatch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bnlab.report import EXPERIMENTS, ReportError, build_report, report_files
from bnlab.report.render import markdown_table, write_documents
from bnlab.report.stats import (
    first_step_reaching,
    fmt_pct,
    fmt_steps,
    mean_std_ci,
    speedup,
    verdict,
)
from bnlab.run_folder import to_strict_json as strict_json


def test_mean_std_ci_t_interval_on_known_values():
    # n = 4: mean 5, sample std sqrt(20/3), t(0.975, df=3) = 3.182
    s = mean_std_ci([2.0, 4.0, 6.0, 8.0])
    std = math.sqrt(20 / 3)
    half = 3.182 * std / 2
    assert s["mean"] == 5.0 and s["n"] == 4 and s["std"] == pytest.approx(std)
    assert s["ci95"] == pytest.approx([5 - half, 5 + half])
    assert s["values"] == [2.0, 4.0, 6.0, 8.0]
    # beyond df = 30 the normal quantile stands in for t
    big = mean_std_ci([0.0, 1.0] * 20)
    half = 1.96 * big["std"] / math.sqrt(40)
    assert big["ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    # plain floats, so the dict is JSON as it stands
    json.dumps(mean_std_ci(np.array([0.1, 0.2], dtype=np.float32)))
    with pytest.raises(ValueError, match="at least one value"):
        mean_std_ci([])


def test_fmt_pct_and_fmt_steps():
    assert fmt_pct(mean_std_ci([0.5, 0.7])).startswith("60.00% ± 14.14 (95% CI ")
    assert fmt_pct(mean_std_ci([0.5, 0.7])).endswith(", n=2)")
    assert fmt_pct(mean_std_ci([0.9])) == "90.00% ± 0.00 (n=1)"
    assert fmt_pct(None) == "n/a"
    assert fmt_steps([1500, None, 20]) == "1,500, never, 20"


def test_first_step_reaching():
    steps = [0, 100, 200, 300]
    per_seed = [
        [0.1, 0.5, 0.9, 0.95],  # reaches 0.9 exactly at 200: >= counts
        [0.1, 0.92, 0.8, 0.97],  # first crossing counts, even if it dips after
        [0.1, float("nan"), 0.5, 0.6],  # NaN never reaches
    ]
    assert first_step_reaching(steps, per_seed, 0.9) == [200, 100, None]
    assert first_step_reaching(steps, per_seed, 0.0) == [0, 0, 0]
    assert first_step_reaching(steps, np.array(per_seed), 2.0) == [None, None, None]
    assert all(type(x) is int for x in first_step_reaching(np.array(steps), per_seed, 0.5))
    assert first_step_reaching(steps, [], 0.5) == []
    with pytest.raises(ValueError, match="match steps"):
        first_step_reaching(steps, [[0.1, 0.2]], 0.5)


def test_speedup_exact_lower_bound_and_not_measurable():
    # every seed of both reached it: ratio of the mean steps
    assert speedup([2000, 4000], [100, 300], 5000) == {"exact": pytest.approx(15.0)}
    # the reference never did in its 5,000 steps, the other always: only a lower bound
    assert speedup([None, None], [100, 300], 5000) == {"at_least": pytest.approx(25.0)}
    # the other misses it in some seed, or the reference reaches it in some seeds only
    assert speedup([None, None], [100, None], 5000) is None
    assert speedup([2000, None], [100, 300], 5000) is None
    assert speedup([None, None], [None, None], 5000) is None
    # nothing to divide by
    assert speedup([], [], 5000) is None
    assert speedup([100, 200], [0, 0], 5000) is None
    # a slower "other" is an exact ratio below 1, not an error
    assert speedup([100, 100], [400, 400], 5000) == {"exact": 0.25}


def test_verdict():
    assert verdict(True, "x") == "agrees: x"
    assert verdict(False, "x") == "does not agree: x"


def test_strict_json_replaces_nan_and_inf_everywhere():
    obj = {
        "a": float("nan"),
        "b": [1.0, float("inf"), {"c": -float("inf"), "d": (np.float32("nan"), 2)}],
        "e": {"f": {"g": np.float64("inf"), "h": "nan", "i": None, "j": True}},
        "k": 0.5,
    }
    out = strict_json(obj)
    assert out == {
        "a": None,
        "b": [1.0, None, {"c": None, "d": [None, 2]}],
        "e": {"f": {"g": None, "h": "nan", "i": None, "j": True}},
        "k": 0.5,
    }
    json.dumps(out, allow_nan=False)
    assert math.isnan(obj["a"])  # the input is left as it was


def test_markdown_table_and_self_contained_html(tmp_path):
    table = markdown_table(["measure", "value"], [("a", 1), ("b **bold**", "`x`")])
    assert table == "| measure | value |\n|---|---|\n| a | 1 |\n| b **bold** | `x` |"
    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    md = f"# T\n\n![My plot](plot.png)\n\n- item\n\n{table}\n"
    written = write_documents(tmp_path, md, "bnlab: <T>")
    assert written == [tmp_path / "report.md", tmp_path / "report.html"]
    assert (tmp_path / "report.md").read_text() == md
    html = (tmp_path / "report.html").read_text()
    assert '<img alt="My plot" src="data:image/png;base64,iVBORyBmYWtl">' in html
    assert "<title>bnlab: &lt;T&gt;</title>" in html
    assert "<td>b <b>bold</b></td><td><code>x</code></td>" in html
    with pytest.raises(ReportError, match="missing"):
        write_documents(tmp_path, "![gone](gone.png)\n", "t")


def _run_folder(tmp_path, config) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return run


@pytest.mark.parametrize(
    "config,phrase",
    [
        ("{not json", "not valid JSON"),
        ({"config": {}}, "names no experiment"),
        ([1, 2], "names no experiment"),
        ({"experiment": "table2", "config": {}}, "'table2', which has no report; known: "),
    ],
)
def test_dispatch_refuses_unknown_or_corrupt_config(tmp_path, config, phrase):
    with pytest.raises(ReportError, match="no config.json"):
        build_report(tmp_path)
    run = _run_folder(tmp_path, config)
    for function in (build_report, report_files):
        with pytest.raises(ReportError, match=phrase):
            function(run)


def _eval_records(accs: dict) -> list[dict]:
    """Eval records of a two-seed run: per arm, the accuracies of both seeds at each step."""
    return [
        {"kind": "eval", "arm": arm, "step": 100 * k, "train_loss": 1.0, "test_acc": acc,
         "p15": [-1.0, -1.0], "p50": [0.0, 0.0], "p85": [1.0, 1.0]}
        for arm, curve in accs.items()
        for k, acc in enumerate(curve)
    ]  # fmt: skip


def test_dispatch_builds_figure1_and_lists_its_files(tmp_path):
    assert EXPERIMENTS["figure1"] == "bnlab.report.figure1"
    cfg = {"thresholds": [0.9], "unit": 0, "data": None, "steps": 300, "batch_size": 60,
           "momentum": 0.9, "lr": 0.01, "init_std": 0.01, "seeds": 2, "eval_every": 100,
           "population_batches": 3}  # fmt: skip
    run = _run_folder(tmp_path, {"experiment": "figure1", "config": cfg})
    records = _eval_records(
        {
            "baseline": [[0.1, 0.1], [0.5, 0.6], [0.91, 0.92], [0.93, 0.94]],
            "bn": [[0.1, 0.1], [0.92, 0.96], [0.97, 0.97], [0.98, 0.99]],
        }
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_report(run)
    assert summary["speedup_steps_bn_vs_baseline"] == {"0.9": pytest.approx(2.0)}
    files = report_files(run)
    assert [f.name for f in files] == ["summary.json", "figure1.png", "report.md", "report.html"]
    # every file written is listed, and nothing else was written
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", *(f.name for f in files)]
    )
    assert all(f.stat().st_size > 0 for f in files)
    assert json.loads(files[0].read_text()) == json.loads(json.dumps(summary))
