"""Section 4.2 experiment: network definitions, batch order, ensemble, a tiny end-to-end run."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.experiments.inception import (
    NETWORKS,
    PRESETS,
    Config,
    config_for,
    ensemble_metrics,
    settings,
    validate,
)
from bnlab.train.schedule import BatchSchedule


def test_networks_follow_section_4_2_1_and_4_2_2():
    cfg = Config(base_lr=0.01, weight_decay=5e-4, decay=0.5)
    s = {name: settings(name, cfg) for name in NETWORKS}
    base = s["inception"]
    assert not base["bn"] and base["dropout"] == 0.4 and base["lrn"]
    assert base["lr"] == 0.01 and base["weight_decay"] == 5e-4 and base["shuffle"] == "shard"
    assert base["final_lr"] == pytest.approx(0.005)  # decays by `decay` over the run
    assert base["augment"].startswith("standard")
    # bn-baseline: the same network with BN before every nonlinearity, nothing else changed
    assert s["bn-baseline"]["bn"]
    for key in ("lr", "weight_decay", "dropout", "lrn", "shuffle", "augment", "activation"):
        assert s["bn-baseline"][key] == base[key], key
    # bn-x5: every change of Section 4.2.1
    x5 = s["bn-x5"]
    assert x5["bn"] and x5["lr"] == pytest.approx(5 * 0.01) and x5["dropout"] == 0
    assert x5["weight_decay"] == pytest.approx(5e-4 / 5) and not x5["lrn"]
    assert x5["final_lr"] == pytest.approx(0.05 * 0.5**6)  # decay 6x faster
    assert x5["shuffle"] == "epoch" and x5["augment"].startswith("light")
    assert s["bn-x30"]["lr"] == pytest.approx(30 * 0.01)
    for key in ("weight_decay", "dropout", "lrn", "shuffle", "augment", "bn"):
        assert s["bn-x30"][key] == x5[key] and s["bn-x5-sigmoid"][key] == x5[key], key
    assert s["bn-x5-sigmoid"]["activation"] == "sigmoid" and x5["activation"] == "relu"
    # controls: no BN at x5; no BN with sigmoid
    assert not s["inception-x5"]["bn"] and s["inception-x5"]["lr"] == pytest.approx(0.05)
    assert s["inception-x5"]["may_diverge"]
    assert not s["inception-sigmoid"]["bn"] and s["inception-sigmoid"]["activation"] == "sigmoid"
    # ensemble variants: bn-x30 with larger initial weights / light dropout
    assert s["bn-x30-init"]["init_gain"] > 1 and s["bn-x30-init"]["lr"] == s["bn-x30"]["lr"]
    assert 0.05 <= s["bn-x30-dropout"]["dropout"] <= 0.1
    # parameters: BN adds gamma/beta and drops biases, same count for every BN-ReLU net
    assert s["bn-x5"]["params_per_copy"] == s["bn-x30"]["params_per_copy"]


def test_presets_and_validation():
    assert all(config_for(p).batch_size == 32 for p in PRESETS)  # the paper's batch
    assert config_for("cpu").data == "data/cifar10" and config_for("quick").data is None
    validate(config_for("quick"))
    for bad in (
        dict(networks=["nope"]),
        dict(base_lr=math.inf),
        dict(base_lr=math.nan),
        dict(batch_size=1),
        dict(decay=0.0),
        dict(steps=0),
        dict(bn_steps=-1),
        dict(steps=100, bn_steps=101),
    ):
        with pytest.raises(ValueError):
            validate(config_for("quick", **bad))


def test_shard_shuffle_keeps_shards_and_reshuffles_within():
    n, b = 100, 10
    sched = BatchSchedule(n, b, [0], shuffle="shard", shards=4)
    epoch0 = torch.cat([sched.indices(k)[:, 0] for k in range(10)])
    epoch1 = torch.cat([sched.indices(10 + k)[:, 0] for k in range(10)])
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    for a, c in zip(epoch0.split(25), epoch1.split(25)):  # the same 4 shards, in order
        assert set(a.tolist()) == set(c.tolist())
    full = BatchSchedule(n, b, [0], shuffle="epoch")
    e0 = torch.cat([full.indices(k)[:, 0] for k in range(10)])
    e1 = torch.cat([full.indices(10 + k)[:, 0] for k in range(10)])
    assert set(e0[:25].tolist()) != set(e1[:25].tolist())  # a full reshuffle crosses shards
    with pytest.raises(ValueError):
        BatchSchedule(n, b, [0], shuffle="sometimes")


def test_process_slices_of_a_batch_join_to_the_whole_batch(tmp_path):
    """Distortions are drawn per global batch, so data-parallel slices see the images
    a single process sees (the basis of torchrun runs matching one process)."""
    from bnlab.distributed import DistInfo
    from bnlab.experiments.inception import build_job

    job = build_job("inception", config_for("quick"), DistInfo(), tmp_path)
    x, y = job.batch(3, slice(0, 32))
    assert x.shape == (32, 6, 32, 32) and y.shape == (32, 2)
    a, ya = job.batch(3, slice(0, 16))
    b, yb = job.batch(3, slice(16, 32))
    assert torch.equal(x, torch.cat([a, b])) and torch.equal(y, torch.cat([ya, yb]))
    assert not torch.equal(x, job.batch(4, slice(0, 32))[0])


def test_bn_steps_stop_the_bn_networks_early_on_the_full_runs_schedule(tmp_path):
    """--bn-steps cuts the BN networks to the start of the full run: the same learning
    rate at every step they train; Inception trains all --steps."""
    from bnlab.distributed import DistInfo
    from bnlab.experiments.inception import build_job

    full = config_for("quick", steps=200)
    cut = config_for("quick", steps=200, bn_steps=60)
    for name in ("bn-x5", "bn-baseline"):
        a, b = (build_job(name, c, DistInfo(), tmp_path) for c in (full, cut))
        assert (a.steps, b.steps) == (200, 60)
        assert [b.lr_at(t) for t in range(60)] == [a.lr_at(t) for t in range(60)]
        assert b.lr_at(59) < b.lr_at(0)  # the decay is the 200-step run's
    assert build_job("inception", cut, DistInfo(), tmp_path).steps == 200
    assert config_for("long").bn_steps < config_for("long").steps


def test_ensemble_averages_member_probabilities():
    y = torch.tensor([0, 1, 2])
    # member A is right on 0 and 1; member B on 2 only; averaged, all three are right
    a = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.4, 0.1]])
    b = torch.tensor([[0.4, 0.5, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]])
    e = ensemble_metrics([a, b], y)
    assert e["member_top1"] == pytest.approx([2 / 3, 1 / 3])
    # mean: [0.5, 0.4, 0.1], [0.25, 0.4, 0.35], [0.3, 0.3, 0.4] -> 0, 1, 2
    assert e["ensemble_top1"] == pytest.approx(1.0)
    assert e["ensemble_top5"] == pytest.approx(1.0)  # only 3 classes: always in the top 5


@pytest.mark.slow
def test_tiny_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    args = ["reproduce", "inception", "--preset", "quick", "--steps", "6", "--eval-every", "3",
            "--eval-examples", "64", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "figure2.png",
                 "report.md", "report.html"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["arm"] for r in evals} == set(NETWORKS)
    assert sorted({r["step"] for r in evals}) == [0, 3, 6]
    assert {r["arm"] for r in records if r["kind"] == "settings"} == set(NETWORKS)
    ensemble = [r for r in records if r["kind"] == "ensemble"]
    assert len(ensemble) == 1 and len(ensemble[0]["members"]) == 4  # 2 bn-x30 seeds + 2
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["networks"]) == set(NETWORKS)
    assert summary["networks"]["bn-x5"]["seeds"] == 2
    assert summary["networks"]["inception-x5"]["seeds"] == 1
    assert "NOT CIFAR-10" in summary["data"]
    md = (out / "report.md").read_text()
    assert "## Claims" in md and "Figure 3" in md and "ensemble" in md
    # every heading stands apart from the paragraph before it (the plateau paragraph
    # once ran into "## Section 4.2.3")
    assert "Plateau rule" in md and not re.search(r"[^\n]\n#", md)
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # the report rebuilds from the records alone
    (out / "figure2.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "figure2.png").stat().st_size > 10_000


SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.mark.cuda
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"CIFAR-10 not found at {SHARED_CIFAR}")
def test_gpu_preset_runs_on_cuda(tmp_path):
    """The gpu preset's code path on a CUDA device, cut to a few steps."""
    out = tmp_path / "run"
    args = ["reproduce", "inception", "--preset", "gpu", "--data", str(SHARED_CIFAR),
            "--networks", "inception,bn-x5,bn-x30,bn-x30-init", "--steps", "20",
            "--eval-every", "10", "--eval-examples", "500", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["networks"]["bn-x5"]["seeds"] == 3
    assert json.loads((out / "env.json").read_text())["cuda"]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    """Under torchrun each network trains data-parallel (DDP + SyncBatchNorm over the
    seeds' stacked channels) and logs what one process logs, up to float32 rounding."""
    import os
    import subprocess
    import sys

    # Networks without dropout: its masks differ between one and two processes.
    args = ["reproduce", "inception", "--preset", "quick", "--networks", "bn-x5,bn-x30",
            "--steps", "8", "--eval-every", "4", "--eval-examples", "200", "--quiet"]  # fmt: skip
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "bnlab.cli", *args, "--out", str(ddp)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def evals(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "eval"]

    a, b = evals(ddp), evals(single)
    assert [(r["arm"], r["step"]) for r in a] == [(r["arm"], r["step"]) for r in b]
    for x, y in zip(a, b):
        if x["train_loss"] is not None:
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-3)
        assert x["test_acc"] == pytest.approx(y["test_acc"], abs=0.02)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    """kill -9 in the middle, then --resume: the same records as one uninterrupted run
    (dropout, distortions and batch order are functions of the step)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("bnlab")
    args = [str(exe), "reproduce", "inception", "--preset", "quick",
            "--networks", "inception,bn-baseline", "--steps", "120", "--eval-every", "20",
            "--checkpoint-every", "40", "--eval-examples", "200", "--quiet"]  # fmt: skip
    ref = tmp_path / "ref"
    assert subprocess.run([*args, "--out", str(ref)], timeout=600).returncode == 0
    run = tmp_path / "run"
    p = subprocess.Popen([*args, "--out", str(run)], start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not all(
        (run / "work" / f"{n}.pt").exists() for n in ("inception", "bn-baseline")
    ):
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers, mid-run
    p.wait()
    assert not (run / "metrics.jsonl").exists()
    assert subprocess.run([*args, "--resume", "--out", str(run)], timeout=600).returncode == 0

    def records(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] in ("eval", "final")]

    assert records(run) == records(ref)


def _evals(arm: str, steps: list[int], acc: list[list[float]]) -> list[dict]:
    """Evaluation records of ``arm``: ``acc[s][t]`` is seed s's accuracy at steps[t]."""
    return [
        {
            "kind": "eval",
            "arm": arm,
            "step": step,
            "train_loss": [1.0] * len(acc),
            "test_acc": [seed[t] for seed in acc],
        }  # fmt: skip
        for t, step in enumerate(steps)
    ]


