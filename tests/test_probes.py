"""bnlab.probes: distributional shift, gradient-based ICS and smoothness (PAPER.md Section 10).

Hand-computable cases, a brute-force reference for G', bit-identical training
with probes, per-copy results of seed-batched models against single models.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import insert_batchnorm
from bnlab.models.inception import inception_net
from bnlab.models.mlp import mnist_mlp
from bnlab.probes import (
    activation_snapshot,
    compute_layer_jacobians,
    compute_unit_stats,
    distribution_shift,
    gradient_ics,
    ics_layers,
    jacobian_singular_values,
    smoothness,
    unit_shift,
    wasserstein_1d,
)
from bnlab.train.loop import make_sgd

IN, HIDDEN, DEPTH, CLASSES, N = 12, 8, 2, 3, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread, or a busy 2-core machine spends
    most of the time synchronizing threads (a 4x12x8x8 conv: 0.04 ms vs 20+ ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(seeds, bn=True, dtype=torch.float64, init_std=0.5):
    """The Section 4.1 MLP, small: 12 - 8 - 8 - 3, sigmoid; with BN: 0 Linear, 1 BN,
    2 Sigmoid, 3 Linear, 4 BN, 5 Sigmoid, 6 Linear."""
    model = mnist_mlp(
        seeds=seeds, hidden=HIDDEN, depth=DEPTH, init_std=init_std, in_features=IN, classes=CLASSES
    )
    if bn:
        model = insert_batchnorm(model)
    return model.to(dtype)


def per_copy_ce(out, y):
    """(N, S * classes) logits, (N, S) labels -> (S,) mean cross-entropy per copy."""
    n, s = y.shape
    return F.cross_entropy(out.view(n, s, -1).transpose(1, 2), y, reduction="none").mean(0)


def make_batch(copies, seed, dtype=torch.float64, n=N):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, copies * IN, generator=gen, dtype=dtype)
    y = torch.randint(0, CLASSES, (n, copies), generator=gen)
    return x, y


def sgd(model, lr=0.1, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, **kw)


def train_steps(model, opt, copies, steps, seed=100):
    for t in range(steps):
        x, y = make_batch(copies, seed + t, dtype=next(model.parameters()).dtype)
        opt.zero_grad(set_to_none=True)
        per_copy_ce(model(x), y).sum().backward()
        opt.step()


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def copy_block(x, k, copies):
    """Copy k's features of a seed-batched (N, S * f) tensor."""
    return x.view(x.shape[0], copies, -1)[:, k]


# ------------------------------------------------------------------ distributional shift


