"""The wheel carries the kernels prebuilt, so an installed bnlab needs no compiler.

``setup.py`` compiles ``bn_cpu.cpp`` at build time for the torch it is built against;
``bnlab.backend.build.prebuilt_library`` decides whether the installed library fits the
running process (torch version, source hash, CPU instructions).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bnlab import __version__
from bnlab.backend import build

ROOT = Path(__file__).resolve().parents[1]


def _fake_prebuilt(tmp_path, monkeypatch, **info):
    """A prebuilt library's metadata (and an empty library file) in tmp_path."""
    record = {
        "torch": torch.__version__,
        "flags": build.compile_flags(),
        "source_sha256": hashlib.sha256(build.SOURCE.read_bytes()).hexdigest(),
        **info,
    }
    path = tmp_path / "_bnlab_cpu.json"
    path.write_text(json.dumps(record))
    (tmp_path / "_bnlab_cpu.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(build, "PREBUILT_INFO", path)


def test_prebuilt_library_fits_only_its_torch_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "PREBUILT_INFO", tmp_path / "_bnlab_cpu.json")
    assert build.prebuilt_library() == (None, "no prebuilt kernels in this installation")
    _fake_prebuilt(tmp_path, monkeypatch)
    lib, reason = build.prebuilt_library()
    assert lib is not None and reason == "prebuilt"
    _fake_prebuilt(tmp_path, monkeypatch, torch="2.0.0")
    assert "prebuilt for torch 2.0.0" in build.prebuilt_library()[1]
    _fake_prebuilt(tmp_path, monkeypatch, source_sha256="0" * 64)
    assert "another version of bn_cpu.cpp" in build.prebuilt_library()[1]
    _fake_prebuilt(tmp_path, monkeypatch, flags=[*build.BASE_CFLAGS, *build.SIMD_CFLAGS])
    monkeypatch.setattr(build, "compile_flags", lambda: list(build.BASE_CFLAGS))  # no AVX2
    assert "AVX2" in build.prebuilt_library()[1]


def test_an_unloadable_prebuilt_library_falls_back_to_the_jit_build(tmp_path, monkeypatch):
    _fake_prebuilt(tmp_path, monkeypatch)  # an empty .so: ImportError when loaded
    assert build.load_prebuilt() is None


def test_version_is_single_sourced_and_printed_with_torch_and_backend():
    meta = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('bnlab'))"],
        capture_output=True,
        text=True,
    )
    # An editable install made before a version bump keeps its old metadata; a fresh
    # install (CI) has the package's version.
    if meta.stdout.strip() != __version__:
        pytest.skip(f"installed metadata {meta.stdout.strip()} predates {__version__}: reinstall")
    exe = Path(sys.executable).with_name("bnlab")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"bnlab {__version__}" and lines[1] == f"torch {torch.__version__}"
    assert lines[2].startswith("backend: ")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog


@pytest.mark.slow
def test_wheel_installs_and_runs_compiled_without_a_compiler(tmp_path):
    """Build the wheel, install it in a fresh venv whose PATH has no compiler, and run
    `bnlab verify`: its backend line must say compiled, from the prebuilt library."""
    pytest.importorskip("build", reason="the `build` package (dev extra) builds the wheel")
    src = tmp_path / "src_tree"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "src",
        src / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_bnlab_cpu.json", "*.egg-info"),
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    start = time.perf_counter()
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--wheel",
            "--outdir",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    build_s = time.perf_counter() - start
    (wheel,) = dist.glob("bnlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnlab/backend/_bnlab_cpu.json" in names
    assert any(n.startswith("bnlab/backend/_bnlab_cpu") and n.endswith(".so") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The dependencies (torch, numpy, ...) from this interpreter's site-packages, so the
    # test downloads nothing; bnlab itself only from the wheel.
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    start = time.perf_counter()
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        timeout=600,
    )
    install_s = time.perf_counter() - start
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "BNLAB_CACHE_DIR": str(cache)}
    assert (
        shutil.which("c++", path=env["PATH"]) is None
        and shutil.which("gcc", path=env["PATH"]) is None
    )
    out = subprocess.run(
        [str(venv / "bin" / "bnlab"), "verify", "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    print(
        f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB, built in {build_s:.0f} s, "
        f"installed in {install_s:.1f} s"
    )
    backend_line = next(line for line in out.stdout.splitlines() if line.startswith("backend:"))
    print(backend_line)
    assert out.returncode == 0, out.stdout + out.stderr
    assert backend_line.startswith("backend: compiled") and "prebuilt" in backend_line
    assert "warning" not in out.stderr.lower(), out.stderr
    assert not any(cache.iterdir())  # nothing was built
    version = subprocess.run(
        [str(venv / "bin" / "bnlab"), "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "prebuilt in the installed package" in version.stdout, version.stdout
