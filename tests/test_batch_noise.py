"""`bnlab reproduce batch-noise`: the sampling formulas, the probe, and a run end to end."""

import json
import math

import numpy as np
import pytest
import torch

from bnlab.cli import main
from bnlab.distributed import DistInfo
from bnlab.experiments import batch_noise as bn
from bnlab.report.batch_noise import interval_shift
from bnlab.train.loop import train

# the quick preset, shortened: the test needs every record and file, not a converged run
QUICK = ["reproduce", "batch-noise", "--preset", "quick", "--steps", "100"]


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("m", [4, 50])
def test_batch_statistics_follow_the_sampling_formulas(kind, m):
    gen = torch.Generator().manual_seed(1)
    n, c, k, sigma = 200_000, 8, 4_000, 2.0
    if kind == "gaussian":
        x = 3.0 + sigma * torch.randn(n, c, generator=gen, dtype=torch.float64)
        kurtosis = 3.0
    else:  # uniform on [-a, a] with a = sigma sqrt(3): mu_4 = 1.8 sigma^4
        x = 3.0 + sigma * math.sqrt(3) * (
            2 * torch.rand(n, c, generator=gen, dtype=torch.float64) - 1
        )
        kurtosis = 1.8
    idx = torch.randint(n, (k, m), generator=gen)
    st = bn.batch_stat_noise(x, x[idx], idx, eps=0.0)

    var_mu = sigma**2 / m  # Var(mu_B) = sigma^2 / m
    var_var_exact = (m - 1) ** 2 / m**3 * (kurtosis - (m - 3) / (m - 1)) * sigma**4
    assert st["pred_var_mu"] == pytest.approx(
        torch.full((c,), var_mu, dtype=torch.float64), rel=0.02
    )
    assert st["pred_var_var"] == pytest.approx(
        torch.full((c,), var_var_exact, dtype=torch.float64), rel=0.04
    )
    # Observed across K batches: within a few standard errors (each unit: ~2-4%).
    assert (st["var_mu"] / var_mu).mean().item() == pytest.approx(1.0, abs=0.03)
    assert (st["var_var"] / var_var_exact).mean().item() == pytest.approx(1.0, abs=0.04)
    assert ((st["var_mu"] / st["pred_var_mu"]) - 1).abs().max() < 0.1
    assert ((st["var_var"] / st["pred_var_var"]) - 1).abs().max() < 0.12
    if m == 50:  # the large-m form (mu_4 - sigma^4) / m, = 2 sigma^4 / m for a Gaussian
        assert (st["var_var"] / ((kurtosis - 1) * sigma**4 / m)).mean().item() == pytest.approx(
            1.0, abs=0.06
        )
        # The noise BN injects: about (1 + (kurtosis - 1) / 4) / m for independent rows.
        assert st["noise_own"].mean().item() == pytest.approx((1 + (kurtosis - 1) / 4) / m, rel=0.1)
    # The batches are the population's rows: the i.i.d. and observed measures coincide.
    assert torch.equal(st["iid_var_mu"], st["var_mu"])
    assert torch.equal(st["noise_total"], st["noise_own"])
    assert st["kurtosis"].mean().item() == pytest.approx(kurtosis, rel=0.03)


def test_predicted_variance_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        bn.predicted_stat_variances(torch.ones(1), torch.ones(1), 1)


