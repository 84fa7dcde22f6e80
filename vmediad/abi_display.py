"""Display records of the shared screen: what a guest and hostd exchange to show pictures.

Pure like ``vmediad.abi`` (stdlib and ``abi`` only); its golden bytes are pinned in
``tests/unit/test_display_core.py``.  All integers are little-endian.

A guest opens a display output (DISPLAY_OPEN) with a size, a format and 2 or 3 buffers; hostd
carves the buffers out of that guest's heap and answers with a reply table (offsets from the
region start, so both sides address the same bytes, and per-plane offsets and strides).  The
guest draws into a buffer it holds and commits it (DISPLAY_COMMIT); a commit may name instead an
"external" picture in its heap, e.g. a decoder's frame-pool slot, described by offset, planes and
format.

Ownership of a buffer (the page-flip rule):

* the guest may write a buffer only while it holds it: every buffer is held by the guest after
  DISPLAY_OPEN; a commit hands that buffer to hostd;
* hostd gives it back with the commit's flip record: each commit gets exactly one, either
  PRESENTED (the commit is now on screen; RELEASED then names the commit that left the screen,
  whose buffer the guest holds again) or DROPPED|RELEASED (a newer commit replaced this one
  before it was ever shown: its buffer is the guest's again at once);
* the picture on screen is never written by the guest, so the screen shows no half-drawn
  buffer.  An external picture follows the same rule: the guest keeps the frame-pool slot lent
  (its lent counter raised) until the flip record releases that commit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vmediad import abi

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

DISPLAY_FORMATS = frozenset({abi.PixFmt.BGRA, abi.PixFmt.NV12, abi.PixFmt.YUV420P})
DISPLAY_MIN_BUFFERS = 2
DISPLAY_MAX_BUFFERS = 3
DISPLAY_MAX_DAMAGE = 16
# Rows of every plane of a buffer hostd allocates start on this boundary (SIMD loads in
# swscale); the luma stride of yuv420p is twice it, so its chroma strides keep it too.
DISPLAY_STRIDE_ALIGN = 64
BUFFER_EXTERNAL = 0xFFFF_FFFE  # DISPLAY_COMMIT.buffer: the picture is described in the commit
BUFFER_NONE = 0xFFFF_FFFF  # DISPLAY_FLIP: no buffer in this field


class DisplayOp(enum.IntEnum):
    """Opcodes proposed for ``abi.Op`` (src = the record below, dst = where the reply goes)."""

    DISPLAY_OPEN = 32  # src: DISPLAY_OPEN; dst: DISPLAY_REPLY table (at most DISPLAY_REPLY_MAX)
    DISPLAY_COMMIT = 33  # src: DISPLAY_COMMIT (+ damage); completes with its DISPLAY_FLIP at dst
    DISPLAY_CLOSE = 34  # arg0: output id


class FlipFlag(enum.IntFlag):
    PRESENTED = 1 << 0  # front_*: this commit is on screen since composed_ns
    RELEASED = 1 << 1  # released_*: that commit left the screen; its buffer is the guest's again
    DROPPED = 1 << 2  # this commit was replaced while pending and never shown (released_* = it)


# width, height, pix_fmt, buffers, flags (none defined: must be 0), reserved (must be 0)
DISPLAY_OPEN = struct.Struct("<IIIIII")


@dataclass(frozen=True, slots=True)
class DisplayOpen:
    STRUCT: ClassVar[struct.Struct] = DISPLAY_OPEN
    SIZE: ClassVar[int] = DISPLAY_OPEN.size

    width: int
    height: int
    pix_fmt: int
    buffers: int
    flags: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        return DISPLAY_OPEN.pack(self.width, self.height, self.pix_fmt, self.buffers, self.flags, self.reserved)

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        DISPLAY_OPEN.pack_into(buf, off, self.width, self.height, self.pix_fmt, self.buffers, self.flags,
                               self.reserved)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> DisplayOpen:
        """Parse a copied record; ValueError unless it is exactly DISPLAY_OPEN.size bytes."""
        if len(raw) != DISPLAY_OPEN.size:
            raise ValueError(f"DISPLAY_OPEN is {DISPLAY_OPEN.size} bytes, got {len(raw)}")
        return cls(*DISPLAY_OPEN.unpack(raw))

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> DisplayOpen:
        return cls(*DISPLAY_OPEN.unpack_from(buf, off))


# Reply table: head (output id, width, height, pix_fmt, buffers, nplanes), then one entry per
# buffer: offset from the region start u64, size u64, plane offsets from the buffer u32 x3,
# strides u32 x3 (unused planes 0).
DISPLAY_REPLY_HEAD = struct.Struct("<IIIIII")
DISPLAY_BUFFER = struct.Struct("<QQ3I3I")
DISPLAY_REPLY_MAX = DISPLAY_REPLY_HEAD.size + DISPLAY_MAX_BUFFERS * DISPLAY_BUFFER.size


@dataclass(frozen=True, slots=True)
class DisplayBuffer:
    STRUCT: ClassVar[struct.Struct] = DISPLAY_BUFFER
    SIZE: ClassVar[int] = DISPLAY_BUFFER.size

    offset: int
    size: int
    plane_offsets: tuple[int, int, int]
    strides: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class DisplayReply:
    output: int
    width: int
    height: int
    pix_fmt: int
    nplanes: int
    buffers: tuple[DisplayBuffer, ...]

    @property
    def size(self) -> int:
        return DISPLAY_REPLY_HEAD.size + len(self.buffers) * DISPLAY_BUFFER.size

    def pack(self) -> bytes:
        head = DISPLAY_REPLY_HEAD.pack(self.output, self.width, self.height, self.pix_fmt, len(self.buffers),
                                       self.nplanes)
        return head + b"".join(DISPLAY_BUFFER.pack(b.offset, b.size, *b.plane_offsets, *b.strides)
                               for b in self.buffers)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> DisplayReply:
        if len(raw) < DISPLAY_REPLY_HEAD.size:
            raise ValueError("display reply too short")
        output, width, height, fmt, n, nplanes = DISPLAY_REPLY_HEAD.unpack_from(raw)
        if n > DISPLAY_MAX_BUFFERS or len(raw) < DISPLAY_REPLY_HEAD.size + n * DISPLAY_BUFFER.size:
            raise ValueError(f"display reply with {n} buffers does not fit in {len(raw)} bytes")
        bufs = []
        for i in range(n):
            f = DISPLAY_BUFFER.unpack_from(raw, DISPLAY_REPLY_HEAD.size + i * DISPLAY_BUFFER.size)
            bufs.append(DisplayBuffer(f[0], f[1], (f[2], f[3], f[4]), (f[5], f[6], f[7])))
        return cls(output, width, height, fmt, nplanes, tuple(bufs))


# Commit: head (output id, buffer index or BUFFER_EXTERNAL, flags (none defined: must be 0),
# damage count), then the external block (all zero unless buffer == BUFFER_EXTERNAL: offset
# from the region start u64, width, height, pix_fmt, nplanes, plane offsets from that offset
# u32 x3, strides u32 x3), then ``ndamage`` rects (x, y, width, height) in buffer pixels.
# Damage is a hint: the whole buffer is what goes on screen.
DISPLAY_COMMIT_HEAD = struct.Struct("<IIII")
DISPLAY_EXTERNAL = struct.Struct("<QIIII3I3I")
DISPLAY_RECT = struct.Struct("<IIII")
DISPLAY_COMMIT_FIXED = DISPLAY_COMMIT_HEAD.size + DISPLAY_EXTERNAL.size
DISPLAY_COMMIT_MAX = DISPLAY_COMMIT_FIXED + DISPLAY_MAX_DAMAGE * DISPLAY_RECT.size


@dataclass(frozen=True, slots=True)
class DamageRect:
    STRUCT: ClassVar[struct.Struct] = DISPLAY_RECT
    SIZE: ClassVar[int] = DISPLAY_RECT.size

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ExternalBuffer:
    STRUCT: ClassVar[struct.Struct] = DISPLAY_EXTERNAL
    SIZE: ClassVar[int] = DISPLAY_EXTERNAL.size

    offset: int
    width: int
    height: int
    pix_fmt: int
    nplanes: int
    plane_offsets: tuple[int, int, int]
    strides: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class DisplayCommit:
    output: int
    buffer: int
    damage: tuple[DamageRect, ...] = ()
    external: ExternalBuffer | None = None
    flags: int = 0

    def pack(self) -> bytes:
        head = DISPLAY_COMMIT_HEAD.pack(self.output, self.buffer, self.flags, len(self.damage))
        e = self.external
        ext = (DISPLAY_EXTERNAL.pack(e.offset, e.width, e.height, e.pix_fmt, e.nplanes, *e.plane_offsets,
                                     *e.strides)
               if e is not None else bytes(DISPLAY_EXTERNAL.size))
        return head + ext + b"".join(DISPLAY_RECT.pack(r.x, r.y, r.width, r.height) for r in self.damage)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> DisplayCommit:
        """Parse a copied record; ValueError if its length is not exactly what its damage count
        says, the count is past DISPLAY_MAX_DAMAGE, or the external block is set without
        BUFFER_EXTERNAL (values are checked by the display core, not here)."""
        if len(raw) < DISPLAY_COMMIT_FIXED:
            raise ValueError(f"DISPLAY_COMMIT is at least {DISPLAY_COMMIT_FIXED} bytes, got {len(raw)}")
        output, buffer, flags, n = DISPLAY_COMMIT_HEAD.unpack_from(raw)
        if n > DISPLAY_MAX_DAMAGE:
            raise ValueError(f"{n} damage rects (at most {DISPLAY_MAX_DAMAGE})")
        if len(raw) != DISPLAY_COMMIT_FIXED + n * DISPLAY_RECT.size:
            raise ValueError(f"DISPLAY_COMMIT with {n} damage rects is not {len(raw)} bytes")
        ext_raw = bytes(raw[DISPLAY_COMMIT_HEAD.size:DISPLAY_COMMIT_FIXED])
        external = None
        if buffer == BUFFER_EXTERNAL:
            f = DISPLAY_EXTERNAL.unpack(ext_raw)
            external = ExternalBuffer(f[0], f[1], f[2], f[3], f[4], (f[5], f[6], f[7]), (f[8], f[9], f[10]))
        elif any(ext_raw):
            raise ValueError("external block set on a commit of an allocated buffer")
        damage = tuple(DamageRect(*DISPLAY_RECT.unpack_from(raw, DISPLAY_COMMIT_FIXED + i * DISPLAY_RECT.size))
                       for i in range(n))
        return cls(output, buffer, damage, external, flags)


# Flip record, one per commit: output id, FlipFlag, front buffer, released buffer (index,
# BUFFER_EXTERNAL or BUFFER_NONE), front commit seq, released commit seq (0 = none), hostd
# monotonic ns of the composition that latched it.
DISPLAY_FLIP = struct.Struct("<IIIIQQQ")


@dataclass(frozen=True, slots=True)
class DisplayFlip:
    STRUCT: ClassVar[struct.Struct] = DISPLAY_FLIP
    SIZE: ClassVar[int] = DISPLAY_FLIP.size

    output: int
    flags: int
    front_buffer: int
    released_buffer: int
    front_seq: int
    released_seq: int
    composed_ns: int

    def pack(self) -> bytes:
        return DISPLAY_FLIP.pack(self.output, self.flags, self.front_buffer, self.released_buffer, self.front_seq,
                                 self.released_seq, self.composed_ns)

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        DISPLAY_FLIP.pack_into(buf, off, self.output, self.flags, self.front_buffer, self.released_buffer,
                               self.front_seq, self.released_seq, self.composed_ns)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> DisplayFlip:
        if len(raw) != DISPLAY_FLIP.size:
            raise ValueError(f"DISPLAY_FLIP is {DISPLAY_FLIP.size} bytes, got {len(raw)}")
        return cls(*DISPLAY_FLIP.unpack(raw))

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> DisplayFlip:
        return cls(*DISPLAY_FLIP.unpack_from(buf, off))
