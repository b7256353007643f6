"""The Figure 1 experiment: CLI end to end, outputs, kill-and-resume, report, validation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.experiments.figure1 import BatchSchedule, build_arm_model
from bnlab.experiments.figure1 import Config as Figure1Config
from bnlab.models import mnist_mlp

TINY = [
    "--steps",
    "120",
    "--seeds",
    "2",
    "--eval-every",
    "40",
    "--checkpoint-every",
    "40",
    "--quiet",
]
OUTPUTS = [
    "config.json",
    "env.json",
    "metrics.jsonl",
    "summary.json",
    "figure1.png",
    "report.md",
    "report.html",
]


def _bnlab(*args, **kw):
    exe = Path(sys.executable).with_name("bnlab")
    return subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig1") / "run"
    assert main(["reproduce", "figure1", *TINY, "--out", str(out)]) == 0
    return out


def test_outputs_and_summary_schema(tiny_run):
    for name in OUTPUTS:
        assert (tiny_run / name).stat().st_size > 0, name
    summary = json.loads((tiny_run / "summary.json").read_text())
    for arm in ("baseline", "bn"):
        a = summary["arms"][arm]
        for key in ("final_test_acc", "best_test_acc"):
            assert set(a[key]) >= {"mean", "std", "n", "ci95", "values"}
            assert a[key]["n"] == 2 and 0 <= a[key]["mean"] <= 1
        assert set(a["steps_to_threshold"]) == {"0.9", "0.95", "0.97"}
        assert a["steps_completed"] == 120
    assert "final_test_acc_population_stats" in summary["arms"]["bn"]
    assert isinstance(summary["bn_higher_final_acc_every_seed"], bool)
    assert "packaged MNIST subset" in summary["data"]
    records = _metrics(tiny_run)
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [0, 40, 80, 120]
    assert all(len(r["test_acc"]) == 2 and len(r["p50"]) == 2 for r in evals)
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["experiment"] == "figure1" and config["config"]["steps"] == 120
    html = (tiny_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert "Beside the paper" in (tiny_run / "report.md").read_text()


def test_report_rebuilds_from_records(tiny_run, tmp_path):
    for name in ("figure1.png", "report.html", "summary.json"):
        (tiny_run / name).unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "figure1.png").stat().st_size > 10_000
    assert json.loads((tiny_run / "summary.json").read_text())["arms"]["bn"]
    assert main(["report", str(tmp_path)]) == 2  # not a run folder


def test_out_dir_protection(tiny_run, tmp_path, capsys):
    before = (tiny_run / "metrics.jsonl").read_text()
    assert main(["reproduce", "figure1", *TINY, "--out", str(tiny_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "reproduce",
                "figure1",
                *TINY[:-1],
                "--lr",
                "0.5",
                "--quiet",
                "--resume",
                "--out",
                str(tiny_run),
            ]
        )
        == 2
    )
    assert "another configuration" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text("mine")
    assert main(["reproduce", "figure1", *TINY, "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tiny_run / "metrics.jsonl").read_text() == before
    assert (tmp_path / "other.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--steps", "-5"], "--steps must be at least 1"),
        (["--batch-size", "1"], "at least 2"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--data", "/nonexistent/mnist"], "no such folder"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_option_validation(args, phrase, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "figure1", *args, "--out", str(out), "--quiet"]) == 2
    assert phrase in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_corrupt_checkpoint_is_a_clear_error(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "work" / "bn.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    assert (
        main(["reproduce", "figure1", *TINY, "--workers", "1", "--resume", "--out", str(run)]) == 2
    )
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is damaged" in err and "cannot be trusted" in err
    assert "weights_only=False" not in err  # never suggest the code-executing load
    ckpt.unlink()  # what the message says to do, which then recovers the run
    assert (
        main(["reproduce", "figure1", *TINY, "--workers", "1", "--resume", "--out", str(run)]) == 0
    )


def test_seed_batched_copies_equal_separate_networks():
    """Copy k of the S-seed model trains exactly like the 1-seed model of seed k."""
    torch.manual_seed(0)
    x = torch.rand(16, 784)
    y = torch.randint(0, 10, (16,))
    for arm in ("baseline", "bn"):
        both = build_arm_model(arm, Figure1Config(seeds=2)).double()
        one = build_arm_model(arm, Figure1Config(seeds=1)).double()  # seed 0 only
        xb = torch.cat([x, torch.rand(16, 784)], 1).double()  # copy 1 sees other data
        out_both = both(xb).view(16, 2, 10)[:, 0]
        out_one = one(x.double())
        torch.testing.assert_close(out_both, out_one)
        g_both = torch.autograd.grad(
            torch.nn.functional.cross_entropy(out_both, y), next(both.parameters())
        )[0][0]
        g_one = torch.autograd.grad(
            torch.nn.functional.cross_entropy(out_one, y), next(one.parameters())
        )[0][0]
        torch.testing.assert_close(g_both, g_one)


def test_schedule_is_stateless_and_shared():
    s = BatchSchedule(100, 10, [0, 1])
    first = [s.indices(k) for k in range(25)]
    again = BatchSchedule(100, 10, [0, 1])
    assert torch.equal(again.indices(17), first[17])  # no state needed to resume
    epoch0 = torch.cat([first[k][:, 0] for k in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))  # a permutation per epoch
    assert not torch.equal(first[0][:, 0], first[0][:, 1])  # seeds differ
    assert mnist_mlp(seeds=[3])[0].weight.shape == (1, 100, 784)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    args = [
        "reproduce",
        "figure1",
        "--steps",
        "1500",
        "--seeds",
        "2",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "300",
        "--quiet",
    ]
    ref = tmp_path / "ref"
    p = _bnlab(*args, "--out", str(ref))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    run = tmp_path / "run"
    p = _bnlab(*args, "--out", str(run))
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (run / "work" / "bn.pt").exists() and (run / "work" / "baseline.pt").exists()
    ):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers, mid-run
    p.wait()
    assert not (run / "metrics.jsonl").exists()
    p = _bnlab(*args, "--resume", "--out", str(run))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert _metrics(run) == _metrics(ref)


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    """Under torchrun the arms train data-parallel (DDP + SyncBatchNorm) and give the same
    records as one process, up to float32 reduction order."""
    args = ["reproduce", "figure1", "--steps", "200", "--seeds", "2", "--eval-every", "100",
            "--quiet"]  # fmt: skip
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "bnlab.cli", *args, "--out", str(ddp)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [r for r in _metrics(ddp) if r["kind"] == "eval"]
    b = [r for r in _metrics(single) if r["kind"] == "eval"]
    assert [(r["arm"], r["step"]) for r in a] == [(r["arm"], r["step"]) for r in b]
    for x, y in zip(a, b):
        if x["train_loss"] is not None:
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["test_acc"] == pytest.approx(y["test_acc"], abs=0.003)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_sigterm_to_the_launcher_stops_its_workers(tmp_path):
    """A SIGTERM to `bnlab reproduce` ends its worker processes too, not only itself."""
    out = tmp_path / "run"
    p = _bnlab("reproduce", "figure1", "--steps", "1000000", "--eval-every", "500000",
               "--seeds", "1", "--quiet", "--out", str(out))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "work").glob("*.jsonl"))) < 2:
        time.sleep(0.2)
    workers = _children(p.pid)
    assert len(workers) >= 2, "expected one worker process per arm"
    os.kill(p.pid, signal.SIGTERM)  # the launcher only, as a scheduler or `kill` would
    p.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in alive:  # do not leave them running if the check fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher"


def test_divergence_is_reported_and_fails_the_run(tmp_path, capsys):
    """A learning rate that makes the loss non-finite: the report says where each arm
    diverged, every file is strict JSON, and the exit status is not 0."""
    out = tmp_path / "run"
    args = ["reproduce", "figure1", "--steps", "20", "--eval-every", "10", "--seeds", "1",
            "--lr", "1e30", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 3
    assert "diverged" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"]
    assert "**Diverged:" in (out / "report.md").read_text()
    for name in ("summary.json", "config.json", "env.json"):
        json.loads((out / name).read_text(), parse_constant=pytest.fail)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)
