"""Fused BN + activation against torch's BN followed by the activation, in one run.

Two parts, each timing torch's reference in the same run and printing the ratio:

1. **Layer**: training-mode forward+backward of BN then an activation, on the
   ``bnlab bench`` shapes (ResNet-like conv shapes, contiguous and channels_last, a wide
   FC layer, the paper's (60, 100) MNIST layer). torch: ``F.batch_norm`` then
   ``F.relu`` (or the activation named); bnlab: ``bnlab.functional.batch_norm_act``
   (the compiled kernels). Round-robin, one call of each per round; median ms.
2. **Block stack**: one SGD training step (forward, backward, update) of a ResNet-style
   stack (a 3x3 stem, then blocks x + conv-BN-act-conv-BN-act, LeakyReLU(0.01)), built
   with torch's ``BatchNorm2d`` + ``LeakyReLU``, and with ``bnlab.nn.BatchNormAct2d``
   in ``memory="standard"`` and ``memory="save"``, the same weights. Peak memory is the
   CPU allocator's: the largest "Total Allocated" over the step's allocation events
   recorded by ``torch.profiler`` (``profile_memory=True``), counted from the step's
   start (the input and the weights are allocated before). Step time is the median of
   round-robin steps without the profiler.

Run: ``python benchmarks/bench_batchnorm_act.py [--threads 2] [--repeats 15] [--json out]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import bnlab.functional as BF
import bnlab.nn
from bnlab import backend
from bnlab.commands.bench import DEFAULT_SHAPES, parse_shape, time_round_robin

TORCH_ACT = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "identity": lambda t: t,
}
# The in-place forms ResNets and timm use (nn.ReLU(inplace=True)): one pass less.
TORCH_ACT_INPLACE = {
    "relu": F.relu_,
    "leaky_relu": F.leaky_relu_,
    "silu": lambda t: F.silu(t, inplace=True),
    "sigmoid": torch.sigmoid_,
    "identity": lambda t: t,
}


def bench_layer(shape, channels_last, act, repeats):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    fmt = torch.preserve_format
    dy = torch.randn(x.shape, generator=gen).contiguous(
        memory_format=torch.channels_last
        if channels_last and len(shape) == 4
        else torch.channels_last_3d
        if channels_last
        else torch.contiguous_format
    )
    xg = x.detach().clone(memory_format=fmt).requires_grad_()
    c = shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    f, f_ = TORCH_ACT[act], TORCH_ACT_INPLACE[act]

    def ref():
        y = f(F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5))
        return torch.autograd.grad(y, (xg, w, b), dy)

    def ref_inplace():
        y = f_(F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5))
        return torch.autograd.grad(y, (xg, w, b), dy)

    def fused():
        with backend.using("compiled"):
            y = BF.batch_norm_act(xg, rm, rv, w, b, True, 0.1, 1e-5, act)
            return torch.autograd.grad(y, (xg, w, b), dy)

    for fn in (ref, ref_inplace, fused):  # warm up (and build the kernels)
        fn()
    return time_round_robin({"torch": ref, "torch_inplace": ref_inplace, "bnlab": fused}, repeats)


def block_stack(norm_act, width=64, blocks=4):
    """A ResNet-style stack: stem, then blocks x + act(BN(conv(act(BN(conv(x))))))."""
    layers = [nn.Conv2d(3, width, 3, padding=1, bias=False), *norm_act(width)]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                *norm_act(width),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                *norm_act(width),
            )

        def forward(self, x):
            return x + self.body(x)

    layers += [Block() for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _torch_norm_act(c):
    return [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]


def _torch_norm_act_inplace(c):
    return [nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)]


def _fused(memory):
    def make(c):
        return [bnlab.nn.BatchNormAct2d(c, act_layer="leaky_relu", memory=memory)]

    return make


def peak_allocated(step) -> int:
    """Largest bytes allocated at once during step(), from its start (torch.profiler)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Parameters and buffers in order (the fused stack has fewer modules, same tensors)."""
    pairs = [*zip(src.parameters(), dst.parameters()), *zip(src.buffers(), dst.buffers())]
    assert len(pairs) == len([*src.parameters(), *src.buffers()])
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)


def bench_stack(batch, size, repeats):
    torch.manual_seed(0)
    ref = block_stack(_torch_norm_act)
    models = {"torch BN+LeakyReLU": ref}
    inplace = block_stack(_torch_norm_act_inplace)
    _copy_state(ref, inplace)
    models["torch, LeakyReLU in place"] = inplace
    for memory in ("standard", "save"):
        model = block_stack(_fused(memory))
        _copy_state(ref, model)  # the same weights and statistics
        models[f"bnlab fused, memory={memory}"] = model
    ref_state = copy.deepcopy(ref)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}

    def step_of(name):
        model, opt = models[name], optims[name]

        def step():
            with backend.using("compiled"):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
                opt.step()

        return step

    with torch.no_grad(), backend.using("compiled"):  # the same function before any step
        losses = {k: F.cross_entropy(m(x), target).item() for k, m in models.items()}
    for m in models.values():  # those forwards updated the running statistics: reset
        _copy_state(ref_state, m)
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-4 * max(abs(v) for v in losses.values()):
        raise SystemExit(f"the three stacks disagree before training: {losses}")
    steps = {k: step_of(k) for k in models}
    for s in steps.values():
        s()
    peaks = {k: peak_allocated(s) for k, s in steps.items()}
    times = time_round_robin(steps, repeats)
    return peaks, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    p.add_argument("--acts", default="relu,leaky_relu,silu")
    p.add_argument("--stack", default="32x32", help="batch x image size of the stack")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {backend.describe('cpu')}")
    results = {"threads": args.threads, "layer": [], "stack": {}}
    print(
        "\n1. BN + activation, training forward+backward (median ms); torch with the "
        "activation out of place and in place (inplace=True); ratio = bnlab / the faster"
    )
    print(f"{'shape':<22}{'act':<12}{'torch':>9}{'in place':>10}{'bnlab':>9}{'ratio':>8}")
    for text in args.shapes:
        shape, cl = parse_shape(text)
        for act in args.acts.split(","):
            t = bench_layer(shape, cl, act, args.repeats)
            best = min(t["torch"][0], t["torch_inplace"][0])
            ratio = t["bnlab"][0] / best
            print(
                f"{text:<22}{act:<12}{1e3 * t['torch'][0]:>9.3f}"
                f"{1e3 * t['torch_inplace'][0]:>10.3f}{1e3 * t['bnlab'][0]:>9.3f}{ratio:>8.2f}",
                flush=True,
            )
            results["layer"].append(
                {
                    "shape": text,
                    "act": act,
                    "torch_ms": 1e3 * t["torch"][0],
                    "torch_inplace_ms": 1e3 * t["torch_inplace"][0],
                    "bnlab_ms": 1e3 * t["bnlab"][0],
                    "ratio": ratio,
                }
            )
    batch, size = (int(v) for v in args.stack.split("x"))
    peaks, times = bench_stack(batch, size, args.repeats)
    ref_peak, ref_time = peaks["torch BN+LeakyReLU"], times["torch BN+LeakyReLU"][0]
    print(
        f"\n2. ResNet-style stack (stem + 4 blocks, width 64, batch {batch}, {size}x{size}), "
        "one SGD step: peak allocated memory and median step time, ratios to torch"
    )
    print(f"{'model':<30}{'peak MiB':>10}{'ratio':>8}{'step ms':>10}{'ratio':>8}")
    for name in peaks:
        pr, tr = peaks[name] / ref_peak, times[name][0] / ref_time
        print(
            f"{name:<30}{peaks[name] / 2**20:>10.1f}{pr:>8.2f}{1e3 * times[name][0]:>10.1f}"
            f"{tr:>8.2f}"
        )
        results["stack"][name] = {
            "peak_mib": peaks[name] / 2**20,
            "peak_ratio": pr,
            "step_ms": 1e3 * times[name][0],
            "time_ratio": tr,
        }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
