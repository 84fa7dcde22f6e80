"""cffi (API mode) build of the decoder frame pool (``codec_backend._framepool``).

The C is in ``framepool.c``; its prototypes, which are also the cdef, are in ``framepool.h``
(the pattern of ``vmediad/_native/build.py``).  Built by ``pip install`` through ``setup.py``'s
``cffi_modules`` with warnings as errors.  The ABI layouts the C writes come from
``vmediad/abi.py`` as ``-D`` macros (``abi.c_macros()``), so the C never restates them.
"""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from cffi import FFI

HERE = Path(__file__).resolve().parent
# Warnings are errors, in framepool.c and in the wrapper cffi generates around it.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def cdef_of(header: Path) -> str:
    """The prototypes between the cdef markers of ``header``."""
    text = header.read_text()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


def _abi() -> ModuleType:
    # Loaded by path: the build runs before (and without) the package being importable.
    # abi.py is pure (standard library only).
    name = "_vmediad_abi_for_build"
    spec = importlib.util.spec_from_file_location(name, HERE.parent / "vmediad" / "abi.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def _rel(p: Path) -> str:
    # setuptools refuses absolute source paths; the build runs in setup.py's directory.
    return os.path.relpath(p)


ffibuilder = FFI()
ffibuilder.cdef(cdef_of(HERE / "framepool.h"))
ffibuilder.set_source("codec_backend._framepool", '#include "framepool.h"', sources=[_rel(HERE / "framepool.c")],
                      include_dirs=[str(HERE)], define_macros=_abi().c_macros(), extra_compile_args=CFLAGS,
                      libraries=["pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