def test_plateau_rule_and_what_the_verdicts_say_when_inception_still_rises():
    from bnlab.report.inception import plateau, summarize

    steps = list(range(0, 8001, 1000))  # the last quarter: after step 6,000
    flat = [0.1, 0.3, 0.5, 0.6, 0.62, 0.63, 0.64, 0.644, 0.643]  # +0.4 pp: plateaued
    rising = [0.1, 0.3, 0.5, 0.6, 0.62, 0.63, 0.64, 0.645, 0.646]  # +0.6 pp: not
    p = plateau(steps, [[a, b] for a, b in zip(flat, flat)])
    assert p["plateaued"] and p["after_step"] == 6000
    assert p["rise"] == pytest.approx([0.004, 0.004])
    # every seed must have plateaued: one still rising is enough to say it has not
    p = plateau(steps, [[a, b] for a, b in zip(flat, rising)])
    assert not p["plateaued"] and p["rise"] == pytest.approx([0.004, 0.006])
    assert not plateau([0, 100], [[0.1], [0.2]])["plateaued"]  # nothing before the cut

    bn = [0.1, 0.6, 0.7, 0.72, 0.73, 0.73, 0.74, 0.74, 0.74]
    for preset, advice in (
        ("cpu", "run --preset long (3.2x the cpu preset's steps) or train Inception longer"),
        ("long", "train Inception longer (more --steps)"),
    ):
        config = {"networks": ["inception", "bn-x5"], "preset": preset, "seeds": 3,
                  "steps": 8000}  # fmt: skip
        records = _evals("inception", steps, [flat, rising, flat]) + _evals(
            "bn-x5", steps, [bn, bn, bn]
        )
        s = summarize(records, config)
        assert not s["plateau"]["plateaued"]
        (v,) = [v for v in s["verdicts"] if v["title"].startswith("bn-x5 reaches")]
        assert v["status"] == "inconclusive"
        assert "Inception had not plateaued" in v["why"] and "+0.6 pp" in v["why"]
        assert advice in v["why"]
        # the same Inception plateaued: the speed-up is judged on its numbers alone
        s = summarize(
            _evals("inception", steps, [flat] * 3) + _evals("bn-x5", steps, [bn] * 3), config
        )
        assert s["plateau"]["plateaued"]
        (v,) = [v for v in s["verdicts"] if v["title"].startswith("bn-x5 reaches")]
        assert "plateau" not in v["why"]
