"""Training-step throughput of the seed-batched Section 4.2 Inception network on CPU.

One training step is forward, cross-entropy, backward and an SGD (momentum) step.
Timed for each combination of

* model: ``inception`` (no BN), ``bnlab`` (``bnlab.insert_batchnorm``: bnlab's BN
  before every nonlinearity) and ``torch`` (the same BN network after
  ``bnlab.nn.revert_batchnorm``: torch's BatchNorm2d, the reference);
* seeds: ``1`` (one network), ``2`` (two copies batched in one module) and ``2x1``
  (two separate one-copy networks stepped one after the other);
* layout: ``contiguous`` or ``channels_last`` (model and input).

All configurations of one batch size are warmed up, then timed in interleaved
rounds (one step of each per round), so a change in the machine's load hits them
alike. The table gives the median ms per step (of all copies), its interquartile
range, steps/s, ms per copy-step (a network-seed's cost), the BN networks'
overhead over no-BN (ratio, same seeds and layout) and ours / torch BN.

    python benchmarks/bench_inception.py [--width 8] [--depth 1] [--threads 2]
        [--batch 32 128] [--repeats 10] [--models inception bnlab torch]
        [--seeds 1 2 2x1] [--layouts contiguous channels_last] [--json FILE]
    python benchmarks/bench_inception.py --networks --threads 1 --batch 32
        (each network of `bnlab reproduce inception` as the experiment trains it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab
from bnlab.models import count_parameters, inception_net
from bnlab.nn import revert_batchnorm

MODELS = ("inception", "bnlab", "torch")
SEEDS = ("1", "2", "2x1")
LAYOUTS = ("contiguous", "channels_last")
CLASSES = 10


def build(model: str, seeds: list[int], width: int, depth: int, layout: str) -> nn.Module:
    net = inception_net(seeds=seeds, width=width, depth=depth, classes=CLASSES)
    if model != "inception":
        net = bnlab.insert_batchnorm(net)
    if model == "torch":
        net = revert_batchnorm(net)
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    return net.train()


@dataclass
class Job:
    """One network (S copies) with its optimizer and a fixed batch."""

    net: nn.Module
    copies: int
    x: Tensor
    y: Tensor
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.net(self.x)  # (N, S * classes)
        # (N, S, classes) -> (N * S, classes); times S: the sum of each copy's mean loss
        logits = out.unflatten(1, (self.copies, CLASSES)).flatten(0, 1)
        loss = F.cross_entropy(logits, self.y.flatten()) * self.copies
        loss.backward()
        self.opt.step()


def make_jobs(model, seeds, width, depth, layout, batch) -> list[Job]:
    groups = [[0], [1]] if seeds == "2x1" else [list(range(int(seeds)))]
    jobs = []
    for g in groups:
        s = len(g)
        x = torch.randn(batch, 3 * s, 32, 32)  # copy k's own images in channels 3k..3k+2
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, CLASSES, (batch, s))
        jobs.append(Job(build(model, g, width, depth, layout), s, x, y))
    return jobs


def run_batch(args, batch: int) -> list[dict]:
    configs = [
        (layout, seeds, model)
        for layout in args.layouts
        for seeds in args.seeds
        for model in args.models
    ]
    jobs = {c: make_jobs(c[2], c[1], args.width, args.depth, c[0], batch) for c in configs}
    for c in configs:
        for _ in range(args.warmup):
            for j in jobs[c]:
                j.step()
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            t0 = time.perf_counter()
            for j in jobs[c]:
                j.step()
            times[c].append(time.perf_counter() - t0)
    rows = []
    for layout, seeds, model in configs:
        t = times[(layout, seeds, model)]
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        med = statistics.median(t)
        copies = 1 if seeds == "1" else 2
        rows.append(
            {
                "batch": batch,
                "layout": layout,
                "seeds": seeds,
                "model": model,
                "ms_step": 1e3 * med,
                "ms_iqr": 1e3 * (q[2] - q[0]),
                "steps_s": 1 / med,
                "ms_copy_step": 1e3 * med / copies,
            }
        )
    by_key = {(r["layout"], r["seeds"], r["model"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["layout"], r["seeds"], "inception"))
        ref = by_key.get((r["layout"], r["seeds"], "torch"))
        r["x_no_bn"] = r["ms_step"] / base["ms_step"] if base else None
        r["ours_torch"] = r["ms_step"] / ref["ms_step"] if ref and r["model"] == "bnlab" else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "batch", "layout", "seeds", "model", "ms/step", "IQR", "steps/s", "ms/copy-step",
        "x no-BN", "ours/torch",
    )  # fmt: skip

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [head] + [
        (
            str(r["batch"]),
            r["layout"],
            r["seeds"],
            r["model"],
            f(r["ms_step"], ".1f"),
            f(r["ms_iqr"], ".1f"),
            f(r["steps_s"], ".2f"),
            f(r["ms_copy_step"], ".1f"),
            f(r["x_no_bn"], ".2f"),
            f(r["ours_torch"], ".2f"),
        )
        for r in rows
    ]
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_networks(args) -> None:
    """Time each named network of `bnlab reproduce inception` as it trains there: its
    job's batch (augmentation included), forward, loss, backward and SGD step, with
    the cpu preset's network and seeds, on the packaged digits (speed does not depend
    on the pixels). Interleaved rounds, median; overhead is against `inception`."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from bnlab.distributed import DistInfo
    from bnlab.experiments.inception import NETWORKS, build_job, config_for

    cfg = config_for("cpu", width=args.width, depth=args.depth, batch_size=args.batch[0])
    cfg = dataclasses.replace(cfg, data=None)  # the packaged digits: same speed, no download
    with TemporaryDirectory() as tmp:
        jobs = {n: build_job(n, cfg, DistInfo(), Path(tmp)) for n in NETWORKS}
    step = {n: 0 for n in jobs}

    def one(name: str) -> float:
        job = jobs[name]
        t0 = time.perf_counter()
        x, y = job.batch(step[name], slice(0, cfg.batch_size))
        loss = job.loss(job.model(x), y).sum() / cfg.batch_size
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        step[name] += 1
        return time.perf_counter() - t0

    for name in jobs:
        for _ in range(args.warmup):
            one(name)
    times = {n: [] for n in jobs}
    for _ in range(args.repeats):
        for name in jobs:
            times[name].append(one(name))
    base = statistics.median(times["inception"]) / jobs["inception"].copies
    print(f"{'network':>18}  seeds  ms/step  steps/s  ms/copy-step  x inception (per copy)")
    for name, t in times.items():
        med, copies = statistics.median(t), jobs[name].copies
        print(
            f"{name:>18}  {copies:5d}  {1e3 * med:7.1f}  {1 / med:7.2f}  "
            f"{1e3 * med / copies:12.1f}  {med / copies / base:6.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=8, help="inception_net width")
    p.add_argument("--depth", type=int, default=1, help="Inception modules per stage")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128], help="images per copy")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", nargs="+", choices=SEEDS, default=list(SEEDS))
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--json", help="also append one JSON line per row to this file")
    p.add_argument(
        "--networks",
        action="store_true",
        help="instead: time each network of `bnlab reproduce inception` (cpu preset settings)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.width < 2 or args.depth < 1:
        p.error("need --repeats >= 1, --warmup >= 0, --width >= 2, --depth >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.networks:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch[0]}"
        )
        run_networks(args)
        return
    params = count_parameters(inception_net(width=args.width, depth=args.depth))
    print(
        f"Inception width={args.width} depth={args.depth}: {params} parameters per copy "
        f"(no BN); torch {torch.__version__}, {torch.get_num_threads()} thread(s), 32x32 "
        f"float32, {args.warmup} warm-up + {args.repeats} timed steps, median"
    )
    rows = []
    for batch in args.batch:
        rows += run_batch(args, batch)
        print(format_table([r for r in rows if r["batch"] == batch]), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"width": args.width, "depth": args.depth, **r}) + "\n")


if __name__ == "__main__":
    main()
