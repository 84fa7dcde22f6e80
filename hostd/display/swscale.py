"""libswscale called directly (cffi, ABI mode): the very library PyAV loaded, without the GIL.

PyAV's ``VideoReformatter`` holds the GIL around everything but the scaling itself and makes a
new output frame per call, so a picture scaled in several steps takes and drops the GIL many
times.  In hostd the device thread and the compositor want the GIL too, and each hand-over
cost a scaling worker more than its scaling (a bgra picture took 6 ms of CPU in hostd against
2.7 ms alone).  Here each step is one ``sws_scale`` call into memory the caller owns; cffi
releases the GIL for the whole call.

The library is the one already mapped into this process by ``import av`` (found in
``/proc/self/maps``): the same build, version and CPU paths as PyAV's.  Only the stable
entry points are declared: ``sws_getCachedContext``, ``sws_scale``, ``sws_freeContext`` and
libavutil's ``av_get_pix_fmt``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import av  # noqa: F401  (maps libswscale and libavutil into the process)
import numpy as np
from cffi import FFI
from numpy.typing import NDArray

_CDEF = """
typedef struct SwsContext SwsContext;
SwsContext *sws_getCachedContext(SwsContext *context, int srcW, int srcH, int srcFormat,
                                 int dstW, int dstH, int dstFormat, int flags,
                                 void *srcFilter, void *dstFilter, const double *param);
int sws_scale(SwsContext *c, const uint8_t *const srcSlice[], const int srcStride[],
              int srcSliceY, int srcSliceH, uint8_t *const dst[], const int dstStride[]);
void sws_freeContext(SwsContext *swsContext);
int av_get_pix_fmt(const char *name);
"""

# swscale's flags (libswscale/swscale.h; unchanged since FFmpeg 0.x).
FLAGS = {"FAST_BILINEAR": 1, "BILINEAR": 2, "BICUBIC": 4, "X": 8, "POINT": 0x10, "AREA": 0x20,
         "BICUBLIN": 0x40, "GAUSS": 0x80, "SINC": 0x100, "LANCZOS": 0x200, "SPLINE": 0x400}

_ffi = FFI()
_ffi.cdef(_CDEF)
_lock = threading.Lock()
_libs: tuple[Any, Any] | None = None


def _loaded(stem: str) -> str:
    """The path of the mapped library whose file name starts with ``stem``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith(stem):
            return path
    raise RuntimeError(f"{stem} is not mapped: PyAV was built without it")


def _lib() -> tuple[Any, Any]:
    global _libs
    with _lock:
        if _libs is None:
            _libs = (_ffi.dlopen(_loaded("libswscale")), _ffi.dlopen(_loaded("libavutil")))
        return _libs


def pix_fmt(name: str) -> int:
    got = int(_lib()[1].av_get_pix_fmt(name.encode()))
    if got < 0:
        raise ValueError(f"libavutil has no pixel format {name!r}")
    return got


def flags_of(interpolation: str | int) -> int:
    if isinstance(interpolation, int):
        return interpolation
    try:
        return FLAGS[interpolation.upper()]
    except KeyError:
        raise ValueError(f"unknown swscale interpolation {interpolation!r}") from None


Planes = tuple[NDArray[np.uint8], ...]  # 2-D uint8 views, rows possibly strided, pixels packed

# swscale's SIMD loads read past the end of an input plane: an NV12 picture whose chroma ended
# 24 bytes before an unmapped page faulted, 32 did not (AVX-512 here); four times that is kept.
INPUT_SLACK = 256

# swscale's SIMD stores run past the end of a row (a 2x2 picture scaled to 5x7 bgra corrupted
# the heap after a tight numpy array): what it writes must be laid out as av_frame_get_buffer
# lays frames out, rows aligned and padded.
ALIGN = 64


def padded(rows: int, row_bytes: int) -> NDArray[np.uint8]:
    """A ``(rows, row_bytes)`` uint8 array for swscale to write: it starts on an ALIGN boundary,
    its rows are ALIGN-aligned with at least ALIGN spare bytes each, and a spare row follows."""
    stride = -(-(row_bytes + ALIGN) // ALIGN) * ALIGN
    buf = np.empty((rows + 1) * stride + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    out: NDArray[np.uint8] = np.lib.stride_tricks.as_strided(buf[start:], shape=(rows, row_bytes),
                                                             strides=(stride, 1))
    return out


class Context:
    """One swscale context (re-made only when the geometry, formats or flags change).  Not
    thread-safe: one user at a time."""

    __slots__ = ("_ctx", "_key")

    def __init__(self) -> None:
        self._ctx: Any = _ffi.NULL
        self._key: tuple[int, ...] | None = None

    def scale(self, src: Planes, src_fmt: int, width: int, height: int,
              dst: Planes, dst_fmt: int, dst_w: int, dst_h: int, flags: int) -> None:
        """Scale/convert the ``width`` x ``height`` picture in ``src`` into ``dst``."""
        lib = _lib()[0]
        key = (width, height, src_fmt, dst_w, dst_h, dst_fmt, flags)
        if key != self._key:
            ctx = lib.sws_getCachedContext(self._ctx, width, height, src_fmt, dst_w, dst_h, dst_fmt, flags,
                                           _ffi.NULL, _ffi.NULL, _ffi.NULL)
            if ctx == _ffi.NULL:  # the old context was freed by the call
                self._ctx, self._key = _ffi.NULL, None
                raise ValueError(f"swscale refused {width}x{height} fmt {src_fmt} -> {dst_w}x{dst_h} fmt {dst_fmt}")
            self._ctx, self._key = ctx, key
        sp = _ffi.new("const uint8_t *[4]", [_ffi.cast("const uint8_t *", p.ctypes.data) for p in src])
        ss = _ffi.new("int[4]", [int(p.strides[0]) for p in src])
        dp = _ffi.new("uint8_t *[4]", [_ffi.cast("uint8_t *", p.ctypes.data) for p in dst])
        ds = _ffi.new("int[4]", [int(p.strides[0]) for p in dst])
        rows = lib.sws_scale(self._ctx, sp, ss, 0, height, dp, ds)
        if rows != dst_h:
            raise ValueError(f"sws_scale wrote {rows} rows of {dst_h}")

    def close(self) -> None:
        libs = _libs  # set by the first scale, which made the context (never loaded here)
        if self._ctx != _ffi.NULL and libs is not None:
            libs[0].sws_freeContext(self._ctx)
        self._ctx, self._key = _ffi.NULL, None

    def __del__(self) -> None:
        self.close()
