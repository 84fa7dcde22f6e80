"""The vmediad device ABI: region layout, descriptors, codes and codec tables.

This module is pure: it does no I/O and imports nothing that does.  Every
byte a guest and hostd exchange is defined here, and ``tests/unit/test_abi.py``
pins it with golden bytes.  Bump ``ABI_VERSION`` on any incompatible change.

Region layout (all integers little-endian)::

    [0, 4096)                  register page ("BAR0"), see REG_*
    [SQ_OFFSET, +4*entries)    submission queue: u32 slot indices
    [DESC_OFFSET, +128*entries) descriptor table, one 128-byte slot per task
    [HEAP_OFFSET, region_size) heap: payload buffers addressed by offset

Ownership of words (who may store to them):

* guest: DOORBELL, SQ_TAIL, SQ entries, descriptor input fields, a slot's
  ``status`` only for FREE->SUBMITTED and DONE/ERROR->FREE, ``waiters``.
* hostd: everything else on the register page, descriptor result fields and
  the SUBMITTED->DONE/ERROR flip of ``status``.

hostd never trusts a guest-owned word twice: it copies a descriptor's input
fields once, when the task is about to run, and validates the copy.

Every record that crosses a process or language boundary is a frozen dataclass here with
``SIZE``, ``pack_into(buf, off)`` and ``unpack_from(buf, off)``; its ``STRUCT`` is the one
definition of its bytes (the module-level struct names are the same objects):

    guest ABI (ABI_VERSION)         Descriptor, DescResult, SessionConfig, MultiEntry (and
                                    MultiList, a whole list), OutHeader, PacketEntry,
                                    FrameEntry, FramePoolHeader
    host-internal (BANK_ABI_VERSION) ChannelProgram, ChannelResult, the BANK_* / CH_* words

Records written per task or per frame also have a static ``write(buf, off, *, field=...)``
that packs by field name without building the record.  ``c_macros()`` exports the layouts
the frame pool's C writes (``codec_backend/framepool.c``).
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

ABI_VERSION = 1
MAGIC = 0x44454D56  # b"VMED" little-endian
PAGE_SIZE = 4096
DESC_SIZE = 128
HEAP_ALIGN = 64
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def struct_items(s: struct.Struct) -> list[tuple[int, int]]:
    """(byte offset, size) of every item of a little-endian, unpadded struct, counts expanded
    ("<Q3I": 4 items).  What ``c_macros`` hands the C, so it writes the bytes this module packs."""
    fmt = s.format
    if not fmt.startswith("<"):
        raise ValueError(f"{fmt!r} is not little-endian and unpadded")
    items: list[tuple[int, int]] = []
    off = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        size = struct.calcsize("<" + code)
        n = int(count or 1)
        if code in "sp":  # one item of n bytes
            items.append((off, n))
            off += n
        elif code == "x":  # padding: no item
            off += n
        else:
            items.extend((off + k * size, size) for k in range(n))
            off += n * size
    if off != s.size:  # pragma: no cover - the regex covers every struct code
        raise ValueError(f"cannot lay out {fmt!r}")
    return items


# --- register page -------------------------------------------------------
# Host-written, read-only for the guest (layout and identity).
REG_MAGIC = 0x000  # u32
REG_ABI_VERSION = 0x004  # u32
REG_REGION_SIZE = 0x008  # u64
REG_RING_ENTRIES = 0x010  # u32
REG_DESC_SIZE = 0x014  # u32
REG_SQ_OFFSET = 0x018  # u64
REG_DESC_OFFSET = 0x020  # u64
REG_HEAP_OFFSET = 0x028  # u64
REG_HEAP_SIZE = 0x030  # u64
REG_CAPS = 0x038  # u64, CAP_* bits
REG_VM_ID = 0x040  # u32
# Guest-written cache line.
REG_DOORBELL = 0x080  # u32: guest stores a DOORBELL_* command; hostd swaps it back to 0
REG_SQ_TAIL = 0x084  # u32: producer count, free-running, release-stored after the SQ entries
# Host-written cache line (hot).
REG_NEED_WAKEUP = 0x0C0  # u32: 1 while hostd may sleep; the guest futex-wakes DOORBELL only then
REG_SQ_HEAD = 0x0C4  # u32: consumer count, free-running
REG_RING_ERROR = 0x0C8  # u32: last ring-level ErrorCode (not tied to one slot)
REG_RING_ERROR_COUNT = 0x0CC  # u32
REG_DEVICE_STATE = 0x0D0  # u32: DeviceState
# Host-written liveness.
REG_EPOCH = 0x100  # u64: random per hostd run; a change means hostd restarted
REG_HEARTBEAT = 0x108  # u64: hostd monotonic ns, refreshed at least every HEARTBEAT_PERIOD_S
REG_IRQ_COUNT = 0x110  # u64: completions posted to this region
REG_TASKS_DONE = 0x118  # u64
REG_TASKS_FAILED = 0x120  # u64

HEARTBEAT_PERIOD_S = 0.5


class Doorbell(enum.IntEnum):
    IDLE = 0
    KICK = 0x4B49434B  # "KICK": the only value that makes hostd read the ring; any other value is counted and ignored
    RESET = 0x52455345  # "RESE": clear a ring error, resynchronise SQ_HEAD to SQ_TAIL


class DeviceState(enum.IntEnum):
    INIT = 0
    RUNNING = 1
    STOPPING = 2
    GONE = 3


class Caps(enum.IntFlag):
    FUTEX = 1 << 0  # NEED_WAKEUP and completion futexes are honoured
    POLL = 1 << 1  # hostd also polls doorbells (poll-only guests may skip futex_wake)
    CODEC = 1 << 2  # session ops present
    NAMED_REGION = 1 << 3
    MULTI = 1 << 4  # ENCODE_FRAME/DECODE accept DescFlag.MULTI (a list of inputs per task)
    FRAME_POOL = 1 << 5  # decode sessions accept SessionFlag.FRAME_POOL (decoding into guest memory)
    ERROR_TEXT = 1 << 6  # failed codec tasks leave an error record (the reason) at dst; see ERROR_RECORD
    # The region is served to a QEMU guest over ivshmem (docs/vms.md); FUTEX is clear there, since
    # no futex crosses the VM boundary: the guest polls or takes MSI-X (vmediad/ivshmem.py).
    IVSHMEM = 1 << 15


# --- descriptor ------------------------------------------------------------
class Status(enum.IntEnum):
    FREE = 0
    SUBMITTED = 1  # the patent's "first value"
    DONE = 2  # the "second value"
    ERROR = 3


class Op(enum.IntEnum):
    NOP = 1
    COPY = 2
    CRC32 = 3
    CAPS = 4
    SESSION_OPEN = 16
    ENCODE_FRAME = 17
    DECODE = 18
    FLUSH = 19
    SESSION_CLOSE = 20
    # The shared screen (records below, "The shared screen"): hostd's device thread runs them
    # itself; they never reach a worker.
    DISPLAY_OPEN = 32  # src: DISPLAY_OPEN; dst: the arena (reply table, then the buffers)
    DISPLAY_COMMIT = 33  # src: DISPLAY_COMMIT (+ damage); dst: its DISPLAY_FLIP (completes at the flip)
    DISPLAY_CLOSE = 34  # arg0: output id


SESSION_OPS = frozenset({Op.ENCODE_FRAME, Op.DECODE, Op.FLUSH, Op.SESSION_CLOSE})
# Run by hostd's worker inline in its main loop (microseconds); every other op is a codec
# task that runs on its channel's thread (milliseconds).
SHORT_OPS = frozenset({Op.NOP, Op.COPY, Op.CRC32})
DISPLAY_OPS = frozenset({Op.DISPLAY_OPEN, Op.DISPLAY_COMMIT, Op.DISPLAY_CLOSE})


@dataclass(frozen=True, slots=True)
class GeometryLimits:
    """The largest picture a task may describe (defaults: FFmpeg's fuzzing caps).

    hostd validates descriptors and session configs against it, and hands the same values to
    each worker, whose codec sessions enforce them again on what FFmpeg reports."""

    max_width: int = 8192
    max_height: int = 8192
    max_pixels: int = 35_000_000

    def allows(self, width: int, height: int) -> bool:
        return 0 < width <= self.max_width and 0 < height <= self.max_height and width * height <= self.max_pixels


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """What hostd tells a worker it may allow (crosses the process boundary as JSON on argv)."""

    geometry: GeometryLimits = GeometryLimits()
    max_sessions: int = 16

    def to_json(self) -> str:
        g = self.geometry
        return json.dumps({"max_width": g.max_width, "max_height": g.max_height, "max_pixels": g.max_pixels,
                           "max_sessions": self.max_sessions}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerLimits:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"worker limits must be a JSON object, got {type(d).__name__}")
        return cls.from_mapping(d)

    @classmethod
    def from_mapping(cls, d: Mapping[str, int]) -> WorkerLimits:
        """The limits named by ``to_json``'s keys; a key left out keeps its default."""
        g, dflt = GeometryLimits(), cls()
        return cls(GeometryLimits(int(d.get("max_width", g.max_width)), int(d.get("max_height", g.max_height)),
                                  int(d.get("max_pixels", g.max_pixels))),
                   int(d.get("max_sessions", dflt.max_sessions)))


class ErrorCode(enum.IntEnum):
    OK = 0
    BAD_OPCODE = 1
    BAD_RANGE = 2  # buffer not inside the heap
    OVERFLOW = 3  # offset + length overflows u64
    BAD_RING_INDEX = 4  # ring-level: SQ entry names a slot >= ring entries
    RING_OVERRUN = 5  # ring-level: SQ_TAIL - SQ_HEAD > ring entries
    SLOT_BUSY = 6  # ring-level: slot submitted again while still in flight
    BAD_ARG = 7
    OVERLAP = 8  # COPY source and destination overlap
    WORKER_CRASHED = 9
    DEVICE_GONE = 10
    UNSUPPORTED_CODEC = 11
    INVALID_DATA = 12
    NO_SPACE = 13  # result_len holds the size needed; output kept for a retry
    BAD_SESSION = 14
    SESSION_LOST = 15
    TOO_LARGE = 16  # geometry caps
    BUSY = 17  # too many sessions
    BACKEND = 18  # codec library failure that is not the guest's fault
    BAD_FLAGS = 19
    TIMEOUT = 20  # the task ran past its deadline: its worker was killed and respawned, sessions lost


class DescFlag(enum.IntFlag):
    FORCE_KEYFRAME = 1 << 0  # ENCODE_FRAME
    PARSE = 1 << 1  # DECODE: src is an elementary stream, split with a parser
    PTS_VALID = 1 << 2  # arg0 carries a pts
    DRAIN_PENDING = 1 << 3  # ENCODE_FRAME/DECODE: consume no input, return output kept (DECODE: what fits)
    MULTI = 1 << 4  # ENCODE_FRAME/DECODE: src is a list of MULTI_ENTRY inputs, not one input


# Plain-int copies for per-task and per-frame paths: an IntFlag operator runs Python code
# (about 0.5 us here), and ``int & IntFlag`` dispatches to IntFlag.__rand__ as well.
F_FORCE_KEYFRAME = int(DescFlag.FORCE_KEYFRAME)
F_PARSE = int(DescFlag.PARSE)
F_PTS_VALID = int(DescFlag.PTS_VALID)
F_DRAIN_PENDING = int(DescFlag.DRAIN_PENDING)
F_MULTI = int(DescFlag.MULTI)

DESC_FLAGS_MASK = int(
    DescFlag.FORCE_KEYFRAME | DescFlag.PARSE | DescFlag.PTS_VALID | DescFlag.DRAIN_PENDING | DescFlag.MULTI
)

# A multi-input task (DescFlag.MULTI): src holds 1..MULTI_MAX entries back to back, each
# one input in the heap (a frame for ENCODE_FRAME, a chunk for DECODE) with its own pts
# and flags (PTS_VALID, and FORCE_KEYFRAME for a frame; other bits are BAD_FLAGS).  The
# descriptor's arg0 and PTS_VALID are unused; ENCODE_FRAME's strides (arg1, arg2) and
# DECODE's PARSE apply to every entry.  The inputs are fed in order and the output of all
# of them lands in dst under one table; NO_SPACE and the DRAIN_PENDING retry work as for
# one input.  hostd copies the list once and checks every entry before the task starts.
# offset u64, length u64, pts i64, flags u32, reserved u32 (must be 0)
MULTI_ENTRY = struct.Struct("<QQqII")
MULTI_MAX = 16
MULTI_ENTRY_FLAGS = int(DescFlag.PTS_VALID | DescFlag.FORCE_KEYFRAME)


@dataclass(frozen=True, slots=True)
class MultiEntry:
    """One input of a MULTI list (written by the guest; hostd copies and checks the list once,
    and the worker reads hostd's copy from the register file's config page)."""

    STRUCT: ClassVar[struct.Struct] = MULTI_ENTRY
    SIZE: ClassVar[int] = MULTI_ENTRY.size

    offset: int
    length: int
    pts: int = 0
    flags: int = 0  # PTS_VALID, FORCE_KEYFRAME (MULTI_ENTRY_FLAGS)
    reserved: int = 0  # must be 0

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        MULTI_ENTRY.pack_into(buf, off, self.offset, self.length, self.pts, self.flags, self.reserved)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> MultiEntry:
        return cls(*MULTI_ENTRY.unpack_from(buf, off))

    @classmethod
    def iter_unpack(cls, buf: ReadableBuffer) -> Iterator[MultiEntry]:
        """The entries of a whole list (its length a multiple of SIZE)."""
        return (cls(*v) for v in MULTI_ENTRY.iter_unpack(buf))


@dataclass(frozen=True, slots=True)
class MultiList:
    """A whole MULTI list, field by field: entry ``i`` is ``offset[i]``, ``length[i]``, ...
    One record per list, so the per-input paths build no record per input."""

    offset: tuple[int, ...]
    length: tuple[int, ...]
    pts: tuple[int, ...]
    flags: tuple[int, ...]
    reserved: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.offset)

    @classmethod
    def unpack(cls, buf: ReadableBuffer) -> MultiList:
        """The list in ``buf`` (its length a multiple of MultiEntry.SIZE)."""
        rows = list(MULTI_ENTRY.iter_unpack(buf))
        if not rows:
            return cls((), (), (), (), ())
        return cls(*zip(*rows, strict=True))