class AddScale(nn.Module):
    """y = a * x + b per unit: its output's shift is known in closed form."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Parameter(torch.ones(c, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(c, dtype=torch.float64))

    def forward(self, x):
        return self.a * x + self.b


def test_translation_gives_hand_computed_shift():
    copies, c = 2, 3
    model = nn.Sequential(AddScale(copies * c), nn.Sigmoid())
    x = torch.randn(50, copies * c, dtype=torch.float64)
    before = activation_snapshot(model, x, copies=copies)  # default: the Sigmoid's input
    assert list(before) == ["1"]
    delta = torch.tensor([0.5, -1.0, 2.0, 0.25, 0.0, -3.0], dtype=torch.float64)
    with torch.no_grad():
        model[0].b += delta
    after = activation_snapshot(model, x, copies=copies)
    shift = distribution_shift(before, after, eps=0.0)["1"]

    var = x.var(0, correction=0)
    expect = {
        "mean_drift": delta.abs(),
        "var_drift": torch.zeros(6, dtype=torch.float64),
        "wasserstein": delta.abs(),  # a pure translation moves every quantile by delta
        "kl": delta**2 / (2 * var),  # KL(N(m, v) || N(m + d, v)) = d^2 / (2 v)
    }
    for key, per_unit in expect.items():
        torch.testing.assert_close(
            torch.tensor(shift[key], dtype=torch.float64),
            per_unit.view(copies, c).mean(1),
            rtol=1e-12,
            atol=1e-12,
        )
    json.dumps(shift)  # JSON-friendly


def test_scaling_gives_hand_computed_shift():
    model = nn.Sequential(AddScale(4), nn.ReLU())
    x = torch.randn(40, 4, dtype=torch.float64)
    before = activation_snapshot(model, x)
    a = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        model[0].a.copy_(a)
    per_unit = unit_shift(before["1"], activation_snapshot(model, x)["1"], eps=0.0)
    m, v = x.mean(0), x.var(0, correction=0)
    torch.testing.assert_close(per_unit["mean_drift"], (a - 1).abs() * m.abs())
    torch.testing.assert_close(per_unit["var_drift"], (a**2 - 1).abs() * v)
    # Scaling keeps the order of the samples: W1 = mean |a x_i - x_i|.
    torch.testing.assert_close(per_unit["wasserstein"], (a - 1).abs() * x.abs().mean(0))
    kl = 0.5 * (torch.log(a**2) + (v + (m - a * m) ** 2) / (a**2 * v) - 1)
    torch.testing.assert_close(per_unit["kl"], kl)


def test_fixed_input_distributions_have_zero_shift():
    """Only the last layer trains: every BN input, and the data, keep their distribution."""
    model = make_mlp([0, 1])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("6."))
    opt = sgd(model)
    x_probe = torch.randn(32, IN, dtype=torch.float64)  # shared by both copies
    before = activation_snapshot(model, x_probe, copies=2)
    data_before = activation_snapshot(model, x_probe, layers=["0"], copies=1)
    last = model[6].weight.detach().clone()
    train_steps(model, opt, 2, 3)
    assert not torch.equal(model[6].weight, last)
    after = activation_snapshot(model, x_probe, copies=2)
    assert list(after) == ["1", "4"]  # default: the BN modules' inputs
    for layer in distribution_shift(before, after).values():
        for values in layer.values():
            assert values == [0.0, 0.0]
    data_shift = distribution_shift(data_before, activation_snapshot(model, x_probe, layers=["0"]))
    assert all(v == [0.0] for v in data_shift["0"].values())

    # Train everything: the second BN's input moves (its first layer moved).
    for p in model.parameters():
        p.requires_grad_(True)
    train_steps(model, sgd(model), 2, 3)
    moved = distribution_shift(before, activation_snapshot(model, x_probe, copies=2))
    assert all(v > 0 for v in moved["4"]["wasserstein"] + moved["4"]["mean_drift"])


def test_snapshot_does_not_change_the_model():
    model = make_mlp([0, 1]).eval()
    model.insert(3, nn.Dropout(0.5))
    train_steps(model.train(), sgd(model), 2, 2)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(20, IN, dtype=torch.float64)
    rng = torch.get_rng_state()
    a = activation_snapshot(model, x, copies=2)
    b = activation_snapshot(model, x, copies=2)  # same seed: same dropout mask
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for name in a:
        assert torch.equal(a[name].quantiles, b[name].quantiles)
    # As in training: the BN input's statistics are the probe batch's, not the running ones.
    h = model[0](x)
    torch.testing.assert_close(a["1"].mean, h.mean(0))


def test_unit_stats_quantiles_and_layer_choice():
    x = torch.arange(10, dtype=torch.float64).flip(0).view(10, 1)
    stats = compute_unit_stats(x, quantiles=5)
    # Inverse empirical CDF at (j + 1/2) / 5: sorted[2j].
    assert stats.quantiles.tolist() == [[0.0, 2.0, 4.0, 6.0, 8.0]]
    assert compute_unit_stats(x).quantiles.tolist() == [list(map(float, range(10)))]
    # (N, C, H, W): units are channels, samples over batch and positions.
    img = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    s = compute_unit_stats(img, copies=2)
    assert s.count == 75 and s.quantiles.shape == (4, 75)
    torch.testing.assert_close(s.mean, img.mean((0, 2, 3)))
    with pytest.raises(ValueError, match="multiple of"):
        compute_unit_stats(img, copies=3)
    model = make_mlp([0], bn=False)
    assert list(activation_snapshot(model, torch.randn(5, IN, dtype=torch.float64))) == ["1", "3"]
    picked = activation_snapshot(
        model, torch.randn(5, IN, dtype=torch.float64), layers=[nn.Sigmoid]
    )
    assert list(picked) == ["1", "3"]
    with pytest.raises(ValueError, match="selects no module"):  # SeedBatchedLinear is no nn.Linear
        activation_snapshot(model, torch.randn(5, IN, dtype=torch.float64), layers=[nn.Linear])
    with pytest.raises(ValueError, match="no module named"):
        activation_snapshot(model, torch.randn(5, IN), layers=["nope"])


def test_wasserstein_of_unequal_sample_counts_is_exact():
    a = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(2, 4, dtype=torch.float64)
    # Exact W1 of the empirical distributions: replicate to 12 samples each.
    ra = a.sort(1).values.repeat_interleave(4, 1)
    rb = b.sort(1).values.repeat_interleave(3, 1)
    expect = (ra - rb).abs().mean(1)
    got = wasserstein_1d(a.sort(1).values, b.sort(1).values)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="different layers"):
        s = {"x": compute_unit_stats(a.T)}
        distribution_shift(s, {"y": s["x"]})


# ------------------------------------------------------------------ gradient-based ICS


def weight_grad(model, layer, batch):
    x, y = batch
    weight = dict(model.named_modules())[layer].weight
    return torch.autograd.grad(per_copy_ce(model(x), y).sum(), weight)[0]


def brute_force_ics(model, opt, batch, layer, copies):
    """Copy model and optimizer, step only the modules before ``layer``, recompute."""
    g = weight_grad(copy.deepcopy(model), layer, batch)
    ref = copy.deepcopy(model)
    ref_opt = type(opt)(ref.parameters(), **{k: v for k, v in opt.defaults.items()})
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    x, y = batch
    per_copy_ce(ref(x), y).sum().backward()
    names = [n for n, _ in ref.named_modules()]
    for name, p in ref.named_parameters():
        if names.index(name.rpartition(".")[0]) >= names.index(layer):
            p.grad = None  # layer i and later do not move
    ref_opt.step()
    g2 = weight_grad(ref, layer, batch)
    a, b = g.reshape(copies, -1), g2.reshape(copies, -1)
    return (a - b).norm(dim=1), F.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize("optimizer", ["sgd", "fused-sgd", "adam"])
def test_gradient_ics_matches_brute_force(optimizer):
    copies = 2
    model = make_mlp([3, 4])
    opt = {
        "sgd": lambda: sgd(model),
        "fused-sgd": lambda: make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.05),
    }[optimizer]()
    train_steps(model, opt, copies, 3)  # momentum / Adam moments not zero
    batch = make_batch(copies, 7)
    ics = gradient_ics(model, per_copy_ce, batch, opt, copies=copies)
    assert list(ics) == ["0", "3", "6"] == ics_layers(model)
    assert ics["0"]["l2"] == [0.0, 0.0] and ics["0"]["cos"] == [1.0, 1.0]
    for layer in ["3", "6"]:
        l2, cos = brute_force_ics(model, opt, batch, layer, copies)
        assert min(l2) > 1e-6
        torch.testing.assert_close(t64(ics[layer]["l2"]), l2, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t64(ics[layer]["cos"]), cos, rtol=1e-9, atol=1e-12)
    json.dumps(ics)
    only = gradient_ics(model, per_copy_ce, batch, opt, copies=copies, layers=["6"])
    assert only == {"6": ics["6"]}


@pytest.mark.parametrize("how", ["lr0", "frozen"])
def test_gradient_ics_is_zero_when_earlier_layers_do_not_move(how):
    model = make_mlp([0, 1])
    early = [p for n, p in model.named_parameters() if n.split(".")[0] in ("0", "1")]
    late = [p for n, p in model.named_parameters() if n.split(".")[0] not in ("0", "1")]
    if how == "lr0":
        opt = torch.optim.SGD(
            [{"params": early, "lr": 0.0}, {"params": late}], lr=0.1, momentum=0.9
        )
    else:
        for p in early:
            p.requires_grad_(False)
        opt = torch.optim.SGD(late, lr=0.1, momentum=0.9)
    train_steps(model, opt, 2, 2)
    ics = gradient_ics(model, per_copy_ce, make_batch(2, 9), opt, copies=2)
    for layer in ("0", "3"):  # nothing before them moves
        assert ics[layer]["l2"] == [0.0, 0.0] and ics[layer]["cos"] == [1.0, 1.0]
    assert min(ics["6"]["l2"]) > 0 and max(ics["6"]["cos"]) < 1  # layer 3 and BN 4 moved
    assert min(ics["0"]["grad_norm"]) > 0


# ------------------------------------------------------------------ smoothness


def test_smoothness_on_a_quadratic_is_the_curvature_along_the_gradient():
    torch.manual_seed(1)
    d, o, n, lr = 5, 2, 30, 0.05
    x = torch.randn(n, d, dtype=torch.float64) * torch.tensor([3.0, 1, 1, 0.5, 0.1])
    y = torch.randn(n, o, dtype=torch.float64)
    model = nn.Linear(d, o, bias=False).double()
    out = smoothness(model, F.mse_loss, (x, y), lr=lr)

    # L(W) = sum((X W^T - Y)^2) / (n o): gradient 2/(n o) R^T X, Hessian V -> 2/(n o) V X^T X.
    w = model.weight.detach()
    c = 2.0 / (n * o)
    g = c * (x @ w.T - y).T @ x
    hg = c * g @ (x.T @ x)
    beta = hg.norm() / g.norm()
    torch.testing.assert_close(t64(out["beta"][0]), beta, rtol=1e-9, atol=0)
    torch.testing.assert_close(t64(out["grad_pred"][0]), 4 * lr * hg.norm(), rtol=1e-9, atol=0)
    loss0 = F.mse_loss(x @ w.T, y)
    etas = [f * lr for f in (0.5, 1, 2, 3, 4)]
    path = [loss0 - e * g.pow(2).sum() + e**2 / 2 * (g * hg).sum() for e in etas]
    path = torch.stack(path)
    torch.testing.assert_close(t64(out["loss_min"][0]), path.min(), rtol=1e-9, atol=0)
    torch.testing.assert_close(t64(out["loss_max"][0]), path.max(), rtol=1e-9, atol=0)
    torch.testing.assert_close(t64(out["loss"][0]), loss0, rtol=1e-12, atol=0)
    torch.testing.assert_close(t64(out["grad_norm"][0]), g.norm(), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="positive"):
        smoothness(model, F.mse_loss, (x, y), lr=0.0)


def test_smoothness_needs_per_copy_losses():
    model = make_mlp([0, 1])
    with pytest.raises(ValueError, match="one loss per copy"):
        smoothness(model, lambda o, y: per_copy_ce(o, y).sum(), make_batch(2, 0), 0.1, copies=2)
    with pytest.raises(ValueError, match="not a multiple of copies=3"):
        smoothness(model, per_copy_ce, make_batch(2, 0), 0.1, copies=3)


# ------------------------------------------------------------------ no side effects


def snapshot_state(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    )


def assert_same_state(a, b):
    (ma, oa, ga), (mb, ob, gb) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            w = ob["state"][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)
    for n in ga:
        assert (ga[n] is None and gb[n] is None) or torch.equal(ga[n], gb[n]), n


def train_with_probes(probe_every):
    """A seed-batched BN MLP with dropout, SGD with momentum and an LR schedule (float32)."""
    torch.manual_seed(0)
    copies = 2
    base = make_mlp([0, 1], dtype=torch.float32)
    model = nn.Sequential(*list(base)[:6], nn.Dropout(0.3), base[6])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x_probe = torch.randn(24, IN)
    prev = activation_snapshot(model, x_probe, copies=copies) if probe_every else None
    records = []
    for t in range(7):
        batch = make_batch(copies, 50 + t, dtype=torch.float32)
        if probe_every and t % probe_every == 0:
            cur = activation_snapshot(model, x_probe, copies=copies)
            records.append(distribution_shift(prev, cur))
            prev = cur
            records.append(gradient_ics(model, per_copy_ce, batch, opt, copies=copies))
            records.append(smoothness(model, per_copy_ce, batch, lr=0.2, copies=copies))
        x, y = batch
        opt.zero_grad(set_to_none=True)
        per_copy_ce(model(x), y).sum().backward()
        opt.step()
        sched.step()
    return snapshot_state(model, opt), torch.get_rng_state(), records


def test_probing_leaves_training_bit_identical():
    state, rng, _ = train_with_probes(0)
    state_p, rng_p, records = train_with_probes(3)
    assert len(records) == 9
    json.dumps(records)
    assert_same_state(state, state_p)
    assert torch.equal(rng, rng_p)


# ------------------------------------------------------------------ copies


def test_seed_batched_copies_equal_single_models():
    seeds, copies = [0, 1, 2], 3
    batched = make_mlp(seeds)
    singles = [make_mlp([s]) for s in seeds]
    opt_b = sgd(batched)
    opts = [sgd(m) for m in singles]
    x_probe = torch.randn(20, IN, dtype=torch.float64)
    snap_b = activation_snapshot(batched, x_probe, copies=copies)
    snaps = [activation_snapshot(m, x_probe) for m in singles]

    def step_all(t):
        x, y = make_batch(copies, 200 + t)
        for m, o, k in [(batched, opt_b, None)] + [
            (m, o, k) for k, (m, o) in enumerate(zip(singles, opts))
        ]:
            xb, yb = (x, y) if k is None else (copy_block(x, k, copies), y[:, k : k + 1])
            o.zero_grad(set_to_none=True)
            per_copy_ce(m(xb), yb).sum().backward()
            o.step()

    for t in range(2):
        step_all(t)
    x, y = make_batch(copies, 300)
    shift_b = distribution_shift(snap_b, activation_snapshot(batched, x_probe, copies=copies))
    ics_b = gradient_ics(batched, per_copy_ce, (x, y), opt_b, copies=copies)
    smooth_b = smoothness(batched, per_copy_ce, (x, y), lr=0.1, copies=copies)
    for k, (m, o) in enumerate(zip(singles, opts)):
        batch_k = (copy_block(x, k, copies), y[:, k : k + 1])
        shift_k = distribution_shift(snaps[k], activation_snapshot(m, x_probe))
        ics_k = gradient_ics(m, per_copy_ce, batch_k, o)
        smooth_k = smoothness(m, per_copy_ce, batch_k, lr=0.1)
        for got, want in [(shift_b, shift_k), (ics_b, ics_k)]:
            for layer in want:
                for key, v in want[layer].items():
                    assert got[layer][key][k] == pytest.approx(v[0], rel=1e-9, abs=1e-12)
        for key, v in smooth_k.items():
            assert smooth_b[key][k] == pytest.approx(v[0], rel=1e-9, abs=1e-12)
    assert min(ics_b["6"]["l2"]) > 0


def test_probes_on_a_seed_batched_inception():
    """4-D activations and grouped convolutions split per copy; copy 1 equals a single net.

    Every layer, in float64.
    """
    copies = 2
    layers = None

    def net(seeds):
        return insert_batchnorm(inception_net(seeds=seeds, width=2, depth=1)).double()

    batched, single = net([5, 6]), net([6])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3 * copies, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4, copies), generator=gen)
    batch_1 = (x[:, 3:], y[:, 1:])
    opt_b, opt_1 = sgd(batched, lr=0.05), sgd(single, lr=0.05)
    for m, o, (xb, yb) in [(batched, opt_b, (x, y)), (single, opt_1, batch_1)]:
        per_copy_ce(m(xb), yb).sum().backward()
        o.step()
    snap = activation_snapshot(batched, x[:, :3], copies=copies)
    assert all(s.mean.numel() % copies == 0 for s in snap.values())
    ics_b = gradient_ics(batched, per_copy_ce, (x, y), opt_b, copies=copies, layers=layers)
    ics_1 = gradient_ics(single, per_copy_ce, batch_1, opt_1, layers=layers)
    assert list(ics_b) == list(ics_1) == ics_layers(batched)  # 34 layers, forward order
    for layer, values in ics_1.items():
        for key, v in values.items():
            assert ics_b[layer][key][1] == pytest.approx(v[0], rel=1e-9, abs=1e-12), (layer, key)
    assert ics_b["stem.0"]["l2"] == [0.0, 0.0] and min(ics_b["classifier"]["l2"]) > 0
    # BN's gamma and beta run before the next layer, though fx registers them last.
    batched.get_submodule("stem.0").weight.requires_grad_(False)
    moved = gradient_ics(batched, per_copy_ce, (x, y), opt_b, copies=copies, layers=["stem.2"])
    assert min(moved["stem.2"]["l2"]) > 0  # only bn_stem_0's gamma and beta moved
    batched.bn_stem_0.requires_grad_(False)
    still = gradient_ics(batched, per_copy_ce, (x, y), opt_b, copies=copies, layers=["stem.2"])
    assert still["stem.2"]["l2"] == [0.0, 0.0]
    beta = smoothness(batched, per_copy_ce, (x, y), 0.05, factors=(1, 4), copies=copies)["beta"]
    assert len(beta) == 2 and all(math.isfinite(b) for b in beta)


def test_probes_refuse_what_would_give_a_silent_answer():
    """An optimizer over other parameters (every layer would read l2 0, cos 1), a
    tensor for (x, y), and snapshots of different probe batches are refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    other = torch.optim.SGD(nn.Linear(4, 5).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds none of the model's"):
        gradient_ics(model, F.cross_entropy, batch, other)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"batch must be the pair \(x, y\).*tensor of shape"):
        gradient_ics(model, F.cross_entropy, batch[0], opt)
    with pytest.raises(TypeError, match=r"batch must be the pair \(x, y\).*3 items"):
        smoothness(model, F.cross_entropy, (*batch, None), lr=0.1)
    assert gradient_ics(model, F.cross_entropy, batch, opt)  # the right call still works
    x = torch.randn(16, 4)
    before = activation_snapshot(model, x)
    for other_x in (torch.randn(16, 4), x[:12]):
        with pytest.raises(ValueError, match="different probe batches"):
            distribution_shift(before, activation_snapshot(model, other_x))
    same = distribution_shift(before, activation_snapshot(model, x.clone()))
    assert same["1"]["mean_drift"] == [0.0]


