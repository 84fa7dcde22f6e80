"""cffi (API mode) build of vmediad's C core: atomics on region words and futexes.

The C is in ``core.c``; its prototypes, which are also the cdef, are in ``core.h``.  Built by
``pip install`` through ``setup.py``'s ``cffi_modules`` with warnings as errors; every call
releases the GIL (cffi's default for API-mode functions).
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# Warnings are errors, in core.c and in the wrapper cffi generates around it.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def cdef_of(header: Path) -> str:
    """The prototypes between the cdef markers of ``header``."""
    text = header.read_text()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


def _rel(p: Path) -> str:
    # setuptools refuses absolute source paths; the build runs in setup.py's directory.
    return os.path.relpath(p)


ffibuilder = FFI()
ffibuilder.cdef(cdef_of(HERE / "core.h"))
ffibuilder.set_source("vmediad._native._core", '#include "core.h"', sources=[_rel(HERE / "core.c")],
                      include_dirs=[str(HERE)], extra_compile_args=CFLAGS)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
