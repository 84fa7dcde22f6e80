"""Encoding: an encode SessionConfig resolved to its target, the encoder context built from
it (presets, rate control, guest options) and ``_EncoderSession`` (input wrapping or
conversion, packet queue and emission)."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, cast

import av
import av.error
import numpy as np
from av.codec.context import ThreadType
from av.packet import Packet
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType, VideoFrame

from codec_backend.inputs import Input
from codec_backend.options import _guest_options, _merge_params, _open_ctx
from codec_backend.session_base import (
    _I64_MAX,
    _I64_MIN,
    DEFAULT_GEOMETRY,
    INPUT_SLACK,
    MAX_STRIDE,
    CodecError,
    _check_config,
    _check_range,
    _codec,
    _codec_formats,
    _ff_error,
    _InLayout,
    _PendingPacket,
    _pix_fmt,
    _Session,
    _Stats,
)
from vmediad import abi
from vmediad.abi import (
    Codec,
    ErrorCode,
    GeometryLimits,
    OutHeader,
    PacketEntry,
    PixFmt,
    RateControl,
    SessionConfig,
)

# What a guest may hand every encoder: converted to the codec's 4:2:0 when it takes no such input.
ENCODE_FORMATS: Final = (PixFmt.YUV420P, PixFmt.NV12, PixFmt.RGB24, PixFmt.BGRA)
# Taken only by a codec that encodes them as they are (see encode_formats); never converted,
# so a 4:4:4 or 10-bit picture is not silently made 8-bit 4:2:0.
_NATIVE_ONLY: Final = (PixFmt.YUV422P, PixFmt.YUV444P, PixFmt.YUV420P10LE)
_TEN_BIT_MAX: Final = (1 << 10) - 1

_JPEG_RANGE: Final = 2  # AVCOL_RANGE_JPEG
_NATIVE_ENCODERS: Final = frozenset({"mjpeg", "mpeg4"})
# Encoders that refuse a picture whose subsampled chroma would be half a sample wide or high (a
# 4:2:0 picture of odd width or height, a 4:2:2 one of odd width); the others pad it.  Refused
# at SESSION_OPEN, before avcodec_open2 fails with a bare "Generic error in an external library".
_EVEN_420: Final = frozenset({"libx264", "libx265"})
# Context formats whose chroma is subsampled: (horizontally, vertically).
_HALF_CHROMA: Final = {"yuv420p": (True, True), "nv12": (True, True), "yuv420p10le": (True, True),
                       "yuv422p": (True, False)}
# libvpx encoders (VP8, VP9) and the numeric presets (cpu-used) each takes.
_LIBVPX: Final = {"libvpx": r"-?\d{1,2}", "libvpx-vp9": r"-?\d"}
_VP8_CQ_CAP: Final = "1000M"  # bit/s: out of reach, so crf alone sets the quality
_B_FRAMES_ON: Final = {"libx264": 3, "mpeg4": 2}
_DEFAULT_QSCALE: Final = 3
_FF_QP2LAMBDA: Final = 118


def _copy_planes_in(frame: VideoFrame, src: np.ndarray, fmt: PixFmt, width: int, height: int,
                    linesizes: tuple[int, ...]) -> int:
    """Copy a packed-with-strides image into an FFmpeg-owned frame; returns bytes copied."""
    pos = copied = 0
    for i, (rows, row_bytes) in enumerate(abi.plane_shapes(fmt, width, height)):
        plane = frame.planes[i]
        dst = np.ndarray((rows, row_bytes), np.uint8, buffer=memoryview(plane),
                         strides=(plane.line_size, 1))
        np.copyto(dst, np.lib.stride_tricks.as_strided(
            src[pos:], (rows, row_bytes), (linesizes[i], 1), writeable=False))
        pos += rows * linesizes[i]
        copied += rows * row_bytes
    return copied


def _copy_10bit_in(frame: VideoFrame, mem: memoryview, src_off: int, fmt: PixFmt, width: int, height: int,
                   linesizes: tuple[int, ...]) -> int:
    """Copy a 10-bit guest picture into ``frame`` (yuv420p10le); returns bytes copied.

    Samples are cut to their 10 bits on the way (P010's live in the high bits), so the encoder
    never reads a sample above 1023 whatever the guest wrote: 10-bit input is never wrapped in
    place.  Rows may start at odd offsets: the uint16 views below need not be aligned."""
    cw, ch = (width + 1) // 2, (height + 1) // 2

    def src(pos: int, rows: int, cols: int, stride: int) -> np.ndarray:
        return np.ndarray((rows, cols), "<u2", buffer=mem, offset=src_off + pos, strides=(stride, 2))

    def dst(i: int, rows: int, cols: int) -> np.ndarray:
        plane = frame.planes[i]
        return np.ndarray((rows, cols), "<u2", buffer=memoryview(plane), strides=(plane.line_size, 2))

    y = src(0, height, width, linesizes[0])
    if fmt == PixFmt.YUV420P10LE:
        np.bitwise_and(y, _TEN_BIT_MAX, out=dst(0, height, width))
        pos = height * linesizes[0]
        for i in (1, 2):
            np.bitwise_and(src(pos, ch, cw, linesizes[i]), _TEN_BIT_MAX, out=dst(i, ch, cw))
            pos += ch * linesizes[i]
    else:  # P010LE: 10 bits in the high bits, chroma interleaved U, V
        np.right_shift(y, 6, out=dst(0, height, width))
        uv = src(height * linesizes[0], ch, 2 * cw, linesizes[1])
        np.right_shift(uv[:, 0::2], 6, out=dst(1, ch, cw))
        np.right_shift(uv[:, 1::2], 6, out=dst(2, ch, cw))
    return 2 * (width * height + 2 * cw * ch)


def encode_formats(impl: str) -> tuple[PixFmt, ...]:
    """The formats a guest may hand the encoder ``impl`` of this FFmpeg build.

    ENCODE_FORMATS always (converted when the codec takes no such input); 4:2:2, 4:4:4 and
    10-bit 4:2:0 when the codec encodes them as they are; P010 with 10-bit 4:2:0 (its samples
    are moved to the low bits, which loses nothing)."""
    takes = _codec_formats(impl)
    out = list(ENCODE_FORMATS)
    out += [f for f in _NATIVE_ONLY if abi.PIX_FMT_NAMES[f] in takes]
    if PixFmt.YUV420P10LE in out:
        out.append(PixFmt.P010LE)
    return tuple(out)


def encode_zero_copy_formats(impl: str) -> tuple[PixFmt, ...]:
    """The formats the encoder ``impl`` reads in place from guest memory (no conversion, no copy
    when the frame's buffer allows it); 10-bit input is always copied (see _copy_10bit_in)."""
    takes = _codec_formats(impl)
    return tuple(f for f in (PixFmt.YUV420P, PixFmt.NV12, PixFmt.YUV422P, PixFmt.YUV444P)
                 if abi.PIX_FMT_NAMES[f] in takes)


def _context_format(fmt: PixFmt, impl: str) -> str:
    """The format the codec context of ``impl`` works in for guest input ``fmt``; BAD_ARG,
    naming the formats it does take, when it cannot encode ``fmt``."""
    allowed = encode_formats(impl)
    if fmt not in allowed:
        names = ", ".join(abi.PIX_FMT_NAMES[f] for f in allowed)
        raise CodecError(ErrorCode.BAD_ARG, f"{impl} cannot encode {abi.PIX_FMT_NAMES[fmt]}; "
                                            f"it takes {names}")
    if fmt in abi.TEN_BIT_FORMATS:
        return "yuv420p10le"
    if fmt in _NATIVE_ONLY:
        return abi.PIX_FMT_NAMES[fmt]
    return "nv12" if fmt == PixFmt.NV12 and "nv12" in _codec_formats(impl) else "yuv420p"


# --- codec contexts (shared by the sessions and by the direct-PyAV benchmark floor) -------
@dataclass(frozen=True, slots=True)
class EncoderTarget:
    """What an encode SessionConfig resolves to after validation."""

    codec: Codec
    impl: str
    fmt: PixFmt  # the guest's input format
    ctx_fmt: str  # the format the codec context takes (and the session converts ``fmt`` to)
    time_base: Fraction
    fps: Fraction


def _encoder_target(cfg: SessionConfig, caps: GeometryLimits) -> EncoderTarget:
    _check_config(cfg, caps)
    codec, impl = _codec(cfg.codec, abi.ENCODER_IMPL, "w")
    fmt = _pix_fmt(cfg.pix_fmt, (*ENCODE_FORMATS, *_NATIVE_ONLY, PixFmt.P010LE))
    ctx_fmt = _context_format(fmt, impl)
    half_w, half_h = _HALF_CHROMA.get(ctx_fmt, (False, False))
    if impl in _EVEN_420 and ((half_w and cfg.width % 2) or (half_h and cfg.height % 2)):
        need = "an even width and height" if half_h else "an even width"
        chroma = "4:2:2" if half_w and not half_h else "4:2:0"
        raise CodecError(ErrorCode.BAD_ARG, f"{impl} encodes {chroma}, which needs {need}; "
                                            f"got {cfg.width}x{cfg.height}")
    return EncoderTarget(codec, impl, fmt, ctx_fmt, Fraction(cfg.tb_num, cfg.tb_den),
                         Fraction(cfg.fps_num, cfg.fps_den))


def open_encoder_context(cfg: SessionConfig, caps: GeometryLimits = DEFAULT_GEOMETRY) -> VideoCodecContext:
    """The opened encoder context an ENCODE session with ``cfg`` uses (same options, same defaults).

    Its ``pix_fmt`` is the format frames must be in (``EncoderTarget.ctx_fmt``):
    the session converts other guest formats to it.
    """
    t = _encoder_target(cfg, caps)
    return _build_encoder(cfg, t.impl, t.ctx_fmt, t.time_base, t.fps)


def _build_encoder(cfg: SessionConfig, impl: str, ctx_fmt: str, tb: Fraction,
                   fps: Fraction) -> VideoCodecContext:
    ctx = cast(VideoCodecContext, av.CodecContext.create(impl, "w"))
    ctx.width, ctx.height, ctx.pix_fmt = cfg.width, cfg.height, ctx_fmt
    ctx.time_base = tb
    ctx.framerate = fps
    if cfg.gop:
        if cfg.gop > 0x7FFF_FFFF:
            raise CodecError(ErrorCode.BAD_ARG, "gop too large")
        ctx.gop_size = cfg.gop
    ctx.thread_count = cfg.threads
    ctx.thread_type = ThreadType.FRAME if impl == "libx264" else ThreadType.SLICE
    if impl in ("libx264", "mpeg4"):
        ctx.max_b_frames = _B_FRAMES_ON[impl] if cfg.bframes else 0
    elif impl == "libx265" and not cfg.bframes:
        ctx.max_b_frames = 0
    if impl == "mjpeg":
        ctx.color_range = _JPEG_RANGE

    opts: dict[str, str] = {}
    _preset(cfg, impl, opts)
    _rate_control(cfg, impl, ctx, opts)
    if cfg.profile:
        if any(o.name == "profile" for o in ctx.supported_options.private):
            opts["profile"] = cfg.profile
        elif cfg.profile in ctx.profiles:
            ctx.profile = cfg.profile
        else:
            raise CodecError(ErrorCode.BAD_ARG, f"unknown profile {cfg.profile!r} for {impl}")
    guest = _guest_options(ctx, cfg.options)
    if impl == "libx265":
        _merge_params(guest, "x265-params", "log-level=error")
    elif impl == "libsvtav1" and not cfg.bframes:
        _merge_params(guest, "svtav1-params", "pred-struct=1")
    opts.update(guest)
    _open_ctx(ctx, opts)
    return ctx


def _preset(cfg: SessionConfig, impl: str, opts: dict[str, str]) -> None:
    preset = cfg.preset
    if impl in ("libx264", "libx265"):
        opts["preset"] = preset or "ultrafast"
    elif impl == "libsvtav1":
        if preset and not re.fullmatch(r"-?\d{1,2}", preset):
            raise CodecError(ErrorCode.BAD_ARG, "libsvtav1 preset must be a number")
        opts["preset"] = preset or "10"
    elif impl in _LIBVPX:
        if not preset:
            opts.update({"deadline": "realtime", "cpu-used": "8"})
        elif preset in ("realtime", "good", "best"):
            opts["deadline"] = preset
        elif re.fullmatch(_LIBVPX[impl], preset):
            opts.update({"deadline": "realtime" if int(preset) >= 5 else "good",
                         "cpu-used": preset})
        else:
            raise CodecError(ErrorCode.BAD_ARG, f"bad {impl} preset {preset!r}")
        if not cfg.bframes:
            opts["lag-in-frames"] = "0"
    elif preset:
        raise CodecError(ErrorCode.BAD_ARG, f"{impl} has no presets")


def _rate_control(cfg: SessionConfig, impl: str, ctx: VideoCodecContext, opts: dict[str, str]) -> None:
    mode, value = cfg.rc_mode, cfg.rc_value
    if mode == RateControl.BITRATE:
        if not 0 < value <= 1 << 40:
            raise CodecError(ErrorCode.BAD_ARG, "bitrate out of range")
        ctx.bit_rate = value
        return
    if mode in (RateControl.CRF, RateControl.QP):
        if not 0 <= value <= 255:
            raise CodecError(ErrorCode.BAD_ARG, "CRF/QP out of range")
    elif mode != RateControl.DEFAULT:
        raise CodecError(ErrorCode.BAD_ARG, f"unknown rc_mode {mode}")
    if impl in _NATIVE_ENCODERS:
        q = value if mode != RateControl.DEFAULT else _DEFAULT_QSCALE
        if not 1 <= q <= 31:
            raise CodecError(ErrorCode.BAD_ARG, "qscale must be 1..31")
        ctx.qscale = True
        ctx.global_quality = q * _FF_QP2LAMBDA
    elif impl in _LIBVPX:
        opts["b"] = "0"
        if mode == RateControl.QP:
            opts.update({"qmin": str(value), "qmax": str(value), "crf": str(value)})
        else:
            if impl == "libvpx":
                # VP8's crf is constrained quality: b=0 would leave libvpx's default
                # 256 kbit/s cap in charge and every crf would look the same.
                opts.update({"b": _VP8_CQ_CAP, "qmin": "0", "qmax": "63"})
            opts["crf"] = str(value) if mode == RateControl.CRF else "30"
    elif mode == RateControl.CRF:
        opts["crf"] = str(value)
    elif mode == RateControl.QP:
        opts["qp"] = str(value)


class _EncoderSession(_Session):
    def __init__(self, cfg: SessionConfig, caps: GeometryLimits, stats: _Stats) -> None:
        super().__init__(stats)
        target = _encoder_target(cfg, caps)
        self._codec, self._impl = target.codec, target.impl
        self._cfg = cfg
        self._fmt = target.fmt
        self._fmt_name = abi.PIX_FMT_NAMES[self._fmt]
        self._w, self._h = cfg.width, cfg.height
        self._shapes = abi.plane_shapes(self._fmt, self._w, self._h)
        self._ctx_fmt = target.ctx_fmt
        self._convert = self._ctx_fmt != self._fmt_name and self._fmt not in abi.TEN_BIT_FORMATS
        self._convert_bytes = abi.frame_size(PixFmt(PixFmt.NV12 if self._ctx_fmt == "nv12"
                                                  else PixFmt.YUV420P), self._w, self._h)
        self._tb, self._fps = target.time_base, target.fps
        self._duration = max(1, round(1 / (self._fps * self._tb)))
        self._next_pts = 0
        self._layouts: dict[tuple[int, ...], _InLayout] = {}
        self._pending: deque[_PendingPacket] = deque()
        self._retains_input = False
        self._fed = 0
        self._ctx: VideoCodecContext | None = None
        self._ctx = self._open()

    def _open(self) -> VideoCodecContext:
        ctx = _build_encoder(self._cfg, self._impl, self._ctx_fmt, self._tb, self._fps)
        # FFmpeg's own encoders keep references to input frames across calls when
        # they reorder (B-frames); those frames must not point into guest memory.
        self._retains_input = self._impl in _NATIVE_ENCODERS and (
            ctx.max_b_frames > 0 or ThreadType.FRAME in ctx.thread_type)
        self._fed = 0
        return ctx

    def _layout(self, strides: tuple[int, ...]) -> _InLayout:
        layout = self._layouts.get(strides)
        if layout is not None:
            return layout
        linesizes: list[int] = []
        need = 0
        for i, (rows, row_bytes) in enumerate(self._shapes):
            stride = strides[i] if i < len(strides) else 0
            stride = stride or row_bytes
            if stride < row_bytes or stride > MAX_STRIDE:
                raise CodecError(ErrorCode.BAD_ARG, f"plane {i}: stride {stride} invalid")
            linesizes.append(stride)
            need += rows * stride
        # from_numpy_buffer derives a 4:2:0 height as rows // 6 * 4, which is wrong
        # (and silently rescaled by PyAV) unless the height is a multiple of 4.
        even = self._w % 2 == 0 and self._h % 4 == 0
        s0 = linesizes[0]
        if self._fmt == PixFmt.YUV420P:
            public = even and s0 % 2 == 0 and linesizes[1] == linesizes[2] == s0 // 2
        elif self._fmt == PixFmt.NV12:
            public = even and linesizes[1] == s0
        else:
            public = self._fmt in (PixFmt.RGB24, PixFmt.BGRA)
        layout = _InLayout(tuple(linesizes), need, public)
        if len(self._layouts) >= 8:
            self._layouts.clear()
        self._layouts[strides] = layout
        return layout

    def _wrap(self, mem: memoryview, src_off: int, src_len: int,
              strides: tuple[int, ...]) -> tuple[VideoFrame, int]:
        """The input as a VideoFrame, in place when possible; returns (frame, bytes copied)."""
        layout = self._layout(strides)
        if layout.need > src_len:
            raise CodecError(ErrorCode.BAD_ARG,
                             f"frame needs {layout.need} bytes, src_len is {src_len}")
        w, h, fmt, name = self._w, self._h, self._fmt, self._fmt_name
        s = layout.linesizes
        if fmt in abi.TEN_BIT_FORMATS:
            ten = VideoFrame(w, h, self._ctx_fmt)
            return ten, _copy_10bit_in(ten, mem, src_off, fmt, w, h, s)
        # The arrays below alias guest memory: the VideoFrame built on them holds a
        # reference (and the region's buffer export) until FFmpeg unrefs the frame.
        # libx264/x265/libvpx/libsvtav1 copy the picture inside avcodec_send_frame.
        in_place = src_off + layout.need + INPUT_SLACK <= mem.nbytes
        if self._retains_input and not self._convert:
            in_place = False
        frame: VideoFrame | None = None
        copied = 0
        if in_place and layout.public:
            if fmt in (PixFmt.YUV420P, PixFmt.NV12):
                arr = np.ndarray((h * 3 // 2, w), np.uint8, buffer=mem, offset=src_off,
                                 strides=(s[0], 1))
                frame = VideoFrame.from_numpy_buffer(arr, name, width=w)
            else:
                depth = 3 if fmt == PixFmt.RGB24 else 4
                arr = np.ndarray((h, w, depth), np.uint8, buffer=mem, offset=src_off,
                                 strides=(s[0], depth, 1))
                frame = VideoFrame.from_numpy_buffer(arr, name)
        elif in_place:
            # Same zero-copy wrapping as from_numpy_buffer, with per-plane linesizes
            # (odd sizes, chroma strides that are not half the luma stride).
            frame = VideoFrame()
            fill = getattr(frame, "_image_fill_pointers_numpy", None)
            if fill is None:
                frame = None
            else:
                fill(np.frombuffer(mem, np.uint8, count=layout.need, offset=src_off), w, h, s, name)
        if frame is not None and (frame.width, frame.height) != (w, h):
            frame = None
        if frame is None:
            frame = VideoFrame(w, h, name)
            src = np.frombuffer(mem, np.uint8, count=layout.need, offset=src_off)
            copied = _copy_planes_in(frame, src, fmt, w, h, s)
        if self._convert:
            frame = frame.reformat(format=self._ctx_fmt)
            copied += self._convert_bytes
        return frame, copied

    def encode(self, mem: memoryview, inputs: Sequence[Input], strides: tuple[int, ...],
               drain_pending: bool, dst_off: int, dst_len: int) -> tuple[int, int]:
        """Feed ``inputs`` (one frame, or a MULTI list) in order, then emit all queued packets.

        Every input is checked before the first is fed, so a bad one fails the task
        with nothing consumed."""
        _check_range(mem, dst_off, dst_len, "dst")
        if not drain_pending:
            need = self._layout(strides).need
            for inp in inputs:
                _check_range(mem, inp.offset, inp.length, "src")
                if need > inp.length:
                    raise CodecError(ErrorCode.BAD_ARG, f"frame needs {need} bytes, src_len is {inp.length}")
                if inp.pts is not None and not _I64_MIN < inp.pts <= _I64_MAX:
                    raise CodecError(ErrorCode.BAD_ARG, "pts out of range")
            self._check_backlog()
            ctx = self._context()
            for inp in inputs:
                self._feed(ctx, mem, inp, strides)
        return self._emit(mem, dst_off, dst_len)

    def _feed(self, ctx: VideoCodecContext, mem: memoryview, inp: Input, strides: tuple[int, ...]) -> None:
        frame, copied = self._wrap(mem, inp.offset, inp.length, strides)
        pts = self._next_pts if inp.pts is None else inp.pts
        frame.pts = pts
        self._next_pts = pts + self._duration
        if inp.force_keyframe:
            frame.pict_type = PictureType.I
        try:
            packets = ctx.encode(frame)
        except av.error.FFmpegError as exc:
            raise _ff_error(exc, ErrorCode.BAD_ARG) from exc
        finally:
            del frame
        self._fed += 1
        self._stats.enc_frames_in += 1
        self._stats.enc_in_copied += copied
        self._queue(packets)

    def flush(self, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        _check_range(mem, dst_off, dst_len, "dst")
        ctx, self._ctx = self._ctx, None
        if ctx is not None and self._fed:
            try:
                packets = ctx.encode(None)
            except av.error.FFmpegError as exc:
                raise _ff_error(exc, ErrorCode.BACKEND) from exc
            self._queue(packets)
        elif ctx is not None:
            self._ctx = ctx
        return self._emit(mem, dst_off, dst_len)

    def _queue(self, packets: list[Packet[Any]]) -> None:
        for p in packets:
            size = p.size
            self._pending.append(_PendingPacket(
                p, size,
                abi.NO_PTS if p.pts is None else p.pts,
                abi.NO_PTS if p.dts is None else p.dts,
                abi.PACKET_KEY if p.is_keyframe else 0,
            ))
            self.pending_items += 1
            self.pending_bytes += size

    def _emit(self, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        pending = self._pending
        count = len(pending)
        table = abi.out_table_size(abi.OUT_PACKETS, count)
        offsets: list[int] = []
        used = table
        for item in pending:
            pos = abi.align(used)
            offsets.append(pos)
            used = pos + item.size
        if used > dst_len:
            raise CodecError(ErrorCode.NO_SPACE, f"output needs {used} bytes", required=used)
        entry_pos = dst_off + OutHeader.SIZE
        OutHeader.write(mem, dst_off, kind=abi.OUT_PACKETS, count=count, used=used)
        for item, pos in zip(pending, offsets, strict=True):
            PacketEntry.write(mem, entry_pos, offset=pos, size=item.size, pts=item.pts, dts=item.dts,
                              flags=item.flags)
            entry_pos += PacketEntry.SIZE
            mem[dst_off + pos:dst_off + pos + item.size] = memoryview(item.packet)
        mem[entry_pos:dst_off + table] = bytes(dst_off + table - entry_pos)
        copied = self.pending_bytes
        self._stats.enc_packets_out += count
        self._stats.enc_bytes_out += copied
        self._stats.enc_out_copied += copied
        pending.clear()
        self.pending_items = self.pending_bytes = 0
        return count, used
