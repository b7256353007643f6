"""Time bnlab's training-mode batch norm against torch.nn.functional.batch_norm.

Both run in the same process on the same inputs; the headline is the ratio
ours / torch (lower is better, 1.0 = parity). Forward and forward+backward,
training mode with running statistics, float32 by default.

    python benchmarks/bench_batchnorm.py [--threads 2] [--repeats 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as TF

from bnlab import functional as BF

SHAPES = [
    ((64, 64, 56, 56), False),
    ((64, 64, 56, 56), True),
    ((128, 256, 14, 14), False),
    ((128, 256, 14, 14), True),
    ((32, 32, 112, 112), False),
    ((32, 32, 112, 112), True),
    ((4096, 1024), False),
    ((60, 100), False),
]


def _time(fn, repeats: int, device: str) -> tuple[float, float]:
    """Median and interquartile spread of fn's wall time in seconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def bench_one(shape, channels_last, impl, repeats, device, dtype):
    c = shape[1]
    x = torch.randn(*shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            impl(x, rm, rv, w, b, True, 0.1, 1e-5)

    def fwd_bwd():
        y = impl(x, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(g)

    return _time(fwd, repeats, device), _time(fwd_bwd, repeats, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float32
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, {dtype}")
    print(
        f"{'shape':<22}{'layout':<8}{'pass':<9}{'ours ms':>10}{'torch ms':>10}"
        f"{'ours GB/s':>11}{'ratio':>8}"
    )
    rows = []
    for shape, cl in SHAPES:
        ours = bench_one(shape, cl, BF.batch_norm, args.repeats, args.device, dtype)
        ref = bench_one(shape, cl, TF.batch_norm, args.repeats, args.device, dtype)
        nbytes = torch.Size(shape).numel() * 4
        for i, name in enumerate(("fwd", "fwd+bwd")):
            # Minimal traffic: fwd reads x twice (stats, normalize) and writes y;
            # bwd reads x and dy twice and writes dx.
            traffic = nbytes * (3 if i == 0 else 8)
            row = {
                "shape": list(shape),
                "channels_last": cl,
                "pass": name,
                "ours_ms": ours[i][0] * 1e3,
                "ours_iqr_ms": ours[i][1] * 1e3,
                "torch_ms": ref[i][0] * 1e3,
                "torch_iqr_ms": ref[i][1] * 1e3,
                "ours_gbps": traffic / ours[i][0] / 1e9,
                "ratio": ours[i][0] / ref[i][0],
            }
            rows.append(row)
            print(
                f"{str(shape):<22}{'NHWC' if cl else 'NCHW':<8}{name:<9}"
                f"{row['ours_ms']:>10.3f}{row['torch_ms']:>10.3f}"
                f"{row['ours_gbps']:>11.2f}{row['ratio']:>8.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