def test_stale_normalization_shift_is_the_mean_squared_change_of_x_hat():
    one = torch.ones(3, dtype=torch.float64)
    mean, var = (
        torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64),
        torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64),
    )
    assert torch.equal(bn.stale_normalization_shift(mean, var, mean, var, 0.0), 0 * one)
    # A mean shifted by 0.1 sigma leaves 0.01.
    moved = bn.stale_normalization_shift(mean, var, mean + 0.1 * var.sqrt(), var, 0.0)
    assert moved == pytest.approx(0.01 * one)
    # Monte Carlo: x from the new distribution, normalized with stale and with new statistics.
    new_mean, new_var, eps = mean + 0.3, var * 1.7, 1e-3
    z = torch.randn(400_000, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = new_mean + new_var.sqrt() * z
    direct = ((x - mean) / (var + eps).sqrt() - (x - new_mean) / (new_var + eps).sqrt()).pow(2)
    formula = bn.stale_normalization_shift(mean, var, new_mean, new_var, eps)
    assert direct.mean(0) == pytest.approx(formula, rel=0.01)
    # The report's copy (records only, numpy) agrees.
    report = interval_shift(*(t.numpy() for t in (mean, var, new_mean, new_var)), eps)
    np.testing.assert_allclose(report, formula.numpy(), rtol=1e-12)


def _tiny_job(steps: int = 3):
    cfg = bn.Config(
        steps=steps, seeds=2, batch_sizes=[8], eval_every=1, draws=4, population_examples=64
    )
    bn.validate(cfg)
    return bn.build_job(bn.arm_name(8), cfg, DistInfo(), None)


def _state(job):
    return (
        {k: v.clone() for k, v in job.model.state_dict().items()},
        json.dumps(str(job.optimizer.state_dict()["param_groups"])),
        [
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for s in job.optimizer.state.values()
        ],
        torch.get_rng_state(),
    )


def _same(a, b) -> bool:
    models = a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    opt = a[1] == b[1] and len(a[2]) == len(b[2])
    for sa, sb in zip(a[2], b[2]):
        opt = opt and all(
            torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa
        )
    return models and opt and torch.equal(a[3], b[3])


def test_probe_changes_nothing_and_is_a_function_of_the_step():
    job = _tiny_job()
    train(job, None, progress=False)  # momentum buffers exist; BN has running statistics
    job.model.train()
    before = _state(job)
    first = job.probe(job.model, 3)
    assert _same(before, _state(job))
    assert job.probe(job.model, 3) == first  # same step, same draws: resumable
    assert job.probe(job.model, 4)["noise"] != first["noise"]
    assert len(first["noise"]) == 3  # the three BN layers, in call order
    for layer in first["noise"].values():
        assert {"ratio_mu", "ratio_var", "noise_own", "noise_total", "step_shift"} <= set(layer)
        assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in layer.values())
    for pop in first["population"].values():
        assert len(pop["mean"]) == 2 and len(pop["mean"][0]) == 100  # per copy, per unit


def test_probing_leaves_training_bit_identical():
    with_probe, without = _tiny_job(steps=4), _tiny_job(steps=4)
    without.probe = None
    records = []
    train(with_probe, None, progress=False, on_record=records.append)
    train(without, None, progress=False)
    assert sum("noise" in r for r in records) == 5  # steps 0..4
    for a, b in zip(with_probe.model.state_dict().values(), without.model.state_dict().values()):
        assert torch.equal(a, b)


def test_batch_noise_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main([*QUICK, "--quiet", "--out", str(out)]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "batch_noise.png", "report.md"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)
    assert set(summary["arms"]) == {"bn-m60", "bn-m8"}
    first = summary["arms"]["bn-m60"]["layers"]["BN 1"]
    assert 0.8 < first["ratio_mu"]["mean"] < 1.25  # i.i.d. rows at the first layer
    noise60 = summary["arms"]["bn-m60"]["layers"]["BN 1"]["noise_own"]["mean"]
    noise8 = summary["arms"]["bn-m8"]["layers"]["BN 1"]["noise_own"]["mean"]
    assert noise8 > 4 * noise60  # about 1/m
    report = (out / "report.md").read_text()
    assert "follows the sampling formulas" in report
    assert "small compared with the shift it removes, per training step" in report
    assert "![batch statistics and noise over training](batch_noise.png)" in report
    assert (out / "batch_noise.png").stat().st_size > 10_000


def test_batch_noise_refuses_bad_options(tmp_path, capsys):
    for flag, value, phrase in [
        ("--batch-sizes", "60,1", "--batch-sizes must be integers of at least 2"),
        ("--draws", "1", "--draws must be at least 2"),
    ]:
        out = tmp_path / "run"
        assert (
            main(["reproduce", "batch-noise", "--preset", "quick", flag, value, "--out", str(out)])
            == 2
        )
        assert phrase in capsys.readouterr().err
        assert not out.exists()