# Offsets inside a 128-byte descriptor slot.
D_STATUS = 0x00  # u32 Status; futex word the submitting thread waits on
D_WAITERS = 0x04  # u32 guest threads asleep on D_STATUS; hostd wakes only if non-zero
D_INPUT = 0x08  # start of the input block hostd copies once
D_RESULT = 0x58  # u64
D_RESULT_LEN = 0x60  # u64
D_ERROR = 0x68  # u32 ErrorCode
D_CHANNEL = 0x6C  # u32 channel that ran the task
D_DEVICE_NS = 0x70  # u64 ns from dispatch to completion
D_SEQ = 0x78  # u64 hostd's global completion sequence number

# Input block: tag, opcode, flags, session, src_off, src_len, dst_off, dst_len, arg0..arg3
DESC_INPUT = struct.Struct("<QHHIQQQQQQQQ")
assert D_INPUT + DESC_INPUT.size == D_RESULT
DESC_RESULT = struct.Struct("<QQIIQQ")  # result, result_len, error, channel, device_ns, seq
assert D_RESULT + DESC_RESULT.size == DESC_SIZE


@dataclass(frozen=True, slots=True)
class Descriptor:
    """The input block of a descriptor, as copied once by hostd."""

    tag: int = 0
    opcode: int = 0
    flags: int = 0
    session: int = 0
    src_off: int = 0
    src_len: int = 0
    dst_off: int = 0
    dst_len: int = 0
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    arg3: int = 0

    STRUCT: ClassVar[struct.Struct] = DESC_INPUT
    SIZE: ClassVar[int] = DESC_INPUT.size

    def pack(self) -> bytes:
        return DESC_INPUT.pack(
            self.tag, self.opcode, self.flags, self.session, self.src_off, self.src_len,
            self.dst_off, self.dst_len, self.arg0, self.arg1, self.arg2, self.arg3,
        )

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        DESC_INPUT.pack_into(
            buf, off, self.tag, self.opcode, self.flags, self.session, self.src_off, self.src_len,
            self.dst_off, self.dst_len, self.arg0, self.arg1, self.arg2, self.arg3,
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Descriptor:
        return cls(*DESC_INPUT.unpack(raw))

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> Descriptor:
        return cls(*DESC_INPUT.unpack_from(buf, off))


@dataclass(frozen=True, slots=True)
class DescResult:
    """A descriptor's result fields (D_RESULT..): hostd writes them before it flips ``status``
    (seq-cst); the guest reads them after it sees DONE or ERROR."""

    STRUCT: ClassVar[struct.Struct] = DESC_RESULT
    SIZE: ClassVar[int] = DESC_RESULT.size

    result: int = 0
    result_len: int = 0
    error: int = 0
    channel: int = 0
    device_ns: int = 0
    seq: int = 0

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        DESC_RESULT.pack_into(buf, off, self.result, self.result_len, self.error, self.channel, self.device_ns,
                              self.seq)

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, result: int, result_len: int, error: int, channel: int,
              device_ns: int, seq: int) -> None:
        """pack_into without building the record (hostd's per-task completion)."""
        DESC_RESULT.pack_into(buf, off, result, result_len, error, channel, device_ns, seq)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> DescResult:
        return cls(*DESC_RESULT.unpack_from(buf, off))


