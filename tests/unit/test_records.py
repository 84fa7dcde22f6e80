"""The typed records of vmediad.abi: exact bytes for a known value, and the round trip.

Each record's STRUCT is the module-level struct hostd and older code use, so these bytes are
the ones every side of a wire writes.  No processes, no shared memory."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from vmediad import abi
from vmediad.abi import (
    ChannelProgram,
    ChannelResult,
    DescResult,
    Descriptor,
    FrameEntry,
    FramePoolHeader,
    MultiEntry,
    MultiList,
    OutHeader,
    PacketEntry,
)

RECORDS: list[Any] = [Descriptor, DescResult, MultiEntry, OutHeader, PacketEntry, FrameEntry, FramePoolHeader,
                      ChannelProgram, ChannelResult]


def roundtrip(rec: Any, hexbytes: str, at: int = 24) -> None:
    """``rec`` packs to exactly ``hexbytes`` at ``at`` (nothing around it touched), and
    unpacks from there, and from the bytes alone, to an equal record."""
    cls = type(rec)
    want = bytes.fromhex(hexbytes)
    size: int = cls.SIZE
    assert len(want) == size
    buf = bytearray(b"\xaa" * (at + size + 8))
    rec.pack_into(buf, at)
    assert bytes(buf[at:at + size]) == want
    assert buf[:at] == b"\xaa" * at and buf[at + size:] == b"\xaa" * 8
    assert cls.unpack_from(buf, at) == rec
    assert cls.unpack_from(want) == rec


def test_every_record_is_frozen_and_sized_by_its_struct() -> None:
    for cls in RECORDS:
        assert cls.STRUCT.size == cls.SIZE, cls
        assert "__slots__" in vars(cls) and "__dict__" not in dir(cls)
    with pytest.raises(AttributeError):
        OutHeader(1, 2, 3).count = 4  # type: ignore[misc]
    # The structs hostd and older callers name are the records' own.
    assert ChannelProgram.STRUCT is abi.CH_PROGRAM_STRUCT and ChannelResult.STRUCT is abi.CH_RESULT_STRUCT
    assert OutHeader.STRUCT is abi.OUT_HEADER and PacketEntry.STRUCT is abi.PACKET_ENTRY
    assert FrameEntry.STRUCT is abi.FRAME_ENTRY and MultiEntry.STRUCT is abi.MULTI_ENTRY
    assert DescResult.STRUCT is abi.DESC_RESULT and Descriptor.STRUCT is abi.DESC_INPUT
    assert (ChannelProgram.SIZE, ChannelResult.SIZE, OutHeader.SIZE, PacketEntry.SIZE, FrameEntry.SIZE,
            MultiEntry.SIZE, DescResult.SIZE, Descriptor.SIZE, FramePoolHeader.SIZE) == (
        80, 32, 16, 40, 64, 32, 40, 80, 4096)


def test_channel_program_golden() -> None:
    prog = ChannelProgram(opcode=abi.Op.DECODE, flags=abi.F_MULTI | abi.F_PARSE, session=7, config_len=64,
                          src_off=0x10000, src_len=64, dst_off=0x20000, dst_len=1 << 20,
                          arg0=1, arg1=2, arg2=3, arg3=4)
    roundtrip(prog, "12000000" "12000000" "07000000" "40000000" "0000010000000000" "4000000000000000"
                    "0000020000000000" "0000100000000000" "0100000000000000" "0200000000000000"
                    "0300000000000000" "0400000000000000")
    # Where hostd puts it in a register file, and that it fits before the result block.
    assert abi.CH_PROGRAM + ChannelProgram.SIZE <= abi.CH_RESULT


def test_channel_result_golden_and_write() -> None:
    res = ChannelResult(result=1, result_len=2, error=abi.ErrorCode.BACKEND, text_len=5, copied=3)
    golden = "0100000000000000" "0200000000000000" "12000000" "05000000" "0300000000000000"
    roundtrip(res, golden)
    buf = bytearray(ChannelResult.SIZE)
    ChannelResult.write(buf, 0, result=1, result_len=2, error=18, text_len=5, copied=3)
    assert buf.hex() == golden
    assert abi.CH_RESULT + ChannelResult.SIZE <= abi.CH_SIZE


def test_output_table_records_golden() -> None:
    head = OutHeader(kind=abi.OUT_FRAMES, count=2, used=3)
    roundtrip(head, "02000000" "02000000" "0300000000000000")
    buf = bytearray(16)
    OutHeader.write(buf, 0, kind=abi.OUT_FRAMES, count=2, used=3)
    assert OutHeader.unpack_from(buf) == head

    pkt = PacketEntry(offset=64, size=100, pts=5, dts=4, flags=abi.PACKET_KEY)
    golden = "4000000000000000" "6400000000000000" "0500000000000000" "0400000000000000" "01000000" "00000000"
    roundtrip(pkt, golden)
    buf = bytearray(PacketEntry.SIZE)
    PacketEntry.write(buf, 0, offset=64, size=100, pts=5, dts=4, flags=abi.PACKET_KEY)
    assert buf.hex() == golden
    assert PacketEntry(0, 0).pts == PacketEntry(0, 0).dts == abi.NO_PTS


def test_frame_entry_golden() -> None:
    copied = FrameEntry(offset=128, width=64, height=48, pix_fmt=abi.PixFmt.YUV420P, nplanes=3, pts=10,
                        plane_offsets=(0, 3072, 3840), strides=(64, 32, 32))
    roundtrip(copied, "8000000000000000" "40000000" "30000000" "01000000" "03000000" "0a00000000000000"
                      "00000000" "000c0000" "000f0000" "40000000" "20000000" "20000000" "00000000" "00000000")
    pooled = FrameEntry(offset=4096, width=64, height=48, pix_fmt=abi.PixFmt.YUV420P, nplanes=3, pts=abi.NO_PTS,
                        plane_offsets=(0, 3072, 3840), strides=(64, 32, 32), flags=abi.FRAME_POOLED, slot=7)
    golden = ("0010000000000000" "40000000" "30000000" "01000000" "03000000" "0000000000000080"
              "00000000" "000c0000" "000f0000" "40000000" "20000000" "20000000" "01000000" "07000000")
    roundtrip(pooled, golden)
    buf = bytearray(FrameEntry.SIZE)
    FrameEntry.write(buf, 0, offset=4096, width=64, height=48, pix_fmt=1, nplanes=3, pts=abi.NO_PTS,
                     plane_offsets=[0, 3072, 3840], strides=[64, 32, 32], flags=abi.FRAME_POOLED, slot=7)
    assert buf.hex() == golden


def test_multi_entry_golden_and_list() -> None:
    e = MultiEntry(offset=0x12340, length=4096, pts=-1, flags=abi.F_PTS_VALID)
    roundtrip(e, "4023010000000000" "0010000000000000" "ffffffffffffffff" "04000000" "00000000")
    f = MultiEntry(offset=0x20000, length=7, flags=abi.F_FORCE_KEYFRAME, reserved=9)  # hostd refuses reserved
    raw = bytearray(2 * MultiEntry.SIZE)
    e.pack_into(raw, 0)
    f.pack_into(raw, MultiEntry.SIZE)
    assert list(MultiEntry.iter_unpack(raw)) == [e, f]
    assert list(MultiEntry.iter_unpack(b"")) == []
    with pytest.raises(struct.error):
        list(MultiEntry.iter_unpack(raw[:-1]))
    # The same list field by field (one record per list: the worker's per-input path).
    lst = MultiList.unpack(raw)
    assert len(lst) == 2
    assert lst == MultiList(offset=(0x12340, 0x20000), length=(4096, 7), pts=(-1, 0),
                            flags=(abi.F_PTS_VALID, abi.F_FORCE_KEYFRAME), reserved=(0, 9))
    assert len(MultiList.unpack(b"")) == 0
    with pytest.raises(struct.error):
        MultiList.unpack(raw[:-1])


def test_descriptor_records_golden() -> None:
    d = Descriptor(tag=1, opcode=abi.Op.COPY, flags=0, session=0, src_off=2, src_len=3, dst_off=4, dst_len=5)
    buf = bytearray(abi.DESC_SIZE)
    d.pack_into(buf, abi.D_INPUT)
    assert bytes(buf[abi.D_INPUT:abi.D_RESULT]) == d.pack()
    assert Descriptor.unpack_from(buf, abi.D_INPUT) == d == Descriptor.unpack(d.pack())
    r = DescResult(result=5, result_len=6, error=abi.ErrorCode.NO_SPACE, channel=1, device_ns=1000, seq=42)
    roundtrip(r, "0500000000000000" "0600000000000000" "0d000000" "01000000" "e803000000000000" "2a00000000000000")
    assert abi.D_RESULT + DescResult.SIZE == abi.DESC_SIZE


def test_frame_pool_header_golden() -> None:
    lent = [0] * abi.POOL_MAX_SLOTS
    lent[0], lent[3], lent[255] = 1, 7, 0xFFFF_FFFF
    head = FramePoolHeader(tuple(lent))
    want = bytearray(abi.POOL_HEADER)
    want[0:4] = bytes.fromhex("01000000")
    want[12:16] = bytes.fromhex("07000000")
    want[1020:1024] = bytes.fromhex("ffffffff")
    roundtrip(head, want.hex())
    # The counter of slot i is the u32 at pool_lent_word(i), as the guest's atomics address it.
    assert [struct.unpack_from("<I", want, abi.pool_lent_word(i))[0] for i in (0, 3, 255)] == [1, 7, 0xFFFF_FFFF]
    # The default header is what the guest writes before SESSION_OPEN: all zero, padding too.
    buf = bytearray(b"\xff" * abi.POOL_HEADER)
    FramePoolHeader().pack_into(buf)
    assert buf == bytes(abi.POOL_HEADER)


def test_struct_items_expands_counts_and_skips_padding() -> None:
    assert abi.struct_items(struct.Struct("<Q3Ii2x4sB")) == [(0, 8), (8, 4), (12, 4), (16, 4), (20, 4), (26, 4),
                                                             (30, 1)]
    with pytest.raises(ValueError, match="little-endian"):
        abi.struct_items(struct.Struct("QI"))


def test_c_macros_are_frame_entry_and_pool_header_layouts() -> None:
    """What the frame pool's C is compiled with: every FrameEntry item's offset and size, and
    a checksum over them all that the built module reports back."""
    m = dict(abi.c_macros())
    items = dict(zip(abi.FRAME_ENTRY_ITEMS, abi.struct_items(abi.FRAME_ENTRY), strict=True))
    assert (m["ABI_FE_SIZE"], m["ABI_FE_OFFSET_AT"], m["ABI_FE_OFFSET_SIZE"]) == ("64", "0", "8")
    assert (m["ABI_FE_PTS_AT"], m["ABI_FE_PTS_SIZE"]) == ("24", "8")
    assert (m["ABI_FE_SLOT_AT"], m["ABI_FE_SLOT_SIZE"]) == ("60", "4")
    for name, (at, size) in items.items():
        assert (m[f"ABI_FE_{name.upper()}_AT"], m[f"ABI_FE_{name.upper()}_SIZE"]) == (str(at), str(size))
    # Packing a FrameEntry puts each field where the macros say the C puts it.
    e = FrameEntry(1, 2, 3, 4, 5, 6, (7, 8, 9), (10, 11, 12), 13, 14)
    raw = bytearray(FrameEntry.SIZE)
    e.pack_into(raw)
    for k, name in enumerate(abi.FRAME_ENTRY_ITEMS):
        at, size = items[name]
        assert int.from_bytes(raw[at:at + size], "little") == k + 1, name
    assert (m["ABI_POOL_HEADER"], m["ABI_POOL_MAX_SLOTS"], m["ABI_POOL_LENT_AT"], m["ABI_POOL_LENT_SIZE"]) == (
        "4096", "256", "0", "4")
    assert (m["ABI_FRAME_POOLED"], m["ABI_NO_PTS"]) == ("1", "(-9223372036854775807LL - 1)")
    body = ";".join(f"{k}={v}" for k, v in abi.c_macros()[:-1])
    assert abi.c_macros()[-1] == ("ABI_LAYOUT_CRC", f"{zlib.crc32(body.encode())}u")


def test_the_built_frame_pool_speaks_these_layouts() -> None:
    """A native module built for other layouts is refused by the probe; this one is current."""
    framepool_native = pytest.importorskip("codec_backend._framepool")
    from codec_backend.framepool import _layout_crc

    assert int(framepool_native.lib.fp_abi_layout()) == _layout_crc()


def test_bank_version_word_is_host_internal() -> None:
    """BANK_VERSION sits in the bank's header page, clear of its other words, and the bank's
    version is not the guest ABI's."""
    words = {abi.BANK_HOST_EVENT, abi.BANK_HOST_NEED_WAKEUP, abi.BANK_WORKER_SPIN, abi.BANK_IRQ_HOLDOFF}
    assert abi.BANK_VERSION == 0x10 and abi.BANK_VERSION not in words
    assert max(words) + 4 <= abi.BANK_VERSION and abi.BANK_VERSION + 4 <= abi.BANK_WORKER_BASE
    assert abi.BANK_ABI_VERSION == 1


def test_worker_limits_keys_left_out_keep_their_defaults() -> None:
    dflt = abi.WorkerLimits()
    assert abi.WorkerLimits.from_json("{}") == dflt
    got = abi.WorkerLimits.from_json('{"max_width":640,"max_sessions":2}')
    assert got == abi.WorkerLimits(abi.GeometryLimits(640, 8192, 35_000_000), 2)
    assert abi.WorkerLimits.from_mapping({"max_pixels": 99}).geometry.max_pixels == 99
    with pytest.raises(ValueError, match="JSON object"):
        abi.WorkerLimits.from_json("[1]")
