"""Build script: the package is pure Python plus one optional C++ extension, the native streaming
conversion engine (csrc/, docs/engine.md), built as tli_kernels.checkpoint._native.

The extension is optional by design: where there is no C++17 compiler, no pybind11, or the platform
is not Linux, the build prints a warning and installs the package without it, and `tli upscale`
falls back to the pure-Python executor (same bytes, slower). Set TLI_REQUIRE_NATIVE=1 to make a
failed extension build an error instead (CI does).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
SOURCES = [os.path.join(CSRC, f) for f in ("engine.cpp", "bindings.cpp")]
# -ffp-contract=off: no fused multiply-add, so `average` and `uniform` round exactly like the reference.
CXX_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden", "-pthread"]


def _warn(message: str) -> None:
    bar = "=" * 78
    print(
        f"\n{bar}\nWARNING (tli-kernels): {message}\n"
        "The native conversion engine is NOT installed; `tli upscale` will use the Python engine.\n"
        f"{bar}\n",
        file=sys.stderr,
    )


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a warning (unless TLI_REQUIRE_NATIVE=1)."""

    failed = False

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all, or (editable installs) nothing to copy back
            self._failed(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        if os.environ.get("TLI_REQUIRE_NATIVE") == "1":
            raise e
        if not self.failed:  # one warning, not one per build step
            _warn(f"building the C++ extension failed ({type(e).__name__}: {e}).")
        self.failed = True


def _extensions():
    if not sys.platform.startswith("linux"):
        _warn(f"the native engine needs Linux (copy_file_range, SEEK_DATA); this is {sys.platform}.")
        return []
    if not all(os.path.exists(s) for s in SOURCES):
        return []  # an sdist without csrc/
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        if os.environ.get("TLI_REQUIRE_NATIVE") == "1":
            raise
        _warn("pybind11 is not installed in the build environment (pip install pybind11).")
        return []
    ext = Pybind11Extension(
        "tli_kernels.checkpoint._native",
        SOURCES,
        include_dirs=[CSRC],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-pthread"],
        cxx_std=17,
    )
    ext.depends = [os.path.join(CSRC, f) for f in ("engine.h", "numerics.h", "checksum.h")]
    return [ext]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
