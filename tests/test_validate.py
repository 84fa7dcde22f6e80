"""Descriptor and session-config validation (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostd import validate
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


def test_session_config_checks() -> None:
    lim = validate.Limits(max_width=1920, max_height=1080, max_pixels=1920 * 1080)
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