@dataclass(frozen=True, slots=True)
class Layout:
    region_size: int
    ring_entries: int
    sq_offset: int
    desc_offset: int
    heap_offset: int
    heap_size: int

    def desc(self, slot: int) -> int:
        return self.desc_offset + slot * DESC_SIZE

    def sq_entry(self, index: int) -> int:
        return self.sq_offset + 4 * (index % self.ring_entries)

    def as_dict(self) -> dict[str, int]:
        return {
            "region_size": self.region_size,
            "ring_entries": self.ring_entries,
            "sq_offset": self.sq_offset,
            "desc_offset": self.desc_offset,
            "heap_offset": self.heap_offset,
            "heap_size": self.heap_size,
        }


class LayoutError(ValueError):
    pass


def align(value: int, to: int = HEAP_ALIGN) -> int:
    """``value`` rounded up to a multiple of ``to`` (heap blocks and output items: HEAP_ALIGN)."""
    return (value + to - 1) // to * to


def compute_layout(region_size: int, ring_entries: int) -> Layout:
    """The one layout for a region of ``region_size`` bytes and ``ring_entries`` slots."""
    if ring_entries < 1 or ring_entries & (ring_entries - 1):
        raise LayoutError(f"ring_entries must be a power of two, got {ring_entries}")
    if region_size % PAGE_SIZE:
        raise LayoutError(f"region_size must be a multiple of {PAGE_SIZE}, got {region_size}")
    sq_offset = PAGE_SIZE
    desc_offset = align(sq_offset + 4 * ring_entries, DESC_SIZE)
    heap_offset = align(desc_offset + DESC_SIZE * ring_entries, PAGE_SIZE)
    if heap_offset + PAGE_SIZE > region_size:
        raise LayoutError(f"region_size {region_size} leaves no heap for {ring_entries} slots")
    return Layout(region_size, ring_entries, sq_offset, desc_offset, heap_offset, region_size - heap_offset)


def layout_from_registers(page: bytes | memoryview) -> Layout:
    """Read (and check) the layout a hostd published on the register page."""
    magic, version = struct.unpack_from("<II", page, REG_MAGIC)
    if magic != MAGIC:
        raise LayoutError(f"bad magic {magic:#x}")
    if version != ABI_VERSION:
        raise LayoutError(f"ABI version {version}, this side speaks {ABI_VERSION}")
    (size,) = struct.unpack_from("<Q", page, REG_REGION_SIZE)
    (entries,) = struct.unpack_from("<I", page, REG_RING_ENTRIES)
    layout = compute_layout(size, entries)
    published = struct.unpack_from("<QQQQ", page, REG_SQ_OFFSET)
    if published != (layout.sq_offset, layout.desc_offset, layout.heap_offset, layout.heap_size):
        raise LayoutError("published layout does not match the computed one")
    return layout


def register_page_init(layout: Layout, vm_id: int, caps: int) -> list[tuple[int, str, int]]:
    """(offset, struct format, value) triples hostd writes once, before publishing the region."""
    return [
        (REG_ABI_VERSION, "<I", ABI_VERSION),
        (REG_REGION_SIZE, "<Q", layout.region_size),
        (REG_RING_ENTRIES, "<I", layout.ring_entries),
        (REG_DESC_SIZE, "<I", DESC_SIZE),
        (REG_SQ_OFFSET, "<Q", layout.sq_offset),
        (REG_DESC_OFFSET, "<Q", layout.desc_offset),
        (REG_HEAP_OFFSET, "<Q", layout.heap_offset),
        (REG_HEAP_SIZE, "<Q", layout.heap_size),
        (REG_CAPS, "<Q", caps),
        (REG_VM_ID, "<I", vm_id),
        # MAGIC last: a reader that sees it sees everything above.
        (REG_MAGIC, "<I", MAGIC),
    ]


def as_i64(v: int) -> int:
    """A u64 register (e.g. a pts in arg0) read as the i64 it carries."""
    return v - (1 << 64) if v >= 1 << 63 else v


def range_ok(off: int, length: int, lo: int, hi: int) -> ErrorCode:
    """Check [off, off+length) lies inside [lo, hi) without ever overflowing u64.

    Python ints do not overflow, so the u64 semantics a C guest would have are
    checked explicitly: the fields are u64 and their sum must fit in u64.
    """
    if off > U64_MAX - length:
        return ErrorCode.OVERFLOW
    if off < lo or length > hi - lo or off - lo > hi - lo - length:
        return ErrorCode.BAD_RANGE
    return ErrorCode.OK


