"""Codec sessions of one guest, run on PyAV inside that guest's worker process.

The worker hands every call the guest's whole region as a writable ``memoryview``
(``mem``) plus absolute offsets that hostd has range-checked; everything inside
those ranges is hostile.  Input frames are wrapped in place (no copy) whenever the
layout allows; output (packets or decoded planes) is copied once into the region,
except the pictures of a decoder with a frame pool (SessionFlag.FRAME_POOL,
``codec_backend.framepool``): the codec writes those into the pool itself, and
their table entries say where (FRAME_POOLED, data offset from the pool start).

Output layout written at ``dst_off`` (all offsets relative to ``dst_off``)::

    OutHeader(kind, count, used)
    count x PacketEntry or FrameEntry, table padded to abi.out_table_size()
    payloads, each starting on a HEAP_ALIGN (64-byte) boundary

``used`` is the end of the last payload (the table size when count == 0).  A
decoded frame's planes are packed one after another with stride = visible row
bytes (the plane offsets and strides in FrameEntry say so explicitly), i.e.
exactly the unpadded layout ``abi.plane_shapes`` describes, so a decoded frame
can be fed back to an encoder with strides (0, 0, 0).

NO_SPACE: the input of the call is consumed, all output stays queued in the
session and ``CodecError.required`` is the exact ``dst_len`` that takes all of it.
The next encode/decode (normal or ``drain_pending``) or flush returns it first.
While at least ``MAX_PENDING_ITEMS`` items or ``MAX_PENDING_BYTES`` bytes are
queued, calls that would consume input fail with BUSY and consume nothing.

flush drains the codec (parser included), queues what comes out, and discards
the codec context.  The session stays open: the next encode/decode opens a fresh
context with the same configuration, i.e. starts a new stream (encoders begin
with a keyframe and in-band headers; the automatic pts counter keeps running).

Encoder defaults (only where the config leaves the choice open):

* libx264: preset ultrafast, thread_type FRAME (bit-identical to threads=1), CRF 23
  (x264 default); ``bframes=1`` means 3 B-frames.
* libx265: preset ultrafast, ``log-level=error``; ``bframes=1`` keeps x265's preset
  B-frames (3 for ultrafast).
* libvpx-vp9: deadline realtime, cpu-used 8, constant quality crf 30 (b=0);
  ``bframes=0`` sets lag-in-frames 0 (no alt-ref look-ahead).  A numeric preset is
  cpu-used, "realtime"/"good"/"best" is the deadline.
* libvpx (VP8): deadline realtime, cpu-used 8, lag-in-frames 0 unless ``bframes=1``
  and presets as for libvpx-vp9 (numeric: cpu-used -16..16).  VP8's crf is constrained
  quality, so CRF (default 30) sets crf, qmin 0, qmax 63 and a 1000 Mbit/s cap that
  never binds (b=0 would cap it at libvpx's 256 kbit/s); QP sets qmin = qmax = crf.
  VP8 has no B-frames: ``bframes=1`` leaves lag-in-frames to libvpx (0 for VP8).
* libsvtav1: preset 10, CRF 35 (SVT default); ``bframes=0`` selects the low-delay
  prediction structure (``pred-struct=1``), ``bframes=1`` SVT's random access.
  Presets 11+ (rtc or not) drop frames below 30 dB on moving content here.
* mjpeg, mpeg4: fixed quantiser qscale 3 (CRF and QP both map to qscale);
  mjpeg is tagged full range (samples are passed through untouched); mpeg4
  ``bframes=1`` means 2 B-frames.

Input conversion: nv12 goes to the codec as is where it takes nv12 (libx264),
otherwise it is converted to yuv420p; rgb24/bgra are converted to yuv420p
(swscale defaults: BT.601, limited range).  Conversions, frames at the very end
of the region and mpeg4/mjpeg input while B-frames are on cost one frame copy.
Guest options: generic AVCodecContext options on an allow list, private codec
options except file-writing ones; ``*-params`` lists are screened for file,
geometry and pixel-format keys; values that look like paths are refused.

Decoders use thread_type AUTO (frame + slice threads) unless ``threads == 1``,
and ``max_pixels`` from the geometry caps.  A zero-length DECODE chunk consumes
nothing (it would be an end-of-stream packet to FFmpeg).  With ``parse`` the
chunk's pts goes to the first packet the parser cuts that starts inside the
chunk (FFmpeg's av_parser_parse2 rule); the vp8, vp9 and av1 parsers do not split
streams, so their chunks must hold whole frames.  Decoding errors raise
INVALID_DATA after the frames decoded before the error were queued (they come
back with the next call); the session stays usable.

``open_encoder_context``/``open_decoder_context`` build and open exactly the codec
context a session with a given SessionConfig uses (the sessions share the builders),
so a direct in-process run with identical options is one call away (benchmarks).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache, lru_cache
from typing import Any, Final, Literal, TypeVar, cast

import av
import av.error
import numpy as np
from av.codec.context import ThreadType
from av.packet import Packet
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType, VideoFrame

from codec_backend import framepool
from codec_backend.framepool import FramePool
from codec_backend.inputs import Input
from vmediad import abi
from vmediad.abi import (
    Codec,
    Direction,
    ErrorCode,
    FrameEntry,
    GeometryLimits,
    OutHeader,
    PacketEntry,
    PixFmt,
    RateControl,
    SessionConfig,
)
from vmediad.errors import VmediadError

__all__ = [
    "CodecError",
    "EncoderTarget",
    "SessionManager",
    "caps_document",
    "open_decoder_context",
    "open_encoder_context",
    "write_caps",
]

_T = TypeVar("_T")

MAX_PENDING_ITEMS: Final = 256
MAX_PENDING_BYTES: Final = 512 << 20
MAX_THREADS: Final = 64
MAX_OPTIONS: Final = 64
MAX_CHUNK: Final = (1 << 31) - 4096  # FFmpeg packet sizes are C ints
MAX_STRIDE: Final = 1 << 30
MAX_PARSER_BACKLOG: Final = 64 << 20  # bytes a parser may buffer without cutting a frame
# Bytes that must stay mapped after a frame wrapped in place: SIMD readers in
# swscale/encoders may over-read a little past the last row.
INPUT_SLACK: Final = 64

DEFAULT_GEOMETRY: Final = GeometryLimits()
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_JPEG_RANGE: Final = 2  # AVCOL_RANGE_JPEG

_NATIVE_ENCODERS: Final = frozenset({"mjpeg", "mpeg4"})
# Encoders that refuse a 4:2:0 picture of odd width or height (their chroma planes would be
# half a sample wide); the others pad it.  Refused at SESSION_OPEN, before avcodec_open2
# fails with a bare "Generic error in an external library".
_EVEN_420: Final = frozenset({"libx264", "libx265"})
# libvpx encoders (VP8, VP9) and the numeric presets (cpu-used) each takes.
_LIBVPX: Final = {"libvpx": r"-?\d{1,2}", "libvpx-vp9": r"-?\d"}
_VP8_CQ_CAP: Final = "1000M"  # bit/s: out of reach, so crf alone sets the quality
_B_FRAMES_ON: Final = {"libx264": 3, "mpeg4": 2}
_DEFAULT_QSCALE: Final = 3
_FF_QP2LAMBDA: Final = 118

# Decoded formats whose memory layout equals an output format (no conversion).
_CAP_DR1: Final = 1 << 1  # AV_CODEC_CAP_DR1: the decoder allocates through get_buffer2
_SAME_LAYOUT: Final = {
    PixFmt.YUV420P: frozenset({"yuv420p", "yuvj420p"}),
    PixFmt.NV12: frozenset({"nv12"}),
}

# Options a guest may pass: generic AVCodecContext options on this list, and any
# private option of the codec not on the deny list.  Everything that touches
# files, geometry, pixel format, threading mode or buffer limits is refused.
_GENERIC_ALLOWED: Final = frozenset({
    "b", "bt", "g", "qcomp", "qblur", "qmin", "qmax", "qdiff", "bf", "b_qfactor",
    "b_qoffset", "i_qfactor", "i_qoffset", "maxrate", "minrate", "bufsize",
    "rc_init_occupancy", "rc_max_vbv_use", "rc_min_vbv_use", "keyint_min", "refs",
    "trellis", "flags", "flags2", "strict", "err_detect", "ec", "mbd", "cmp",
    "subcmp", "mbcmp", "precmp", "dia_size", "last_pred", "pre_dia_size", "subq",
    "me_range", "mblmin", "mblmax", "lumi_mask", "tcplx_mask", "scplx_mask",
    "p_mask", "dark_mask", "dct", "idct", "nssew", "bidir_refine", "mv0_threshold",
    "compression_level", "global_quality", "level", "slices", "aspect", "sar",
    "colorspace", "color_primaries", "color_trc", "color_range",
    "chroma_sample_location", "field_order", "skip_loop_filter", "skip_idct",
    "skip_frame", "lowres", "discard_damaged_percentage", "export_side_data", "bug",
    "apply_cropping",
})
_PRIVATE_DENIED: Final = frozenset({"passlogfile", "stats", "x265-stats"})
_PARAM_LISTS: Final = frozenset({"x264-params", "x264opts", "x265-params", "svtav1-params"})
_PARAM_DENIED_PARTS: Final = ("file", "stat", "csv", "dump", "recon", "analysis", "clbin",
                              "input", "rpu", "path", "config")
_PARAM_DENIED: Final = frozenset({
    "w", "h", "width", "height", "csp", "color-format", "depth", "scaling-list",
    "fgs-table", "source-width", "source-height", "forced-max-frame-width",
    "forced-max-frame-height",
})
_FRACTION_RE: Final = re.compile(r"\d+/\d+")


class CodecError(VmediadError):
    """The backend's verdict on one task: its ABI error code, which is the guest's fault (BAD_ARG,
    BAD_FLAGS, NO_SPACE ...) or a backend failure (BACKEND, INVALID_DATA, TOO_LARGE ...), and the
    reason.  ``required``: dst bytes for NO_SPACE."""

    def __init__(self, code: ErrorCode, message: str, required: int = 0) -> None:
        super().__init__(message)
        self.code: ErrorCode = ErrorCode(code)
        self.required: int = required

    def __repr__(self) -> str:
        return f"CodecError({self.code.name}, {str(self)!r}, required={self.required})"


def _check_range(mem: memoryview, off: int, length: int, what: str) -> None:
    if off < 0 or length < 0 or off + length > mem.nbytes:
        raise CodecError(ErrorCode.BAD_RANGE, f"{what} [{off}, +{length}) outside the region")


def _ff_error(exc: av.error.FFmpegError, guest_code: ErrorCode) -> CodecError:
    """Map an FFmpeg error: resource/library faults are BACKEND, the rest the guest's."""
    if isinstance(exc, (av.error.MemoryError, av.error.BugError, av.error.ExternalError,
                        av.error.UnknownError)):
        return CodecError(ErrorCode.BACKEND, str(exc))
    return CodecError(guest_code, str(exc))


