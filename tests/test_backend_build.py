"""The kernels' loader without a usable compiler: bnlab's one warning line, not torch's
compiler banner; with BNLAB_BACKEND=compiled, an error that names the cause.

Each test runs a fresh process with ``CXX=/nonexistent`` and an empty cache, so the
real build is attempted and fails at once (no compiler runs); about 3 s each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Phrases of torch.utils.cpp_extension's WRONG_COMPILER_WARNING banner.
TORCH_BANNER = ("!! WARNING !!", "is not compatible with the compiler")


def _run(code: str, tmp_path: Path, backend: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_BUILD_VERBOSE"}
    env.update(CXX="/nonexistent", BNLAB_CACHE_DIR=str(tmp_path), BNLAB_BACKEND=backend)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_no_compiler_is_one_warning_line_and_no_torch_banner(tmp_path):
    out = _run(
        """
        import torch
        import bnlab.nn as bnn
        bn = bnn.BatchNorm2d(3)
        bn(torch.randn(4, 3, 2, 2)).sum().backward()
        bn(torch.randn(4, 3, 2, 2))
        """,
        tmp_path,
        "auto",
    )
    assert out.returncode == 0, out.stderr
    for phrase in TORCH_BANNER:
        assert phrase not in out.stderr + out.stdout, out.stderr
    warning = [line for line in out.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1, out.stderr
    assert "compiled CPU backend is unavailable" in warning[0]
    assert "/nonexistent: not found" in warning[0]  # the cause, not ninja's last line
    # The warning and the source line Python's warnings module prints under it.
    assert len(out.stderr.strip().splitlines()) == 2, out.stderr


def test_compiled_backend_error_names_the_cause_and_torch_log_is_kept(tmp_path):
    out = _run(
        """
        import logging, sys, torch
        import bnlab.nn as bnn
        from bnlab.backend import BackendUnavailableError
        handler = logging.StreamHandler(sys.stdout)
        logging.getLogger("bnlab").addHandler(handler)
        logging.getLogger("bnlab").setLevel(logging.DEBUG)
        try:
            bnn.BatchNorm1d(3)(torch.randn(4, 3))
        except BackendUnavailableError as e:
            print("ERROR:", e)
        """,
        tmp_path,
        "compiled",
    )
    assert out.returncode == 0, out.stderr
    error = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(error) == 1, out.stdout
    assert "/nonexistent: not found" in error[0]
    assert "BNLAB_BUILD_VERBOSE=1" in error[0]
    # torch's messages and the compiler's output are kept at debug level, not printed.
    assert TORCH_BANNER[1] in out.stdout and "ninja: build stopped" in out.stdout
    for phrase in TORCH_BANNER:
        assert phrase not in out.stderr, out.stderr
