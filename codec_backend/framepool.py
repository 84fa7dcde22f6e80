"""Decoder frame pools in guest memory: the libav side of zero-copy decode.

A :class:`FramePool` owns a range of the guest's region and is attached to one PyAV decoder
context.  The decoder then allocates its pictures (output and reference frames alike) in that
range through ``get_buffer2`` (``fp_get_buffer2`` in ``framepool.c``), so a decoded frame is
already in guest memory and the worker only reports where.  When a picture does not fit (pool
full, geometry changed while slots are in use, a decoder that does not use ``get_buffer2``),
libav's default allocator takes over and the worker copies that frame the old way: nothing is
lost.

PyAV exposes neither the ``AVCodecContext`` pointer nor ``get_buffer2``, and its wheels ship
no FFmpeg headers, so :func:`probe` establishes what it needs at run time and checks every
assumption before the first pool is made:

* the libav functions come from the very libraries PyAV loaded (``/proc/self/maps``);
* the offset of ``get_buffer2`` in ``AVCodecContext`` is the one word of a fresh context that
  holds ``avcodec_default_get_buffer2``;
* the offset of ``buf[0]`` in ``AVFrame`` is the word that points at an ``AVBufferRef`` whose
  ``data`` is the frame's ``data[0]`` (probed through ``/proc/self/mem``, which fails with EIO
  rather than faulting on a word that is not a pointer);
* the ``AVCodecContext`` behind a PyAV ``CodecContext`` is the pointer after the Cython
  object's header, and is accepted only if its ``av_class``, ``codec_type`` and ``codec_id``
  say it is that decoder;
* the ``AVFrame`` behind a PyAV ``VideoFrame`` is at the same place, checked once against a
  real frame's planes, line sizes and size: the worker lends each decoded picture by reading
  it there (:meth:`FramePool.lend_frame`) instead of building PyAV's plane objects per frame.

* the native module was built for this ABI's layouts (``abi.c_macros()``' checksum).

If any check fails, :func:`probe` says why and no pool is ever attached: decode falls back to
copying, which is slower but correct.  ``VMEDIAD_FRAME_POOL=0`` in a worker's environment makes
the probe fail the same way (the A/B switch of the benchmarks, and the fallback's test).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import av.error as av_error
from av.codec.context import CodecContext
from av.video.frame import VideoFrame
from cffi import FFI

from vmediad import abi

__all__ = ["DecodeLoop", "FramePool", "PoolStats", "Probe", "capture_log", "probe", "take_log_error"]

_ABI = FFI()
_ABI.cdef("""
int avcodec_default_get_buffer2(void *s, void *frame, int flags);
void avcodec_align_dimensions2(void *s, int *width, int *height, int linesize_align[8]);
const void *avcodec_get_class(void);
void *avcodec_alloc_context3(const void *codec);
void avcodec_free_context(void **avctx);
int av_image_fill_linesizes(int linesizes[4], int pix_fmt, int width);
int av_image_fill_plane_sizes(size_t size[4], int pix_fmt, int height, const ptrdiff_t linesizes[4]);
void *av_buffer_create(uint8_t *data, size_t size, void (*free)(void *opaque, uint8_t *data), void *opaque, int flags);
void *av_frame_alloc(void);
void av_frame_free(void **frame);
int av_frame_get_buffer(void *frame, int align);
int av_get_pix_fmt(const char *name);
const char *av_get_pix_fmt_name(int pix_fmt);
void *av_packet_alloc(void);
int av_new_packet(void *pkt, int size);
void av_packet_free(void **pkt);
int avcodec_send_packet(void *avctx, const void *pkt);
int avcodec_receive_frame(void *avctx, void *frame);
void av_frame_unref(void *frame);
void av_frame_move_ref(void *dst, void *src);
void av_log_set_callback(void (*callback)(void *, int, const char *, ...));
""")

# AVCodecContext's first fields, unchanged since FFmpeg 1.x.
_CTX_CODEC_TYPE = 12
_CTX_CODEC_ID = 24
_CTX_OPAQUE = 48
_SCAN_BYTES = 1024
_CAP_DR1 = 1 << 1  # AV_CODEC_CAP_DR1
# A Cython extension type with cdef methods: PyObject header (16 bytes), then its vtable
# pointer, then the first declared attribute: CodecContext.ptr, Frame.ptr.
_PYAV_CTX_PTR = 24
_PYAV_FRAME_PTR = 24
# AVFrame's width, height and format: fixed since FFmpeg 1.x (F_WIDTH etc. in the C module).
_FRAME_WIDTH, _FRAME_HEIGHT, _FRAME_FORMAT = 104, 108, 116


@dataclass(frozen=True, slots=True)
class Probe:
    """What :func:`probe` found: ``ok`` and the offsets, or the reason pools are off.
    ``loop``: :class:`DecodeLoop` may be used (else ``loop_reason`` says why not)."""

    ok: bool
    reason: str = ""
    off_get_buffer2: int = 0
    off_buf: int = 0
    loop: bool = False
    loop_reason: str = ""


@dataclass(frozen=True, slots=True)
class PoolStats:
    slots: int
    in_use: int
    slot_size: int
    hits: int
    misses: int
    relayouts: int


class _Mem:
    """Reads of arbitrary addresses that fail with OSError instead of faulting."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mem", os.O_RDONLY)

    def word(self, addr: int) -> int:
        data = os.pread(self._fd, 8, addr)
        if len(data) != 8:
            raise OSError("short read")
        return int(struct.unpack("<Q", data)[0])

    def i32(self, addr: int) -> int:
        data = os.pread(self._fd, 4, addr)
        if len(data) != 4:
            raise OSError("short read")
        return int(struct.unpack("<i", data)[0])

    def close(self) -> None:
        os.close(self._fd)