def _with_log_reason(exc: CodecError) -> CodecError:
    """``exc`` with the error line libav logged on this thread during the call in front of
    its text: PyAV's message alone is often just "Generic error in an external library"."""
    reason = framepool.take_log_error()
    if not reason or exc.code == ErrorCode.NO_SPACE or reason in str(exc):
        return exc
    return CodecError(exc.code, f"{reason} ({exc})", exc.required)


@dataclass
class _Stats:
    enc_frames_in: int = 0
    enc_packets_out: int = 0
    enc_bytes_out: int = 0
    enc_in_copied: int = 0
    enc_out_copied: int = 0
    dec_chunks_in: int = 0
    dec_packets_in: int = 0
    dec_frames_out: int = 0
    dec_bytes_in: int = 0
    dec_in_copied: int = 0
    dec_out_copied: int = 0
    dec_frames_pooled: int = 0  # decoded straight into the guest's frame pool: not copied
    dec_frames_looped: int = 0  # of those, lent by the C decode loop (framepool.DecodeLoop)
    opened: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _InLayout:
    linesizes: tuple[int, ...]
    need: int
    public: bool  # VideoFrame.from_numpy_buffer can describe it


@dataclass(slots=True)
class _PendingPacket:
    packet: Packet[Any]
    size: int
    pts: int
    dts: int
    flags: int


