"""`bnlab reproduce paper`: one registry, the forecast before training, every experiment,
the claims, one index.html; resumable; progress bars on a terminal."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.experiments import batch_noise, dropout, figure1
from bnlab.experiments.estimate import estimate
from bnlab.experiments.protocol import DEFAULT_PRESET, PRESET_NAMES, config_from
from bnlab.lab import EXPERIMENTS, Experiment, build_report
from bnlab.report.claims import CLAIMS

TINY = {
    dropout: {"steps": 30, "eval_every": 15, "checkpoint_every": 15, "seeds": 2,
              "train_eval_examples": 100},
    batch_noise: {"steps": 30, "eval_every": 15, "checkpoint_every": 15, "seeds": 2,
                  "draws": 5, "population_examples": 300},
}  # fmt: skip


def test_one_registry_one_protocol():
    """Every experiment: the same preset names and default, a Config with a preset, help
    for every option, a report module, and only claim ids the claims table knows."""
    known = {c[0] for c in CLAIMS}
    for name, exp in EXPERIMENTS.items():
        assert exp.name == name
        assert tuple(exp.run.PRESETS)[:3] == PRESET_NAMES, name  # (inception adds long)
        fields = {f.name for f in dataclasses.fields(exp.run.Config)}
        assert "preset" in fields and "preset" in exp.run.Config.IDENTITY, name
        assert exp.run.Config().preset == DEFAULT_PRESET, name
        missing = fields - set(exp.run.HELP) - {"preset"}
        assert not missing, f"{name}: options without help: {missing}"
        for preset in PRESET_NAMES:
            assert config_from(exp.run, preset).preset == preset
        assert hasattr(exp.report, "build_report") and exp.report.FILES
        assert set(exp.claims) <= known, name
    with pytest.raises(ValueError, match="--preset must be one of"):
        config_from(figure1, "full")
    with pytest.raises(ValueError, match="unknown options"):
        config_from(figure1, "quick", stepz=3)


def test_experiment_records_travel_to_worker_processes_by_name():
    import pickle

    exp = pickle.loads(pickle.dumps(EXPERIMENTS["figure1"]))
    assert exp == EXPERIMENTS["figure1"] and exp.run is figure1
    assert isinstance(exp, Experiment)


def test_estimate_times_every_arm_and_restores_threads():
    cfg = config_from(figure1, "quick", steps=200, eval_every=100, seeds=1)
    threads = torch.get_num_threads()
    for workers in (1, 2):  # in this process, and in a pool as the run would
        est = estimate(EXPERIMENTS["figure1"], cfg, workers=workers, steps=2)
        assert torch.get_num_threads() == threads
        assert [a.arm for a in est.arms] == ["baseline", "bn"]
        if workers > 1:  # a fresh worker per arm: Python, torch, data, build, first step
            assert est.cold_start_seconds > max(a.build_seconds for a in est.arms)
        else:  # the arms train in this process
            assert est.cold_start_seconds == 0
        for a in est.arms:
            assert a.steps == 200 and a.evals == 3 and a.step_seconds > 0 and a.eval_seconds > 0
            assert a.final_seconds > 0  # figure1's final population statistics and test
            # (timed on the first arm, scaled by evaluation time for the others)
            start = est.cold_start_seconds or a.build_seconds + a.step_seconds + a.eval_seconds
            assert a.seconds == pytest.approx(
                start + 199 * a.step_seconds + 2 * a.eval_seconds + a.final_seconds
            )
        assert est.workers == workers
        total = sum if workers == 1 else max
        assert est.seconds == pytest.approx(total(a.seconds for a in est.arms))


@pytest.fixture
def tiny_quick(monkeypatch):
    for module, values in TINY.items():
        monkeypatch.setitem(module.PRESETS, "quick", {**module.PRESETS["quick"], **values})


@pytest.mark.slow
def test_paper_runs_forecasts_links_and_resumes(tiny_quick, tmp_path, capsys):
    out = tmp_path / "paper"
    args = ["reproduce", "paper", "--preset", "quick", "--only", "dropout,batch-noise",
            "--workers", "2", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([a for a in args if a != "--quiet"] + ["--estimate-only"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"dropout: about +\d", printed) and re.search(r"total: about", printed)
    assert not out.exists()  # a forecast writes nothing
    assert main(args) == 0
    record = json.loads((out / "paper.json").read_text())
    assert record["preset"] == "quick"
    assert all(record["experiments"][n]["measured_seconds"] > 0 for n in ("dropout", "batch-noise"))
    index = (out / "index.html").read_text()
    assert "Smoke test" in index
    for key in ("dropout", "batch_noise"):
        assert (out / key / "report.html").is_file()
        assert f'href="{key}/report.html"' in index
    assert 'href="claims/claims.html"' in index and (out / "claims" / "claims.html").is_file()
    claims = json.loads((out / "claims" / "claims.json").read_text())
    dropout_rows = [r for c in claims["claims"] if c["id"] == "dropout" for r in c["rows"]]
    assert dropout_rows and all(r["smoke"] for r in dropout_rows)
    # Resumed: nothing retrains, the page is rebuilt.
    summary = (out / "dropout" / "summary.json").stat().st_mtime_ns
    assert main([*args[:-3], "--out", str(out), "--resume"]) == 0
    assert (out / "dropout" / "summary.json").stat().st_mtime_ns == summary
    # A second run into the same folder without --resume is refused.
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_paper_refuses_missing_cifar_before_any_output(tmp_path, capsys):
    out = tmp_path / "paper"
    code = main(["reproduce", "paper", "--preset", "cpu", "--only", "inception",
                 "--cifar10", str(tmp_path / "nope"), "--out", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "bnlab data download cifar10" in err and "--preset quick" in err
    assert not out.exists()


def test_report_of_any_experiment_rebuilds_through_the_registry(tmp_path):
    cfg = config_from(dropout, "quick", **TINY[dropout])
    from bnlab.experiments.runner import run_experiment

    out = tmp_path / "run"
    run_experiment(EXPERIMENTS["dropout"], cfg, out, workers=1, progress=False, log=lambda *a: 0)
    assert build_report(out)["verdicts"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bars_with_eta_on_a_terminal(tmp_path):
    """Under a pseudo-terminal every arm shows a bar with its rate and ETA while training."""
    exe = Path(sys.executable).with_name("bnlab")
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: bnlab on the terminal's other end
        os.execv(
            str(exe),
            [str(exe), "reproduce", "figure1", "--preset", "quick", "--steps", "3000",
             "--seeds", "1", "--eval-every", "1000", "--out", str(out)],
        )  # fmt: skip
    text, deadline = b"", time.time() + 240
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                text += chunk
            if re.search(rb"baseline.*\d+/3000 \[.*<\d", text) and re.search(
                rb"bn.*\d+/3000 \[.*<\d", text
            ):
                break
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
        subprocess.run(["pkill", "-f", str(out)], check=False)
    decoded = text.decode(errors="replace")
    assert re.search(r"baseline.*\d+/3000 \[.*<\d", decoded), decoded[-2000:]
    assert re.search(r"bn.*\d+/3000 \[.*<\d", decoded), decoded[-2000:]
