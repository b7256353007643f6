"""The experiments beyond the paper's figures, end to end on tiny settings."""

import json
import shutil

import pytest

from bnlab.cli import main
from bnlab.experiments import lr_init
from test_report import check_report_markdown  # what every report.md must look like

TINY = ["--steps", "30", "--seeds", "2", "--eval-every", "10", "--quiet"]


def _summary(out):
    return json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)


def test_cell_names_round_trip():
    for norm, lr, init in [("bn", 0.1, 0.01), ("none", 3.0, "glorot"), ("bn", 1e-3, 1.0)]:
        assert lr_init.parse_cell(lr_init.cell_name(norm, lr, init)) == (norm, lr, init)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each experiment, shared by the tests below."""
    root = tmp_path_factory.mktemp("beyond")
    extra = {
        "lr-init": ["--lrs", "0.01,1e30", "--inits", "0.01,glorot"],
        "dropout": [],
        "shift": ["--probe-examples", "50", "--networks", "mlp"],
    }
    for name, args in extra.items():
        assert main(["reproduce", name, *TINY, *args, "--out", str(root / name)]) == 0
    sizes = ["--batch-sizes", "8,2", "--examples", "64", "--evals", "2", "--seeds", "2"]
    assert main(["reproduce", "batch-size", *sizes, "--quiet", "--out", str(root / "bs")]) == 0
    return root


@pytest.mark.slow
def test_lr_init_grid_runs_and_reports_divergence(runs):
    out = runs / "lr-init"
    for name in ("config.json", "metrics.jsonl", "summary.json", "lr_init.png", "report.md"):
        assert (out / name).exists(), name
    s = _summary(out)
    assert set(s["grid"]) == {"none", "bn"}
    assert set(s["grid"]["bn"]) == {"0.01", "glorot"}
    huge = s["grid"]["none"]["0.01"]["1e+30"]  # lr 1e30 without BN: the loss blows up
    assert huge["diverged"] and not huge["trains"]
    assert (
        "div " in (out / "report.md").read_text() or "diverged" in (out / "report.md").read_text()
    )
    assert "BN allows higher learning rates" in (out / "report.md").read_text()


def test_lr_init_refuses_bad_grids(tmp_path, capsys):
    for flag, value, phrase in [
        ("--lrs", "0.1,-1", "--lrs must be positive"),
        ("--inits", "0.1,xavier", "--inits takes positive numbers or 'glorot'"),
    ]:
        out = tmp_path / "run"
        assert main(["reproduce", "lr-init", *TINY, flag, value, "--out", str(out)]) == 2
        assert phrase in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.slow
def test_dropout_runs_four_arms_with_train_and_test_accuracy(runs):
    out = runs / "dropout"
    s = _summary(out)
    assert set(s["arms"]) == {"none", "none+dropout", "bn", "bn+dropout"}
    for arm in s["arms"].values():
        assert arm["final_test_acc"]["n"] == 2 and arm["steps_completed"] == 30
        gap = [
            a - b for a, b in zip(arm["final_train_acc"]["values"], arm["final_test_acc"]["values"])
        ]
        assert gap == pytest.approx(arm["gap"]["values"])
    report = (out / "report.md").read_text()
    assert "BN regularizes" in report and "![BN and dropout](dropout.png)" in report


def test_dropout_arms_really_drop(tmp_path):
    from bnlab.distributed import DistInfo
    from bnlab.experiments import dropout

    cfg = dropout.Config(steps=1, seeds=1)
    for arm in dropout.ARMS:
        job = dropout.build_job(arm, cfg, DistInfo(), tmp_path)
        has = any(type(m).__name__ == "Dropout" for m in job.model.modules())
        assert has == arm.endswith("+dropout")
        assert any("BatchNorm" in type(m).__name__ for m in job.model.modules()) == arm.startswith(
            "bn"
        )


def test_noisy_shift_follows_santurkar_and_is_identity_in_eval():
    import torch

    from bnlab.experiments.shift import NoisyShift

    noise = NoisyShift(copies=2)
    x = torch.zeros(4000, 2 * 50)
    torch.manual_seed(0)
    shift = noise(x).view(4000, 2, 50)  # x = 0: the output is the shift alone
    for k in range(2):  # per copy: mu ~ U(-0.5, 0.5), shift ~ U(mu - 0.1, mu + 0.1)
        mu = shift[:, k].mean()
        assert -0.5 <= mu <= 0.5
        assert shift[:, k].max() - shift[:, k].min() == pytest.approx(0.2, abs=0.01)
    scale = noise(torch.ones(4000, 100)) - noise(torch.zeros(4000, 100))  # new draws each call
    assert scale.std() > 0.05
    torch.manual_seed(1)
    a = noise(torch.ones(3, 100))
    torch.manual_seed(1)
    assert torch.equal(a, noise(torch.ones(3, 100)))  # the loop's per-step seed fixes it
    noise.eval()
    x = torch.randn(5, 100)
    assert torch.equal(noise(x), x)


@pytest.mark.slow
def test_shift_records_every_probe_and_reports_verdicts(runs):
    out = runs / "shift"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["arm"] for r in evals} == {"none", "bn", "noisy-bn"}
    for r in evals:
        assert len(r["shift"]) == 3  # the three sigmoids
        assert all(len(v["kl"]) == 2 for v in r["shift"].values())  # one value per seed
        assert len(r["ics"]) == 4 and len(r["smoothness"]["beta"]) == 2
    report = (out / "report.md").read_text()
    assert "![probes over training](shift.png)" in report and "gradient-based ICS" in report
    assert (out / "shift.png").stat().st_size > 10_000


@pytest.mark.slow
def test_claims_table_files_every_verdict_under_its_claim(runs, tmp_path, capsys):
    from bnlab.report.claims import CLAIMS
    from bnlab.report.stats import STATUSES

    dirs = [str(runs / name) for name in ("lr-init", "dropout", "shift")]
    assert main(["claims", *dirs, "--out", str(tmp_path / "claims")]) == 0
    result = json.loads((tmp_path / "claims" / "claims.json").read_text())
    assert [c["id"] for c in result["claims"]] == [c[0] for c in CLAIMS]
    by_id = {c["id"]: c["rows"] for c in result["claims"]}
    for cid in ("alg1-moments", "scale-invariance"):  # checked now, exactly
        assert [r["verdict"] for r in by_id[cid]] == ["agrees"]
    for cid in ("higher-lr", "init", "regularizes", "dropout", "ics"):
        assert len(by_id[cid]) == 1 and by_id[cid][0]["verdict"] in STATUSES
        # 30 steps and 2 seeds: no interval, so nothing here can agree or disagree
        assert by_id[cid][0]["verdict"] in ("inconclusive", "not measurable"), by_id[cid]
        assert by_id[cid][0]["why"] and by_id[cid][0]["seeds"] == 2
    assert by_id["inc-bn-x5"] == [] and by_id["shuffle"] == []
    md = (tmp_path / "claims" / "claims.md").read_text().split("## Further")[0]
    assert md.count("**not tested**") == sum(1 for c in result["claims"] if not c["rows"])
    assert any("Santurkar" in r["title"] for r in result["other"])
    assert main(["claims", str(tmp_path), "--out", str(tmp_path / "c2")]) == 2
    assert "not a finished run" in capsys.readouterr().err
    # a summary.json of an older bnlab, without structured verdicts: say how to rebuild it
    import shutil

    old = tmp_path / "old"
    shutil.copytree(runs / "dropout", old)
    summary = _summary(old)
    del summary["verdicts"]
    (old / "summary.json").write_text(json.dumps(summary))
    assert main(["claims", str(old), "--out", str(tmp_path / "c3")]) == 2
    assert f"rebuild its report with `bnlab report {old}`" in capsys.readouterr().err


@pytest.mark.slow
def test_batch_size_sweeps_every_normalization_at_fixed_examples(runs):
    from bnlab.experiments import batch_size

    s = _summary(runs / "bs")
    assert set(s["grid"]) == set(batch_size.NORMS)
    for by_size in s["grid"].values():
        assert by_size["8"]["steps"] == 8 and by_size["2"]["steps"] == 32  # 64 examples each
        assert by_size["2"]["lr"] == pytest.approx(0.01 * 2 / 60)  # linear scaling
    assert "Batch Renorm recovers" in (runs / "bs" / "report.md").read_text()


def test_batch_size_models_put_each_normalization_before_the_sigmoids():
    from torch import nn

    from bnlab.experiments import batch_size
    from bnlab.nn import BatchRenorm1d, GhostBatchNorm1d

    cfg = batch_size.Config(seeds=2, examples=1000)
    expect = {
        "brn": BatchRenorm1d,
        "ghost": GhostBatchNorm1d,
        "ln": nn.GroupNorm,
        "gn": nn.GroupNorm,
    }
    for norm, cls in expect.items():
        model = batch_size.build_model(norm, 8, cfg)
        layers = list(model)
        norms = [i for i, m in enumerate(layers) if isinstance(m, cls)]
        assert len(norms) == 3
        for i in norms:
            assert isinstance(layers[i + 1], nn.Sigmoid) and layers[i - 1].bias is None
    groups = [
        m.num_groups for m in batch_size.build_model("ln", 8, cfg) if isinstance(m, nn.GroupNorm)
    ]
    assert groups == [2, 2, 2]  # LayerNorm = one group per seed copy
    ghost = next(
        m for m in batch_size.build_model("ghost", 8, cfg) if isinstance(m, GhostBatchNorm1d)
    )
    assert ghost.virtual_batch_size == cfg.ghost_batch


@pytest.mark.slow
def test_shift_probes_the_inception_network_at_its_relus(tmp_path):
    out = tmp_path / "run"
    args = ["reproduce", "shift", "--networks", "inception", "--inception-steps", "10",
            "--eval-every", "10", "--seeds", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["arm"] for r in evals} == {"inception-none", "inception-bn"}
    assert {r["step"] for r in evals} == {0, 10}
    from torch import nn

    from bnlab.experiments import inception

    net = inception.build_network("inception", inception.config_for("quick", seeds=1))
    relus = {name for name, m in net.named_modules() if isinstance(m, nn.ReLU)}
    for r in evals:
        assert {k.split(":")[0] for k in r["shift"]} == relus  # the input of every ReLU
        assert len(r["ics"]) > 5  # every convolution of the network
    report = (out / "report.md").read_text()
    assert ", Inception" in report and "ReLU inputs" in report


@pytest.mark.slow
def test_claims_written_into_a_run_folder_leave_its_report_alone(runs, tmp_path):
    import shutil

    run = tmp_path / "dropout"
    shutil.copytree(runs / "dropout", run)
    before = (run / "report.md").read_text()
    assert main(["claims", str(run), "--out", str(run)]) == 0
    assert (run / "report.md").read_text() == before
    assert (run / "claims.md").exists() and (run / "claims.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,title,sections",
    [
        ("lr-init", "# Section 3.3: higher learning rates and less careful initialization",
         ["## Verdicts", "## What was run", "## Every cell"]),
        ("dropout", "# Section 3.4: does Batch Normalization regularize?",
         ["## Verdicts", "## Our numbers (last evaluation)", "## What was run"]),
        ("shift", "# Internal covariate shift, measured",
         ["## Verdicts", "## Our numbers (probe levels: mean over the evaluations after step 0)",
          "## What was run"]),
        ("bs", "# BN as the mini-batch shrinks",
         ["## Verdicts", "## Final test accuracy", "## What was run"]),
    ],
)  # fmt: skip
def test_report_md_of_each_tiny_run_is_its_template_filled_in(runs, tmp_path, name, title,
                                                               sections):  # fmt: skip
    run = tmp_path / name
    shutil.copytree(runs / name, run)
    md = (run / "report.md").read_text()
    check_report_markdown(md)
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings == [title, *sections]
    # Rebuilt from the records alone, the report says exactly the same.
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == md
    for verdict in _summary(run)["verdicts"]:  # the verdict table: one row per verdict
        assert f"\n| {verdict['title']} | **" in md, verdict["title"]
