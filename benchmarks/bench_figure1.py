"""Wall time of the Figure 1 reproduction at paper scale (50,000 steps per arm).

Runs the Figure 1 reproduction in temporary folders for each requested number
of seeds (both arms in parallel worker processes, as `bnlab reproduce figure1`
does) and prints the total wall time, including evaluation, population
statistics and the report, with the final accuracies.

    python benchmarks/bench_figure1.py --data ../shared/data/mnist [--seeds 1 5] [--steps 50000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bnlab.experiments.figure1 import Figure1Config, run_figure1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="MNIST IDX folder (default: packaged subset)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 5])
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = []
    for seeds in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Figure1Config(data=args.data, steps=args.steps, seeds=seeds)
            t0 = time.perf_counter()
            summary = run_figure1(
                cfg, Path(tmp) / "run", workers=args.workers, progress=False, log=lambda *a: None
            )
            total = time.perf_counter() - t0
        row = {
            "seeds": seeds,
            "steps": args.steps,
            "total_s": round(total, 1),
            "final_acc_baseline": summary["arms"]["baseline"]["final_test_acc"]["mean"],
            "final_acc_bn": summary["arms"]["bn"]["final_test_acc"]["mean"],
        }
        rows.append(row)
        print(
            f"{seeds} seed(s) x 2 arms x {args.steps} steps: {total:.1f} s total "
            f"(incl. evaluation, population statistics and report); final test accuracy "
            f"{100 * row['final_acc_baseline']:.2f}% without BN, "
            f"{100 * row['final_acc_bn']:.2f}% with BN",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
