"""Figure 1 report: statistics, summary and documents built from synthetic records only."""

import json
import math
import re
from pathlib import Path

import jinja2
import pytest

from bnlab.report import (
    batch_noise,
    batch_size,
    dropout,
    ema_vs_precise,
    figure1,
    inception,
    lr_init,
    shift,
)
from bnlab.report.figure1 import ReportError, build_report, mean_std_ci, summarize
from bnlab.report.render import TEMPLATES, render_template
from bnlab.report.stats import fmt_pct, fmt_steps

# every report whose prose is a template, by the template's name
REPORTS = {"figure1.md.j2": figure1, "inception.md.j2": inception, "lr_init.md.j2": lr_init,
           "dropout.md.j2": dropout, "shift.md.j2": shift, "batch_size.md.j2": batch_size,
           "batch_noise.md.j2": batch_noise,
           "ema_vs_precise.md.j2": ema_vs_precise}  # fmt: skip

CONFIG = {"thresholds": [0.9, 0.95], "unit": 0}


def _records(base_acc, bn_acc, steps=(0, 100, 200, 300), drift=(2.0, 0.1)):
    """Eval records of two arms: per-step accuracy lists (one entry per seed)."""
    out = []
    for arm, accs, d in (("baseline", base_acc, drift[0]), ("bn", bn_acc, drift[1])):
        for k, (step, acc) in enumerate(zip(steps, accs)):
            out.append(
                {
                    "kind": "eval",
                    "arm": arm,
                    "step": step,
                    "train_loss": None if step == 0 else 1.0,
                    "test_acc": acc,
                    "p15": [-1 - d * k] * len(acc),
                    "p50": [-d * k] * len(acc),
                    "p85": [1 + d * k] * len(acc),
                }
            )
    seeds = len(bn_acc[0])
    out.append(
        {"kind": "final", "arm": "bn", "step": steps[-1], "test_acc_population": [0.99] * seeds}
    )
    return out


BASE = [[0.1, 0.1], [0.5, 0.6], [0.91, 0.92], [0.93, 0.94]]
BN = [[0.1, 0.1], [0.92, 0.96], [0.97, 0.97], [0.98, 0.99]]
# three seeds: enough for an interval
BASE3 = [[0.1, 0.1, 0.1], [0.5, 0.6, 0.55], [0.91, 0.92, 0.915], [0.93, 0.94, 0.935]]
BN3 = [[0.1, 0.1, 0.1], [0.92, 0.96, 0.94], [0.97, 0.97, 0.97], [0.98, 0.99, 0.985]]


def _by_title(summary: dict) -> dict:
    return {v["title"]: v for v in summary["verdicts"]}


def test_mean_std_ci_uses_the_t_interval():
    s = mean_std_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    half = 4.303 / math.sqrt(3)  # t(0.975, df=2) * std / sqrt(n)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half])
    one = mean_std_ci([0.5])
    assert one["std"] == 0.0 and one["ci95"] is None and one["n"] == 1


def test_summarize_thresholds_speedup_and_stability():
    s = summarize(_records(BASE, BN, steps=(0, 100, 2000, 3000)), CONFIG)
    base, bn = s["arms"]["baseline"], s["arms"]["bn"]
    assert base["final_test_acc"]["mean"] == pytest.approx(0.935)
    assert bn["best_test_acc"]["values"] == [0.98, 0.99]
    assert base["steps_to_threshold"] == {"0.9": [2000, 2000], "0.95": [None, None]}
    assert bn["steps_to_threshold"] == {"0.9": [100, 100], "0.95": [2000, 100]}
    assert s["speedup_steps_bn_vs_baseline"] == {"0.9": pytest.approx(20.0)}  # 0.95: never
    assert base["first_step_above_chance"] == bn["first_step_above_chance"] == [100, 100]
    # two seeds give no t-interval: every comparison is inconclusive and says to add seeds
    # (the share of seeds that learn early has the Wilson interval, valid at any n)
    for v in s["verdicts"]:
        if v["claim"] is not None:
            assert v["status"] == "inconclusive" and "only 2 seeds" in v["why"], v
            assert v["interval"] is None and len(v["values"]) == 2
    assert s["bn_higher_final_acc_every_seed"] is True
    assert bn["final_test_acc_population_stats"]["mean"] == pytest.approx(0.99)
    # the median moves by 2.0 per evaluation without BN, 0.1 with (steps 100..300)
    assert base["sigmoid_input"]["median_range"] == pytest.approx(4.0)
    assert bn["sigmoid_input"]["median_range"] == pytest.approx(0.2)
    # three seeds that all agree: every verdict agrees, with its claim id and interval
    s = summarize(_records(BASE3, BN3, steps=(0, 100, 2000, 3000)), {**CONFIG, "seeds": 3})
    verdicts = _by_title(s)
    assert all(v["status"] == "agrees" for v in verdicts.values()), verdicts
    faster = verdicts["BN trains faster"]
    assert faster["claim"] == "fig1-faster" and faster["measured"] == pytest.approx(20.0)
    assert faster["interval"] == pytest.approx([20.0, 20.0]) and faster["n"] == 3
    assert verdicts["Sigmoid input more stable with BN"]["claim"] == "fig1-stable"
    assert verdicts["Both networks learn from the start (Figure 1a)"]["claim"] is None


