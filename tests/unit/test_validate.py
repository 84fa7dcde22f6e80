"""Descriptor and session-config validation (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.core import validate
from vmediad import abi
from vmediad.abi import Descriptor, ErrorCode, Op

LAY = abi.compute_layout(1 << 20, 16)
H, E = LAY.heap_offset, LAY.region_size


def test_valid_ops() -> None:
    p = validate.check(Descriptor(opcode=Op.COPY, src_off=H, src_len=10, dst_off=H + 64, dst_len=10), LAY)
    assert isinstance(p, validate.Program) and p.opcode == Op.COPY
    assert isinstance(validate.check(Descriptor(opcode=Op.NOP, src_off=abi.U64_MAX, src_len=5), LAY),
                      validate.Program)  # NOP reads no buffer


def test_encode_without_input_needs_drain_flag() -> None:
    d = Descriptor(opcode=Op.ENCODE_FRAME, session=1, dst_off=H, dst_len=100)
    assert validate.check(d, LAY) == ErrorCode.BAD_ARG
    d2 = Descriptor(opcode=Op.ENCODE_FRAME, session=1, dst_off=H, dst_len=100, flags=abi.DescFlag.DRAIN_PENDING)
    assert isinstance(validate.check(d2, LAY), validate.Program)


def _entries(*rows: tuple[int, int, int, int, int]) -> bytes:
    return b"".join(abi.MULTI_ENTRY.pack(*r) for r in rows)


def test_multi_descriptor_rules() -> None:
    multi = abi.DescFlag.MULTI
    n = abi.MULTI_ENTRY.size

    def chk(op: Op, flags: int, src_len: int) -> validate.Program | ErrorCode:
        return validate.check(Descriptor(opcode=op, session=1, flags=flags, src_off=H, src_len=src_len,
                                         dst_off=H + 4096, dst_len=4096), LAY)

    assert isinstance(chk(Op.ENCODE_FRAME, multi, 2 * n), validate.Program)
    assert isinstance(chk(Op.DECODE, multi | abi.DescFlag.PARSE, abi.MULTI_MAX * n), validate.Program)
    assert chk(Op.COPY, multi, 2 * n) == ErrorCode.BAD_FLAGS  # only ENCODE_FRAME and DECODE
    assert chk(Op.DECODE, multi | abi.DescFlag.DRAIN_PENDING, n) == ErrorCode.BAD_FLAGS
    assert chk(Op.DECODE, multi, n + 1) == ErrorCode.BAD_ARG  # not whole entries
    assert chk(Op.DECODE, multi, (abi.MULTI_MAX + 1) * n) == ErrorCode.BAD_ARG


def test_multi_entries_are_checked_one_by_one() -> None:
    pts = int(abi.DescFlag.PTS_VALID)
    key = int(abi.DescFlag.FORCE_KEYFRAME)
    good = _entries((H, 100, 0, pts, 0), (E - 64, 64, -5, pts | key, 0))
    assert validate.check_multi(good, Op.ENCODE_FRAME, LAY) == good
    assert validate.check_multi(good, Op.DECODE, LAY) == ErrorCode.BAD_FLAGS  # no keyframe flag on a chunk
    assert validate.check_multi(_entries((H, 100, 0, 0, 0), (H - 1, 10, 0, 0, 0)), Op.DECODE, LAY) \
        == ErrorCode.BAD_RANGE  # the second entry starts before the heap
    assert validate.check_multi(_entries((E - 10, 11, 0, 0, 0)), Op.DECODE, LAY) == ErrorCode.BAD_RANGE
    assert validate.check_multi(_entries((2**64 - 8, 16, 0, 0, 0)), Op.DECODE, LAY) == ErrorCode.OVERFLOW
    assert validate.check_multi(_entries((H, 0, 0, 0, 0)), Op.DECODE, LAY) == ErrorCode.BAD_ARG  # empty chunk
    assert validate.check_multi(_entries((H, 8, 0, 0, 1)), Op.DECODE, LAY) == ErrorCode.BAD_ARG  # reserved
    assert validate.check_multi(_entries((H, 8, 0, 1 << 9, 0)), Op.ENCODE_FRAME, LAY) == ErrorCode.BAD_FLAGS


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(-2**63, 2**63 - 1),
                          st.integers(0, 2**32 - 1), st.integers(0, 1)), min_size=1, max_size=abi.MULTI_MAX))
def test_any_multi_list_is_either_in_heap_or_rejected(rows: list[tuple[int, int, int, int, int]]) -> None:
    raw = _entries(*rows)
    r = validate.check_multi(raw, Op.ENCODE_FRAME, LAY)
    if r == raw:
        for off, length, _, flags, reserved in rows:
            assert H <= off and off + length <= E and length > 0
            assert not flags & ~abi.MULTI_ENTRY_FLAGS and reserved == 0
    else:
        assert r != ErrorCode.OK


def test_session_config_checks() -> None:
    lim = abi.GeometryLimits(max_width=1920, max_height=1080, max_pixels=1920 * 1080)
    ok = abi.SessionConfig(direction=1, codec=abi.Codec.H264, width=640, height=480)
    assert validate.check_session_config(ok.pack(), lim) == ok
    big = abi.SessionConfig(direction=1, codec=abi.Codec.H264, width=4096, height=480)
    assert validate.check_session_config(big.pack(), lim) == ErrorCode.TOO_LARGE
    bad_codec = abi.SessionConfig(direction=1, codec=99, width=64, height=64)
    assert validate.check_session_config(bad_codec.pack(), lim) == ErrorCode.UNSUPPORTED_CODEC
    assert validate.check_session_config(b"\xff" * 100, lim) == ErrorCode.BAD_ARG
    zero = abi.SessionConfig(direction=1, codec=abi.Codec.H264, width=0, height=64)
    assert validate.check_session_config(zero.pack(), lim) == ErrorCode.BAD_ARG


u64 = st.one_of(st.sampled_from([0, 1, H - 1, H, E - 1, E, E + 1, 2**32 - 1, 2**64 - 1, 2**63]),
                st.integers(0, 2**64 - 1))


@given(st.integers(0, 40), st.integers(0, 0xFFFF), u64, u64, u64, u64)
def test_any_descriptor_is_either_in_heap_or_rejected(op: int, flags: int, so: int, sl: int, do: int,
                                                      dl: int) -> None:
    r = validate.check(Descriptor(opcode=op, flags=flags, src_off=so, src_len=sl, dst_off=do, dst_len=dl), LAY)
    if isinstance(r, validate.Program):
        uses_src, uses_dst = validate._USES[r.opcode]
        if uses_src and r.src_len:
            assert H <= r.src_off and r.src_off + r.src_len <= E
        if uses_dst:
            assert H <= r.dst_off and r.dst_off + r.dst_len <= E
    else:
        assert r != ErrorCode.OK


ENC = abi.SessionConfig(abi.Direction.ENCODE, abi.Codec.H264, 640, 360)
DEC = abi.SessionConfig(abi.Direction.DECODE, abi.Codec.H264)


@pytest.mark.parametrize("cfg, want", [
    (ENC, None),
    (DEC, None),
    (replace(DEC, width=1920, height=1080, flags=abi.SessionFlag.FRAME_POOL), None),
    (replace(ENC, direction=9), (ErrorCode.BAD_ARG, "unknown direction 9")),
    (replace(ENC, codec=99), (ErrorCode.UNSUPPORTED_CODEC, "unknown codec 99")),
    (replace(ENC, pix_fmt=77), (ErrorCode.BAD_ARG, "unknown pix_fmt 77")),
    (replace(ENC, rc_mode=9), (ErrorCode.BAD_ARG, "unknown rate control 9")),
    (replace(ENC, flags=2), (ErrorCode.BAD_FLAGS, "unknown session flags 0x2")),
    (replace(ENC, flags=abi.SessionFlag.FRAME_POOL), (ErrorCode.BAD_FLAGS, "FRAME_POOL is for decode sessions")),
    (replace(ENC, threads=65), (ErrorCode.BAD_ARG, "threads must be 0..64")),
    (replace(ENC, bframes=2), (ErrorCode.BAD_ARG, "bframes must be 0 or 1")),
    (replace(ENC, width=0), (ErrorCode.BAD_ARG, "width and height are required")),
    (replace(ENC, width=9000, height=16), (ErrorCode.TOO_LARGE, "9000x16 exceeds the geometry caps")),
    (replace(DEC, width=640), (ErrorCode.BAD_ARG, "640x0: give both width and height, or neither")),
    (replace(ENC, fps_num=0), (ErrorCode.BAD_ARG, "bad frame rate 0/1")),
    (replace(ENC, tb_den=0x8000_0000), (ErrorCode.BAD_ARG, "bad time base 1/2147483648")),
    (replace(DEC, fps_num=0), None),  # a decoder takes its rate from the stream
])
def test_one_session_config_rule_for_hostd_and_the_worker(cfg: abi.SessionConfig,
                                                           want: tuple[ErrorCode, str] | None) -> None:
    lim = abi.GeometryLimits()
    assert abi.session_config_problem(cfg, lim) == want
    # hostd's check of the copied bytes gives the same code.
    assert validate.check_session_config(cfg.pack(), lim) == (cfg if want is None else want[0])
