"""Build and load the compiled CPU kernels (``bn_cpu.cpp``) on first use.

A wheel built with torch in its build environment (``python -m build --no-isolation``,
see ``setup.py``) holds the kernels prebuilt for that torch (``_bnlab_cpu*.so`` and
``_bnlab_cpu.json`` in this folder); :func:`load_prebuilt` loads them when the running
torch version, the CPU's instruction set and the source's hash match what they were built
for, so an installed bnlab needs no compiler. Otherwise:

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
Otherwise a build is quiet: torch.utils.cpp_extension's log messages (its large
"compiler not compatible" banner, say) are held back, so a machine without a
compiler sees bnlab's one warning line. A failed build raises :class:`BuildError`,
whose one-line message names the cause (the compiler's first error line) and whose
``details`` keep the compiler's output and torch's messages; both go to the
``bnlab.backend.build`` logger at DEBUG level.

Instruction set: ``-mavx2 -mfma -mf16c`` only where torch reports AVX2 or AVX-512
support on this CPU at run time (never ``-march=native``, whose build would crash on
an older CPU sharing the cache); the flags are part of the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

SOURCE = Path(__file__).with_name("bn_cpu.cpp")
PREBUILT_INFO = Path(__file__).with_name("_bnlab_cpu.json")  # written by setup.py
# -fno-trapping-math: IEEE results unchanged (bnlab never enables floating-point traps),
# but GCC may then compute both sides of a select, so the activation loops vectorize.
BASE_CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG", "-fno-trapping-math"]
SIMD_CFLAGS = ["-mavx2", "-mfma", "-mf16c"]
LDFLAGS = ["-fopenmp"]  # links the libgomp torch itself loaded (same soname)
TORCH_LOGGER = "torch.utils.cpp_extension"

_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The kernels could not be built or loaded.

    ``str()`` is one line naming the cause (for bnlab's warning and for the error of
    ``BNLAB_BACKEND=compiled``); ``details`` holds the full text: the compiler's
    output as torch reported it, and torch's log messages of the attempt.
    """

    def __init__(self, summary: str, details: str) -> None:
        super().__init__(summary)
        self.details = details


# A compiler's or linker's line that says what went wrong (not a command line or
# ninja's progress: those start with "[", "FAILED:" or hold the compiler's "-o").
_CAUSE = re.compile(r"error|not found|no such file|cannot|fatal|undefined", re.IGNORECASE)


def failure_cause(text: str) -> str:
    """The line of a failed build's output that names the cause: the first compiler
    error line, else the last line (ninja's own last line says only "build stopped")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("[", "FAILED:", "Error building extension")) or " -o " in line:
            continue
        if _CAUSE.search(line):
            return line
    return lines[-1] if lines else text.strip()


class _Collect(logging.Handler):
    """A log handler that keeps the records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_torch_log() -> Iterator[list[logging.LogRecord]]:
    """Collect torch.utils.cpp_extension's log records instead of printing them.

    Its compiler checks log a banner of several hundred characters (an unknown or
    missing ``CXX``) through torch's handler on stderr; the records are yielded to
    the caller, which keeps them with the outcome. Handlers and propagation are
    restored on exit.
    """
    logger = logging.getLogger(TORCH_LOGGER)
    collect = _Collect()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:] = [collect]
    logger.propagate = False
    try:
        yield collect.records
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate


def _log_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{TORCH_LOGGER} {r.levelname}: {r.getMessage().strip()}" for r in records)


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


def prebuilt_library() -> tuple[Path | None, str]:
    """The wheel's prebuilt library if it fits this process, and why (not).

    It fits when it was built for this torch version (the C++ ABI of ATen changes
    between releases), from this source (an editable install may have changed it),
    and with instructions this CPU has (AVX2 flags on a CPU without AVX2 would crash).

    Returns:
        ``(path, reason)``: path None, with the reason, where it does not fit.
    """
    if not PREBUILT_INFO.exists():
        return None, "no prebuilt kernels in this installation"
    try:
        info = json.loads(PREBUILT_INFO.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable {PREBUILT_INFO.name}: {e}"
    libs = sorted(PREBUILT_INFO.parent.glob("_bnlab_cpu*.so"))
    if not libs:
        return None, f"{PREBUILT_INFO.name} without its library"
    if info.get("torch") != torch.__version__:
        return None, f"prebuilt for torch {info.get('torch')}, running {torch.__version__}"
    if info.get("source_sha256") != hashlib.sha256(SOURCE.read_bytes()).hexdigest():
        return None, "prebuilt from another version of bn_cpu.cpp"
    if set(SIMD_CFLAGS) & set(info.get("flags", [])) and not set(SIMD_CFLAGS) <= set(
        compile_flags()
    ):
        return None, "prebuilt with AVX2 instructions, which this CPU lacks"
    return libs[0], "prebuilt"


def load_prebuilt() -> tuple[Path, ModuleType] | None:
    """Load the wheel's prebuilt kernels where they fit (:func:`prebuilt_library`),
    else None (the reason at DEBUG level on this module's logger)."""
    lib, reason = prebuilt_library()
    if lib is None:
        _log.debug("bnlab: not using prebuilt kernels: %s", reason)
        return None
    try:
        return lib, _import("_bnlab_cpu", lib)
    except ImportError as e:  # a broken file: the JIT build still works
        _log.debug("bnlab: the prebuilt kernels did not load (%s); building them", e)
        return None


def build_and_load(verbose: bool = False) -> tuple[Path, float, ModuleType]:
    """Compile (or find cached) and load the kernels into ``torch.ops.bnlab``.

    The library is also a Python extension module: its functions are the same C++
    functions without the dispatcher's boxed call (about a microsecond less per call,
    which matters on small inputs).

    The wheel's prebuilt library is taken first where it fits (:func:`load_prebuilt`).

    Returns:
        ``(library_path, build_seconds, module)``; ``build_seconds`` is 0.0 when a
        prebuilt or cached library was loaded.

    Unless ``verbose`` (or ``BNLAB_BUILD_VERBOSE``), torch's log messages during the
    build are held back and logged at DEBUG level on this module's logger.

    Raises:
        BuildError: the compiler or loader failed (the caller decides whether that is
            a warning or an error); its message names the cause.
    """
    prebuilt = load_prebuilt()
    if prebuilt is not None:
        return prebuilt[0], 0.0, prebuilt[1]
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
        verbose = verbose or bool(os.environ.get("BNLAB_BUILD_VERBOSE"))
        start = time.perf_counter()
        with contextlib.nullcontext([]) if verbose else _held_torch_log() as records:
            try:
                module = cpp_extension.load(
                    name=name,
                    sources=[str(SOURCE)],
                    extra_cflags=flags,
                    extra_ldflags=LDFLAGS,
                    build_directory=str(build_dir),
                    is_python_module=True,
                    verbose=verbose,
                )
            except Exception as e:
                details = "\n".join(filter(None, [_log_text(records), str(e).strip()]))
                _log.debug("bnlab: building the C++ kernels failed:\n%s", details)
                compiler = os.environ.get("CXX", "c++")
                raise BuildError(
                    f"building the C++ kernels with {compiler} failed: "
                    f"{failure_cause(str(e)) or type(e).__name__} (BNLAB_BUILD_VERBOSE=1 "
                    "shows the compiler's output)",
                    details,
                ) from e
            finally:
                os.environ["PATH"] = old_path
        if records:
            _log.debug("bnlab: the C++ kernels built; torch said:\n%s", _log_text(records))
        return lib, time.perf_counter() - start, module
