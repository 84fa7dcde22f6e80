"""What every codec session shares: CodecError, the pending-output and geometry limits,
config checks common to encoders and decoders, the statistics record and the ``_Session``
base class (backlog check, context reopen, close)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final, Literal

import av
import av.error
from av.packet import Packet
from av.video.codeccontext import VideoCodecContext

from codec_backend import framepool
from vmediad import abi
from vmediad.abi import (
    Codec,
    ErrorCode,
    GeometryLimits,
    PixFmt,
    SessionConfig,
)
from vmediad.errors import VmediadError

MAX_PENDING_ITEMS: Final = 256
MAX_PENDING_BYTES: Final = 512 << 20
MAX_THREADS: Final = abi.SESSION_MAX_THREADS
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


def _check_config(cfg: SessionConfig, caps: GeometryLimits) -> None:
    """The ABI's rule for a session config (hostd checked it too; a worker trusts no input)."""
    problem = abi.session_config_problem(cfg, caps)
    if problem is not None:
        raise CodecError(*problem)


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
