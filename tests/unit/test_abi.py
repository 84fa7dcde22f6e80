"""Golden bytes: these pin ABI version 1.  A failure here is an ABI break: bump ABI_VERSION."""

from __future__ import annotations

import struct

import pytest

from vmediad import abi

REG_PAGE_1MIB_16 = (
    "564d4544010000000000100000000000100000008000000000100000000000008010000000000000"
    "002000000000000000e00f000000000005000000000000000700000000000000"
)
DESC = (
    "8877665544332211020004000900000000000100000000002000000000000000000002000000000040000000000000000100"
    "000000000000020000000000000003000000000000000400000000000000"
)
SESSION = (
    "010000000100000000050000d002000001000000010000001e0000001e000000010000000200000017000000000000003c00"
    "000001000000020000000000000000000000666173740000000000000000000000006869676800000000000000000000000074"
    "756e653d7a65726f6c6174656e637900"
)


def test_constants() -> None:
    assert abi.ABI_VERSION == 1
    assert abi.MAGIC.to_bytes(4, "little") == b"VMED"
    assert (abi.DESC_SIZE, abi.PAGE_SIZE, abi.HEAP_ALIGN) == (128, 4096, 64)
    assert abi.Doorbell.KICK.to_bytes(4, "big") == b"KICK"
    assert [s.value for s in abi.Status] == [0, 1, 2, 3]
    assert {o.name: o.value for o in abi.Op} == {
        "NOP": 1, "COPY": 2, "CRC32": 3, "CAPS": 4, "SESSION_OPEN": 16, "ENCODE_FRAME": 17, "DECODE": 18,
        "FLUSH": 19, "SESSION_CLOSE": 20, "DISPLAY_OPEN": 32, "DISPLAY_COMMIT": 33, "DISPLAY_CLOSE": 34,
    }
    codes = (abi.ErrorCode.WORKER_CRASHED, abi.ErrorCode.NO_SPACE, abi.ErrorCode.SESSION_LOST)
    assert [int(c) for c in codes] == [9, 13, 15]
    assert (abi.REG_DOORBELL, abi.REG_SQ_TAIL, abi.REG_NEED_WAKEUP, abi.REG_SQ_HEAD) == (0x80, 0x84, 0xC0, 0xC4)
    assert (abi.REG_EPOCH, abi.REG_HEARTBEAT, abi.REG_IRQ_COUNT) == (0x100, 0x108, 0x110)
    assert (abi.D_STATUS, abi.D_WAITERS, abi.D_INPUT, abi.D_RESULT, abi.D_SEQ) == (0, 4, 8, 0x58, 0x78)


def test_register_page_golden() -> None:
    lay = abi.compute_layout(1 << 20, 16)
    assert (lay.sq_offset, lay.desc_offset, lay.heap_offset, lay.heap_size) == (4096, 4224, 8192, 1040384)
    page = bytearray(abi.PAGE_SIZE)
    writes = abi.register_page_init(lay, vm_id=7, caps=5)
    assert writes[-1][0] == abi.REG_MAGIC  # magic is published last
    for off, fmt, value in writes:
        struct.pack_into(fmt, page, off, value)
    assert bytes(page[:0x48]).hex() == REG_PAGE_1MIB_16
    assert abi.layout_from_registers(bytes(page)) == lay


def test_descriptor_golden() -> None:
    d = abi.Descriptor(tag=0x1122334455667788, opcode=abi.Op.COPY, flags=abi.DescFlag.PTS_VALID, session=9,
                       src_off=0x10000, src_len=0x20, dst_off=0x20000, dst_len=0x40, arg0=1, arg1=2, arg2=3, arg3=4)
    raw = d.pack()
    assert raw.hex() == DESC and len(raw) == abi.D_RESULT - abi.D_INPUT
    assert abi.Descriptor.unpack(raw) == d
    assert abi.DESC_RESULT.size == abi.DESC_SIZE - abi.D_RESULT


def test_session_config_golden() -> None:
    c = abi.SessionConfig(direction=1, codec=abi.Codec.H264, width=1280, height=720, rc_mode=abi.RateControl.CRF,
                          rc_value=23, gop=60, bframes=1, threads=2, preset="fast", profile="high",
                          options=(("tune", "zerolatency"),))
    raw = c.pack()
    assert raw.hex() == SESSION and abi.SESSION_CONFIG.size == 100
    assert abi.SessionConfig.unpack(raw) == c
    with pytest.raises(ValueError):
        abi.SessionConfig.unpack(raw[:50])
    with pytest.raises(ValueError):
        abi.SessionConfig.unpack(raw[:100] + b"novalue\0")


