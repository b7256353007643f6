"""``bnlab bench``: training-mode BN on this CPU against the memory-bandwidth floor.

BN is memory-bound: its cost is the bytes it moves. In one run this command

1. measures the machine's copy bandwidth (``dst.copy_(src)`` of a 256 MiB float32
   tensor; bytes read plus written) for each thread count;
2. for each shape and layout, times torch's native ``torch.nn.functional.batch_norm``,
   bnlab's compiled backend and bnlab's pure-PyTorch path (both through
   ``bnlab.functional.batch_norm``, forced with ``bnlab.backend.using``): ``fwd`` and
   ``fwd+bwd`` in training mode with running statistics, ``eval`` in inference mode
   (Algorithm 2's fixed affine map, under ``torch.no_grad``);
3. prints each as median time, effective GB/s over the minimum traffic, the fraction
   of the copy bandwidth, and the ratio to torch timed in the same run;
4. times one SGD training step of the Figure 1 network and of the small Inception
   network with bnlab's BN (compiled, pure) against the same network with torch's BN.

Minimum traffic (what any implementation must move): the forward reads x once and
writes y (2 tensors); forward+backward adds reading x and dy and writing dx (5); eval
reads x and writes y (2). ``%2pass`` is the same against a two-pass kernel's traffic
(statistics, then output, each reading the input from memory: 3 and 8 tensors; eval
has one pass, 2), the "two-pass limit" (read x to sum, read it again to normalize).

The implementations are timed round-robin (one call of each per round), so a busy
host slows all of them alike; the headline is the ratio, never the absolute time.

Allocation: every call allocates its outputs, as in training. With ``--alloc reuse``
(default) glibc is told to keep freed memory (``mallopt`` M_MMAP_THRESHOLD and
M_TRIM_THRESHOLD raised to 1 GiB), so a large output reuses already-mapped pages;
with ``--alloc fresh`` glibc's defaults apply and every large output is a new
``mmap`` whose first touch page-faults (2.5-6x slower for all implementations).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable

from bnlab.commands import HelpFormatter, positive_int

# ResNet-like conv shapes, contiguous and channels_last, a wide FC layer, and the (60,
# 100) layer of the paper's MNIST network.
DEFAULT_SHAPES = [
    "64x64x56x56",
    "64x64x56x56:cl",
    "128x256x14x14",
    "128x256x14x14:cl",
    "32x32x112x112",
    "32x32x112x112:cl",
    "4096x1024",
    "60x100",
]
IMPLS = ("torch", "compiled", "pure")
PASSES = ("fwd", "fwd+bwd", "eval")
TRAFFIC = {"fwd": 2, "fwd+bwd": 5, "eval": 2}  # tensors of x's size moved at the minimum
# ... and by two-pass kernels (statistics pass, then output pass, re-reading the input
# from memory): fwd reads x twice, bwd reads x and dy twice; both write once.
TWO_PASS_TRAFFIC = {"fwd": 3, "fwd+bwd": 8, "eval": 2}  # eval is one pass
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def parse_shape(text: str) -> tuple[tuple[int, ...], bool]:
    """``"64x64x56x56:cl"`` -> ((64, 64, 56, 56), True); channels_last needs 4 or 5 dims."""
    dims, _, layout = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}; write it as NxCxHxW, e.g. 64x64x56x56 or 64x64x56x56:cl"
        ) from None
    if len(shape) < 2 or min(shape) < 1 or layout not in ("", "cl"):
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: at least 2 positive dims, optionally ':cl' for channels_last"
        )
    if layout == "cl" and len(shape) not in (4, 5):
        raise argparse.ArgumentTypeError(f"{text!r}: channels_last needs a 4-D or 5-D shape")
    return shape, layout == "cl"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks mapped (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        )
    except OSError:
        return False


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2):
    """Median and interquartile range (seconds) of each fn, timed one call per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = (statistics.median(ts), q[2] - q[0])
    return out


def copy_bandwidth(repeats: int) -> float:
    """Bytes read plus written per second by a large tensor copy."""
    import torch

    src = torch.ones(64 << 20)  # 256 MiB, far beyond the caches
    dst = torch.empty_like(src)
    (med, _) = time_round_robin({"copy": lambda: dst.copy_(src)}, max(repeats, 5))["copy"]
    return 2 * src.numel() * src.element_size() / med