# --- option handling ---------------------------------------------------------------
def _check_param_list(key: str, value: str) -> None:
    for item in value.split(":"):
        sub, _, sub_value = item.partition("=")
        sub = sub.strip().lower()
        if sub in _PARAM_DENIED or any(part in sub for part in _PARAM_DENIED_PARTS):
            raise CodecError(ErrorCode.BAD_ARG, f"{key}: parameter {sub!r} is not allowed")
        _check_value(key, sub_value)


def _check_value(key: str, value: str) -> None:
    if ("/" in value or "\\" in value) and not _FRACTION_RE.fullmatch(value):
        raise CodecError(ErrorCode.BAD_ARG, f"option {key}: paths are not allowed")


def _guest_options(ctx: VideoCodecContext, options: tuple[tuple[str, str], ...]) -> dict[str, str]:
    if len(options) > MAX_OPTIONS:
        raise CodecError(ErrorCode.BAD_ARG, "too many options")
    if not options:
        return {}
    private = {o.name for o in ctx.supported_options.private}
    out: dict[str, str] = {}
    for key, value in options:
        if "\0" in key or "\0" in value:
            raise CodecError(ErrorCode.BAD_ARG, "NUL in option")
        if key in private:
            if key in _PRIVATE_DENIED:
                raise CodecError(ErrorCode.BAD_ARG, f"option {key!r} is not allowed")
            if key in _PARAM_LISTS:
                _check_param_list(key, value)
            else:
                _check_value(key, value)
        elif key not in _GENERIC_ALLOWED:
            raise CodecError(ErrorCode.BAD_ARG, f"option {key!r} is unknown or not allowed")
        out[key] = value
    return out


def _merge_params(opts: dict[str, str], key: str, defaults: str) -> None:
    """Prepend our defaults to a key=value:... list; the guest's later entries win."""
    guest = opts.get(key)
    opts[key] = f"{defaults}:{guest}" if guest else defaults


def _open_ctx(ctx: VideoCodecContext, opts: dict[str, str]) -> None:
    ctx.options = opts
    try:
        ctx.open()
    except av.error.FFmpegError as exc:
        raise _ff_error(exc, ErrorCode.BAD_ARG) from exc
    leftover = dict(ctx.options)
    if leftover:
        raise CodecError(ErrorCode.BAD_ARG, f"options not recognised by {ctx.name}: {sorted(leftover)}")


def _check_common(cfg: SessionConfig) -> None:
    if cfg.flags & ~abi.SESSION_FLAGS_MASK:
        raise CodecError(ErrorCode.BAD_FLAGS, f"unknown session flags {cfg.flags:#x}")
    if cfg.flags & abi.SessionFlag.FRAME_POOL and cfg.direction != Direction.DECODE:
        raise CodecError(ErrorCode.BAD_FLAGS, "FRAME_POOL is for decode sessions")
    if not 0 <= cfg.threads <= MAX_THREADS:
        raise CodecError(ErrorCode.BAD_ARG, f"threads must be 0..{MAX_THREADS}")
    if cfg.bframes not in (0, 1):
        raise CodecError(ErrorCode.BAD_ARG, "bframes must be 0 or 1")


def _check_geometry(width: int, height: int, caps: GeometryLimits, required: bool) -> None:
    if required and (width <= 0 or height <= 0):
        raise CodecError(ErrorCode.BAD_ARG, "width and height are required")
    if width > caps.max_width or height > caps.max_height or width * height > caps.max_pixels:
        raise CodecError(ErrorCode.TOO_LARGE, f"{width}x{height} exceeds the geometry caps")


def _pix_fmt(value: int, allowed: tuple[PixFmt, ...]) -> PixFmt:
    try:
        fmt = PixFmt(value)
    except ValueError:
        raise CodecError(ErrorCode.BAD_ARG, f"unknown pix_fmt {value}") from None
    if fmt not in allowed:
        raise CodecError(ErrorCode.BAD_ARG, f"pix_fmt {fmt.name} not allowed here")
    return fmt


def _codec(value: int, table: dict[Codec, str], mode: Literal["r", "w"]) -> tuple[Codec, str]:
    try:
        codec = Codec(value)
    except ValueError:
        raise CodecError(ErrorCode.UNSUPPORTED_CODEC, f"unknown codec {value}") from None
    impl = table[codec]
    if not _available(impl, mode):
        raise CodecError(ErrorCode.UNSUPPORTED_CODEC, f"{impl} is not in this FFmpeg build")
    return codec, impl


@cache
def _available(impl: str, mode: Literal["r", "w"]) -> bool:
    try:
        av.Codec(impl, mode)
    except (ValueError, av.error.FFmpegError):
        return False
    return True


@cache
def _codec_formats(impl: str) -> frozenset[str]:
    formats = av.Codec(impl, "w").video_formats or ()
    return frozenset(f.name for f in formats)


def _ratio(num: int, den: int, what: str) -> Fraction:
    if not (0 < num <= 0x7FFF_FFFF and 0 < den <= 0x7FFF_FFFF):
        raise CodecError(ErrorCode.BAD_ARG, f"bad {what} {num}/{den}")
    return Fraction(num, den)


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


# --- codec contexts (shared by the sessions and by the direct-PyAV benchmark floor) -------
@dataclass(frozen=True, slots=True)
class EncoderTarget:
    """What an encode SessionConfig resolves to after validation."""

    codec: Codec
    impl: str
    fmt: PixFmt  # the guest's input format
    ctx_fmt: str  # the format the codec context takes ("yuv420p" or "nv12")
    time_base: Fraction
    fps: Fraction


def _encoder_target(cfg: SessionConfig, caps: GeometryLimits) -> EncoderTarget:
    _check_common(cfg)
    codec, impl = _codec(cfg.codec, abi.ENCODER_IMPL, "w")
    _check_geometry(cfg.width, cfg.height, caps, required=True)
    fmt = _pix_fmt(cfg.pix_fmt, (PixFmt.YUV420P, PixFmt.NV12, PixFmt.RGB24, PixFmt.BGRA))
    if impl in _EVEN_420 and (cfg.width % 2 or cfg.height % 2):
        raise CodecError(ErrorCode.BAD_ARG, f"{impl} encodes 4:2:0, which needs an even width and height; "
                                            f"got {cfg.width}x{cfg.height}")
    ctx_fmt = "nv12" if fmt == PixFmt.NV12 and "nv12" in _codec_formats(impl) else "yuv420p"
    return EncoderTarget(codec, impl, fmt, ctx_fmt, _ratio(cfg.tb_num, cfg.tb_den, "time base"),
                         _ratio(cfg.fps_num, cfg.fps_den, "frame rate"))


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