# ------------------------------------------------------------------ Jacobian singular values


def linear_with(weight, bias=True):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def orthogonal(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def test_jacobian_of_an_orthogonal_linear_map_has_singular_values_one():
    """a -> Q a + b between two probed points: every singular value is 1, c Q gives
    c, orthonormal rows (6 -> 3) give three 1s; a per-unit scaling is 1 when normalized."""
    torch.manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64)
    q = orthogonal(6, 1)
    for weight, want in [(q, 1.0), (2.5 * q, 2.5), (q[:3], 1.0)]:
        model = nn.Sequential(
            linear_with(torch.randn(6, 4, dtype=torch.float64)),
            nn.Identity(),
            linear_with(weight),
            nn.Identity(),
        )
        jac = compute_layer_jacobians(model, x, layers=[nn.Identity], scale="raw", examples=4)
        assert list(jac) == ["1->3"] and jac["1->3"].shape == (4, 1, weight.shape[0], 6)
        torch.testing.assert_close(jac["1->3"], weight.expand(4, 1, -1, -1))
        sv = jacobian_singular_values(model, x, layers=[nn.Identity], scale="raw")["1->3"]
        for key in ("mean", "rms", "min", "max", "q05", "q50", "q95"):
            assert sv[key] == [pytest.approx(want, abs=1e-12)], key
        assert sv["frac_within"] == [1.0 if 0.5 <= want <= 2 else 0.0]
    c = torch.tensor([0.01, -3.0, 7.0, 0.5], dtype=torch.float64)
    scaled = nn.Sequential(nn.Identity(), linear_with(torch.diag(c)), nn.Identity())
    raw = jacobian_singular_values(scaled, x, layers=[nn.Identity], scale="raw")["0->2"]
    assert raw["max"] == [pytest.approx(7.0)] and raw["min"] == [pytest.approx(0.01)]
    norm = jacobian_singular_values(scaled, x, layers=[nn.Identity])["0->2"]
    assert norm["min"] == [pytest.approx(1.0)] and norm["max"] == [pytest.approx(1.0)]


