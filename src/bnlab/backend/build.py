"""Build and load the compiled CPU kernels (``bn_cpu.cpp``) on first use.

The C++ source ships with the package. The first process that needs it compiles it
with ``torch.utils.cpp_extension.load`` (the system C++ compiler, ninja) into a cache
directory; later processes load the cached shared library directly. A file lock
serializes the build, so parallel test workers or ranks build it once.

Cache directory, first that is set:
``$BNLAB_CACHE_DIR``, ``$TORCH_EXTENSIONS_DIR/bnlab``, ``$XDG_CACHE_HOME/bnlab``,
``~/.cache/bnlab``. The library's name carries a hash of the source, the compiler
flags, the torch and Python versions and the compiler, so a change in any of them
builds a new one instead of loading a stale or foreign one.

Set ``BNLAB_BUILD_VERBOSE=1`` to see the compiler's command lines and output.

Instruction set: ``-mavx2 -mfma -mf16c`` only where torch reports AVX2 or AVX-512
support on this CPU at run time (never ``-march=native``, whose build would crash on
an older CPU sharing the cache); the flags are part of the hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

SOURCE = Path(__file__).with_name("bn_cpu.cpp")
BASE_CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]
SIMD_CFLAGS = ["-mavx2", "-mfma", "-mf16c"]
LDFLAGS = ["-fopenmp"]  # links the libgomp torch itself loaded (same soname)


def cache_root() -> Path:
    """The folder compiled libraries are cached in (see the module docstring)."""
    if os.environ.get("BNLAB_CACHE_DIR"):
        return Path(os.environ["BNLAB_CACHE_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "bnlab"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bnlab"


def compile_flags() -> list[str]:
    """Compiler flags for this CPU: AVX2/FMA/F16C only where the CPU has them."""
    capability = torch.backends.cpu.get_cpu_capability()
    return BASE_CFLAGS + (SIMD_CFLAGS if capability in ("AVX2", "AVX512") else [])


def library_name(flags: list[str]) -> str:
    """``bnlab_cpu_<hash>``: the hash keys the cache on everything the binary depends on."""
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(flags).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        os.environ.get("CXX", "c++").encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return f"bnlab_cpu_{key.hexdigest()[:16]}"


def _import(name: str, lib: Path) -> ModuleType:
    """Import the compiled library as the Python module ``name`` (which also registers
    its ops in ``torch.ops.bnlab``)."""
    spec = importlib.util.spec_from_file_location(name, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_and_load(verbose: bool = False) -> tuple[Path, float, ModuleType]:
    """Compile (or find cached) and load the kernels into ``torch.ops.bnlab``.

    The library is also a Python extension module: its functions are the same C++
    functions without the dispatcher's boxed call (about a microsecond less per call,
    which matters on small inputs).

    Returns:
        ``(library_path, build_seconds, module)``; ``build_seconds`` is 0.0 when a
        cached library was loaded.

    Raises:
        Exception: whatever the compiler or loader raised (the caller decides
            whether that is a warning or an error).
    """
    from torch.utils import cpp_extension  # pulls in setuptools: only when building

    flags = compile_flags()
    name = library_name(flags)
    root = cache_root()
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{name}.so"
    with FileLock(str(root / f"{name}.lock")):  # an flock: released if its holder dies
        if lib.exists():
            try:
                return lib, 0.0, _import(name, lib)
            except ImportError:  # a truncated or foreign file: build it again
                lib.unlink()
        # torch's own build lock (a plain file) outlives a killed build and would make
        # this one wait forever; holding our lock, no other build can be running.
        (build_dir / "lock").unlink(missing_ok=True)
        # ninja from the pip package lives next to this interpreter, which need not
        # be on PATH (e.g. `.venv/bin/python -m pytest` without an activated venv).
        old_path = os.environ.get("PATH", "")
        scripts = {os.path.dirname(sys.executable), sysconfig.get_path("scripts")}
        os.environ["PATH"] = os.pathsep.join([*sorted(scripts), old_path])
        start = time.perf_counter()
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=flags,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                is_python_module=True,
                verbose=verbose or bool(os.environ.get("BNLAB_BUILD_VERBOSE")),
            )
        finally:
            os.environ["PATH"] = old_path
        return lib, time.perf_counter() - start, module