def test_output_tables_golden() -> None:
    assert abi.OUT_HEADER.pack(1, 2, 3).hex() == "01000000020000000300000000000000"
    assert abi.PACKET_ENTRY.pack(64, 100, 5, 4, 1, 0).hex() == (
        "40000000000000006400000000000000050000000000000004000000000000000100000000000000")
    assert abi.FRAME_ENTRY.pack(128, 64, 48, 1, 3, 10, 0, 3072, 3840, 64, 32, 32, 0, 0).hex() == (
        "8000000000000000400000003000000001000000030000000a0000000000000000000000000c0000000f0000400000002000"
        "0000200000000000000000000000")
    # A pooled frame: the former reserved u64 is flags (FRAME_POOLED) and the slot.
    assert abi.FRAME_ENTRY.pack(4096, 64, 48, 1, 3, 10, 0, 3072, 3840, 64, 32, 32, abi.FRAME_POOLED, 7).hex()[-16:] == (
        "0100000007000000")
    # A converted frame (FRAME_CONVERTED, bit 1) copied to dst: flags 2, slot 0.
    assert abi.FRAME_ENTRY.pack(128, 64, 48, 1, 3, 10, 0, 3072, 3840, 64, 32, 32, abi.FRAME_CONVERTED, 0).hex()[
        -16:] == "0200000000000000"
    # The last entry of a drain cut short (FRAME_MORE, bit 2), here a pooled frame: flags 5.
    assert abi.FRAME_MORE == 4
    assert abi.FRAME_ENTRY.pack(4096, 64, 48, 1, 3, 10, 0, 3072, 3840, 64, 32, 32,
                                abi.FRAME_POOLED | abi.FRAME_MORE, 7).hex()[-16:] == "0500000007000000"
    assert (abi.OUT_HEADER.size, abi.PACKET_ENTRY.size, abi.FRAME_ENTRY.size) == (16, 40, 64)
    assert abi.out_table_size(abi.OUT_PACKETS, 3) == 192


def test_frame_pool_layout() -> None:
    """SessionFlag.FRAME_POOL, Caps.FRAME_POOL and the pool header: one u32 lent counter per slot."""
    assert (int(abi.SessionFlag.FRAME_POOL), abi.SESSION_FLAGS_MASK, int(abi.Caps.FRAME_POOL)) == (1, 1, 0x20)
    assert (abi.POOL_MAX_SLOTS, abi.POOL_HEADER, abi.POOL_MIN, abi.FRAME_POOLED) == (256, 4096, 8192, 1)
    assert [abi.pool_lent_word(i) for i in (0, 1, 255)] == [0, 4, 1020]
    assert 4 * abi.POOL_MAX_SLOTS <= abi.POOL_HEADER


def test_multi_input_list_layout() -> None:
    """DescFlag.MULTI (bit 4) and its 32-byte entries: offset, length, pts (i64), flags, reserved."""
    assert (int(abi.DescFlag.MULTI), abi.DESC_FLAGS_MASK, int(abi.Caps.MULTI)) == (0x10, 0x1F, 0x10)
    # The plain-int copies the hot paths use are the flags' bits, and plain ints.
    plain = (abi.F_FORCE_KEYFRAME, abi.F_PARSE, abi.F_PTS_VALID, abi.F_DRAIN_PENDING, abi.F_MULTI)
    assert plain == (1, 2, 4, 8, 16) and all(type(f) is int for f in plain)
    assert (abi.MULTI_ENTRY.size, abi.MULTI_MAX, abi.MULTI_ENTRY_FLAGS) == (32, 16, 0x5)
    assert abi.MULTI_ENTRY.pack(0x12340, 4096, -1, int(abi.DescFlag.PTS_VALID), 0).hex() == (
        "40230100000000000010000000000000ffffffffffffffff0400000000000000")