def test_speedup_is_a_lower_bound_when_the_baseline_never_reaches_a_threshold():
    # Baseline never reaches 90% in 3,000 steps; BN does after 100 steps in both seeds.
    base = [[0.1, 0.1], [0.1, 0.1], [0.5, 0.6], [0.8, 0.85]]
    s = summarize(_records(base, BN, steps=(0, 100, 2000, 3000)), CONFIG)
    assert s["speedup_steps_bn_vs_baseline"] == {}
    # 0.95: BN reaches it in both seeds (2000, 100) -> at least 3000 / 1050
    assert s["speedup_steps_bn_vs_baseline_at_least"] == {
        "0.9": pytest.approx(30.0),
        "0.95": pytest.approx(3000 / 1050),
    }
    verdict = _by_title(s)["BN trains faster"]
    assert verdict["status"] == "inconclusive" and verdict["lower_bound"]  # 2 seeds
    assert "at least 2.9x fewer steps" in verdict["result"], verdict
    # three seeds, BN at 100 steps in each: a lower bound of 30x whose interval excludes 1x
    base3 = [[0.1] * 3, [0.1] * 3, [0.5, 0.6, 0.55], [0.8, 0.85, 0.82]]
    fast3 = [[0.1] * 3, [0.96] * 3, [0.97] * 3, [0.98] * 3]
    s = summarize(_records(base3, fast3, steps=(0, 100, 2000, 3000)), CONFIG)
    verdict = _by_title(s)["BN trains faster"]
    assert verdict["status"] == "agrees" and verdict["interval"] == [30.0, None], verdict
    assert "at least 30.0x fewer steps" in verdict["result"]
    # When BN misses a threshold in some seed there is no bound, and the verdict says so.
    bn_partly = [[0.1, 0.1], [0.5, 0.5], [0.91, 0.6], [0.92, 0.7]]  # seed 1 never reaches 90%
    s = summarize(_records(base, bn_partly, steps=(0, 100, 2000, 3000)), CONFIG)
    assert s["speedup_steps_bn_vs_baseline_at_least"] == {}
    verdict = _by_title(s)["BN trains faster"]
    assert verdict["status"] == "not measurable" and "--steps" in verdict["why"]


def test_a_baseline_at_chance_makes_the_comparisons_inconclusive():
    # Without BN every seed stays at 10% for the whole (short) run: nothing to compare with.
    chance = [[0.1] * 3] * 4
    s = summarize(_records(chance, BN3, drift=(0.0, 0.1)), {**CONFIG, "preset": "quick"})
    verdicts = _by_title(s)
    for title in ("BN reaches higher final test accuracy", "BN trains faster",
                  "Sigmoid input more stable with BN"):  # fmt: skip
        v = verdicts[title]
        assert v["status"] == "inconclusive", v
        assert "never left chance" in v["why"] and "--preset cpu" in v["why"]
        assert v["smoke"] and v["preset"] == "quick"


