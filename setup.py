"""Build-time compilation of bnlab's C++ CPU kernels into the wheel.

``python -m build --no-isolation`` (or any build whose environment has torch) compiles
``src/bnlab/backend/bn_cpu.cpp`` into ``bnlab/backend/_bnlab_cpu*.so`` for the torch it
is built against, and writes ``_bnlab_cpu.json`` beside it: that torch version, the
compiler flags and the source's hash. An installed bnlab loads it when all three match
the running process (see ``bnlab.backend.build.load_prebuilt``), so it needs no compiler
at run time; otherwise it falls back to the JIT build (and, without a compiler, to the
pure-PyTorch path with one warning).

Without torch in the build environment (pip's default isolated build, the sdist, the
editable install of ``make setup``) no extension is built and the package is the pure
Python one that builds its kernels on first use.

Why not LibTorch's stable ABI (torch >= 2.10, one binary for several torch versions):
the kernels use ATen's Tensor API, a hand-written autograd Node and pybind11 entry points
that skip the dispatcher (a microsecond per call, a tenth of the paper's (60, 100) layer);
none of that is in the stable ABI's C shim, so a stable-ABI build would be a rewrite of
the entry points and lose the fast path. One wheel per torch version, with the JIT build
as the fallback for any other, keeps both.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "src" / "bnlab" / "backend" / "bn_cpu.cpp"


def _extensions():
    if os.environ.get("BNLAB_NO_PREBUILT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build without torch: the pure-Python package
        return [], {}
    sys.path.insert(0, str(ROOT / "src"))
    from bnlab.backend.build import LDFLAGS, compile_flags  # the flags the JIT build uses

    flags = compile_flags()

    class BuildWithInfo(BuildExtension):
        """torch's build_ext, also writing what the library was built for."""

        def run(self) -> None:
            super().run()
            info = {
                "torch": torch.__version__,
                "flags": flags,
                "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
            }
            out = Path(self.build_lib) / "bnlab" / "backend" / "_bnlab_cpu.json"
            if self.inplace:
                out = ROOT / "src" / "bnlab" / "backend" / "_bnlab_cpu.json"
            out.write_text(json.dumps(info, indent=1) + "\n")

    ext = CppExtension(
        "bnlab.backend._bnlab_cpu",
        [str(SOURCE.relative_to(ROOT))],
        extra_compile_args=[*flags, "-g0"],  # no debug info: 15.8 MB -> about 1 MB
        extra_link_args=[*LDFLAGS, "-s"],
    )
    return [ext], {"build_ext": BuildWithInfo.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