def _decoder_target(cfg: SessionConfig, caps: GeometryLimits) -> tuple[Codec, str, PixFmt]:
    _check_common(cfg)
    codec, impl = _codec(cfg.codec, abi.DECODER_IMPL, "r")
    _check_geometry(cfg.width, cfg.height, caps, required=False)
    return codec, impl, _pix_fmt(cfg.pix_fmt, (PixFmt.YUV420P, PixFmt.NV12))


def open_decoder_context(cfg: SessionConfig, caps: GeometryLimits = DEFAULT_GEOMETRY) -> VideoCodecContext:
    """The opened decoder context a DECODE session with ``cfg`` uses (same threading and options)."""
    _codec_id, impl, _fmt = _decoder_target(cfg, caps)
    return _build_decoder(cfg, impl, caps)


def _build_decoder(cfg: SessionConfig, impl: str, caps: GeometryLimits,
                   pool: FramePool | None = None) -> VideoCodecContext:
    ctx = cast(VideoCodecContext, av.CodecContext.create(impl, "r"))
    if cfg.threads == 1:
        ctx.thread_type, ctx.thread_count = ThreadType.SLICE, 1
    else:
        ctx.thread_type, ctx.thread_count = ThreadType.AUTO, cfg.threads
    opts = _guest_options(ctx, cfg.options)
    opts["max_pixels"] = str(caps.max_pixels)
    if impl == "h264":
        # A stream without VUI bitstream_restriction does not say how many pictures it
        # reorders.  FFmpeg then guesses the depth from the pictures it has seen, outputs a
        # picture too early and drops the one that should have come first; "strict" makes it
        # use the DPB size the level allows (as an output-order conformant decoder does)
        # from the first picture on.  A guest may still choose otherwise.
        opts.setdefault("strict", "strict")
    if pool is not None and not pool.attach(ctx):  # before open: the frame threads copy the context
        raise CodecError(ErrorCode.BACKEND, "the frame pool could not be attached to the decoder")
    _open_ctx(ctx, opts)
    return ctx


# --- sessions --------------------------------------------------------------------------
@dataclass(slots=True)
class _Lent:
    """Frames the C decode loop lent (their slots' counters are up) and whose table entries it
    wrote: ``count`` abi.FrameEntry records, as bytes.  Queued like decoded frames; a task
    that fails keeps them lent and queued for the next."""

    entries: bytes
    count: int