def test_report_says_so_when_our_numbers_disagree(tmp_path):
    # BN worse in every seed and its sigmoid input drifting more: those verdicts flip.
    bn = [[0.1] * 3, [0.3] * 3, [0.5] * 3, [0.85, 0.80, 0.82]]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"experiment": "figure1", "config": {**CONFIG, "data": None, "steps": 300,
                    "batch_size": 60, "momentum": 0.9, "lr": 0.01, "init_std": 0.01,
                    "seeds": 3, "eval_every": 100, "population_batches": 3,
                    "preset": "quick"}})
    )  # fmt: skip
    records = _records(BASE3, bn, drift=(0.1, 2.0))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_report(run)
    assert summary["bn_higher_final_acc_every_seed"] is False
    md = (run / "report.md").read_text()
    # final accuracy and stability: intervals on the other side of no effect
    assert md.count("**does not agree") == 2
    verdicts = _by_title(summary)
    assert verdicts["BN trains faster"]["status"] == "not measurable"  # BN never reached 90%
    # learning from the start (100 > 5% of 300 steps) in no seed: 0 of 3
    start = verdicts["Both networks learn from the start (Figure 1a)"]
    assert start["status"] == "inconclusive" and "excludes the paper's 100.00%" in start["why"]
    assert "without BN the network stays near chance" in md
    # a quick-preset run says near the top that it is a smoke test
    assert md.index("**Smoke test") < md.index("![Figure 1]") and "--preset cpu" in md
    assert md.count("(smoke test)**") == len(summary["verdicts"])
    assert "packaged MNIST subset" in md  # the data used is always stated
    html = (run / "report.html").read_text()
    # self-contained: the figure is embedded, nothing is fetched from elsewhere
    assert "data:image/png;base64," in html
    links = re.findall(r"""(?:src|href)=["']([^"']*)""", html)
    assert links and all(u.startswith("data:") for u in links)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_report_refuses_incomplete_records(tmp_path):
    with pytest.raises(ReportError, match="no config.json"):
        build_report(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "figure1", "config": {}}))
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records(BASE, BN) if r["arm"] == "baseline")
    )
    with pytest.raises(ReportError, match="no evaluation records for arm 'bn'"):
        build_report(tmp_path)


def check_report_markdown(md: str) -> None:
    """What every report.md rendered from its template must look like: a title, no
    template syntax left, no runs of blank lines, one final newline, tables whose rows
    have as many cells as their header, and no citation of documents users do not have."""
    assert md.startswith("# ") and md.endswith("\n") and not md.endswith("\n\n"), md[-200:]
    assert "\n\n\n" not in md
    for residue in ("{{", "}}", "{%", "%}", "{#", "#}"):
        assert residue not in md, residue
    for internal in ("PAPER.md", "the review", "review's", "the issue"):
        assert internal not in md, internal
    lines = md.split("\n")
    for k, line in enumerate(lines):
        if line.startswith("|") and (k == 0 or not lines[k - 1].startswith("|")):
            header = line.strip("| ").split(" | ")
            assert lines[k + 1] == "|" + "---|" * len(header), (line, lines[k + 1])
            for row in lines[k + 2 :]:
                if not row.startswith("|"):
                    break
                assert len(row.strip("| ").split(" | ")) == len(header), (line, row)


def test_every_report_renders_from_its_template_strictly():
    names = sorted(p.name for p in TEMPLATES.glob("*.j2") if not p.name.startswith("_"))
    assert names == sorted(REPORTS)  # one template per report, none left over
    for name, module in REPORTS.items():
        assert f'"{name}"' in Path(module.__file__).read_text(), name  # the module renders it
        # StrictUndefined: a name the context lacks is an error, never an empty string
        with pytest.raises(jinja2.UndefinedError):
            render_template(name)
        with pytest.raises(jinja2.UndefinedError):
            render_template(name, summary={}, config={"preset": "cpu"}, env={})


def test_report_md_of_a_tiny_run_is_its_template_filled_in(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {**CONFIG, "data": None, "steps": 300, "batch_size": 60, "momentum": 0.9,
              "lr": 0.01, "init_std": 0.01, "seeds": 3, "eval_every": 100,
              "population_batches": 3, "preset": "cpu"}  # fmt: skip
    (run / "config.json").write_text(json.dumps({"experiment": "figure1", "config": config}))
    records = _records(BASE3, BN3)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_report(run)
    md = (run / "report.md").read_text()
    check_report_markdown(md)
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings == [
        "# Figure 1 reproduction (Section 4.1): MNIST with and without Batch Normalization",
        "## What was run",
        "## Our numbers",
        "## Beside the paper",
    ]
    assert "**Smoke test" not in md and "**Diverged" not in md  # the cpu preset, no divergence
    # the numbers are the summary's, formatted by report.stats
    base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
    row = (
        "| final test accuracy (moving-average BN statistics) | "
        f"{fmt_pct(base['final_test_acc'])} | {fmt_pct(bn['final_test_acc'])} |"
    )
    assert row in md
    for thr in CONFIG["thresholds"]:
        steps = bn["steps_to_threshold"][str(thr)]
        assert f"| steps to {100 * thr:.0f}% test accuracy (per seed) | " in md
        assert f"| {fmt_steps(steps)} |" in md
    assert "- **Training:** 300 steps, mini-batches of 60, SGD with momentum 0.9" in md
    assert md.count("\n| ") >= 3 + len(summary["verdicts"])
    assert md.endswith("for that.\n")  # the packaged-data note closes it