def test_timeout_code_and_error_record_golden() -> None:
    """ErrorCode.TIMEOUT (20, appended), Caps.ERROR_TEXT (bit 6) and the error record a failed
    codec task leaves at dst: OUT_HEADER(OUT_ERROR, code, 16 + text), then the UTF-8 text."""
    assert [int(c) for c in abi.ErrorCode] == list(range(21))
    assert (abi.ErrorCode.BAD_FLAGS, abi.ErrorCode.TIMEOUT) == (19, 20)
    assert int(abi.Caps.ERROR_TEXT) == 0x40
    assert (abi.OUT_ERROR, abi.ERROR_RECORD_SIZE, abi.ERROR_TEXT_MAX) == (4, 256, 240)
    assert abi.ERROR_RECORD_OPS == {abi.Op.CAPS, abi.Op.SESSION_OPEN, abi.Op.ENCODE_FRAME, abi.Op.DECODE,
                                    abi.Op.FLUSH}
    rec = abi.pack_error_record(abi.ErrorCode.BACKEND, "x264: no")
    assert rec.hex() == "04000000120000001800000000000000" + b"x264: no".hex()
    assert abi.unpack_error_record(rec + bytes(8), abi.ErrorCode.BACKEND) == "x264: no"
    assert abi.unpack_error_record(rec, abi.ErrorCode.TIMEOUT) is None  # the code must match
    assert abi.unpack_error_record(abi.OUT_HEADER.pack(abi.OUT_JSON, 18, 24) + b"x264: no", 18) is None
    assert abi.unpack_error_record(rec[:20], abi.ErrorCode.BACKEND) is None  # used past the bytes given
    # Cut to the room given, and never inside a UTF-8 character.
    assert abi.pack_error_record(7, "ab\u00e9cd", 19) == abi.OUT_HEADER.pack(4, 7, 18) + b"ab"
    assert abi.pack_error_record(7, "anything", 16) == b""
    long = abi.pack_error_record(7, "y" * 1000)
    assert len(long) == abi.ERROR_RECORD_SIZE and long[16:] == b"y" * 240


def test_channel_register_file_fits() -> None:
    assert abi.CH_PROGRAM_STRUCT.size == 80 and abi.CH_RESULT == 0x70
    # result, result_len, error, text_len (the reason's bytes on the file's config page), copied
    assert abi.CH_RESULT_STRUCT.pack(1, 2, 18, 5, 3).hex() == (
        "0100000000000000020000000000000012000000050000000300000000000000")
    assert abi.ERROR_TEXT_MAX <= abi.CONFIG_PAGE
    assert abi.CH_FILES == 4
    # Header page, 2 x 4 files of 256 bytes (one page), 8 config pages, 2 doorbell pages.
    assert abi.bank_size(2) == 4096 + 4096 + 8 * 4096 + 2 * 4096
    # Channel doorbells: a page per channel after the config pages, 8 bytes per worker slot.
    assert abi.channel_kick_offset(2, 0, 0) == 0xA000
    assert abi.channel_kick_offset(2, 1, 3) == 0xB018
    assert abi.channel_need_wakeup_offset(2, 1, 3) == 0xB01C
    assert abi.channel_kick_offset(2, 1, abi.BANK_MAX_WORKERS - 1) + 8 <= abi.bank_size(2)
    assert (abi.channel_offset(0), abi.channel_offset(0, 1), abi.channel_offset(1)) == (4096, 4096 + 256, 4096 + 1024)
    assert abi.channel_config_offset(2, 0, 1) == 8192 + 4096
    assert abi.channel_config_offset(2, 1, 1) == 8192 + 5 * 4096
    # Header words hostd writes for the workers.
    assert (abi.BANK_HOST_EVENT, abi.BANK_HOST_NEED_WAKEUP, abi.BANK_WORKER_SPIN, abi.BANK_IRQ_HOLDOFF) == (0, 4, 8, 12)


@pytest.mark.parametrize(("off", "length", "want"), [
    (100, 0, abi.ErrorCode.OK), (100, 900, abi.ErrorCode.OK), (100, 901, abi.ErrorCode.BAD_RANGE),
    (99, 1, abi.ErrorCode.BAD_RANGE), (999, 1, abi.ErrorCode.OK), (1000, 1, abi.ErrorCode.BAD_RANGE),
    (abi.U64_MAX, 1, abi.ErrorCode.OVERFLOW), (1, abi.U64_MAX, abi.ErrorCode.OVERFLOW),
    (abi.U64_MAX, 0, abi.ErrorCode.BAD_RANGE), (0, abi.U64_MAX, abi.ErrorCode.BAD_RANGE),
])
def test_range_ok(off: int, length: int, want: abi.ErrorCode) -> None:
    assert abi.range_ok(off, length, 100, 1000) == want


def test_layout_rejects_bad_geometry() -> None:
    with pytest.raises(abi.LayoutError):
        abi.compute_layout(1 << 20, 100)
    with pytest.raises(abi.LayoutError):
        abi.compute_layout(1000, 16)
    with pytest.raises(abi.LayoutError):
        abi.compute_layout(8192, 64)