class _Session:
    pending_items: int
    pending_bytes: int
    _ctx: VideoCodecContext | None
    _pending: deque[Any]

    def __init__(self, stats: _Stats) -> None:
        self._stats = stats
        self.pending_items = 0
        self.pending_bytes = 0

    def _check_backlog(self) -> None:
        if self.pending_items >= MAX_PENDING_ITEMS or self.pending_bytes >= MAX_PENDING_BYTES:
            raise CodecError(ErrorCode.BUSY, "output backlog: drain pending output first")

    def _open(self) -> VideoCodecContext:
        raise NotImplementedError

    def _context(self) -> VideoCodecContext:
        """The session's codec context, opened again if an FFmpeg error dropped it."""
        if self._ctx is None:
            try:
                self._ctx = self._open()
            except CodecError as exc:
                raise CodecError(ErrorCode.BACKEND, f"reopen failed: {exc}") from exc
        return self._ctx

    def flush(self, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the codec context and any queued output; no FFmpeg buffer refers to the region after."""
        self._ctx = None
        self._pending.clear()
        self.pending_items = self.pending_bytes = 0


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
        self._convert = self._ctx_fmt != self._fmt_name
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
            public = True
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



class _DecoderSession(_Session):
    def __init__(self, cfg: SessionConfig, caps: GeometryLimits, stats: _Stats,
                 mem: memoryview | None = None, pool: tuple[int, int] = (0, 0)) -> None:
        super().__init__(stats)
        self._codec, self._impl, self._fmt = _decoder_target(cfg, caps)
        self._pool: FramePool | None = None
        self._loop: framepool.DecodeLoop | None = None  # the C packet loop (pooled sessions)
        self._base_mem: memoryview | None = None
        self._base = 0
        if cfg.flags & abi.SessionFlag.FRAME_POOL:
            if mem is None or pool[1] < abi.POOL_MIN:
                raise CodecError(ErrorCode.BAD_ARG, f"FRAME_POOL needs a pool of at least {abi.POOL_MIN} bytes")
            _check_range(mem, pool[0], pool[1], "frame pool")
            if pool[0] % abi.HEAP_ALIGN:  # the lent counters are atomics
                raise CodecError(ErrorCode.BAD_ARG, f"a frame pool must be {abi.HEAP_ALIGN}-byte aligned")
            if not av.codec.Codec(self._impl, "r").capabilities & _CAP_DR1:
                # libavcodec allows a custom get_buffer2 only with direct rendering.
                raise CodecError(ErrorCode.BAD_FLAGS, f"{self._impl} cannot decode into a frame pool")
            pr = framepool.probe()
            if not pr.ok:
                raise CodecError(ErrorCode.BACKEND, f"frame pools unavailable: {pr.reason}")
            base = int(np.frombuffer(mem, np.uint8, 1).ctypes.data)
            self._pool = FramePool(base + pool[0], pool[1], formats=tuple(sorted(_SAME_LAYOUT[self._fmt])))
            if framepool.DecodeLoop.enabled():
                self._loop = framepool.DecodeLoop(self._pool)
        elif pool[1]:
            raise CodecError(ErrorCode.BAD_ARG, "a frame pool was given without FRAME_POOL")
        self._cfg = cfg
        self._caps = caps
        self._fmt_name = abi.PIX_FMT_NAMES[self._fmt]
        self._same_layout = _SAME_LAYOUT[self._fmt]
        self._geom: tuple[int, int, tuple[list[tuple[int, int]], int, Any]] = (0, 0, ([], 0, None))  # _geometry
        self._pending: deque[VideoFrame | _Lent] = deque()
        self._fed = 0
        self._parsed = False
        self._stream_pos = 0  # bytes fed to the parser
        self._parsed_pos = 0  # bytes the parser has handed out as packets
        self._chunk_pts: deque[list[int | None]] = deque()  # [chunk start, pts or None, used]
        self._ctx: VideoCodecContext | None = None
        try:
            self._ctx = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> VideoCodecContext:
        ctx = _build_decoder(self._cfg, self._impl, self._caps, self._pool)
        self._fed = 0
        self._parsed = False
        self._stream_pos = self._parsed_pos = 0
        self._chunk_pts.clear()
        return ctx

    def _stamp(self, packets: list[Packet[Any]]) -> None:
        """Give a parsed packet the pts of the chunk its first byte came from (once)."""
        marks = self._chunk_pts
        for p in packets:
            start = self._parsed_pos
            self._parsed_pos += p.size
            while len(marks) > 1 and cast(int, marks[1][0]) <= start:
                marks.popleft()
            if marks and cast(int, marks[0][0]) <= start and not marks[0][2]:
                marks[0][2] = 1
                if marks[0][1] is not None:
                    p.pts = marks[0][1]
            self._stats.dec_in_copied += p.size

    def _decode_packets(self, ctx: VideoCodecContext, packets: list[Packet[Any] | None],
                        ) -> CodecError | None:
        """Decode and queue; the first error is returned so frames before it are kept."""
        error: CodecError | None = None
        for pkt in packets:
            try:
                frames = ctx.decode(pkt)
            except av.error.FFmpegError as exc:
                error = error or self._packet_failed(exc)
                if self._ctx is None:
                    break
                continue
            if pkt is not None:
                self._stats.dec_packets_in += 1
            for frame in frames:
                error = self._queue(frame) or error
        return error

    def _packet_failed(self, exc: av.error.FFmpegError) -> CodecError:
        """The error of a packet the decoder rejected.  Invalid data fails only that packet
        (the next is decoded as usual); any other error drops the context, which the next
        task opens again."""
        if isinstance(exc, av.error.InvalidDataError):
            return CodecError(ErrorCode.INVALID_DATA, str(exc))
        self._ctx = None
        return _ff_error(exc, ErrorCode.INVALID_DATA)

    def _geometry(self, w: int, h: int) -> tuple[list[tuple[int, int]], int, Any] | None:
        """Plane shapes, unpadded size and the shapes as the frame pool takes them of a
        ``w`` x ``h`` picture, or None past the caps.  The last geometry that passed is
        kept: a stream's pictures rarely change size."""
        geom = self._geom
        if geom[0] == w and geom[1] == h:
            return geom[2]
        caps = self._caps
        if not caps.allows(w, h):
            return None
        shapes = abi.plane_shapes(self._fmt, w, h)
        found = (shapes, sum(r * b for r, b in shapes), None if self._pool is None else FramePool.shape(shapes))
        self._geom = (w, h, found)
        return found

    def _queue(self, frame: VideoFrame) -> CodecError | None:
        w, h = frame.width, frame.height
        geom = self._geometry(w, h)
        if geom is None:
            return CodecError(ErrorCode.TOO_LARGE, f"decoded {w}x{h} exceeds the geometry caps")
        size = geom[1]
        if frame.format.name not in self._same_layout:
            try:
                frame = frame.reformat(format=self._fmt_name)
            except (av.error.FFmpegError, ValueError) as exc:
                return CodecError(ErrorCode.INVALID_DATA, f"cannot convert frame: {exc}")
            self._stats.dec_out_copied += size
        self._pending.append(frame)
        self.pending_items += 1
        self.pending_bytes += size
        return None

    def decode(self, mem: memoryview, inputs: Sequence[Input], parse: bool, drain_pending: bool,
               dst_off: int, dst_len: int) -> tuple[int, int]:
        """Feed ``inputs`` (one chunk, or a MULTI list) in order, then emit all queued frames.

        Every chunk is checked before the first is fed.  A chunk the decoder rejects
        does not stop the ones after it (as for packets the parser split one chunk
        into): the task ends with the first error, and the frames decoded from all
        chunks stay queued for the next task (DRAIN_PENDING or more input)."""
        _check_range(mem, dst_off, dst_len, "dst")
        error: CodecError | None = None
        chunks = [] if drain_pending else [inp for inp in inputs if inp.length]  # empty: no input
        for inp in chunks:
            _check_range(mem, inp.offset, inp.length, "src")
            if inp.length > MAX_CHUNK:
                raise CodecError(ErrorCode.TOO_LARGE, "bitstream chunk too large")
            if inp.pts is not None and not _I64_MIN < inp.pts <= _I64_MAX:
                raise CodecError(ErrorCode.BAD_ARG, "pts out of range")
        if chunks:
            self._check_backlog()
        if chunks and self._loop is not None and not parse and self._loop.bind(self._context()):
            error = self._feed_loop(mem, chunks)
        else:
            for inp in chunks:
                try:
                    error = self._feed(mem, inp.offset, inp.length, inp.pts, parse) or error
                except CodecError as exc:
                    error = error or exc
        if error is not None:
            raise error
        return self._emit(mem, dst_off, dst_len)

    def _feed_loop(self, mem: memoryview, chunks: list[Input]) -> CodecError | None:
        """Decode ``chunks`` (checked, unparsed) in the C loop: what ``_feed`` does for each,
        with the pictures it can lend queued as :class:`_Lent` and the others as PyAV frames
        through ``_queue``.  Returns the first error; frames before it stay queued."""
        loop = cast(framepool.DecodeLoop, self._loop)
        if mem is not self._base_mem:
            self._base_mem, self._base = mem, int(np.frombuffer(mem, np.uint8, 1).ctypes.data)
        n = len(chunks)
        arr = loop.chunks([(c.offset, c.length, 0 if c.pts is None else c.pts, c.pts is not None) for c in chunks])
        fmt = int(self._fmt)
        error: CodecError | None = None
        i = receiving = failed = 0
        while True:
            w, h, geom = self._geom
            rc, i, receiving, entries, err = loop.run(self._base, arr, n, i, receiving, w, h, geom[2], fmt)
            if entries:
                k = len(entries) // FrameEntry.SIZE
                self._stats.dec_frames_looped += k
                self._pending.append(_Lent(entries, k))
                self.pending_items += k
                self.pending_bytes += k * geom[1]
            if rc == framepool.FD_DONE:
                break
            if rc == framepool.FD_HELD:
                frame = loop.take()
                if frame is None:
                    error = error or CodecError(ErrorCode.INVALID_DATA, "cannot convert frame: unknown format")
                else:
                    error = self._queue(frame) or error
            elif rc == framepool.FD_ERROR:
                failed += 1
                try:
                    av.error.err_check(err)
                    error = error or CodecError(ErrorCode.BACKEND, f"decoder error {err}")
                    break
                except av.error.FFmpegError as exc:
                    error = error or self._packet_failed(exc)
                    if self._ctx is None:
                        break
            elif rc == framepool.FD_NOMEM:
                error = error or CodecError(ErrorCode.BACKEND, "out of memory for a packet")
                break
            # FD_FULL: the entries are queued; go on.
        sent = sum(c.length for c in chunks[:i])
        stats = self._stats
        stats.dec_chunks_in += i
        stats.dec_bytes_in += sent
        stats.dec_in_copied += sent
        stats.dec_packets_in += i - failed
        self._fed += i
        return error

    def _feed(self, mem: memoryview, src_off: int, src_len: int, pts: int | None,
              parse: bool) -> CodecError | None:
        """Decode one chunk and queue its frames; returns the decoder's first error (frames
        before it stay queued) or raises one that drops the chunk."""
        ctx = self._context()
        # One copy into FFmpeg-owned, zero-padded memory: decoders and parsers
        # over-read up to 64 bytes and frame threads read packets later, so the
        # bitstream must neither alias the region nor be re-read from it.
        # (PyAV's Packet(bytes) wraps the bytes without that padding: FFmpeg
        # then reads whatever follows them, e.g. mpeg4 decodes differ per run.)
        buf = Packet(src_len)
        memoryview(buf)[:] = mem[src_off:src_off + src_len]
        self._stats.dec_chunks_in += 1
        self._stats.dec_bytes_in += src_len
        self._stats.dec_in_copied += src_len
        packets: list[Packet[Any] | None]
        if parse:
            self._parsed = True
            if len(self._chunk_pts) >= 4096:
                self._chunk_pts.popleft()
            self._chunk_pts.append([self._stream_pos, pts, 0])
            self._stream_pos += src_len
            try:
                parsed = ctx.parse(memoryview(buf))
            except av.error.FFmpegError as exc:
                self._ctx = None
                raise _ff_error(exc, ErrorCode.INVALID_DATA) from exc
            self._stamp(parsed)
            packets = list(parsed)
            if self._stream_pos - self._parsed_pos > MAX_PARSER_BACKLOG:
                self._ctx = None
                raise CodecError(ErrorCode.INVALID_DATA,
                                 "no frame boundary found; parser state discarded")
        else:
            buf.pts = pts
            packets = [buf]
        self._fed += 1
        return self._decode_packets(ctx, packets)

    def flush(self, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        _check_range(mem, dst_off, dst_len, "dst")
        ctx, self._ctx = self._ctx, None
        error: CodecError | None = None
        if ctx is not None and self._fed:
            packets: list[Packet[Any] | None] = []
            if self._parsed:
                try:
                    parsed = ctx.parse(None)
                except av.error.FFmpegError as exc:
                    error = _ff_error(exc, ErrorCode.INVALID_DATA)
                    parsed = []
                self._stamp(parsed)
                packets.extend(parsed)
            packets.append(None)
            self._ctx = ctx
            error = self._decode_packets(ctx, packets) or error
            self._ctx = None
        elif ctx is not None:
            self._ctx = ctx
        if error is not None:
            raise error
        return self._emit(mem, dst_off, dst_len)

    def _emit(self, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        pending = self._pending
        count = self.pending_items
        fmt = int(self._fmt)
        pool = self._pool
        table = abi.out_table_size(abi.OUT_FRAMES, count)
        # Frames the decoder wrote into the pool are lent in this first pass (the slot's
        # counter + 1, which the decoder's get_buffer2 reads): every failure below, NO_SPACE
        # included, takes these lends back, and the guest sees them only with the completion.
        # (The C loop's _Lent frames were lent as they were decoded and stay lent and queued.)
        # Per item: (-1, shapes, slot, (offset in the pool, plane offsets, line sizes)) for a
        # pooled frame, (position in dst, shapes, 0, None) for a copied one, or
        # (-2, [], count, the _Lent's entry bytes).
        layouts: list[tuple[int, list[tuple[int, int]], int, Any]] = []
        used = table
        pooled = 0
        try:
            for item in pending:
                if type(item) is _Lent:
                    layouts.append((-2, [], item.count, item.entries))
                    pooled += item.count
                    continue
                frame = cast(VideoFrame, item)
                geom = self._geometry(frame.width, frame.height)
                if geom is None:  # pragma: no cover - _queue admitted only frames within the caps
                    raise CodecError(ErrorCode.BACKEND, "queued frame exceeds the geometry caps")
                shapes = geom[0]
                if pool is not None:
                    try:
                        lent = pool.lend_frame(frame, geom[2])
                    except ValueError as exc:
                        raise CodecError(ErrorCode.BACKEND, str(exc)) from exc
                    if lent is not None:
                        layouts.append((-1, shapes, lent[0], lent[1:]))
                        pooled += 1
                        continue
                pos = abi.align(used)
                layouts.append((pos, shapes, 0, None))
                used = pos + geom[1]
            if used > dst_len:
                raise CodecError(ErrorCode.NO_SPACE, f"output needs {used} bytes", required=used)
            OutHeader.write(mem, dst_off, kind=abi.OUT_FRAMES, count=count, used=used)
            entry_pos = dst_off + OutHeader.SIZE
            copied = 0
            for item, (pos, shapes, slot, entry) in zip(pending, layouts, strict=True):
                if pos == -2:
                    mem[entry_pos:entry_pos + len(entry)] = entry  # FrameEntry bytes the C loop wrote
                    entry_pos += len(entry)
                    continue
                frame = cast(VideoFrame, item)
                pts = abi.NO_PTS if frame.pts is None else frame.pts
                if pos < 0:
                    offset, plane_offsets, line_sizes = entry
                    FrameEntry.write(mem, entry_pos, offset=offset, width=frame.width, height=frame.height,
                                     pix_fmt=fmt, nplanes=len(shapes), pts=pts, plane_offsets=plane_offsets,
                                     strides=line_sizes, flags=abi.FRAME_POOLED, slot=slot)
                else:
                    copied += self._emit_copy(mem, entry_pos, dst_off, pos, frame, shapes, pts)
                entry_pos += FrameEntry.SIZE
        except BaseException:
            # The task fails and its frames stay queued: the guest never sees these lends.
            for pos, _shapes, slot, _entry in layouts:
                if pos == -1:
                    cast(FramePool, pool).unlend(slot)
            raise
        mem[entry_pos:dst_off + table] = bytes(dst_off + table - entry_pos)
        self._stats.dec_frames_out += count
        self._stats.dec_frames_pooled += pooled
        self._stats.dec_out_copied += copied
        pending.clear()
        self.pending_items = self.pending_bytes = 0
        return count, used

    def _emit_copy(self, mem: memoryview, entry_pos: int, dst_off: int, pos: int, frame: VideoFrame,
                   shapes: list[tuple[int, int]], pts: int) -> int:
        """Copy a frame decoded into libav's memory to ``pos`` in dst, once, straight from
        its AVFrame planes (rows of line_size bytes, cropped to the visible width), and
        write its entry.  Returns the bytes copied."""
        planes = frame.planes  # PyAV builds new plane objects on every access
        offs = [0, 0, 0]
        strides = [0, 0, 0]
        plane_off = 0
        for i, (rows, row_bytes) in enumerate(shapes):
            line = planes[i].line_size
            if line < row_bytes:
                raise CodecError(ErrorCode.BACKEND, "decoded plane narrower than its format")
            src = np.ndarray((rows, row_bytes), np.uint8, buffer=memoryview(planes[i]), strides=(line, 1))
            dst = np.ndarray((rows, row_bytes), np.uint8, buffer=mem, offset=dst_off + pos + plane_off)
            np.copyto(dst, src)
            offs[i], strides[i] = plane_off, row_bytes
            plane_off += rows * row_bytes
        FrameEntry.write(mem, entry_pos, offset=pos, width=frame.width, height=frame.height, pix_fmt=int(self._fmt),
                         nplanes=len(shapes), pts=pts, plane_offsets=offs, strides=strides)
        return plane_off

    def close(self) -> None:
        """Drop the codec context and queued frames, then the pool: slots the guest still
        holds stay lent until it gives them back or frees the pool with the session."""
        super().close()
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def pool_statistics(self) -> framepool.PoolStats | None:
        return None if self._pool is None else self._pool.statistics()


class SessionManager:
    """All codec sessions of ONE guest (lives in that guest's worker process)."""

    def __init__(self, caps: GeometryLimits = DEFAULT_GEOMETRY, max_sessions: int = 16) -> None:
        self._caps = caps
        self._max = max_sessions
        self._sessions: dict[int, _EncoderSession | _DecoderSession] = {}
        self._stats = _Stats()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its config at info level
        framepool.capture_log()

    def _guard(self, fn: Callable[[], _T]) -> _T:
        framepool.take_log_error()  # a line logged before this call is not this call's reason
        try:
            return fn()
        except CodecError as exc:
            self._stats.errors[exc.code.name] += 1
            raise _with_log_reason(exc) from exc.__cause__
        except Exception as exc:
            # A surprise from the codec library or numpy is reported, never raised raw:
            # the worker loop must survive any guest input.
            self._stats.errors[ErrorCode.BACKEND.name] += 1
            raise _with_log_reason(CodecError(ErrorCode.BACKEND, f"{type(exc).__name__}: {exc}")) from exc

    def _get(self, session_id: int) -> _EncoderSession | _DecoderSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise CodecError(ErrorCode.BAD_SESSION, f"no session {session_id}")
        return session

    def open(self, session_id: int, cfg: SessionConfig, mem: memoryview | None = None,
             pool: tuple[int, int] = (0, 0)) -> None:
        """Open a session; ``pool`` is the (offset, length) of a decoder's frame pool in
        ``mem`` (SessionFlag.FRAME_POOL), or (0, 0)."""
        def run() -> None:
            if session_id in self._sessions:
                raise CodecError(ErrorCode.BAD_SESSION, f"session {session_id} already open")
            if len(self._sessions) >= self._max:
                raise CodecError(ErrorCode.BUSY, f"at most {self._max} sessions")
            session: _EncoderSession | _DecoderSession
            if cfg.direction == Direction.ENCODE:
                session = _EncoderSession(cfg, self._caps, self._stats)
            elif cfg.direction == Direction.DECODE:
                session = _DecoderSession(cfg, self._caps, self._stats, mem, pool)
            else:
                raise CodecError(ErrorCode.BAD_ARG, f"unknown direction {cfg.direction}")
            if pool[1] and not isinstance(session, _DecoderSession):
                raise CodecError(ErrorCode.BAD_ARG, "a frame pool was given to an encoder")
            self._sessions[session_id] = session
            self._stats.opened += 1
        self._guard(run)

    def encode(self, session_id: int, mem: memoryview, inputs: Sequence[Input], strides: tuple[int, ...],
               drain_pending: bool, dst_off: int, dst_len: int) -> tuple[int, int]:
        def run() -> tuple[int, int]:
            session = self._get(session_id)
            if not isinstance(session, _EncoderSession):
                raise CodecError(ErrorCode.BAD_SESSION, f"session {session_id} is not an encoder")
            return session.encode(mem, inputs, strides, drain_pending, dst_off, dst_len)
        return self._guard(run)

    def decode(self, session_id: int, mem: memoryview, inputs: Sequence[Input], parse: bool,
               drain_pending: bool, dst_off: int, dst_len: int) -> tuple[int, int]:
        def run() -> tuple[int, int]:
            session = self._get(session_id)
            if not isinstance(session, _DecoderSession):
                raise CodecError(ErrorCode.BAD_SESSION, f"session {session_id} is not a decoder")
            return session.decode(mem, inputs, parse, drain_pending, dst_off, dst_len)
        return self._guard(run)

    def flush(self, session_id: int, mem: memoryview, dst_off: int, dst_len: int) -> tuple[int, int]:
        return self._guard(lambda: self._get(session_id).flush(mem, dst_off, dst_len))

    def close(self, session_id: int) -> None:
        def run() -> None:
            self._get(session_id).close()
            del self._sessions[session_id]
        self._guard(run)

    def close_all(self) -> None:
        """Free every codec context; afterwards no FFmpeg buffer refers to the region."""
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            session.close()

    def _pool_statistics(self) -> dict[str, object]:
        pr = framepool.probe()
        pools = [p for x in self._sessions.values() if isinstance(x, _DecoderSession)
                 and (p := x.pool_statistics()) is not None]
        return {
            "available": pr.ok,
            "reason": pr.reason,
            "pools": len(pools),
            "slots": sum(p.slots for p in pools),
            "slots_in_use": sum(p.in_use for p in pools),
            "hits": sum(p.hits for p in pools),
            "misses": sum(p.misses for p in pools),
        }

    def bytes_copied(self) -> int:
        """Bytes copied so far by all sessions (inputs and outputs, encode and decode): cheap."""
        s = self._stats
        return s.enc_in_copied + s.enc_out_copied + s.dec_in_copied + s.dec_out_copied

    def statistics(self) -> dict[str, object]:
        s = self._stats
        enc_copied = s.enc_in_copied + s.enc_out_copied
        dec_copied = s.dec_in_copied + s.dec_out_copied
        kinds = Counter("encode" if isinstance(x, _EncoderSession) else "decode"
                        for x in self._sessions.values())
        return {
            "sessions_open": len(self._sessions),
            "sessions_encode": kinds["encode"],
            "sessions_decode": kinds["decode"],
            "sessions_opened_total": s.opened,
            "pending_items": sum(x.pending_items for x in self._sessions.values()),
            "encode": {
                "frames_in": s.enc_frames_in,
                "packets_out": s.enc_packets_out,
                "bytes_out": s.enc_bytes_out,
                "input_bytes_copied": s.enc_in_copied,
                "output_bytes_copied": s.enc_out_copied,
                "bytes_copied": enc_copied,
                "bytes_copied_per_frame": enc_copied / s.enc_frames_in if s.enc_frames_in else 0.0,
            },
            "decode": {
                "chunks_in": s.dec_chunks_in,
                "packets_in": s.dec_packets_in,
                "frames_out": s.dec_frames_out,
                "bytes_in": s.dec_bytes_in,
                "input_bytes_copied": s.dec_in_copied,
                "output_bytes_copied": s.dec_out_copied,
                "bytes_copied": dec_copied,
                "bytes_copied_per_frame": dec_copied / s.dec_frames_out if s.dec_frames_out else 0.0,
                "frames_pooled": s.dec_frames_pooled,
                "frames_looped": s.dec_frames_looped,
            },
            "frame_pool": self._pool_statistics(),
            "errors": dict(s.errors),
        }


# --- capabilities ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _codec_caps() -> tuple[dict[str, object], ...]:
    out: list[dict[str, object]] = []
    for codec in Codec:
        enc, dec = abi.ENCODER_IMPL[codec], abi.DECODER_IMPL[codec]
        enc_ok, dec_ok = _available(enc, "w"), _available(dec, "r")
        native = sorted({"yuv420p", "nv12"} & _codec_formats(enc)) if enc_ok else []
        parser = False
        if dec_ok:
            try:
                av.CodecContext.create(dec, "r").parse(None)
                parser = True
            except (ValueError, av.error.FFmpegError):
                parser = False
        out.append({
            "id": int(codec),
            "name": abi.CODEC_NAMES[codec],
            "encoder": {
                "impl": enc,
                "available": enc_ok,
                "pix_fmts": [abi.PIX_FMT_NAMES[f] for f in PixFmt] if enc_ok else [],
                "zero_copy_pix_fmts": native,
                "bframes": enc in ("libx264", "libx265", "mpeg4", "libsvtav1"),
            },
            "decoder": {
                "impl": dec,
                "available": dec_ok,
                "pix_fmts": ["yuv420p", "nv12"] if dec_ok else [],
                "parser": parser,
                # FFmpeg's vp8, vp9 and av1 parsers do not split a byte stream into
                # frames: with PARSE every chunk must still hold whole frames.
                "parser_splits": parser and codec not in (Codec.VP8, Codec.VP9, Codec.AV1),
            },
        })
    return tuple(out)


def caps_document(caps: GeometryLimits = DEFAULT_GEOMETRY) -> dict[str, object]:
    """What this FFmpeg build really offers, per abi.Codec, plus the geometry caps."""
    return {
        "abi_version": abi.ABI_VERSION,
        "backend": "pyav",
        "pyav_version": av.__version__,
        "ffmpeg_version": str(av.ffmpeg_version_info),
        "codecs": [dict(c) for c in _codec_caps()],
        "pix_fmts": {name: int(fmt) for fmt, name in abi.PIX_FMT_NAMES.items()},
        "rc_modes": {m.name: int(m) for m in RateControl},
        "geometry": {"max_width": caps.max_width, "max_height": caps.max_height,
                     "max_pixels": caps.max_pixels},
        "decoded_stride": "visible row bytes, planes packed",
    }


def write_caps(mem: memoryview, dst_off: int, dst_len: int, caps: GeometryLimits) -> tuple[int, int]:
    """OutHeader(OUT_JSON, 1, used) then the UTF-8 JSON, right after the header."""
    _check_range(mem, dst_off, dst_len, "dst")
    payload = json.dumps(caps_document(caps), sort_keys=True, separators=(",", ":")).encode()
    used = OutHeader.SIZE + len(payload)
    if used > dst_len:
        raise CodecError(ErrorCode.NO_SPACE, f"caps need {used} bytes", required=used)
    OutHeader.write(mem, dst_off, kind=abi.OUT_JSON, count=1, used=used)
    mem[dst_off + OutHeader.SIZE:dst_off + used] = payload
    return 1, used