def _loaded(name: str) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if f"/{name}" in path and ".so" in path:
                return path
    return None


class _Av:
    def __init__(self) -> None:
        import av  # noqa: F401  (loads the libraries this module binds to)

        codec, util = _loaded("libavcodec"), _loaded("libavutil")
        if codec is None or util is None:
            raise OSError("PyAV's libavcodec/libavutil are not mapped")
        self.codec: Any = _ABI.dlopen(codec)
        self.util: Any = _ABI.dlopen(util)

    def addr(self, lib: Any, name: str) -> int:
        return int(_ABI.cast("uintptr_t", getattr(lib, name)))


_PROBE: Probe | None = None
_AV: _Av | None = None
_NATIVE: Any = None


def _free(fn: Any, ptr: Any) -> None:
    """Call a libav ``*_free(T **)`` function on ``ptr``."""
    fn(_ABI.new("void **", ptr))


def _layout_crc() -> int:
    """The ABI layout checksum a module built from this ``abi`` reports (``fp_abi_layout``)."""
    name, value = abi.c_macros()[-1]
    assert name == "ABI_LAYOUT_CRC"
    return int(value.rstrip("u"))


def _discover() -> Probe:
    global _AV, _NATIVE
    if os.environ.get("VMEDIAD_FRAME_POOL", "1") == "0":
        return Probe(False, "frame pools are turned off (VMEDIAD_FRAME_POOL=0)")
    if sys.byteorder != "little" or struct.calcsize("P") != 8:
        return Probe(False, "only 64-bit little-endian layouts are known")
    try:
        from codec_backend import _framepool  # type: ignore[attr-defined]
    except ImportError as e:
        return Probe(False, f"native frame pool not built: {e}")
    if int(_framepool.lib.fp_abi_layout()) != _layout_crc():
        return Probe(False, "the native frame pool was built for other ABI layouts: rebuild it (pip install)")
    try:
        av_ = _Av()
    except OSError as e:
        return Probe(False, str(e))
    mem = _Mem()
    try:
        dflt = av_.addr(av_.codec, "avcodec_default_get_buffer2")
        ctx = av_.codec.avcodec_alloc_context3(_ABI.NULL)
        if ctx == _ABI.NULL:
            return Probe(False, "avcodec_alloc_context3 failed")
        try:
            base = int(_ABI.cast("uintptr_t", ctx))
            if mem.word(base) != int(_ABI.cast("uintptr_t", av_.codec.avcodec_get_class())):
                return Probe(False, "AVCodecContext does not start with its AVClass")
            hits = [off for off in range(0, _SCAN_BYTES, 8) if mem.word(base + off) == dflt]
        finally:
            _free(av_.codec.avcodec_free_context, ctx)
        if len(hits) != 1:
            return Probe(False, f"get_buffer2 not found in AVCodecContext ({len(hits)} candidates)")
        off_gb2 = hits[0]

        frame = av_.util.av_frame_alloc()
        if frame == _ABI.NULL:
            return Probe(False, "av_frame_alloc failed")
        try:
            fb = int(_ABI.cast("uintptr_t", frame))
            ints = _ABI.cast("int *", frame)
            ints[_FRAME_WIDTH // 4], ints[_FRAME_HEIGHT // 4], ints[_FRAME_FORMAT // 4] = 64, 48, 0  # YUV420P
            if av_.util.av_frame_get_buffer(frame, 0) != 0:
                return Probe(False, "AVFrame width/height/format are not where expected")
            data0, ls0 = mem.word(fb), mem.i32(fb + 64)
            if data0 == 0 or ls0 < 64 or mem.word(fb + 24) != 0:
                return Probe(False, "AVFrame data/linesize are not where expected")
            buf = []
            for off in range(120, _SCAN_BYTES, 8):
                q = mem.word(fb + off)
                if not 4096 <= q < 1 << 47 or q % 8:
                    continue
                try:
                    if mem.word(q + 8) == data0:
                        buf.append(off)
                except OSError:
                    continue
        finally:
            _free(av_.util.av_frame_free, frame)
        if len(buf) != 1:
            return Probe(False, f"AVFrame.buf not found ({len(buf)} candidates)")
        off_buf = buf[0]
        if not _pyav_frame_checks(mem):
            return Probe(False, "the AVFrame behind a PyAV VideoFrame is not where expected")
    except OSError as e:
        return Probe(False, f"probing libav failed: {e}")
    finally:
        mem.close()

    loop_reason = _probe_decode_loop(av_)
    _framepool.lib.fp_setup(
        dflt,
        av_.addr(av_.codec, "avcodec_align_dimensions2"),
        av_.addr(av_.util, "av_image_fill_linesizes"),
        av_.addr(av_.util, "av_image_fill_plane_sizes"),
        av_.addr(av_.util, "av_buffer_create"),
        off_gb2,
        _CTX_OPAQUE,
        off_buf,
        _PYAV_FRAME_PTR,
    )
    if isinstance(loop_reason, int):
        _framepool.lib.fp_setup_decode(*(av_.addr(av_.codec, n) for n in (
            "av_packet_alloc", "av_new_packet", "av_packet_free", "avcodec_send_packet",
            "avcodec_receive_frame")), *(av_.addr(av_.util, n) for n in ("av_frame_unref", "av_frame_move_ref")),
            loop_reason)
    _AV, _NATIVE = av_, _framepool
    if isinstance(loop_reason, int):
        return Probe(True, "", off_gb2, off_buf, True)
    return Probe(True, "", off_gb2, off_buf, False, loop_reason)


def _probe_decode_loop(av_: _Av) -> int | str:
    """What fp_decode assumes of AVPacket and AVFrame: the offset of AVFrame.pts, or why the
    loop is off.  AVPacket: buf, pts, dts, data and size lead it (checked on a real packet);
    AVFrame.pts is found as the one word that holds a pts set through PyAV, twice."""
    mem = _Mem()
    try:
        pkt = av_.codec.av_packet_alloc()
        if pkt == _ABI.NULL:
            return "av_packet_alloc failed"
        try:
            if av_.codec.av_new_packet(pkt, 100) != 0:
                return "av_new_packet failed"
            pb = int(_ABI.cast("uintptr_t", pkt))
            buf, data = mem.word(pb), mem.word(pb + 24)
            nopts = 1 << 63
            if not (buf and data and mem.word(buf + 8) == data and mem.i32(pb + 32) == 100
                    and mem.word(pb + 8) == nopts and mem.word(pb + 16) == nopts):
                return "AVPacket buf/pts/dts/data/size are not where expected"
        finally:
            _free(av_.codec.av_packet_free, pkt)
        vf = VideoFrame(64, 48, "yuv420p")
        p = mem.word(id(vf) + _PYAV_FRAME_PTR)
        found: list[int] = []
        for value in (0x1122334455667788, 0x0A0B0C0D0E0F1011):
            vf.pts = value
            hits = [off for off in range(120, _SCAN_BYTES, 8) if mem.word(p + off) == value]
            found.append(hits[0] if len(hits) == 1 else -1)
        if found[0] < 0 or found[0] != found[1]:
            return "AVFrame.pts not found"
        return found[0]
    except OSError as e:
        return f"probing AVPacket/AVFrame failed: {e}"
    finally:
        mem.close()


def _pyav_frame_checks(mem: _Mem) -> bool:
    """Whether the AVFrame pointer of a PyAV VideoFrame is at ``_PYAV_FRAME_PTR``: the
    AVFrame found there must hold the frame's plane addresses, line sizes and size."""
    vf = VideoFrame(64, 48, "yuv420p")
    p = mem.word(id(vf) + _PYAV_FRAME_PTR)
    if p < 4096:
        return False
    planes = vf.planes
    return (all(mem.word(p + 8 * i) == pl.buffer_ptr and mem.i32(p + 64 + 4 * i) == pl.line_size
                for i, pl in enumerate(planes))
            and mem.i32(p + _FRAME_WIDTH) == vf.width and mem.i32(p + _FRAME_HEIGHT) == vf.height)


_LOG: Any = None  # the native module once its log callback is installed
_LOG_TRIED = False


def capture_log() -> bool:
    """Keep libav's error lines per thread (``fp_log_cb``) for :func:`take_log_error`.

    Once per process, after ``import av`` (which installs PyAV's silent callback); libav then
    prints nothing, as with PyAV's, and each thread's last error line is kept."""
    global _LOG, _LOG_TRIED
    if not _LOG_TRIED:
        _LOG_TRIED = True
        try:
            from codec_backend import _framepool  # type: ignore[attr-defined]

            av_ = _AV if _AV is not None else _Av()
            _framepool.lib.fp_log_install(av_.addr(av_.util, "av_log_set_callback"))
            _LOG = _framepool
        except (ImportError, OSError, AttributeError):
            _LOG = None
    return _LOG is not None


def take_log_error() -> str:
    """The last error line libav logged on this thread since the last call ("" if none)."""
    if _LOG is None:
        return ""
    buf = _LOG.ffi.new("char[]", 512)
    n = int(_LOG.lib.fp_log_take(buf, 512))
    return bytes(_LOG.ffi.buffer(buf, n)).decode("utf-8", "replace") if n > 0 else ""


def probe() -> Probe:
    """Check (once per process) that pools can be used with the loaded libav."""
    global _PROBE
    if _PROBE is None:
        try:
            _PROBE = _discover()
        except Exception as e:  # any surprise means no pools, never a failed session
            _PROBE = Probe(False, f"probing libav failed: {type(e).__name__}: {e}")
    return _PROBE


def _context_pointer(ctx: Any) -> int | None:
    """The AVCodecContext behind a PyAV decoder context, or None if it cannot be proven."""
    assert _AV is not None
    try:
        mem = _Mem()
    except OSError:
        return None
    try:
        p = mem.word(id(ctx) + _PYAV_CTX_PTR)
        if p < 4096:
            return None
        klass = int(_ABI.cast("uintptr_t", _AV.codec.avcodec_get_class()))
        if mem.word(p) != klass or mem.i32(p + _CTX_CODEC_TYPE) != 0:
            return None
        if mem.i32(p + _CTX_CODEC_ID) != ctx.codec.id:
            return None
        return p
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    finally:
        mem.close()


_YUV420P: Mapping[str, abi.PixFmt] = MappingProxyType({"yuv420p": abi.PixFmt.YUV420P,
                                                        "yuvj420p": abi.PixFmt.YUV420P})


class FramePool:
    """The picture slots of one decoder, in the frame pool at ``[addr, addr + size)`` (see
    ``abi.FramePoolHeader``): lent counters first, then the slots.  The mapping must stay until
    :meth:`close` has run and every frame the decoder handed out is gone.

    All slots are laid out for one geometry; the layout follows the stream when no slot is
    in use or lent.  A slot is reused only when libav's last reference to it is dropped and
    the guest's lent counter is back at 0."""

    MAX_FORMATS = 16  # FP_MAX_FORMATS in framepool.c

    def __init__(self, addr: int, size: int, max_slots: int = abi.POOL_MAX_SLOTS,
                 formats: Mapping[str, abi.PixFmt] = _YUV420P) -> None:
        """``formats``: the libav pixel formats pictures may have to get a slot, each with the
        ABI format its frames are reported as (at most ``MAX_FORMATS``); others are decoded
        into libav's memory (and converted and copied by the session)."""
        pr = probe()
        if not pr.ok:
            raise RuntimeError(f"frame pools unavailable: {pr.reason}")
        if size < abi.POOL_MIN:
            raise ValueError(f"a frame pool needs at least {abi.POOL_MIN} bytes")
        if len(formats) > self.MAX_FORMATS:
            raise ValueError(f"a frame pool takes at most {self.MAX_FORMATS} pixel formats")
        self.addr, self.size = addr, size
        assert _AV is not None
        known = [(int(_AV.util.av_get_pix_fmt(name.encode())), int(fmt)) for name, fmt in formats.items()]
        known = [k for k in known if k[0] >= 0] or [(-1, -1)]
        ids = _NATIVE.ffi.new("int[]", [k[0] for k in known])
        abi_ids = _NATIVE.ffi.new("int[]", [k[1] for k in known])
        self._ptr: Any = _NATIVE.lib.fp_pool_new(addr, size, min(max_slots, abi.POOL_MAX_SLOTS), ids, abi_ids,
                                                 len(known))
        if self._ptr == _NATIVE.ffi.NULL:
            raise MemoryError("frame pool")
        self._out = _NATIVE.ffi.new("int64_t[7]")

    def attach(self, ctx: Any) -> bool:
        """Install the pool on a PyAV decoder context.  False, and nothing installed, if its
        pointer can't be proven or the decoder lacks AV_CODEC_CAP_DR1: libavcodec allows a
        custom get_buffer2 only for decoders with direct rendering (libdav1d has none)."""
        try:
            if not int(ctx.codec.capabilities) & _CAP_DR1:
                return False
        except AttributeError:
            return False
        p = _context_pointer(ctx)
        if p is None or self._ptr is None:
            return False
        _NATIVE.lib.fp_attach(self._ptr, p)
        return True

    def owns(self, ptr: int) -> bool:
        return self.addr <= ptr < self.addr + self.size

    def lend_frame(self, frame: VideoFrame, shape: Any) -> tuple[int, int, list[int], list[int]] | None:
        """Count a decoded picture the decoder wrote into a slot as lent to the guest, read
        from its AVFrame (no PyAV plane objects): (slot, the slot's offset in the pool, plane
        offsets in the slot x 3, line sizes x 3), or None if it is not in a slot.  ``shape``
        is from :meth:`shape`.  Raises ValueError if a plane is narrower than its rows or does
        not lie inside its slot."""
        if self._ptr is None:
            return None
        if type(frame) is not VideoFrame:  # the pointer is read at a fixed offset
            raise TypeError(f"not a VideoFrame: {type(frame).__name__}")
        slot = int(_NATIVE.lib.fp_lend_frame(self._ptr, id(frame), shape[1], shape[0], self._out))
        if slot == -1:
            return None
        if slot < 0:
            raise ValueError("decoded plane narrower than its format or outside its pool slot")
        out = _NATIVE.ffi.unpack(self._out, 7)  # fp_lend_frame's order
        return slot, out[0], out[1:4], out[4:7]

    @staticmethod
    def shape(shapes: list[tuple[int, int]]) -> tuple[Any, int]:
        """Plane shapes ((rows, row bytes) per plane) as :meth:`lend_frame` takes them."""
        return _NATIVE.ffi.new("int64_t[]", [v for rb in shapes for v in rb] or [0]), len(shapes)

    def unlend(self, slot: int) -> None:
        """Undo a :meth:`lend_frame` whose frame never reached the guest."""
        if self._ptr is not None:
            _NATIVE.lib.fp_unlend(self._ptr, slot)

    def statistics(self) -> PoolStats:
        if self._ptr is None:
            return PoolStats(0, 0, 0, 0, 0, 0)
        out = _NATIVE.ffi.new("uint64_t[6]")
        _NATIVE.lib.fp_stats(self._ptr, out)
        return PoolStats(*(int(v) for v in out))

    def close(self) -> None:
        """Stop handing out slots.  Call after the decoder context is dropped; slots of frames
        still alive are released with them."""
        if self._ptr is not None:
            _NATIVE.lib.fp_close(self._ptr)
            self._ptr = None


class DecodeLoop:
    """The packet loop of one pooled decoder in C (``fp_decode``): chunks of guest memory in,
    pooled pictures lent with their frame-table entries out, no Python per packet or frame.

    A picture the loop cannot lend (not in a slot, another geometry or format) stops it and
    is handed over as a PyAV frame (:meth:`take`), so the session treats it exactly as one
    ``decode()`` returned.  The loop writes the frame-table entries of the pictures it lends
    itself (``abi.FrameEntry``'s bytes).  ``VMEDIAD_DECODE_LOOP=0`` in a worker's environment
    turns the loop off (the A/B switch of the benchmarks)."""

    MAX_OUT = 64  # entries per call; a task with more calls again

    def __init__(self, pool: FramePool) -> None:
        assert _AV is not None and _NATIVE is not None
        self._pool = pool
        frame = _AV.util.av_frame_alloc()
        if frame == _ABI.NULL:
            raise MemoryError("av_frame_alloc")
        self._frame: Any = frame
        self._frame_addr = int(_ABI.cast("uintptr_t", frame))
        self._out: Any = _NATIVE.ffi.new("uint8_t[]", abi.FrameEntry.SIZE * self.MAX_OUT)
        self._state: Any = _NATIVE.ffi.new("int64_t[4]")
        self._ctx_id = 0
        self._avctx = 0

    @staticmethod
    def enabled() -> bool:
        return probe().loop and os.environ.get("VMEDIAD_DECODE_LOOP", "1") != "0"

    def bind(self, ctx: Any) -> bool:
        """Use ``ctx`` (its AVCodecContext is proven once per context it holds).

        The pointer PyAV holds is read again on every bind: a session's context reopened
        after FLUSH is a new object that often gets the old one's ``id`` while the old
        AVCodecContext is freed, so a pointer cached by ``id`` alone could be a freed one."""
        if not isinstance(ctx, CodecContext):
            return False
        held = int(_ABI.cast("uint64_t *", id(ctx) + _PYAV_CTX_PTR)[0])  # a live object's own field
        if id(ctx) != self._ctx_id or held != self._avctx:
            p = _context_pointer(ctx)
            if p is None:
                return False
            self._ctx_id, self._avctx = id(ctx), p
        return True

    def run(self, base: int, chunks: Any, n: int, start: int, receiving: int, width: int, height: int,
            shape: Any | None, fmt: int) -> tuple[int, int, int, bytes, int]:
        """One fp_decode call: (code, next chunk, receiving, the lent pictures' frame-table
        entries (abi.FrameEntry bytes, back to back), libav error).  ``shape``:
        :meth:`FramePool.shape` of the session's geometry, None before it has one (``width``
        0: no picture is lent then); ``fmt``: the abi.PixFmt that geometry is of.  A picture
        is lent only if it has that size and a libav format the pool reports as ``fmt``."""
        ptr = self._pool._ptr
        if ptr is None:
            raise RuntimeError("the frame pool is closed")
        st = self._state
        st[0], st[1] = start, receiving
        arr, nplanes = (_NATIVE.ffi.NULL, 0) if shape is None else shape
        rc = int(_NATIVE.lib.fp_decode(ptr, self._avctx, self._frame_addr, base, chunks, n, width, height,
                                       nplanes, arr, fmt, self._out, self.MAX_OUT, st))
        nout = int(st[2])
        entries = _NATIVE.ffi.buffer(self._out, abi.FrameEntry.SIZE * nout)[:] if nout else b""
        return rc, int(st[0]), int(st[1]), entries, int(st[3])

    @staticmethod
    def chunks(items: list[tuple[int, int, int, int]]) -> Any:
        """The chunk array fp_decode reads: (offset, length, pts, pts valid) per chunk."""
        assert _NATIVE is not None
        return _NATIVE.ffi.new("int64_t[]", [v for c in items for v in c] or [0])

    def take(self) -> VideoFrame | None:
        """The picture the loop stopped at, as a PyAV frame (None: a format PyAV can't hold;
        the picture is dropped)."""
        assert _AV is not None and _NATIVE is not None
        f = _ABI.cast("int *", self._frame)
        w, h, fmt = int(f[_FRAME_WIDTH // 4]), int(f[_FRAME_HEIGHT // 4]), int(f[_FRAME_FORMAT // 4])
        name = _AV.util.av_get_pix_fmt_name(fmt)
        try:
            if name == _ABI.NULL:
                raise ValueError(f"pixel format {fmt}")
            vf = VideoFrame(w, h, _ABI.string(name).decode())
        except (ValueError, TypeError, av_error.FFmpegError):
            _AV.util.av_frame_unref(self._frame)
            return None
        _NATIVE.lib.fp_take_frame(self._frame_addr, id(vf))
        return vf

    def close(self) -> None:
        if self._frame is not None and _AV is not None:
            _free(_AV.util.av_frame_free, self._frame)
            self._frame = None


# fp_decode's return codes (framepool.c).
FD_DONE, FD_HELD, FD_FULL, FD_ERROR, FD_NOMEM = range(5)