def ranges_overlap(a_off: int, a_len: int, b_off: int, b_len: int) -> bool:
    return a_len > 0 and b_len > 0 and a_off < b_off + b_len and b_off < a_off + a_len


# --- codec ABI ---------------------------------------------------------------
class Codec(enum.IntEnum):
    H264 = 1
    HEVC = 2
    VP9 = 3
    AV1 = 4
    MJPEG = 5
    MPEG4 = 6
    VP8 = 7


class PixFmt(enum.IntEnum):
    # DECODE only: each picture keeps the decoder's own format when it is one of 1, 2, 5-8 and
    # is converted otherwise (8-bit to yuv420p, deeper to yuv420p10le, FRAME_CONVERTED); every
    # FrameEntry names its picture's format, never NATIVE.
    NATIVE = 0
    YUV420P = 1
    NV12 = 2
    RGB24 = 3
    BGRA = 4
    YUV422P = 5
    YUV444P = 6
    YUV420P10LE = 7  # 10 bits in the low bits of little-endian 16-bit samples
    P010LE = 8  # 10 bits in the high bits of little-endian 16-bit samples, chroma interleaved


PIX_FMT_NAMES = {PixFmt.NATIVE: "native", PixFmt.YUV420P: "yuv420p", PixFmt.NV12: "nv12", PixFmt.RGB24: "rgb24",
                 PixFmt.BGRA: "bgra", PixFmt.YUV422P: "yuv422p", PixFmt.YUV444P: "yuv444p",
                 PixFmt.YUV420P10LE: "yuv420p10le", PixFmt.P010LE: "p010le"}
CODEC_NAMES = {
    Codec.H264: "h264", Codec.HEVC: "hevc", Codec.VP9: "vp9",
    Codec.AV1: "av1", Codec.MJPEG: "mjpeg", Codec.MPEG4: "mpeg4", Codec.VP8: "vp8",
}
# FFmpeg implementation behind each codec, per direction.
ENCODER_IMPL = {
    Codec.H264: "libx264", Codec.HEVC: "libx265", Codec.VP9: "libvpx-vp9",
    Codec.AV1: "libsvtav1", Codec.MJPEG: "mjpeg", Codec.MPEG4: "mpeg4", Codec.VP8: "libvpx",
}
DECODER_IMPL = {
    Codec.H264: "h264", Codec.HEVC: "hevc", Codec.VP9: "vp9",
    Codec.AV1: "libdav1d", Codec.MJPEG: "mjpeg", Codec.MPEG4: "mpeg4", Codec.VP8: "vp8",
}


def plane_shapes(fmt: PixFmt, width: int, height: int) -> list[tuple[int, int]]:
    """(rows, bytes per row) of each plane of an unpadded frame."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    if fmt == PixFmt.YUV420P:
        return [(height, width), (ch, cw), (ch, cw)]
    if fmt == PixFmt.NV12:
        return [(height, width), (ch, 2 * cw)]
    if fmt == PixFmt.RGB24:
        return [(height, 3 * width)]
    if fmt == PixFmt.BGRA:
        return [(height, 4 * width)]
    if fmt == PixFmt.YUV422P:
        return [(height, width), (height, cw), (height, cw)]
    if fmt == PixFmt.YUV444P:
        return [(height, width)] * 3
    if fmt == PixFmt.YUV420P10LE:
        return [(height, 2 * width), (ch, 2 * cw), (ch, 2 * cw)]
    if fmt == PixFmt.P010LE:
        return [(height, 2 * width), (ch, 4 * cw)]
    if fmt == PixFmt.NATIVE:
        raise ValueError("native is a session's choice, not a picture's format: it has no planes")
    raise ValueError(f"unknown pixel format {fmt}")


# The decoder formats (libav's names) each device format holds as decoded, with no conversion
# (a full-range yuvj format has the same samples).  A NATIVE decode session emits pictures in
# these formats as they are, and converts any other.
DECODED_AS = {
    PixFmt.YUV420P: frozenset({"yuv420p", "yuvj420p"}),
    PixFmt.NV12: frozenset({"nv12"}),
    PixFmt.YUV422P: frozenset({"yuv422p", "yuvj422p"}),
    PixFmt.YUV444P: frozenset({"yuv444p", "yuvj444p"}),
    PixFmt.YUV420P10LE: frozenset({"yuv420p10le"}),
    PixFmt.P010LE: frozenset({"p010le"}),
}
# The formats a NATIVE decode session emits pictures in.
NATIVE_OUTPUTS = tuple(DECODED_AS)

# Formats of 16-bit little-endian samples holding 10 bits (an encoder keeps only those 10).
TEN_BIT_FORMATS = frozenset({PixFmt.YUV420P10LE, PixFmt.P010LE})


def frame_size(fmt: PixFmt, width: int, height: int, strides: list[int] | None = None) -> int:
    """Bytes of an unpadded frame (or of one with ``strides``).  NATIVE: the largest picture
    a native decode session may emit at that size (about 3 bytes per pixel: 8-bit 4:4:4 or
    10-bit 4:2:0); it has no strides."""
    if fmt == PixFmt.NATIVE and strides is None:
        return max(frame_size(f, width, height) for f in NATIVE_OUTPUTS)
    shapes = plane_shapes(fmt, width, height)
    if strides is None:
        return sum(r * b for r, b in shapes)
    return sum(r * s for (r, _), s in zip(shapes, strides, strict=True))


class Direction(enum.IntEnum):
    ENCODE = 1
    DECODE = 2


class RateControl(enum.IntEnum):
    DEFAULT = 0
    BITRATE = 1
    CRF = 2
    QP = 3


# SESSION_OPEN: src points at this struct, optionally followed by an options
# string "key=value\0key=value\0" (UTF-8) of length src_len - SESSION_CONFIG.size.
# Fields: direction, codec, width, height, pix_fmt, tb_num, tb_den, fps_num,
# fps_den, rc_mode, rc_value (bitrate bit/s, or CRF/QP), gop, bframes (0 off,
# 1 on: codec default B-frames), threads, flags, reserved, preset[16], profile[16]
SESSION_CONFIG = struct.Struct("<IIIIIIIIIIQIIIII16s16s")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    direction: int
    codec: int
    width: int = 0
    height: int = 0
    pix_fmt: int = PixFmt.YUV420P
    tb_num: int = 1
    tb_den: int = 30
    fps_num: int = 30
    fps_den: int = 1
    rc_mode: int = RateControl.DEFAULT
    rc_value: int = 0
    gop: int = 0
    bframes: int = 0
    threads: int = 0
    flags: int = 0
    preset: str = ""
    profile: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def pack(self) -> bytes:
        head = SESSION_CONFIG.pack(
            self.direction, self.codec, self.width, self.height, self.pix_fmt, self.tb_num,
            self.tb_den, self.fps_num, self.fps_den, self.rc_mode, self.rc_value, self.gop,
            self.bframes, self.threads, self.flags, 0,
            self.preset.encode(), self.profile.encode(),
        )
        tail = b"".join(f"{k}={v}".encode() + b"\0" for k, v in self.options)
        return head + tail

    @classmethod
    def unpack(cls, raw: bytes) -> SessionConfig:
        """Parse a copied config; raises ValueError on malformed text fields."""
        if len(raw) < SESSION_CONFIG.size:
            raise ValueError("session config too short")
        f = SESSION_CONFIG.unpack_from(raw)
        opts: list[tuple[str, str]] = []
        for item in raw[SESSION_CONFIG.size:].split(b"\0"):
            if not item:
                continue
            key, sep, value = item.decode("utf-8").partition("=")
            if not sep or not key:
                raise ValueError(f"bad option {item!r}")
            opts.append((key, value))
        return cls(
            direction=f[0], codec=f[1], width=f[2], height=f[3], pix_fmt=f[4], tb_num=f[5], tb_den=f[6],
            fps_num=f[7], fps_den=f[8], rc_mode=f[9], rc_value=f[10], gop=f[11], bframes=f[12],
            threads=f[13], flags=f[14],
            preset=f[16].rstrip(b"\0").decode("ascii"),
            profile=f[17].rstrip(b"\0").decode("ascii"),
            options=tuple(opts),
        )


class SessionFlag(enum.IntFlag):
    # DECODE sessions: SESSION_OPEN's dst (at least POOL_MIN bytes) is a frame pool.
    FRAME_POOL = 1 << 0


SESSION_FLAGS_MASK = int(SessionFlag.FRAME_POOL)
SESSION_MAX_THREADS = 64  # SessionConfig.threads: 0 (the codec's choice) to this
_RATIO_MAX = 0x7FFF_FFFF  # a time base or frame rate term (FFmpeg's AVRational is int/int)


def session_config_problem(cfg: SessionConfig, limits: GeometryLimits) -> tuple[ErrorCode, str] | None:
    """Why a SESSION_OPEN config is not valid, whatever the codec library; None if it is.

    The one rule for it: hostd checks the copy it took before a session is bound, and the
    worker checks what it was handed again (it trusts no input).  What a codec library offers
    (the codecs of an FFmpeg build, the pixel formats a codec takes) is the backend's to check."""
    if cfg.direction not in (Direction.ENCODE, Direction.DECODE):
        return ErrorCode.BAD_ARG, f"unknown direction {cfg.direction}"
    if cfg.codec not in Codec._value2member_map_:
        return ErrorCode.UNSUPPORTED_CODEC, f"unknown codec {cfg.codec}"
    if cfg.pix_fmt not in PixFmt._value2member_map_:
        return ErrorCode.BAD_ARG, f"unknown pix_fmt {cfg.pix_fmt}"
    if cfg.pix_fmt == PixFmt.NATIVE and cfg.direction != Direction.DECODE:
        return ErrorCode.BAD_ARG, "pix_fmt native is for decode sessions: an encoder takes a named format"
    if cfg.rc_mode not in RateControl._value2member_map_:
        return ErrorCode.BAD_ARG, f"unknown rate control {cfg.rc_mode}"
    if cfg.flags & ~SESSION_FLAGS_MASK:
        return ErrorCode.BAD_FLAGS, f"unknown session flags {cfg.flags:#x}"
    if cfg.flags & SessionFlag.FRAME_POOL and cfg.direction != Direction.DECODE:
        return ErrorCode.BAD_FLAGS, "FRAME_POOL is for decode sessions"
    if not 0 <= cfg.threads <= SESSION_MAX_THREADS:
        return ErrorCode.BAD_ARG, f"threads must be 0..{SESSION_MAX_THREADS}"
    if cfg.bframes not in (0, 1):
        return ErrorCode.BAD_ARG, "bframes must be 0 or 1"
    encode = cfg.direction == Direction.ENCODE
    if encode and (cfg.width == 0 or cfg.height == 0):
        return ErrorCode.BAD_ARG, "width and height are required"
    if (cfg.width or cfg.height) and not limits.allows(cfg.width, cfg.height):
        if cfg.width == 0 or cfg.height == 0:
            return ErrorCode.BAD_ARG, f"{cfg.width}x{cfg.height}: give both width and height, or neither"
        return ErrorCode.TOO_LARGE, f"{cfg.width}x{cfg.height} exceeds the geometry caps"
    if encode:
        for num, den, what in ((cfg.tb_num, cfg.tb_den, "time base"), (cfg.fps_num, cfg.fps_den, "frame rate")):
            if not (0 < num <= _RATIO_MAX and 0 < den <= _RATIO_MAX):
                return ErrorCode.BAD_ARG, f"bad {what} {num}/{den}"
    return None

