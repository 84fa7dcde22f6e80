"""Decode sessions: ``decoder_config``, ``pool_slot_bytes`` and ``Decoder`` (``Device.decoder()``).

A decoder given the picture size gets a frame pool in guest memory (``abi.POOL_HEADER``) that the
codec writes into itself; without one, frames are copied once into the task's output buffer.
Imports ``guestlib.device`` only for type checking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from guestlib.frames import (
    DEFAULT_OUT,
    DEFAULT_POOL_FRAMES,
    MIN_POOL_FRAMES,
    Chunk,
    Frame,
    Packet,
    Planes,
    _plane_views,
    codec_id,
    pix_fmt_id,
)
from guestlib.session import _returner, _Session, _Spec
from vmediad import abi
from vmediad.abi import ErrorCode, FrameEntry, FramePoolHeader, Op, OutHeader, PixFmt
from vmediad.errors import ClientError

if TYPE_CHECKING:
    from guestlib.device import Buffer, Device

def decoder_config(codec: str | abi.Codec = "h264", *, pix_fmt: str | PixFmt = "native", threads: int = 0,
                   **options: Any) -> abi.SessionConfig:
    """The SessionConfig ``Decoder`` opens with these arguments.  ``pix_fmt`` "native" (the
    default): each frame keeps the stream's own format (``Frame.format`` says which); a named
    format: every frame is converted to it."""
    return abi.SessionConfig(direction=abi.Direction.DECODE, codec=codec_id(codec), pix_fmt=pix_fmt_id(pix_fmt),
                             threads=threads, options=tuple((k, str(v)) for k, v in options.items()))


# Formats a frame pool takes, with their bytes per pixel in halves: every format a decoder
# emits.  NATIVE sizes for the largest picture it may turn out to be (8-bit 4:4:4, 10-bit 4:2:0).
POOL_HALF_BYTES = {PixFmt.YUV420P: 3, PixFmt.NV12: 3, PixFmt.YUV422P: 4, PixFmt.YUV444P: 6,
                   PixFmt.YUV420P10LE: 6, PixFmt.P010LE: 6, PixFmt.NATIVE: 6}


def pool_slot_bytes(width: int, height: int, fmt: PixFmt = PixFmt.YUV420P) -> int:
    """A generous estimate of one frame pool slot for a picture of ``fmt`` (NATIVE: of any
    format a native session emits): the decoder pads the picture (codec alignment, 64-byte
    strides, edge rows) before laying slots out."""
    half = POOL_HALF_BYTES[fmt]
    return abi.align((abi.align(width, 64) + 64) * (abi.align(height, 64) + 8) * half // 2 + 3 * 192, abi.PAGE_SIZE)


class Decoder(_Session):
    _drains_in_parts = True  # a DRAIN_PENDING DECODE returns what fits and FRAME_MORE
    def __init__(self, dev: Device, codec: str = "h264", *, pix_fmt: str | PixFmt = "native", threads: int = 0,
                 parse: bool = True, width: int = 0, height: int = 0, pool_frames: int | None = None,
                 **options: Any) -> None:
        """``width``/``height`` (optional) are the expected picture size, e.g. from a
        container: ``decode_stream()`` sizes its output buffers from them until it has
        seen a frame.  The stream's own geometry is what the device decodes.

        ``pix_fmt`` "native" (the default): each frame comes out in the stream's own format
        (yuv420p, nv12, yuv422p, yuv444p, yuv420p10le or p010le; ``Frame.format``), and a
        stream in any other format (gray, yuv440p, 12-bit, ...) is converted to yuv420p or,
        deeper than 8 bits, yuv420p10le, with ``Frame.converted`` set.  A named format:
        every frame is converted to it unless it already is.

        With a size, the session also gets a frame pool of ``pool_frames`` pictures
        (default ``DEFAULT_POOL_FRAMES``, fewer if the heap is short; 0: none): the
        decoder then writes pictures straight into it and nothing is copied.  Pooled
        frames are read-only and lent until the next call (or ``Frame.release()``);
        frames that find no free slot are copied as without a pool."""
        if width < 0 or height < 0:
            raise ValueError("width and height must not be negative")
        if pool_frames is not None and pool_frames < 0:
            raise ValueError("pool_frames must not be negative")
        if pool_frames and not (width and height):
            raise ValueError("a frame pool needs the picture size (width, height)")
        cfg = decoder_config(codec, pix_fmt=pix_fmt, threads=threads, **options)
        self.parse = parse
        # Largest decoded picture so far (bytes in the output buffer), or the hint's size
        # (native: the largest format it may turn out to be) until a frame is seen.
        self._frame_bytes = abi.frame_size(pix_fmt_id(pix_fmt), width, height) if width and height else 0
        self._seen_frame = False
        self._in: Buffer | None = None
        self._staging: list[Buffer] = []
        self._lent: list[Frame] = []  # pooled frames handed out by the last decode()/flush()
        self._geom: tuple[Any, ...] = ((),)  # see _geometry
        self._givers: dict[int, Callable[[], None]] = {}  # see _lender
        self._pool: Buffer | None = None
        pool = self._make_pool(dev, width, height, DEFAULT_POOL_FRAMES if pool_frames is None else pool_frames,
                               pix_fmt_id(pix_fmt))
        if pool is not None:
            try:
                super().__init__(dev, dataclasses.replace(cfg, flags=cfg.flags | abi.SessionFlag.FRAME_POOL), pool)
                self._pool = pool
            except BaseException as e:
                dev.free(pool)
                # This decoder cannot use a pool (BAD_FLAGS: no direct rendering, e.g.
                # libdav1d) or the worker's libav cannot (BACKEND): decode with copies.
                # (A DeviceError, the ClientError with a ``code``.)
                if not (isinstance(e, ClientError)
                        and getattr(e, "code", None) in (ErrorCode.BAD_FLAGS, ErrorCode.BACKEND)):
                    raise
        if self._pool is None:
            super().__init__(dev, cfg)
        # 8 MiB, or a quarter of the free heap if that is less: a decode's output larger
        # than its buffer grows it, or drains in parts (_Session._run).
        self.device.free(self._out)
        room = dev.heap.available() // 4 // abi.PAGE_SIZE * abi.PAGE_SIZE
        self._out = dev.alloc(min(8 << 20, max(DEFAULT_OUT, room)))

    @staticmethod
    def _make_pool(dev: Device, width: int, height: int, frames: int, fmt: PixFmt = PixFmt.NATIVE) -> Buffer | None:
        if not (frames and width and height) or not dev.region.load64(abi.REG_CAPS) & abi.Caps.FRAME_POOL:
            return None
        if fmt not in POOL_HALF_BYTES:
            return None
        slot = pool_slot_bytes(width, height, fmt)
        # NATIVE sizes for ``frames`` of the largest pictures, but the worker cuts slots for the
        # stream's real ones: a pool is worth having if it holds MIN_POOL_FRAMES of the smallest
        # (8-bit 4:2:0) ones.
        least = pool_slot_bytes(width, height, PixFmt.YUV420P) if fmt == PixFmt.NATIVE else slot
        # At most half the free heap: the stream's output buffers need the rest.
        room = (dev.heap.available() // 2 - abi.POOL_HEADER) // abi.PAGE_SIZE * abi.PAGE_SIZE
        size = min(min(frames, abi.POOL_MAX_SLOTS) * slot, room)
        if size < MIN_POOL_FRAMES * least:
            return None
        pool = dev.alloc(FramePoolHeader.SIZE + size)
        # Every slot starts with no frame lent (the heap memory may hold old bytes).
        FramePoolHeader().pack_into(pool.mem)
        return pool

    def _lender(self, slot: int) -> Callable[[], None]:
        """The give-back of pool slot ``slot`` (made once per slot and session)."""
        give = self._givers.get(slot)
        if give is not None:
            return give
        pool = self._pool
        assert pool is not None
        word = pool.offset + abi.pool_lent_word(slot)
        region = self.device.region

        def give_back() -> None:
            # Only while the pool is this session's: once close() has freed it, the word may
            # belong to another buffer.  Release ordering (a seq-cst RMW): the guest's reads
            # of the frame happen before the decoder may write the slot again.
            if self._pool is pool:
                region.fadd32(word, -1)
        self._givers[slot] = give_back
        return give_back

    def _retainer(self, slot: int) -> Callable[[], Callable[[], None]]:
        """One more lend of pool slot ``slot`` (the decoder does not write a slot whose lent
        counter is above zero), and its give-back."""
        pool = self._pool
        assert pool is not None
        word = pool.offset + abi.pool_lent_word(slot)
        region = self.device.region
        give_back = self._lender(slot)

        def retain() -> Callable[[], None]:
            region.fadd32(word, 1)
            return give_back

        return retain

    @property
    def pool_size(self) -> int:
        """Bytes of the session's frame pool (0: none)."""
        return 0 if self._pool is None else self._pool.size

    def _release_lent(self) -> None:
        lent, self._lent = self._lent, []
        for f in lent:
            f.release()

    def _stage(self, data: bytes | bytearray | memoryview | Buffer) -> tuple[int, int]:
        block = self._region_block(data)
        if block is not None:
            return block
        mv = memoryview(cast("bytes | bytearray | memoryview", data)).cast("B")
        if self._in is None or self._in.size < mv.nbytes:
            if self._in is not None:
                self.device.free(self._in)
            self._in = self.device.alloc(max(mv.nbytes, 64 << 10))
        self._in.mem[: mv.nbytes] = mv  # the one copy of the bitstream into the region
        return self._in.offset, mv.nbytes

    def decode(self, data: bytes | bytearray | memoryview | Buffer, pts: int | None = None,
               parse: bool | None = None) -> list[Frame]:
        self._release_lent()
        src = self._stage(data)
        backlog = self._take_backlog()
        if src[1] == 0:
            return backlog
        parse = self.parse if parse is None else parse
        flags = (abi.F_PARSE if parse else 0) | (abi.F_PTS_VALID if pts is not None else 0)
        try:
            self._run(Op.DECODE, flags=flags, src=src, args=((pts or 0) & abi.U64_MAX, 0, 0, 0))
        except BaseException:
            self._backlog[:0] = backlog  # still first in line for the next call
            raise
        frames = self._frames()  # first: if it raises, the parts stay queued
        return backlog + self._lend(self._take_parts() + frames)

    def flush(self) -> list[Frame]:
        self._release_lent()
        self._run(Op.FLUSH)
        frames = self._frames()
        return self._take_backlog() + self._lend(self._take_parts() + frames)

    @staticmethod
    def _drain(op: Op) -> tuple[Op, int]:
        # A DECODE drain, after a FLUSH too (the flush has run: what it left is queued output
        # like any other), because only DRAIN_PENDING may return part of it.
        return Op.DECODE, abi.F_DRAIN_PENDING

    def _more(self, base: int) -> bool:
        mem = self.device.region.mem
        head = OutHeader.unpack_from(mem, base)
        if head.kind != abi.OUT_FRAMES or not head.count:
            return False
        last = FrameEntry.unpack_from(mem, base + OutHeader.SIZE + (head.count - 1) * FrameEntry.SIZE)
        return bool(last.flags & abi.FRAME_MORE)

    def _keep_part(self, items: list[Any]) -> list[Any]:
        # Copied frames lie in the output buffer the next part is written to: private copies.
        # Pooled ones lie in their slots, lent until the call after the one returning them.
        return [f if f.pooled else f.copy() for f in items]

    def _lend(self, frames: list[Frame]) -> list[Frame]:
        self._lent.extend(f for f in frames if f.pooled)
        return frames

    def decode_stream(self, chunks: Iterable[Chunk], *, flush: bool = True, parse: bool | None = None,
                      depth: int = 2, batch: int = 1) -> Iterator[Frame]:
        """Decode ``chunks`` with ``depth`` tasks queued on the device; yields frames in order.

        A chunk is a region ``Buffer`` (used in place), bytes-like (copied into the
        region once), a guestlib ``Packet`` or any object with a ``pts`` attribute
        and the buffer protocol (``av.Packet``), or a ``(data, pts)`` tuple.  With
        ``batch`` > 1 each task carries up to that many chunks (a MULTI descriptor);
        its output buffer then holds that many frames.  A yielded frame's planes
        stay valid until the iterator is advanced past it (``Frame.copy()`` keeps
        one).  ``flush`` ends the stream (``flush()``).
        """
        self._release_lent()
        yield from self._take_backlog()
        parse = self.parse if parse is None else parse
        yield from self._stream(self._decode_specs(chunks, flush, parse), depth, Op.DECODE, batch)

    def _decode_specs(self, chunks: Iterable[Chunk], flush: bool, parse: bool) -> Iterator[_Spec]:
        dev = self.device
        free = self._staging  # staging buffers whose task has run; freed by close()
        for chunk in chunks:
            pts: int | None
            if isinstance(chunk, tuple):
                data, pts = chunk
            elif isinstance(chunk, Packet):
                data, pts = chunk.data, chunk.pts
            else:
                data, pts = chunk, getattr(chunk, "pts", None)
            done: Callable[[], None] | None = None
            block = self._region_block(data)
            if block is not None:
                src = block
            else:
                mv = memoryview(data).cast("B")
                if mv.nbytes == 0:
                    continue
                buf = free.pop() if free else None
                if buf is None or buf.size < mv.nbytes:
                    if buf is not None:
                        dev.free(buf)
                    buf = dev.alloc(max(mv.nbytes, 64 << 10))
                buf.mem[: mv.nbytes] = mv  # the one copy of the bitstream into the region
                src = (buf.offset, mv.nbytes)
                done = _returner(free, buf)
            flags = (abi.F_PARSE if parse else 0) | (abi.F_PTS_VALID if pts is not None else 0)
            yield _Spec(Op.DECODE, flags, src, ((pts or 0) & abi.U64_MAX, 0, 0, 0), done)
        if flush:
            yield _Spec(Op.FLUSH)

    def _items_at(self, base: int) -> list[Any]:
        return self._frames(base)

    def _task_output(self, batch: int) -> int:
        if not self._frame_bytes:
            return 0
        # A task emits about one frame per chunk; one more covers a decoder catching up
        # (frame threads, reordering).  Frames start HEAP_ALIGN-aligned after the table.
        # With a frame pool the pictures are decoded in place: the buffer holds the table
        # and one picture that found no free slot (more ends in NO_SPACE and grows it).
        n = batch + 1
        pictures = 1 if self._pool is not None else n
        return abi.out_table_size(abi.OUT_FRAMES, n) + pictures * abi.align(self._frame_bytes)

    def _private(self, items: list[Any]) -> list[Any]:
        copies = [f.copy() for f in items]
        for f in items:
            f.release()
        return copies

    def _given(self, item: Any) -> None:
        item.release()

    def _stopped_at(self, item: Any) -> None:
        if item.pooled:
            self._lent.append(item)

    def _frames(self, base: int | None = None) -> list[Frame]:
        base = self._out.offset if base is None else base
        entries = self._table(base, abi.OUT_FRAMES, FrameEntry)
        frames: list[Frame] = []
        try:
            for entry in entries:
                frames.append(self._frame(entry, base))
        except BaseException:
            # A malformed table: give back every slot the worker lent for it, or the
            # pool would lose them for the rest of the session.
            for f in frames:
                f.release()
            for entry in entries[len(frames):]:
                if entry.flags & abi.FRAME_POOLED and self._pool is not None and entry.slot < abi.POOL_MAX_SLOTS:
                    self._lender(entry.slot)()
            raise
        return frames

    def _geometry(self, key: tuple[int, int, int, int, int, int, int],
                  ) -> tuple[PixFmt, list[tuple[int, int]], tuple[int, ...], int, list[int]]:
        """For a table entry's (fmt, width, height, planes, strides x 3): the pixel format,
        plane shapes, strides, bytes and each plane's extent (from its first byte to past its
        last visible one).  The last one is kept: a stream's entries rarely change."""
        g = self._geom
        if g[0] != key:
            fmt, w, h, nplanes = key[:4]
            pf = PixFmt(fmt)
            shapes = abi.plane_shapes(pf, w, h)
            if nplanes != len(shapes):
                raise ValueError(f"{nplanes} planes for {abi.PIX_FMT_NAMES[pf]}")
            strides = key[4:4 + nplanes]
            g = self._geom = (key, pf, shapes, strides, sum(r * s for (r, _), s in zip(shapes, strides, strict=True)),
                              [(r - 1) * s + rb for (r, rb), s in zip(shapes, strides, strict=True)])
            # Output buffers are sized for the pictures seen (copied, these bytes) from the
            # first one on, no longer for the hint (native: for the largest format).
            size = sum(r * rb for r, rb in shapes)
            self._frame_bytes = max(self._frame_bytes, size) if self._seen_frame else size
            self._seen_frame = True
        return g[1], g[2], g[3], g[4], g[5]

    def _frame(self, entry: FrameEntry, base: int) -> Frame:
        mem = self.device.region.mem
        w, h, nplanes, slot, off = entry.width, entry.height, entry.nplanes, entry.slot, entry.offset
        pf, shapes, strides, nbytes, extents = self._geometry((entry.pix_fmt, w, h, nplanes, *entry.strides))
        offs = entry.plane_offsets[:nplanes]
        pts = None if entry.pts == abi.NO_PTS else entry.pts
        converted = bool(entry.flags & abi.FRAME_CONVERTED)
        if entry.flags & abi.FRAME_POOLED:
            pool = self._pool
            if pool is None or slot >= abi.POOL_MAX_SLOTS:
                raise ValueError(f"pooled frame in slot {slot} without a frame pool")
            start = pool.offset + off
            lo, hi = pool.offset + FramePoolHeader.SIZE, pool.offset + pool.size
            for o, ext in zip(offs, extents, strict=True):
                if not lo <= start + o or start + o + ext > hi:
                    raise ValueError("pooled frame outside the frame pool")

            def views() -> Planes:
                planes = _plane_views(mem, pf, w, h, start, offs, strides)
                for p in planes:
                    p.flags.writeable = False  # the decoder may still predict from it
                return planes
            return Frame(w, h, pf, pts, views, strides=strides, nbytes=nbytes, release=self._lender(slot),
                         plane_offsets=tuple(start + o for o in offs), retain=self._retainer(slot),
                         converted=converted)
        planes = _plane_views(mem, pf, w, h, base + off, offs, strides)
        packed, acc = True, 0
        for (rows, _), o, s in zip(shapes, offs, strides, strict=True):
            packed, acc = packed and o == acc, acc + rows * s
        return Frame(w, h, pf, pts, planes, offset=base + off if packed else -1, strides=strides, nbytes=nbytes,
                     plane_offsets=tuple(base + off + o for o in offs), converted=converted)

    def close(self) -> None:
        if not self.closed:
            self._release_lent()
            if self._in is not None:
                self.device.free(self._in)
                self._in = None
            for b in self._staging:
                self.device.free(b)
            self._staging.clear()
        super().close()
        if self._pool is not None:  # after SESSION_CLOSE: the worker has let go of it
            self.device.free(self._pool)
            self._pool = None