def bench_shape(shape, channels_last, impls, passes, repeats, dtype) -> dict:
    """Times of every (impl, pass) on one input: {(impl, pass): (median_s, iqr_s)}."""
    import torch
    import torch.nn.functional as F

    import bnlab.functional as BF
    from bnlab import backend

    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, generator=gen).to(dtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=_format(x))
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    fns = {"torch": F.batch_norm, "compiled": BF.batch_norm, "pure": BF.batch_norm}
    modes = {"torch": backend.mode(), "compiled": "compiled", "pure": "torch"}

    def forward(impl, training=True):  # training=False: inference (the "eval" pass)
        fn, mode = fns[impl], modes[impl]

        def run():
            with backend.using(mode), torch.no_grad():
                return fn(x, rm, rv, w, b, training, 0.1, 1e-5)

        return run

    def forward_backward(impl):
        fn, mode = fns[impl], modes[impl]

        def run():
            with backend.using(mode):
                y = fn(xg, rm, rv, w, b, True, 0.1, 1e-5)
                return torch.autograd.grad(y, (xg, w, b), dy)  # no .grad accumulation

        return run

    results = {}
    for name in passes:
        make = {
            "fwd": forward,
            "fwd+bwd": forward_backward,
            "eval": lambda impl: forward(impl, training=False),
        }[name]
        timed = time_round_robin({impl: make(impl) for impl in impls}, repeats)
        for impl, t in timed.items():
            results[(impl, name)] = t
    return results


def _network(name: str):
    """(bnlab BN network, the same with torch's BN, inputs, targets) for a training step:
    the Section 4.1 MNIST network on a batch of 60, or the small Section 4.2 Inception
    (width 8) on 32 images of 32x32."""
    import copy

    import torch

    from bnlab import insert_batchnorm
    from bnlab.models.inception import inception_net
    from bnlab.models.mlp import mnist_mlp
    from bnlab.nn.convert import revert_batchnorm

    gen = torch.Generator().manual_seed(0)
    if name == "figure1":
        ours = insert_batchnorm(mnist_mlp(seeds=(0,)))
        x = torch.randn(60, 784, generator=gen)
    else:
        ours = insert_batchnorm(inception_net(seeds=(0,), width=8))
        x = torch.randn(32, 3, 32, 32, generator=gen)
    ref = revert_batchnorm(copy.deepcopy(ours))
    return ours, ref, x, torch.randint(0, 10, (x.shape[0],), generator=gen)


def bench_network(name: str, impls, repeats: int) -> dict:
    """Median time of one SGD training step per impl: {impl: (median_s, iqr_s)}."""
    import torch
    import torch.nn.functional as F

    from bnlab import backend

    ours, ref, x, target = _network(name)
    nets = {"torch": ref, "compiled": ours, "pure": ours}
    modes = {"torch": backend.mode(), "compiled": "compiled", "pure": "torch"}

    def step(impl):
        net, mode = nets[impl], modes[impl]
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def run():
            with backend.using(mode):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), target).backward()
                opt.step()

        return run

    return time_round_robin({impl: step(impl) for impl in impls}, repeats)