# A frame pool (SessionFlag.FRAME_POOL) is guest memory the decoder allocates its pictures
# in, so decoded planes are written there by the codec itself and never copied:
#
#   pool + 0:            u32 lent[POOL_MAX_SLOTS], one counter per slot
#   pool + POOL_HEADER:  slots, laid out by the worker for the stream's geometry
#
# The worker cuts the slots, hands them to the decoder (for output and reference pictures
# alike) and reports a frame that lies in one with FRAME_POOLED and its slot number.  Before
# the completion is published it adds 1 to that slot's lent counter (one per entry, as a
# decoder may output the same picture twice); the guest subtracts 1 (atomically, release)
# when it is done with the frame.  A slot is reused only when its counter is 0 and the
# decoder holds no reference to it, so the guest must treat pooled planes as read-only (the
# decoder may still predict from them) and must not touch the pool until the session is
# closed.  A counter the guest never decrements only costs it pool slots: frames that find
# no free slot are decoded into private memory and copied to dst as without a pool.
POOL_MAX_SLOTS = 256
POOL_HEADER = 4096
POOL_MIN = POOL_HEADER + PAGE_SIZE
# The header: the lent counters, then zero padding up to POOL_HEADER.
POOL_HEADER_STRUCT = struct.Struct(f"<{POOL_MAX_SLOTS}I{POOL_HEADER - 4 * POOL_MAX_SLOTS}x")


def pool_lent_word(slot: int) -> int:
    """Offset of slot ``slot``'s lent counter from the pool start."""
    return 4 * slot


@dataclass(frozen=True, slots=True)
class FramePoolHeader:
    """The first POOL_HEADER bytes of a frame pool: slot ``i``'s lent counter at
    ``pool_lent_word(i)``.  The guest zeroes it before SESSION_OPEN; afterwards the worker
    adds and the guest subtracts, each with an atomic on one counter (never this record)."""

    STRUCT: ClassVar[struct.Struct] = POOL_HEADER_STRUCT
    SIZE: ClassVar[int] = POOL_HEADER

    lent: tuple[int, ...] = (0,) * POOL_MAX_SLOTS

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        POOL_HEADER_STRUCT.pack_into(buf, off, *self.lent)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> FramePoolHeader:
        return cls(POOL_HEADER_STRUCT.unpack_from(buf, off))


# Output tables written at dst by ENCODE_FRAME / DECODE / FLUSH / CAPS.
# Header: kind, count, used (bytes of dst used, header included).
OUT_HEADER = struct.Struct("<IIQ")
OUT_PACKETS = 1
OUT_FRAMES = 2
OUT_JSON = 3
# Packet entry: data offset from dst start, size, pts, dts, flags (bit0 keyframe), reserved.
PACKET_ENTRY = struct.Struct("<QQqqII")
PACKET_KEY = 1
# Frame entry: data offset from dst start, width, height, pix_fmt, nplanes, pts,
# plane offsets (from data offset) x3, strides x3, flags, slot.  With FRAME_POOLED the data
# offset is from the session's frame pool start instead, and slot is the pool slot it is in.
FRAME_ENTRY = struct.Struct("<QIIIIq3I3III")
FRAME_POOLED = 1
# The worker converted this picture from the decoder's own format into the entry's pix_fmt
# (a NATIVE session: a format no device format matches; a named one: any other format).
FRAME_CONVERTED = 2
# On the last entry of a table that a drain (DescFlag.DRAIN_PENDING) cut short because its dst
# could not take every queued frame: more frames are queued in the session, oldest first; the
# next task (another drain, or one with input) returns them first.
FRAME_MORE = 4
NO_PTS = -(1 << 63)


