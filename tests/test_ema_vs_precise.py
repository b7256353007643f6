"""Precise BN statistics in the training loop (TrainJob.precise_bn) and `ema-vs-precise`."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab import recompute_population_stats
from bnlab.cli import main
from bnlab.experiments import ema_vs_precise
from bnlab.lab import EXPERIMENTS
from bnlab.run_folder import read_jsonl
from bnlab.train.loop import TrainJob, make_sgd, train


def _job(precise_bn=0, steps=40, fail_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=False), bnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    x_test = torch.randn(50, 5, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    y_test = x_test[:, :3].argmax(1)
    failed = []

    def batch(step, rows):
        if step == fail_at and not failed:  # a crash after the step-20 checkpoint, once
            failed.append(step)
            raise RuntimeError("killed")
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64) * 2 + 1
        return x[rows], x[rows, :3].argmax(1)

    def evaluate(m):
        out = m(x_test)
        return {
            "test_acc": [(out.argmax(1) == y_test).double().mean().item()],
            "test_loss": [F.cross_entropy(out, y_test).item()],
        }

    return TrainJob(
        name="arm",
        model=model,
        optimizer=make_sgd(model, lr=0.5, momentum=0.9),
        steps=steps,
        batch_size=16,
        copies=1,
        batch=batch,
        loss=lambda out, y: F.cross_entropy(out, y, reduction="sum").view(1),
        evaluate=evaluate,
        eval_every=10,
        checkpoint_every=20,
        precise_bn=precise_bn,
    )


def _evals(path):
    return [r for r in read_jsonl(path) if r["kind"] == "eval"]


def test_precise_bn_adds_a_second_evaluation_and_leaves_training_alone(tmp_path):
    plain, precise = _job(), _job(precise_bn=3)
    train(plain, tmp_path / "plain", progress=False)
    result = train(precise, tmp_path / "precise", progress=False)
    a, b = _evals(tmp_path / "plain" / "arm.jsonl"), _evals(tmp_path / "precise" / "arm.jsonl")
    assert [r["step"] for r in b] == [0, 10, 20, 30, 40]
    for ra, rb in zip(a, b):  # the EMA evaluation and the trajectory are unchanged
        assert rb == {**ra, "precise_test_acc": rb["precise_test_acc"],
                      "precise_test_loss": rb["precise_test_loss"]}  # fmt: skip
    for pa, pb in zip(plain.model.parameters(), precise.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # early on the EMA still holds the initial (0, 1): precise statistics differ from it
    assert b[1]["precise_test_loss"] != b[1]["test_loss"]
    # the final model keeps the precise statistics: Algorithm 2 on batches 40, 41, 42
    bn = result.model[1]
    ref = _job(precise_bn=3)
    ref.model.load_state_dict(result.model.state_dict())
    recompute_population_stats(ref.model, [ref.batch(40 + i, slice(None)) for i in range(3)])
    torch.testing.assert_close(bn.running_mean, ref.model[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref.model[1].running_var, rtol=0, atol=0)
    assert not torch.equal(bn.running_var, plain.model[1].running_var)
    assert bn.num_batches_tracked.item() == plain.model[1].num_batches_tracked.item() == 40


def test_resumed_run_with_precise_bn_equals_an_uninterrupted_one(tmp_path):
    full = _job(precise_bn=2)
    train(full, tmp_path / "full", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        train(_job(precise_bn=2, fail_at=25), tmp_path / "part", progress=False)
    ckpt = torch.load(tmp_path / "part" / "arm.pt", weights_only=True)
    assert ckpt["step"] == 20 and not ckpt.get("done")
    # the checkpoint holds the EMA statistics (those of a run without precise BN)
    with pytest.raises(RuntimeError, match="killed"):
        train(_job(fail_at=25), tmp_path / "ema", progress=False)
    ema_ckpt = torch.load(tmp_path / "ema" / "arm.pt", weights_only=True)
    torch.testing.assert_close(ckpt["model"], ema_ckpt["model"], rtol=0, atol=0)
    resumed = _job(precise_bn=2)
    train(resumed, tmp_path / "part", resume=True, progress=False)
    assert read_jsonl(tmp_path / "part" / "arm.jsonl") == read_jsonl(
        tmp_path / "full" / "arm.jsonl"
    )
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_precise_bn_must_be_a_count():
    for bad in (-1, 1.5, True):
        job = _job()
        job.precise_bn = bad
        with pytest.raises(ValueError, match="precise_bn must be a number of batches"):
            train(job, None, progress=False)


def test_experiment_protocol_and_validation():
    exp = EXPERIMENTS["ema-vs-precise"]
    assert exp.key == "ema_vs_precise" and exp.claims == ()
    cfg = exp.config("quick")
    ema_vs_precise.validate(cfg)
    assert ema_vs_precise.arms(cfg) == ["batch32", "batch512"]
    assert ema_vs_precise.parse_arm(ema_vs_precise.arm_name(96)) == 96
    assert ema_vs_precise.lr_for(cfg, 512) == pytest.approx(16 * cfg.lr)
    assert ema_vs_precise.precise_batches(cfg, 512) == 2
    assert ema_vs_precise.steps_for(cfg, 512, 4000) == 21  # 3 epochs of 7 batches
    for field, value, phrase in [
        ("batch_sizes", [32], "at least two different sizes"),
        ("batch_sizes", [32, 1], "at least two different sizes"),
        ("epochs", 0.0, "--epochs"),
        ("bn_momentum", 0.0, "--bn-momentum"),
        ("precise_bn", 1, "--precise-bn"),
        ("init", "xavier", "--init"),
    ]:
        with pytest.raises(ValueError, match=phrase):
            ema_vs_precise.validate(exp.config("quick", **{field: value}))


def test_tiny_run_writes_the_report_with_verdicts(tmp_path):
    out = tmp_path / "run"
    args = ["--batch-sizes", "8,128", "--epochs", "0.1", "--evals", "2", "--seeds", "2",
            "--precise-bn", "128", "--workers", "1", "--quiet"]  # fmt: skip
    assert main(["reproduce", "ema-vs-precise", *args, "--out", str(out)]) == 0
    for name in ema_vs_precise_files():
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)
    assert s["batch_sizes"] == [8, 128]
    arm = s["arms"]["8"]
    assert arm["steps"] == 50 and arm["precise_batches"] == 16
    assert len(arm["curves"]["precise_test_acc"]) == len(arm["curves"]["steps"]) == 3
    assert all(v["claim"] is None for v in s["verdicts"]) and len(s["verdicts"]) == 4
    assert (
        "EMA falls further behind at batch 128 than at batch 8" in (out / "report.md").read_text()
    )


def ema_vs_precise_files():
    return EXPERIMENTS["ema-vs-precise"].report.FILES
