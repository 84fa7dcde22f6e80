"""Decoding: the decoder context built from a decode SessionConfig (threading, options, frame
pool) and ``_DecoderSession`` (parsing, decoding, the C decode loop, frame emission)."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import av
import av.error
import numpy as np
from av.codec.context import ThreadType
from av.packet import Packet
from av.video.codeccontext import VideoCodecContext
from av.video.frame import VideoFrame

from codec_backend import framepool
from codec_backend.framepool import FramePool
from codec_backend.inputs import Input
from codec_backend.options import _guest_options, _open_ctx
from codec_backend.session_base import (
    _I64_MAX,
    _I64_MIN,
    DEFAULT_GEOMETRY,
    MAX_CHUNK,
    MAX_PARSER_BACKLOG,
    CodecError,
    _check_config,
    _check_range,
    _codec,
    _ff_error,
    _pix_fmt,
    _Session,
    _Stats,
)
from vmediad import abi
from vmediad.abi import (
    Codec,
    ErrorCode,
    FrameEntry,
    GeometryLimits,
    OutHeader,
    PixFmt,
    SessionConfig,
)
from vmediad.avformats import nearest_decoded

# A frame entry's flags word (FrameEntry bytes are patched in place for FRAME_MORE).
_ENTRY_FLAGS_AT: Final = abi.struct_items(abi.FRAME_ENTRY)[abi.FRAME_ENTRY_ITEMS.index("flags")][0]
_U32: Final = struct.Struct("<I")
# Decoded formats whose memory layout equals an output format (no conversion).
_CAP_DR1: Final = 1 << 1  # AV_CODEC_CAP_DR1: the decoder allocates through get_buffer2
_SAME_LAYOUT: Final = abi.DECODED_AS
# The output format of each libav format emitted as decoded: a NATIVE session's map, and
# the format of every picture a session emits (converted ones are in one of these).
_NATIVE_OUT: Final = {name: fmt for fmt, names in _SAME_LAYOUT.items() for name in names}
DECODE_FORMATS: Final = (PixFmt.NATIVE, *_SAME_LAYOUT)
# Formats whose pictures may be decoded into a guest's frame pool: all of them, 10-bit
# included (why a guest's writes into a 10-bit slot harm only its own worker: framepool.c,
# fp_get_buffer2).
_POOL_FORMATS: Final = frozenset(_SAME_LAYOUT)


def _decoder_target(cfg: SessionConfig, caps: GeometryLimits) -> tuple[Codec, str, PixFmt]:
    _check_config(cfg, caps)
    codec, impl = _codec(cfg.codec, abi.DECODER_IMPL, "r")
    return codec, impl, _pix_fmt(cfg.pix_fmt, DECODE_FORMATS)


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
    frame_bytes: int = 0  # each frame's unpadded size (what pending_bytes counts for it)


class _DecoderSession(_Session):
    def __init__(self, cfg: SessionConfig, caps: GeometryLimits, stats: _Stats,
                 mem: memoryview | None = None, pool: tuple[int, int] = (0, 0)) -> None:
        super().__init__(stats)
        self._codec, self._impl, self._fmt = _decoder_target(cfg, caps)
        # The libav formats emitted as decoded, each with its output format; any other is
        # converted (to the session's format, or for NATIVE to the nearest device format).
        self._outputs: dict[str, PixFmt] = (dict(_NATIVE_OUT) if self._fmt == PixFmt.NATIVE
                                            else {name: self._fmt for name in _SAME_LAYOUT[self._fmt]})
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
            pooled = {name: fmt for name, fmt in self._outputs.items() if fmt in _POOL_FORMATS}
            self._pool = FramePool(base + pool[0], pool[1], formats=pooled)
            if framepool.DecodeLoop.enabled():
                self._loop = framepool.DecodeLoop(self._pool)
        elif pool[1]:
            raise CodecError(ErrorCode.BAD_ARG, "a frame pool was given without FRAME_POOL")
        self._cfg = cfg
        self._caps = caps
        self._geom: tuple[int, int, int, tuple[list[tuple[int, int]], int, Any]] = (0, 0, 0, ([], 0, None))
        # Decoded frames to emit, each with its output format and entry flags, and the C
        # loop's lent frames.
        self._pending: deque[tuple[VideoFrame, int, int] | _Lent] = deque()
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

    def _geometry(self, w: int, h: int, fmt: int) -> tuple[list[tuple[int, int]], int, Any] | None:
        """Plane shapes, unpadded size and the shapes as the frame pool takes them of a
        ``w`` x ``h`` picture of output format ``fmt``, or None past the caps.  The last
        geometry that passed is kept: a stream's pictures rarely change size or format."""
        geom = self._geom
        if geom[0] == w and geom[1] == h and geom[2] == fmt:
            return geom[3]
        caps = self._caps
        if not caps.allows(w, h):
            return None
        shapes = abi.plane_shapes(PixFmt(fmt), w, h)
        found = (shapes, sum(r * b for r, b in shapes), None if self._pool is None else FramePool.shape(shapes))
        self._geom = (w, h, fmt, found)
        return found

    def _queue(self, frame: VideoFrame) -> CodecError | None:
        w, h = frame.width, frame.height
        fmt = self._outputs.get(frame.format.name)
        flags = 0
        if fmt is None:  # not a format emitted as decoded: converted (and flagged)
            fmt = nearest_decoded(frame.format) if self._fmt == PixFmt.NATIVE else self._fmt
            flags = abi.FRAME_CONVERTED
        geom = self._geometry(w, h, fmt)
        if geom is None:
            return CodecError(ErrorCode.TOO_LARGE, f"decoded {w}x{h} exceeds the geometry caps")
        size = geom[1]
        if flags:
            try:
                frame = frame.reformat(format=abi.PIX_FMT_NAMES[fmt])
            except (av.error.FFmpegError, ValueError) as exc:
                return CodecError(ErrorCode.INVALID_DATA, f"cannot convert frame: {exc}")
            self._stats.dec_out_copied += size
        self._pending.append((frame, fmt, flags))
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
        return self._emit(mem, dst_off, dst_len, partial=drain_pending)

    def _feed_loop(self, mem: memoryview, chunks: list[Input]) -> CodecError | None:
        """Decode ``chunks`` (checked, unparsed) in the C loop: what ``_feed`` does for each,
        with the pictures it can lend queued as :class:`_Lent` and the others as PyAV frames
        through ``_queue``.  Returns the first error; frames before it stay queued."""
        loop = cast(framepool.DecodeLoop, self._loop)
        if mem is not self._base_mem:
            self._base_mem, self._base = mem, int(np.frombuffer(mem, np.uint8, 1).ctypes.data)
        n = len(chunks)
        arr = loop.chunks([(c.offset, c.length, 0 if c.pts is None else c.pts, c.pts is not None) for c in chunks])
        error: CodecError | None = None
        i = receiving = failed = 0
        while True:
            w, h, fmt, geom = self._geom
            rc, i, receiving, entries, err = loop.run(self._base, arr, n, i, receiving, w, h, geom[2], fmt)
            if entries:
                k = len(entries) // FrameEntry.SIZE
                self._stats.dec_frames_looped += k
                self._pending.append(_Lent(entries, k, geom[1]))
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

    def _emit(self, mem: memoryview, dst_off: int, dst_len: int, partial: bool = False) -> tuple[int, int]:
        """Write the queued frames at dst as one output table, oldest first.

        Without ``partial`` every queued frame goes, or none (NO_SPACE, ``required`` = the
        bytes all of them take).  With ``partial`` (a DRAIN_PENDING task) the longest prefix
        of whole frames that fits goes, the rest stays queued in order and the last entry
        has FRAME_MORE; if not even the first fits: NO_SPACE, ``required`` = its bytes."""
        pending = self._pending
        pool = self._pool
        # Frames the decoder wrote into the pool are lent in this first pass (the slot's
        # counter + 1, which the decoder's get_buffer2 reads): every failure below, NO_SPACE
        # included, takes these lends back, and so does a partial drain for the frames it
        # leaves queued; the guest sees a lend only with the completion that reports it.
        # (The C loop's _Lent frames were lent as they were decoded and stay lent and queued.)
        # Per emitted item: (item, position, shapes, slot, entry): position -1 and
        # (offset in the pool, plane offsets, line sizes) for a pooled frame; the payload's
        # position after the table (payloads and the table's size are HEAP_ALIGN multiples,
        # so the table's size, known only at the end, shifts them all alike) for a copied
        # one; -2, the entries' count and the entries' bytes for (a prefix of) a _Lent.
        layouts: list[tuple[Any, int, list[tuple[int, int]], int, Any]] = []
        count = 0  # frames laid out
        end = 0  # end of the last copied payload, after the table
        pooled = 0
        emitted_bytes = 0
        cut = False  # a partial drain stopped before the end of the queue
        first_need = 0  # partial, nothing fits: the bytes the first frame needs
        try:
            for item in pending:
                if type(item) is _Lent:
                    take = item.count
                    if partial:  # a lent frame costs only its table entry
                        while take and abi.out_table_size(abi.OUT_FRAMES, count + take) + end > dst_len:
                            take -= 1
                        if not take and not count:
                            first_need = abi.out_table_size(abi.OUT_FRAMES, 1)
                    if take:
                        entries = item.entries if take == item.count else item.entries[:take * FrameEntry.SIZE]
                        layouts.append((item, -2, [], take, entries))
                        count += take
                        pooled += take
                        emitted_bytes += take * item.frame_bytes
                    if take < item.count:
                        cut = True
                        break
                    continue
                frame, fmt, _flags = cast(tuple[VideoFrame, int, int], item)
                geom = self._geometry(frame.width, frame.height, fmt)
                if geom is None:  # pragma: no cover - _queue admitted only frames within the caps
                    raise CodecError(ErrorCode.BACKEND, "queued frame exceeds the geometry caps")
                shapes = geom[0]
                lent = None
                if pool is not None:
                    try:
                        lent = pool.lend_frame(frame, geom[2])
                    except ValueError as exc:
                        raise CodecError(ErrorCode.BACKEND, str(exc)) from exc
                pos, new_end = (-1, end) if lent is not None else (abi.align(end), abi.align(end) + geom[1])
                if partial and abi.out_table_size(abi.OUT_FRAMES, count + 1) + new_end > dst_len:
                    if lent is not None:
                        cast(FramePool, pool).unlend(lent[0])  # stays queued: not the guest's yet
                    if not count:
                        first_need = abi.out_table_size(abi.OUT_FRAMES, 1) + new_end
                    cut = True
                    break
                if lent is not None:
                    layouts.append((item, -1, shapes, lent[0], lent[1:]))
                    pooled += 1
                else:
                    layouts.append((item, pos, shapes, 0, None))
                end = new_end
                count += 1
                emitted_bytes += geom[1]
            table = abi.out_table_size(abi.OUT_FRAMES, count)
            used = table + end
            if cut and not count:
                raise CodecError(ErrorCode.NO_SPACE, f"the first queued frame needs {first_need} bytes",
                                 required=first_need)
            if used > dst_len:
                raise CodecError(ErrorCode.NO_SPACE, f"output needs {used} bytes", required=used)
            OutHeader.write(mem, dst_off, kind=abi.OUT_FRAMES, count=count, used=used)
            entry_pos = dst_off + OutHeader.SIZE
            copied = 0
            for item, pos, shapes, slot, entry in layouts:
                if pos == -2:
                    mem[entry_pos:entry_pos + len(entry)] = entry  # FrameEntry bytes the C loop wrote
                    entry_pos += len(entry)
                    continue
                frame, fmt, flags = cast(tuple[VideoFrame, int, int], item)
                pts = abi.NO_PTS if frame.pts is None else frame.pts
                if pos < 0:
                    offset, plane_offsets, line_sizes = entry
                    FrameEntry.write(mem, entry_pos, offset=offset, width=frame.width, height=frame.height,
                                     pix_fmt=fmt, nplanes=len(shapes), pts=pts, plane_offsets=plane_offsets,
                                     strides=line_sizes, flags=abi.FRAME_POOLED | flags, slot=slot)
                else:
                    copied += self._emit_copy(mem, entry_pos, dst_off, table + pos, frame, fmt, flags, shapes, pts)
                entry_pos += FrameEntry.SIZE
            if cut:  # frames stay queued: the last entry says so
                at = entry_pos - FrameEntry.SIZE + _ENTRY_FLAGS_AT
                _U32.pack_into(mem, at, _U32.unpack_from(mem, at)[0] | abi.FRAME_MORE)
        except BaseException:
            # The task fails and its frames stay queued: the guest never sees these lends.
            for _item, pos, _shapes, slot, _entry in layouts:
                if pos == -1:
                    cast(FramePool, pool).unlend(slot)
            raise
        mem[entry_pos:dst_off + table] = bytes(dst_off + table - entry_pos)
        self._stats.dec_frames_out += count
        self._stats.dec_frames_pooled += pooled
        self._stats.dec_out_copied += copied
        if not cut:
            pending.clear()
            self.pending_items = self.pending_bytes = 0
        else:
            for item, pos, _shapes, slot, entry in layouts:
                if pos == -2 and slot < cast(_Lent, item).count:  # the cut group: its rest stays first
                    lent_item = cast(_Lent, item)
                    pending[0] = _Lent(lent_item.entries[len(entry):], lent_item.count - slot, lent_item.frame_bytes)
                else:
                    pending.popleft()
            self.pending_items -= count
            self.pending_bytes -= emitted_bytes
        return count, used

    def _emit_copy(self, mem: memoryview, entry_pos: int, dst_off: int, pos: int, frame: VideoFrame, fmt: int,
                   flags: int, shapes: list[tuple[int, int]], pts: int) -> int:
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
        FrameEntry.write(mem, entry_pos, offset=pos, width=frame.width, height=frame.height, pix_fmt=fmt,
                         nplanes=len(shapes), pts=pts, plane_offsets=offs, strides=strides, flags=flags)
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