@dataclass(frozen=True, slots=True)
class OutHeader:
    """The header of an output table at dst (and of an error record): written by the worker
    (by hostd for an error record), read by the guest after the task completes."""

    STRUCT: ClassVar[struct.Struct] = OUT_HEADER
    SIZE: ClassVar[int] = OUT_HEADER.size

    kind: int  # OUT_PACKETS, OUT_FRAMES, OUT_JSON, OUT_ERROR
    count: int  # entries (OUT_ERROR: the ErrorCode)
    used: int  # bytes of dst used, header included

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        OUT_HEADER.pack_into(buf, off, self.kind, self.count, self.used)

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, kind: int, count: int, used: int) -> None:
        OUT_HEADER.pack_into(buf, off, kind, count, used)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> OutHeader:
        return cls(*OUT_HEADER.unpack_from(buf, off))


@dataclass(frozen=True, slots=True)
class PacketEntry:
    """One encoded packet in an OUT_PACKETS table; its bytes are at dst + ``offset``."""

    STRUCT: ClassVar[struct.Struct] = PACKET_ENTRY
    SIZE: ClassVar[int] = PACKET_ENTRY.size

    offset: int
    size: int
    pts: int = NO_PTS
    dts: int = NO_PTS
    flags: int = 0  # PACKET_KEY
    reserved: int = 0

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        PACKET_ENTRY.pack_into(buf, off, self.offset, self.size, self.pts, self.dts, self.flags, self.reserved)

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, offset: int, size: int, pts: int, dts: int, flags: int) -> None:
        PACKET_ENTRY.pack_into(buf, off, offset, size, pts, dts, flags, 0)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> PacketEntry:
        return cls(*PACKET_ENTRY.unpack_from(buf, off))


# FRAME_ENTRY's items in order, the tuples flattened: the names c_macros() exports.
FRAME_ENTRY_ITEMS = ("offset", "width", "height", "pix_fmt", "nplanes", "pts",
                     "plane_offset0", "plane_offset1", "plane_offset2", "stride0", "stride1", "stride2",
                     "flags", "slot")


@dataclass(frozen=True, slots=True)
class FrameEntry:
    """One decoded picture in an OUT_FRAMES table.  ``offset`` is from dst, or with
    FRAME_POOLED in ``flags`` from the frame pool's start (and ``slot`` is its pool slot);
    ``plane_offsets`` are from ``offset``.  Written by the worker (Python, or the C decode
    loop from c_macros()' offsets), read by the guest."""

    STRUCT: ClassVar[struct.Struct] = FRAME_ENTRY
    SIZE: ClassVar[int] = FRAME_ENTRY.size

    offset: int
    width: int
    height: int
    pix_fmt: int
    nplanes: int
    pts: int
    plane_offsets: tuple[int, int, int]
    strides: tuple[int, int, int]
    flags: int = 0  # FRAME_POOLED, FRAME_CONVERTED, FRAME_MORE
    slot: int = 0

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        FRAME_ENTRY.pack_into(buf, off, self.offset, self.width, self.height, self.pix_fmt, self.nplanes, self.pts,
                              *self.plane_offsets, *self.strides, self.flags, self.slot)

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, offset: int, width: int, height: int, pix_fmt: int,
              nplanes: int, pts: int, plane_offsets: tuple[int, ...] | list[int],
              strides: tuple[int, ...] | list[int], flags: int = 0, slot: int = 0) -> None:
        """pack_into without building the record (per-frame paths); three of each list."""
        FRAME_ENTRY.pack_into(buf, off, offset, width, height, pix_fmt, nplanes, pts, *plane_offsets, *strides,
                              flags, slot)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> FrameEntry:
        v = FRAME_ENTRY.unpack_from(buf, off)
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], (v[6], v[7], v[8]), (v[9], v[10], v[11]), v[12], v[13])


# Error record (Caps.ERROR_TEXT): a codec task (CAPS, SESSION_OPEN, ENCODE_FRAME, DECODE, FLUSH)
# that fails with a reason, NO_SPACE excepted, has hostd write the reason at dst:
#   OUT_HEADER(kind OUT_ERROR, count = the ErrorCode, used = 16 + text bytes), then the text
#   (UTF-8, no NUL, at most ERROR_TEXT_MAX bytes and never past dst_len)
# and result_len = used; a failed task without a record has result_len 0.  SESSION_OPEN without
# FRAME_POOL takes a dst of at most ERROR_RECORD_SIZE bytes for it (a larger one is a frame pool
# without the flag: BAD_ARG).  With FRAME_POOL the record lands at the pool start, over the lent
# counters the guest zeroes before every SESSION_OPEN anyway.
OUT_ERROR = 4
ERROR_RECORD_SIZE = 256
ERROR_TEXT_MAX = ERROR_RECORD_SIZE - 16  # OUT_HEADER.size
ERROR_RECORD_OPS = frozenset({Op.CAPS, Op.SESSION_OPEN, Op.ENCODE_FRAME, Op.DECODE, Op.FLUSH})