def test_plane_shapes() -> None:
    assert abi.plane_shapes(abi.PixFmt.YUV420P, 5, 3) == [(3, 5), (2, 3), (2, 3)]
    assert abi.plane_shapes(abi.PixFmt.NV12, 4, 4) == [(4, 4), (2, 4)]
    assert abi.frame_size(abi.PixFmt.BGRA, 2, 2) == 16
    assert abi.plane_shapes(abi.PixFmt.YUV422P, 5, 3) == [(3, 5), (3, 3), (3, 3)]
    assert abi.plane_shapes(abi.PixFmt.YUV444P, 5, 3) == [(3, 5)] * 3
    assert abi.plane_shapes(abi.PixFmt.YUV420P10LE, 5, 3) == [(3, 10), (2, 6), (2, 6)]
    assert abi.plane_shapes(abi.PixFmt.P010LE, 4, 4) == [(4, 8), (2, 8)]
    assert [int(f) for f in abi.PixFmt] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [abi.PIX_FMT_NAMES[f] for f in abi.PixFmt] == [
        "native", "yuv420p", "nv12", "rgb24", "bgra", "yuv422p", "yuv444p", "yuv420p10le", "p010le"]


def test_native_format_sizes_for_the_largest_picture_and_has_no_planes() -> None:
    """NATIVE (0): a decode session's choice, never a picture's.  Its frame size is the largest
    picture a native session may emit: 8-bit 4:4:4 and 10-bit 4:2:0 (3 bytes a pixel, more
    for odd sizes' rounded-up chroma)."""
    assert abi.frame_size(abi.PixFmt.NATIVE, 64, 48) == 3 * 64 * 48
    assert abi.frame_size(abi.PixFmt.NATIVE, 5, 3) == abi.frame_size(abi.PixFmt.YUV420P10LE, 5, 3) == 54
    assert abi.frame_size(abi.PixFmt.NATIVE, 5, 3) > abi.frame_size(abi.PixFmt.YUV444P, 5, 3) == 45
    assert set(abi.NATIVE_OUTPUTS) == set(abi.PixFmt) - {abi.PixFmt.NATIVE, abi.PixFmt.RGB24, abi.PixFmt.BGRA}
    with pytest.raises(ValueError, match="no planes"):
        abi.plane_shapes(abi.PixFmt.NATIVE, 64, 48)
    with pytest.raises(ValueError, match="no planes"):
        abi.frame_size(abi.PixFmt.NATIVE, 64, 48, strides=[64, 32, 32])
    # Decode only: an encoder takes a named format.
    lim = abi.GeometryLimits()
    dec = abi.SessionConfig(direction=abi.Direction.DECODE, codec=abi.Codec.H264, pix_fmt=abi.PixFmt.NATIVE)
    enc = abi.SessionConfig(direction=abi.Direction.ENCODE, codec=abi.Codec.H264, width=64, height=48,
                            pix_fmt=abi.PixFmt.NATIVE)
    assert abi.session_config_problem(dec, lim) is None
    assert abi.session_config_problem(enc, lim) == (
        abi.ErrorCode.BAD_ARG, "pix_fmt native is for decode sessions: an encoder takes a named format")
    assert abi.SessionConfig.unpack(dec.pack()).pix_fmt == 0


@pytest.mark.parametrize(("name", "want"), [
    ("gray", "yuv420p"), ("gray10le", "yuv420p10le"), ("yuv440p", "yuv444p"), ("yuv411p", "yuv422p"),
    ("yuv410p", "yuv420p"), ("gbrp", "yuv444p"), ("rgb24", "yuv444p"), ("yuv444p12le", "yuv420p10le"),
    ("yuv420p12le", "yuv420p10le"), ("ya8", "yuv420p")])
def test_nearest_decoded_keeps_the_chroma_and_both_edges_use_it(name: str, want: str) -> None:
    """One rule for a NATIVE decode session (the worker) and for guestlib's transcode."""
    import av

    from guestlib.media import _nearest as guest_nearest
    from vmediad.avformats import nearest_decoded

    assert abi.PIX_FMT_NAMES[nearest_decoded(av.VideoFrame(16, 16, name).format)] == want  # the worker's call
    assert guest_nearest(name) == want


def test_worker_limits_json_golden_and_geometry_rule() -> None:
    w = abi.WorkerLimits(abi.GeometryLimits(100, 200, 3000), 4)
    assert w.to_json() == '{"max_width":100,"max_height":200,"max_pixels":3000,"max_sessions":4}'
    assert abi.WorkerLimits.from_json(w.to_json()) == w
    g = abi.GeometryLimits()
    assert (g.max_width, g.max_height, g.max_pixels) == (8192, 8192, 35_000_000)
    assert g.allows(8192, 4272) and not g.allows(8192, 4273)  # 35 Mpx
    assert not g.allows(0, 16) and not g.allows(8194, 2)
    assert abi.SHORT_OPS == {abi.Op.NOP, abi.Op.COPY, abi.Op.CRC32}
