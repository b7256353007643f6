"""Time bnlab's training-mode batch norm against torch.nn.functional.batch_norm.

Moved into the package as the ``bnlab bench`` command (src/bnlab/commands/bench.py);
this script runs it with the same options, e.g.

    python benchmarks/bench_batchnorm.py --threads 2 --repeats 15 --json out.json
"""

from __future__ import annotations

import sys

from bnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