def error_text_bytes(text: str, room: int = ERROR_TEXT_MAX) -> bytes:
    """``text`` as UTF-8, cut to at most ``room`` bytes on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= room:
        return raw
    return raw[:max(0, room)].decode("utf-8", "ignore").encode("utf-8")


def pack_error_record(code: int, text: str, dst_len: int = ERROR_RECORD_SIZE) -> bytes:
    """The error record a failed task leaves in a dst of ``dst_len`` bytes (b"": no room)."""
    room = min(ERROR_TEXT_MAX, dst_len - OUT_HEADER.size)
    if room <= 0:
        return b""
    body = error_text_bytes(text, room)
    return OUT_HEADER.pack(OUT_ERROR, code, OUT_HEADER.size + len(body)) + body


def unpack_error_record(raw: bytes | memoryview, code: int) -> str | None:
    """The text of an error record for ``code`` at the start of ``raw``, or None if there is none."""
    if len(raw) < OUT_HEADER.size:
        return None
    kind, got, used = OUT_HEADER.unpack_from(raw)
    if kind != OUT_ERROR or got != code or not OUT_HEADER.size <= used <= min(len(raw), ERROR_RECORD_SIZE):
        return None
    return bytes(raw[OUT_HEADER.size:used]).decode("utf-8", "replace")


def out_table_size(kind: int, count: int) -> int:
    entry = PACKET_ENTRY.size if kind == OUT_PACKETS else FRAME_ENTRY.size
    return align(OUT_HEADER.size + count * entry, HEAP_ALIGN)


# --- channel register files (host <-> codec worker; never guest-visible) ----
# The register bank is host-internal: hostd and its workers, never a guest.  It is versioned
# apart from the guest ABI: hostd stores BANK_ABI_VERSION at BANK_VERSION before it starts a
# worker, and a worker refuses to run on a bank of another version.  Bump it on any change to
# the BANK_* / CH_* words, the register file, ChannelProgram or ChannelResult.
BANK_ABI_VERSION = 1
# Each hardware channel has CH_FILES 256-byte register files that hostd programs in
# ring order (file 0, 1, 2, 3, 0, ...): while the codec unit runs the program in one
# file, hostd loads the next tasks of the same worker into the others (the shadows),
# and the worker starts the next the moment it stores DONE for the one before, with
# no round trip through hostd.  A channel's files only ever hold one worker's tasks
# at a time, and that worker runs them in the order they were programmed (CH_SEQ).
class Ctrl(enum.IntEnum):
    IDLE = 0
    START = 1  # hostd: registers programmed, worker may run
    RUNNING = 2  # worker: claimed (CAS START->RUNNING), executing
    DONE = 3  # worker: result registers valid ("interrupt raised")


def ctrl_start(owner: int) -> int:
    """The CTRL value hostd stores to start a channel for worker ``owner`` (slot + 1).

    The owner is part of the value, so claiming is one CAS(ctrl_start(me) -> RUNNING):
    a worker cannot claim a channel hostd re-programmed for another guest between
    reading CH_OWNER and claiming (it would run that guest's task on its own region).
    """
    return int(Ctrl.START) | owner << 8


def ctrl_is_start(value: int) -> bool:
    return value & 0xFF == Ctrl.START


# Register files per hardware channel: the running program and its shadows.  Four let the
# worker hold back IRQs (BANK_IRQ_HOLDOFF) and still find a started file after each task
# while hostd sleeps; with two, hostd must reload after every task (docs/benchmarks.md).
CH_FILES = 4
CH_SIZE = 256
CH_CTRL = 0x00  # u32 Ctrl; hostd stores ctrl_start(owner) (release), the owner CASes RUNNING, stores DONE
CH_OWNER = 0x04  # u32 worker slot + 1 that may run this file
CH_SEQ = 0x08  # u64 task sequence number programmed (increasing per hostd run)
CH_PROGRAM = 0x10  # program block, see CH_PROGRAM_STRUCT
# opcode, flags, session, config_len, src_off, src_len, dst_off, dst_len, arg0..arg3
CH_PROGRAM_STRUCT = struct.Struct("<IIIIQQQQQQQQ")
# result, result_len, error, text_len, bytes the engine copied.  text_len > 0: the worker left the
# failure's reason (UTF-8, at most ERROR_TEXT_MAX bytes) at the start of the file's config page;
# it stores it before DONE (release), hostd reads it after it sees DONE.
CH_RESULT = 0x70
CH_RESULT_STRUCT = struct.Struct("<QQIIQ")
CONFIG_PAGE = 4096  # per-file page holding the SESSION_OPEN config (or MULTI list) hostd copied
assert CH_PROGRAM + CH_PROGRAM_STRUCT.size <= CH_RESULT
assert CH_RESULT + CH_RESULT_STRUCT.size <= CH_SIZE


@dataclass(frozen=True, slots=True)
class ChannelProgram:
    """A register file's program block (CH_PROGRAM): the task hostd hands a worker.  hostd
    writes it while the file is IDLE, then release-stores CTRL = ctrl_start(owner); the worker
    reads it once, after its CAS claimed the file.  ``config_len``: bytes of the file's config
    page that hold the SESSION_OPEN config or the MULTI list hostd copied."""

    STRUCT: ClassVar[struct.Struct] = CH_PROGRAM_STRUCT
    SIZE: ClassVar[int] = CH_PROGRAM_STRUCT.size

    opcode: int
    flags: int = 0
    session: int = 0
    config_len: int = 0
    src_off: int = 0
    src_len: int = 0
    dst_off: int = 0
    dst_len: int = 0
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    arg3: int = 0

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        CH_PROGRAM_STRUCT.pack_into(
            buf, off, self.opcode, self.flags, self.session, self.config_len, self.src_off, self.src_len,
            self.dst_off, self.dst_len, self.arg0, self.arg1, self.arg2, self.arg3,
        )

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, opcode: int, flags: int, session: int, config_len: int,
              src_off: int, src_len: int, dst_off: int, dst_len: int, arg0: int, arg1: int, arg2: int,
              arg3: int) -> None:
        """pack_into without building the record (hostd's per-task programming)."""
        CH_PROGRAM_STRUCT.pack_into(buf, off, opcode, flags, session, config_len, src_off, src_len, dst_off,
                                    dst_len, arg0, arg1, arg2, arg3)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> ChannelProgram:
        return cls(*CH_PROGRAM_STRUCT.unpack_from(buf, off))


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """A register file's result block (CH_RESULT): the worker writes it (and ``text_len``
    bytes of reason at the start of the file's config page) before it release-stores
    CTRL = DONE; hostd reads it after it sees DONE."""

    STRUCT: ClassVar[struct.Struct] = CH_RESULT_STRUCT
    SIZE: ClassVar[int] = CH_RESULT_STRUCT.size

    result: int = 0
    result_len: int = 0
    error: int = 0
    text_len: int = 0
    copied: int = 0  # bytes the engine copied for the task

    def pack_into(self, buf: WriteableBuffer, off: int = 0) -> None:
        CH_RESULT_STRUCT.pack_into(buf, off, self.result, self.result_len, self.error, self.text_len, self.copied)

    @staticmethod
    def write(buf: WriteableBuffer, off: int, *, result: int, result_len: int, error: int, text_len: int,
              copied: int) -> None:
        """pack_into without building the record (the worker's per-task path)."""
        CH_RESULT_STRUCT.pack_into(buf, off, result, result_len, error, text_len, copied)

    @classmethod
    def unpack_from(cls, buf: ReadableBuffer, off: int = 0) -> ChannelResult:
        return cls(*CH_RESULT_STRUCT.unpack_from(buf, off))

# Register bank: header page, K * CH_FILES register files, one config page per file, then one
# page of channel doorbells per channel.
BANK_HOST_EVENT = 0x00  # u32: bumped by workers (IRQ) and hostd threads; hostd's futex
BANK_HOST_NEED_WAKEUP = 0x04  # u32: 1 while hostd may sleep on HOST_EVENT
# u32, hostd writes, workers read: how long (pause iterations) a worker spins for its next
# kick before it sleeps.  hostd sets 0 while several guests are active: a spinning worker
# then only steals a core from another guest's worker, from that guest or from hostd.
BANK_WORKER_SPIN = 0x08
# u32, hostd writes, workers read: interrupt moderation.  A worker that finishes a codec
# task raises no IRQ while at least this many more files of that channel are started for
# it: it runs those next, and the IRQ of the last of them reports them all (hostd reads
# every file's CTRL on each pass).  0: an IRQ per task.  NOP/COPY/CRC32 always raise one.
BANK_IRQ_HOLDOFF = 0x0C
# u32, hostd writes once (BANK_ABI_VERSION) before it starts any worker; a worker checks it at
# start.  0 is accepted too, as "hostd predates the word" (same release, so same layout).
BANK_VERSION = 0x10
BANK_WORKER_BASE = 0x40  # per worker slot: kick u32, need_wakeup u32
BANK_WORKER_STRIDE = 8
BANK_MAX_WORKERS = (PAGE_SIZE - BANK_WORKER_BASE) // BANK_WORKER_STRIDE


def _channels_end(channels: int) -> int:
    return align(PAGE_SIZE + channels * CH_FILES * CH_SIZE, PAGE_SIZE)


def _configs_end(channels: int) -> int:
    return _channels_end(channels) + channels * CH_FILES * CONFIG_PAGE


def bank_size(channels: int) -> int:
    return _configs_end(channels) + channels * PAGE_SIZE


def channel_offset(index: int, file: int = 0) -> int:
    """Register file ``file`` (0 .. CH_FILES - 1) of hardware channel ``index``."""
    return PAGE_SIZE + (index * CH_FILES + file) * CH_SIZE


def channel_config_offset(channels: int, index: int, file: int = 0) -> int:
    return _channels_end(channels) + (index * CH_FILES + file) * CONFIG_PAGE


def worker_kick_offset(slot: int) -> int:
    return BANK_WORKER_BASE + slot * BANK_WORKER_STRIDE


def worker_need_wakeup_offset(slot: int) -> int:
    return worker_kick_offset(slot) + 4


# Channel doorbells: per (channel, worker slot) a kick u32 and a need_wakeup u32, on the page
# of that channel.  hostd kicks the worker's thread for the channel straight away when it
# starts a codec task there (the worker's main loop takes the short ops).
CHANNEL_KICK_STRIDE = 8
assert BANK_MAX_WORKERS * CHANNEL_KICK_STRIDE <= PAGE_SIZE


def channel_kick_offset(channels: int, index: int, slot: int) -> int:
    return _configs_end(channels) + index * PAGE_SIZE + slot * CHANNEL_KICK_STRIDE


def channel_need_wakeup_offset(channels: int, index: int, slot: int) -> int:
    return channel_kick_offset(channels, index, slot) + 4


# --- layouts exported to C ------------------------------------------------------
def c_macros() -> list[tuple[str, str]]:
    """The ABI layouts the frame pool's C writes (``codec_backend/framepool.c``), as
    ``(name, value)`` pairs for the compiler's ``-D``: FrameEntry's size and each item's
    offset and size (``ABI_FE_<ITEM>_AT`` / ``_SIZE``, items as in FRAME_ENTRY_ITEMS), the
    frame pool header's layout, FRAME_POOLED and NO_PTS."""
    items = struct_items(FRAME_ENTRY)
    assert len(items) == len(FRAME_ENTRY_ITEMS)
    out = [("ABI_FE_SIZE", str(FRAME_ENTRY.size))]
    for name, (at, size) in zip(FRAME_ENTRY_ITEMS, items, strict=True):
        out += [(f"ABI_FE_{name.upper()}_AT", str(at)), (f"ABI_FE_{name.upper()}_SIZE", str(size))]
    lent_at, lent_size = struct_items(POOL_HEADER_STRUCT)[0]
    assert pool_lent_word(1) - pool_lent_word(0) == lent_size and pool_lent_word(0) == lent_at
    out += [
        ("ABI_FRAME_POOLED", str(FRAME_POOLED)),
        ("ABI_NO_PTS", f"({NO_PTS + 1}LL - 1)"),
        ("ABI_POOL_HEADER", str(POOL_HEADER)),
        ("ABI_POOL_MAX_SLOTS", str(POOL_MAX_SLOTS)),
        ("ABI_POOL_LENT_AT", str(lent_at)),
        ("ABI_POOL_LENT_SIZE", str(lent_size)),
    ]
    # A checksum of all of the above, which the built module reports back: a module built
    # for another layout is refused at run time instead of writing wrong bytes.
    crc = zlib.crc32(";".join(f"{k}={v}" for k, v in out).encode())
    return [*out, ("ABI_LAYOUT_CRC", f"{crc}u")]


# --- The shared screen (display records) --------------------------------------------------------
# Display records of the shared screen: what a guest and hostd exchange to show pictures.
#
# Pure like ``vmediad.abi`` (stdlib and ``abi`` only); its golden bytes are pinned in
# ``tests/unit/test_display_core.py``.  All integers are little-endian.
#
# A guest opens a display output (Op.DISPLAY_OPEN) with a size, a format and 2 or 3 buffers.  The
# task's dst is an arena of the guest's heap lent to hostd for as long as the output is open (at
# least ``display_arena_size`` bytes; the guest's heap allocator is the guest's own, so hostd
# allocates inside what it was lent).  hostd writes the reply table at the arena's start, places
# the buffers after it (page-aligned, strides and plane offsets its choice) and answers with
# their offsets from the region start, so both sides address the same bytes.  The
# guest draws into a buffer it holds and commits it (DISPLAY_COMMIT); a commit may name instead an
# "external" picture in its heap, e.g. a decoder's frame-pool slot, described by offset, planes and
# format.
#
# Ownership of a buffer (the page-flip rule):
#
# * the guest may write a buffer only while it holds it: every buffer is held by the guest after
#   DISPLAY_OPEN; a commit hands that buffer to hostd;
# * hostd gives it back with the commit's flip record: each commit gets exactly one, either
#   PRESENTED (the commit is now on screen; RELEASED then names the commit that left the screen,
#   whose buffer the guest holds again) or DROPPED|RELEASED (a newer commit replaced this one
#   before it was ever shown: its buffer is the guest's again at once);
# * the picture on screen is never written by the guest, so the screen shows no half-drawn
#   buffer.  An external picture follows the same rule: the guest keeps the frame-pool slot lent
#   (its lent counter raised) until the flip record releases that commit.

DISPLAY_FORMATS = frozenset({PixFmt.BGRA, PixFmt.NV12, PixFmt.YUV420P})
DISPLAY_MIN_BUFFERS = 2
DISPLAY_MAX_BUFFERS = 3
DISPLAY_MAX_DAMAGE = 16
# Rows of every plane of a buffer hostd allocates start on this boundary (SIMD loads in
# swscale); the luma stride of yuv420p is twice it, so its chroma strides keep it too.
DISPLAY_STRIDE_ALIGN = 64
BUFFER_EXTERNAL = 0xFFFF_FFFE  # DISPLAY_COMMIT.buffer: the picture is described in the commit
BUFFER_NONE = 0xFFFF_FFFF  # DISPLAY_FLIP: no buffer in this field


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


def display_buffer_layout(fmt: PixFmt, width: int, height: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Plane offsets, strides and size of one buffer hostd allocates: planes back to back as
    FFmpeg fills pointers, every stride a multiple of DISPLAY_STRIDE_ALIGN, the size a multiple
    of PAGE_SIZE.  ValueError if ``fmt`` is not a display format."""
    a = DISPLAY_STRIDE_ALIGN
    if fmt == PixFmt.BGRA:
        strides: tuple[int, ...] = (align(4 * width, a),)
    elif fmt == PixFmt.NV12:
        strides = (align(width, a), align(width, a))
    elif fmt == PixFmt.YUV420P:
        s = align(width, 2 * a)
        strides = (s, s // 2, s // 2)
    else:
        raise ValueError(f"not a display format: {fmt}")
    offsets, off = [], 0
    for (rows, _), stride in zip(plane_shapes(fmt, width, height), strides, strict=True):
        offsets.append(off)
        off += rows * stride
    return tuple(offsets), strides, align(off, PAGE_SIZE)


def display_arena_size(fmt: PixFmt, width: int, height: int, buffers: int) -> int:
    """Bytes a DISPLAY_OPEN's dst must lend: the reply table, the buffers, and one page for
    aligning an arena that starts anywhere in the heap."""
    return align(DISPLAY_REPLY_MAX, PAGE_SIZE) + buffers * display_buffer_layout(fmt, width, height)[2] + PAGE_SIZE


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