def _format(x):
    import torch

    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def run_bench(args: argparse.Namespace) -> dict:
    """Run every measurement and return the records (printing the table as it goes)."""
    import torch

    from bnlab import backend

    dtype = getattr(torch, args.dtype)
    alloc_ok = keep_freed_memory() if args.alloc == "reuse" else False
    impls = list(args.impls)
    if "compiled" in impls and not backend.is_available():
        print(f"bnlab bench: compiled backend unavailable, skipped: {backend.describe()}")
        impls.remove("compiled")
    print(f"torch {torch.__version__}, {args.dtype}, backend: {backend.describe()}")
    print(
        f"allocation: {'freed memory kept by glibc (mallopt)' if alloc_ok else 'glibc defaults'}"
        "; outputs allocated by each call; timed round-robin, median of "
        f"{args.repeats}; GB/s and %copy over the minimum traffic, 2 tensors of x's size "
        "(fwd) or 5 (fwd+bwd); %2pass over a two-pass kernel's, 3 or 8"
    )
    old_threads = torch.get_num_threads()
    records = []
    bandwidth = {}
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            bandwidth[threads] = copy_bandwidth(args.repeats)
            print(f"\n== {threads} thread(s): copy bandwidth {bandwidth[threads] / 1e9:.1f} GB/s")
            head = (
                f"{'shape':<20}{'layout':<7}{'pass':<8}{'impl':<9}{'ms':>10}{'iqr':>9}"
                f"{'GB/s':>7}{'%copy':>7}{'%2pass':>7}{'/torch':>8}"
            )
            print(head)
            for shape, cl in args.shapes:
                timed = bench_shape(shape, cl, impls, args.passes, args.repeats, dtype)
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                for name in args.passes:
                    ref = timed.get(("torch", name))
                    for impl in impls:
                        med, iqr = timed[(impl, name)]
                        gbps = TRAFFIC[name] * nbytes / med
                        rec = {
                            "threads": threads,
                            "shape": list(shape),
                            "layout": "channels_last" if cl else "contiguous",
                            "pass": name,
                            "impl": impl,
                            "ms": med * 1e3,
                            "iqr_ms": iqr * 1e3,
                            "gbps": gbps / 1e9,
                            "frac_copy": gbps / bandwidth[threads],
                            "frac_copy_two_pass": gbps
                            * TWO_PASS_TRAFFIC[name]
                            / TRAFFIC[name]
                            / bandwidth[threads],
                            "ratio_to_torch": med / ref[0] if ref else None,
                        }
                        records.append(rec)
                        ratio = f"{rec['ratio_to_torch']:.2f}" if ref else "-"
                        print(
                            f"{'x'.join(map(str, shape)):<20}{'NHWC' if cl else 'NCHW':<7}"
                            f"{name:<8}{impl:<9}{rec['ms']:>10.3f}{rec['iqr_ms']:>9.3f}"
                            f"{rec['gbps']:>7.1f}{rec['frac_copy']:>7.0%}"
                            f"{rec['frac_copy_two_pass']:>7.0%}{ratio:>8}"
                        )
            for name in args.networks:
                timed = bench_network(name, impls, args.repeats)
                for impl in impls:
                    med, iqr = timed[impl]
                    ref = timed.get("torch")
                    rec = {
                        "threads": threads,
                        "network": name,
                        "pass": "train step",
                        "impl": impl,
                        "ms": med * 1e3,
                        "iqr_ms": iqr * 1e3,
                        "ratio_to_torch": med / ref[0] if ref else None,
                    }
                    records.append(rec)
                    ratio = f"{rec['ratio_to_torch']:.2f}" if ref else "-"
                    print(
                        f"{name + ' net':<27}{'step':<8}{impl:<9}{rec['ms']:>10.3f}"
                        f"{rec['iqr_ms']:>9.3f}{'':>21}{ratio:>8}"
                    )
    finally:
        torch.set_num_threads(old_threads)
    return {
        "torch": torch.__version__,
        "dtype": args.dtype,
        "backend": backend.describe(),
        "alloc": "reuse" if alloc_ok else "fresh",
        "copy_gbps": {str(k): v / 1e9 for k, v in bandwidth.items()},
        "records": records,
    }


def _run(args: argparse.Namespace) -> int:
    result = run_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time BN (torch, compiled, pure PyTorch) against the copy bandwidth",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        metavar="SHAPE",
        help="input shapes NxCx..., ':cl' for channels_last (default: 6 conv shapes, half "
        "channels_last, and 2 fully connected)",
    )
    p.add_argument(
        "--threads", nargs="+", type=positive_int, default=[1, 2], help="torch CPU threads"
    )
    p.add_argument("--repeats", type=positive_int, default=15, help="timed rounds per case")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument(
        "--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32"
    )
    p.add_argument(
        "--alloc",
        choices=["reuse", "fresh"],
        default="reuse",
        help="reuse: glibc keeps freed memory (no page faults); fresh: glibc defaults",
    )
    p.add_argument(
        "--networks",
        nargs="*",
        choices=["figure1", "inception"],
        default=["figure1", "inception"],
        help="also time one SGD step of these networks, bnlab's BN against torch's "
        "(figure1: Section 4.1 MLP, batch 60; inception: Section 4.2 net, width 8, "
        "batch 32); give the option alone for none",
    )
    p.add_argument("--json", help="also write the records to this JSON file")
    p.set_defaults(func=_run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bnlab")
    add_parser(parser.add_subparsers())
    sys.exit(_run(parser.parse_args(["bench", *sys.argv[1:]])))