def test_jacobian_through_bn_and_sigmoid_matches_the_chain_rule():
    """x -> BN -> sigmoid -> W -> (next BN's input): W diag(sigmoid'(y_n)) diag(gamma /
    sqrt(var + eps)), with the probe batch's statistics (training) or the running ones."""
    torch.manual_seed(0)
    w = torch.randn(3, 5, dtype=torch.float64)
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.Sigmoid(),
        linear_with(w),
        nn.BatchNorm1d(3),
        nn.Sigmoid(),
    ).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(12, 4, dtype=torch.float64)
    h = model[0](x).detach()
    bn = model[1]
    for training, mean, var in [
        (True, h.mean(0), h.var(0, correction=0)),
        (False, bn.running_mean, bn.running_var),
    ]:
        y = (h - mean) / (var + bn.eps).sqrt() * bn.weight.detach() + bn.bias.detach()
        s = torch.sigmoid(y)
        want = w * (s * (1 - s))[:, None, :] * (bn.weight.detach() / (var + bn.eps).sqrt())
        raw = compute_layer_jacobians(model, x, training=training, scale="raw", examples=None)
        assert list(raw) == ["1->4"]
        torch.testing.assert_close(raw["1->4"][:, 0], want)
        # normalized: diag(1 / s_out) J diag(s_in), per-unit stds of the probe batch
        z = model[:4](x).detach() if training else model[:4].eval()(x).detach()
        model.train()
        scaled = want * h.std(0, correction=0) / z.std(0, correction=0)[:, None]
        norm = compute_layer_jacobians(model, x, training=training, examples=None)
        torch.testing.assert_close(norm["1->4"][:, 0], scaled)
    # Without BN's batch coupling, the Jacobian is the same at any batch size.
    part = compute_layer_jacobians(model, x[:3], training=False, scale="raw")
    torch.testing.assert_close(part["1->4"], raw["1->4"][:3])


