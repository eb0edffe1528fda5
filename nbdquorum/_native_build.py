"""cffi builder for ``nbdquorum._native_lib`` (out-of-line API mode).

Used two ways: setuptools picks up ``ffibuilder`` through ``cffi_modules`` in
setup.py (``pip install -e .``), and ``python nbdquorum/_native_build.py``
compiles the module in place for development.  Paths are taken relative to
this file, so both work from any working directory.

API mode compiles the generated wrapper against native/quorum.h, so a cdef
that drifts from the header fails the build instead of misbehaving at run time.
"""

from __future__ import annotations

from pathlib import Path

import cffi  # type: ignore[import-untyped, unused-ignore]

#: The project root: the directory holding setup.py, native/ and nbdquorum/.
_ROOT = Path(__file__).resolve().parent.parent

# Compiler paths are relative to _ROOT, which is the working directory both of
# a setuptools build and of cffi's compile(tmpdir=_ROOT) below.  An absolute
# source path would make distutils mirror it, directory by directory, under the
# build directory.
_NATIVE = "native"

ffibuilder = cffi.FFI()
ffibuilder.cdef((_ROOT / _NATIVE / "quorum.cdef").read_text(encoding="utf-8"))
ffibuilder.set_source(
    "nbdquorum._native_lib",
    '#include "quorum.h"',
    sources=[f"{_NATIVE}/quorum.c", f"{_NATIVE}/sender.c", f"{_NATIVE}/writer.c"],
    include_dirs=[_NATIVE],
    extra_compile_args=["-O2", "-pthread"],
    extra_link_args=["-pthread"],
    # Name the module for this interpreter (.cpython-311-...so), both when
    # setuptools builds it and when compile() below does.  With the default
    # (limited API, .abi3.so under setuptools) the two builds leave files
    # with different names side by side, and the interpreter-specific one
    # shadows a fresh abi3 rebuild.
    py_limited_api=False,
)

if __name__ == "__main__":
    # With tmpdir=_ROOT the module lands in nbdquorum/ beside this file,
    # whatever the current directory is.  distutils leaves each source's
    # object beside it; drop ours so it is not an untracked file in native/.
    ffibuilder.compile(tmpdir=str(_ROOT), verbose=True)
    for obj in ("quorum.o", "sender.o", "writer.o"):
        (_ROOT / _NATIVE / obj).unlink(missing_ok=True)
