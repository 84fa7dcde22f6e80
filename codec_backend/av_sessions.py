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

Draining in parts: a decode with ``drain_pending`` whose dst cannot take every
queued frame emits the longest prefix of whole frames that fits (a pooled frame
costs only its table entry), succeeds with that table and leaves the rest queued
in order; the last entry then has ``abi.FRAME_MORE``, so the guest knows to drain
again.  Frames left queued are not lent to the guest (PyAV frames' lends are taken
back; the C loop's ``_Lent`` groups stay lent as they were, a group may be split).
If not even the first frame fits: NO_SPACE with ``required`` = what that frame
alone needs.  Every other call (input, flush, encoders' drains) stays
all-or-nothing.
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

This module owns SessionManager (the sessions of one guest, error accounting,
statistics) and re-exports the names of the modules it is built from:
session_base (CodecError, limits, shared checks, the session base class), options
(guest option screening), encode, decode and caps.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from codec_backend import framepool
from codec_backend.caps import (
    _codec_caps,
    caps_document,
    write_caps,
)
from codec_backend.decode import (
    _CAP_DR1,
    _SAME_LAYOUT,
    _build_decoder,
    _decoder_target,
    _DecoderSession,
    _Lent,
    open_decoder_context,
)
from codec_backend.encode import (
    _B_FRAMES_ON,
    _DEFAULT_QSCALE,
    _EVEN_420,
    _FF_QP2LAMBDA,
    _JPEG_RANGE,
    _LIBVPX,
    _NATIVE_ENCODERS,
    _VP8_CQ_CAP,
    EncoderTarget,
    _build_encoder,
    _copy_planes_in,
    _encoder_target,
    _EncoderSession,
    _preset,
    _rate_control,
    open_encoder_context,
)
from codec_backend.inputs import Input
from codec_backend.options import (
    _FRACTION_RE,
    _GENERIC_ALLOWED,
    _PARAM_DENIED,
    _PARAM_DENIED_PARTS,
    _PARAM_LISTS,
    _PRIVATE_DENIED,
    _check_param_list,
    _check_value,
    _guest_options,
    _merge_params,
    _open_ctx,
)
from codec_backend.session_base import (
    _I64_MAX,
    _I64_MIN,
    DEFAULT_GEOMETRY,
    INPUT_SLACK,
    MAX_CHUNK,
    MAX_OPTIONS,
    MAX_PARSER_BACKLOG,
    MAX_PENDING_BYTES,
    MAX_PENDING_ITEMS,
    MAX_STRIDE,
    MAX_THREADS,
    CodecError,
    _available,
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
    _with_log_reason,
)
from vmediad.abi import (
    Direction,
    ErrorCode,
    GeometryLimits,
    SessionConfig,
)

# The backend's names, private ones included (tests and benchmarks reach them), stay
# importable from here; the defining module is the one imported from above.
__all__ = [
    "DEFAULT_GEOMETRY",
    "INPUT_SLACK",
    "MAX_CHUNK",
    "MAX_OPTIONS",
    "MAX_PARSER_BACKLOG",
    "MAX_PENDING_BYTES",
    "MAX_PENDING_ITEMS",
    "MAX_STRIDE",
    "MAX_THREADS",
    "_B_FRAMES_ON",
    "_CAP_DR1",
    "_DEFAULT_QSCALE",
    "_EVEN_420",
    "_FF_QP2LAMBDA",
    "_FRACTION_RE",
    "_GENERIC_ALLOWED",
    "_I64_MAX",
    "_I64_MIN",
    "_JPEG_RANGE",
    "_LIBVPX",
    "_NATIVE_ENCODERS",
    "_PARAM_DENIED",
    "_PARAM_DENIED_PARTS",
    "_PARAM_LISTS",
    "_PRIVATE_DENIED",
    "_SAME_LAYOUT",
    "_VP8_CQ_CAP",
    "CodecError",
    "EncoderTarget",
    "SessionManager",
    "_DecoderSession",
    "_EncoderSession",
    "_InLayout",
    "_Lent",
    "_PendingPacket",
    "_Session",
    "_Stats",
    "_available",
    "_build_decoder",
    "_build_encoder",
    "_check_config",
    "_check_param_list",
    "_check_range",
    "_check_value",
    "_codec",
    "_codec_caps",
    "_codec_formats",
    "_copy_planes_in",
    "_decoder_target",
    "_encoder_target",
    "_ff_error",
    "_guest_options",
    "_merge_params",
    "_open_ctx",
    "_pix_fmt",
    "_preset",
    "_rate_control",
    "_with_log_reason",
    "caps_document",
    "open_decoder_context",
    "open_encoder_context",
    "write_caps",
]

_T = TypeVar("_T")


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