def test_jacobian_probe_does_not_change_the_model():
    model = make_mlp([0, 1]).train()
    opt = sgd(model)
    train_steps(model, opt, 2, 2)
    model[4].eval()  # a mixed set of modes, restored as it was
    modes = [m.training for m in model.modules()]
    state = snapshot_state(model, opt)
    x = torch.randn(20, IN, dtype=torch.float64)
    rng = torch.get_rng_state()
    with torch.no_grad():  # the caller's grad mode does not matter
        a = jacobian_singular_values(model, x, copies=2)
    b = jacobian_singular_values(model, x, copies=2, training=False)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(state, snapshot_state(model, opt))
    assert model[1].num_batches_tracked.item() == 2
    assert list(a) == ["1->4"] and a != b  # batch vs running statistics
    json.dumps([a, b])
    assert all(len(v) == 2 for v in a["1->4"].values())


@pytest.mark.parametrize("bn", [True, False])
def test_jacobians_of_seed_batched_copies_equal_single_models(bn):
    seeds, copies = [0, 1, 2], 3
    batched = make_mlp(seeds, bn=bn)
    singles = [make_mlp([s], bn=bn) for s in seeds]
    x = torch.randn(20, IN, dtype=torch.float64)
    pair = "1->4" if bn else "1->3"
    for training in (True, False):
        jac_b = compute_layer_jacobians(batched, x, copies=copies, training=training)[pair]
        sv_b = jacobian_singular_values(batched, x, copies=copies, training=training)[pair]
        assert jac_b.shape == (20, copies, HIDDEN, HIDDEN)
        for k, m in enumerate(singles):
            jac_k = compute_layer_jacobians(m, x, training=training)[pair]
            torch.testing.assert_close(jac_b[:, k], jac_k[:, 0])
            sv_k = jacobian_singular_values(m, x, training=training)[pair]
            for key, v in sv_k.items():
                assert sv_b[key][k] == pytest.approx(v[0], rel=1e-9, abs=1e-12), key


class CenterOverBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


def test_jacobian_probe_refuses_what_it_cannot_measure():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    one_point = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="at least two probed points"):
        jacobian_singular_values(one_point, x)
    relu = nn.ReLU()
    reused = nn.Sequential(nn.Linear(4, 5), relu, nn.Linear(5, 5), relu)
    with pytest.raises(ValueError, match="called more than once"):
        jacobian_singular_values(reused, x)
    two = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
    assert list(jacobian_singular_values(two, x)) == ["1->3"]  # the right call works
    with pytest.raises(ValueError, match="scale must be one of"):
        jacobian_singular_values(two, x, scale="log")
    with pytest.raises(ValueError, match="N >= 2"):
        jacobian_singular_values(two, x[:1])
    with pytest.raises(ValueError, match="examples must be a positive int"):
        jacobian_singular_values(two, x, examples=0)
    with pytest.raises(ValueError, match="not a multiple of copies=2"):
        jacobian_singular_values(two, x, copies=2)
    with pytest.raises(ValueError, match="max_entries"):
        jacobian_singular_values(two, x, max_entries=100)
    with pytest.raises(ValueError, match="band"):
        jacobian_singular_values(two, x, band=(2.0, 0.5))
    with pytest.raises(ValueError, match="constant on the probe batch"):
        jacobian_singular_values(two, torch.ones(8, 4))
    no_stats = nn.Sequential(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5, track_running_stats=False),
        nn.Linear(5, 5),
        nn.BatchNorm1d(5),
    )
    with pytest.raises(ValueError, match="track_running_stats=False"):
        jacobian_singular_values(no_stats, x)
    mixing = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), CenterOverBatch(), nn.Tanh())
    with pytest.raises(ValueError, match="mixes examples"):
        jacobian_singular_values(mixing, x, examples=4)
    parallel = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
    parallel.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(ValueError, match="no module named"):
        jacobian_singular_values(parallel, x, layers=["1", "9"])
