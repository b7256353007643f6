"""Shared report code: statistics on plain lists/arrays, JSON strictness, rendering, dispatch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bnlab.lab import EXPERIMENTS, build_report, report_files
from bnlab.report import ReportError
from bnlab.report import figure1 as figure1_report
from bnlab.report.render import markdown_table, smoke_banner, verdict_table, write_documents
from bnlab.report.stats import (
    Verdict,
    combine,
    difference_ci,
    first_step_reaching,
    fmt_pct,
    fmt_pp,
    fmt_steps,
    geometric_ci,
    judge,
    mean_std_ci,
    proportion_ci,
    ratio_ci,
    run_context,
    speedup,
    speedup_estimate,
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
    # three or more seeds: mean ± std and the 95% interval
    three = fmt_pct(mean_std_ci([0.5, 0.6, 0.7]))
    assert three.startswith("60.00% ± 10.00 (95% CI 35.16–84.84%") and three.endswith(", n=3)")
    # fewer: the seeds' values, never an interval (t(0.975, 1) = 12.7 makes it meaningless)
    assert fmt_pct(mean_std_ci([0.971, 0.975])) == "97.10%, 97.50% (n=2)"
    assert fmt_pct(mean_std_ci([0.9])) == "90.00% (n=1)"
    assert fmt_pct(None) == "n/a"
    assert fmt_pp(mean_std_ci([0.01, -0.02])) == "+1.00 pp, -2.00 pp (n=2)"
    assert fmt_steps([1500, None, 20]) == "1,500, never, 20"
    # a bound that rounds to zero has no sign to lose: "+0.00", never "-0.00"
    near_zero = {"mean": 0.0057, "std": 0.0023, "n": 3, "ci95": [-0.00001, 0.0114]}
    assert fmt_pp(near_zero) == "+0.57 pp ± 0.23 (95% CI +0.00 to +1.14 pp, n=3)"
    assert fmt_pct({"mean": -1e-9, "n": 1}) == "0.00% (n=1)"


def test_accuracy_intervals_stay_in_their_range():
    # n = 3 near 100%: the t-interval would pass 100%; bounds clip it and the text says so
    d = mean_std_ci([0.99, 1.0, 0.9], bounds=(0, 1))
    assert d["ci95"][1] == 1.0 and d["clipped"] and d["ci95"][0] < 0.963
    assert "–100.00%, clipped to the range 0.00–100.00%, n=3)" in fmt_pct(d)
    # a dict from an older summary, unclipped: fmt_pct clips at print time anyway
    raw = mean_std_ci([0.05, 0.3, 0.0])
    assert raw["ci95"][0] < 0 and not raw["clipped"]
    assert "95% CI 0.00–" in fmt_pct(raw) and "clipped" in fmt_pct(raw)
    # the issue's case, n = 2 with an interval of -5.09-64.79: the values instead
    assert fmt_pct(mean_std_ci([0.02, 0.575], bounds=(0, 1))) == "2.00%, 57.50% (n=2)"
    # ratios stay positive: the delta-method interval is on the log scale
    r = ratio_ci([100, 5000, 300], [90, 100, 110])
    assert r["ci95"][0] > 0 and r["ci95"][0] < r["mean"] < r["ci95"][1]
    g = geometric_ci([0.01, 1.0, 100.0])
    assert g["mean"] == pytest.approx(1.0) and g["ci95"][0] > 0
    assert geometric_ci([1.0, -1.0]) is None
    p = proportion_ci(1, 1)  # Wilson: inside [0, 1] and meaningful at n = 1
    assert 0.2 < p["ci95"][0] < 0.21 and p["ci95"][1] == 1.0


def test_difference_ci_pairs_seeds_or_falls_back_to_welch():
    paired = difference_ci([0.9, 0.92, 0.94], [0.8, 0.83, 0.85])
    assert paired["values"] == pytest.approx([0.1, 0.09, 0.09])
    welch = difference_ci([0.9, 0.92, 0.94, 0.96], [0.8, 0.83, 0.85])
    assert welch["mean"] == pytest.approx(0.93 - 0.8266667) and welch["ci95"][0] > 0
    with pytest.raises(ValueError, match="both sides"):
        difference_ci([], [1.0])


CTX = {"seeds": 3, "steps": 3000, "preset": "cpu"}


def test_judge_agrees_only_when_the_effect_reaches_the_claim_and_excludes_none():
    # BN-x5: 14.8x with an interval well above 1 -> agrees with the paper's 14x
    v = judge("x5", ratio_ci([30, 31, 32], [2.0, 2.1, 2.2]), claim="inc-bn-x5", claimed=14.0,
              null=1.0, unit="x", context=CTX)  # fmt: skip
    assert v.status == "agrees" and v.why == "" and v.measured == pytest.approx(31 / 2.1)
    # 1.7x against a claimed 14x: a real speed-up, smaller than the paper's
    v = judge("x5", ratio_ci([170, 175, 165], [100, 101, 99]), claim="inc-bn-x5",
              claimed=14.0, null=1.0, unit="x", context=CTX)  # fmt: skip
    assert v.status == "smaller than claimed"
    assert "1.7x falls short of the paper's 14x" in v.why
    # an interval that spans 1x: inconclusive, and why says what to run
    v = judge("x5", ratio_ci([100, 300, 150], [150, 100, 160]), claimed=14.0, null=1.0,
              unit="x", context=CTX)  # fmt: skip
    assert v.interval[0] < 1 < v.interval[1] and v.status == "inconclusive"
    assert "includes 1x (no effect)" in v.why and "--seeds" in v.why
    assert "it also excludes the paper's 14x" in v.why
    # the interval excludes the claimed effect (and any effect): does not agree
    v = judge("acc", mean_std_ci([-0.05, -0.04, -0.06]), null=0.0, unit="difference",
              context=CTX)  # fmt: skip
    assert v.status == "does not agree" and "points the other way" in v.why
    assert v.interval[1] < 0 and v.measurement().startswith("-5.00 pp (95% CI")
    # lower is better: mirrored
    v = judge("noise", geometric_ci([0.1, 0.2, 0.15]), null=1.0, higher_is_better=False,
              unit="x", context=CTX)  # fmt: skip
    assert v.status == "agrees"
    # an equivalence band: inside agrees, outside does not, on its edge inconclusive
    for values, status in (([0.98, 1.0, 1.02], "agrees"), ([3.0, 3.1, 2.9], "does not agree"),
                           ([0.7, 1.0, 1.3], "inconclusive")):  # fmt: skip
        v = judge("band", geometric_ci(values), null=1.0, band=(0.8, 1.25), unit="x", context=CTX)
        assert v.status == status, (values, v)


def test_judge_is_inconclusive_when_a_precondition_fails_or_seeds_are_too_few():
    chance = (
        "the baseline never left chance in 300 steps: there is no trained baseline to "
        "compare with; run --preset cpu"
    )
    v = judge("faster", speedup_estimate([None] * 3, [100, 120, 110], 300), null=1.0,
              unit="x", context=CTX, precondition=chance)  # fmt: skip
    assert v.status == "inconclusive" and v.why == chance and v.lower_bound
    # two seeds: no interval; the verdict shows the seeds' values and says to add seeds
    v = judge("acc", mean_std_ci([0.971, 0.975]), null=0.0, unit="fraction", context=CTX)
    assert v.status == "inconclusive" and v.interval is None
    assert "only 2 seeds" in v.why and "--seeds" in v.why
    assert v.measurement() == "97.10%, 97.50% (n=2)"
    # nothing measured at all
    v = judge("faster", None, null=1.0, context=CTX, missing="no seed reached 90%")
    assert v.status == "not measurable" and v.why == "no seed reached 90%"
    # ... unless a failed precondition explains it: then the run cannot tell
    v = judge("faster", None, null=1.0, context=CTX, precondition=chance, missing="x")
    assert v.status == "inconclusive" and v.why == chance
    # a lower bound above the null but below the claimed value cannot be "smaller"
    v = judge("x5", speedup_estimate([None] * 3, [100, 110, 120], 330), claimed=14.0,
              null=1.0, unit="x", context=CTX)  # fmt: skip
    assert v.status == "inconclusive" and "only a lower bound" in v.why
    assert v.measurement().startswith("at least 3x (95% lower bound")


def test_combine_takes_the_weakest_part():
    ok = judge("a", mean_std_ci([1.0, 1.1, 0.9]), null=0.0, context=CTX)
    unsure = judge("b", mean_std_ci([1.0, -1.1, 0.9]), null=0.0, context=CTX)
    both = combine("a and b", [ok, unsure], claim="fig1-stable", result="r")
    assert (both.status, both.claim, both.title, both.result) == (
        "inconclusive", "fig1-stable", "a and b", "r")  # fmt: skip
    assert both.why.startswith("b: the 95% interval")
    assert combine("a", [ok, ok]).status == "agrees"


def test_verdict_round_trips_through_json_and_marks_smoke_tests():
    quick = run_context({"preset": "quick", "seeds": 2, "steps": 300})
    v = judge("BN trains faster", ratio_ci([300, 280, 290], [100, 90, 95]), claim="fig1-faster",
              null=1.0, unit="x", context=quick, result="3.1x fewer steps")  # fmt: skip
    assert v.smoke and v.preset == "quick" and v.label == "agrees (smoke test)"
    back = Verdict.from_dict(json.loads(json.dumps(strict_json(v.to_dict()))))
    assert back == v
    assert {"claim", "status", "measured", "interval", "seeds", "steps", "preset", "why"} <= set(
        v.to_dict()
    )
    # a config without a preset (written before presets existed) is unknown, not smoke
    assert not judge("t", None, null=0.0, context=run_context({"seeds": 3})).smoke
    with pytest.raises(ValueError, match="status"):
        Verdict.from_dict({**v.to_dict(), "status": "mostly agrees"})
    with pytest.raises(ValueError, match="not a verdict"):
        Verdict.from_dict({"title": "x"})
    table = verdict_table([v.to_dict()])
    assert "**agrees (smoke test)**" in table and "3.1x fewer steps" in table
    assert smoke_banner({"preset": "quick"})[0].startswith("**Smoke test")
    assert "--preset cpu" in smoke_banner({"preset": "quick"})[0]
    assert smoke_banner({"preset": "cpu"}) == smoke_banner({}) == []


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
    assert '<img src="data:image/png;base64,iVBORyBmYWtl" alt="My plot" />' in html
    assert "<title>bnlab: &lt;T&gt;</title>" in html
    assert "<td>b <strong>bold</strong></td>\n<td><code>x</code></td>" in html
    assert "<li>item</li>" in html and "<h1>T</h1>" in html
    with pytest.raises(ReportError, match="missing"):
        write_documents(tmp_path, "![gone](gone.png)\n", "t")
    # Links stay links (the paper's index.html links every claim to its report);
    # raw HTML in a report's text is escaped, not rendered.
    write_documents(tmp_path, "[the report](run/report.html) <script>x</script>\n", "t", "links")
    links = (tmp_path / "links.html").read_text()
    assert '<a href="run/report.html">the report</a>' in links and "<script>" not in links


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
    assert EXPERIMENTS["figure1"].report is figure1_report
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
