import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.verify import CheckResult, format_table, run_checks


def test_run_checks_all_pass_on_cpu():
    results = run_checks("cpu", ["float32", "bfloat16"])
    assert len(results) >= 10
    assert all(r.passed for r in results), format_table(results, "cpu")
    # The layouts where torch 2.13's CPU kernel gives wrong gradients (tests/test_layouts.py).
    assert any(r.name == "BN on odd layouts vs float64 math" for r in results)


def test_table_reports_failures():
    table = format_table([CheckResult("x", "float64", 1.0, 1e-10)], "cpu")
    assert "FAIL" in table and "0 passed, 1 failed" in table


def test_cli_prints_table(capsys):
    assert main(["verify", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm2d vs torch" in out and "failed" in out and "FAIL " not in out


def test_cli_rejects_unavailable_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path cannot be exercised")
    assert main(["verify", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().out


def test_installed_console_script():
    exe = Path(sys.executable).with_name("bnlab")
    proc = subprocess.run(
        [str(exe), "verify", "--dtype", "float32"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed, 0 failed" in proc.stdout
