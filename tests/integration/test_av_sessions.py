"""codec_backend.av_sessions against real PyAV, on an anonymous shared mapping."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

import av
import numpy as np
import pytest
from av.video.frame import VideoFrame

from codec_backend.av_sessions import (
    CodecError,
    SessionManager,
    caps_document,
    open_decoder_context,
    open_encoder_context,
    write_caps,
)
from codec_backend.inputs import Input
from vmediad import abi
from vmediad.abi import (
    Codec,
    Direction,
    ErrorCode,
    FrameEntry,
    GeometryLimits,
    OutHeader,
    PacketEntry,
    PixFmt,
    RateControl,
    SessionConfig,
)

W, H, N = 320, 240, 24
REGION = 48 << 20
SRC = 0
DST = 16 << 20
DST_LEN = 32 << 20

Planes = list[np.ndarray]


@dataclass
class Pkt:
    data: bytes
    pts: int
    dts: int
    flags: int


@dataclass
class Frm:
    width: int
    height: int
    pix_fmt: int
    pts: int
    planes: Planes


@pytest.fixture
def mem() -> Iterator[memoryview]:
    region = mmap.mmap(-1, REGION)
    view = memoryview(region)
    yield view
    gc.collect()
    # Fails with BufferError if anything (FFmpeg buffer, numpy view) still aliases the region.
    view.release()
    region.close()


@pytest.fixture
def mgr(mem: memoryview) -> Iterator[SessionManager]:
    manager = SessionManager()
    yield manager
    manager.close_all()


# --- helpers ------------------------------------------------------------------------
def pattern(i: int, w: int = W, h: int = H) -> Planes:
    """A moving yuv420p test pattern: drifting waves plus a moving bright box."""
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    luma = 128 + 55 * np.sin((x + 4 * i) / 11.0) + 35 * np.cos((y - 3 * i) / 17.0)
    bx, by = (13 * i) % max(1, w - 40), (7 * i) % max(1, h - 40)
    luma[by:by + 32, bx:bx + 32] = 235
    cw, ch = (w + 1) // 2, (h + 1) // 2
    cy = np.arange(ch, dtype=np.float64)[:, None]
    cx = np.arange(cw, dtype=np.float64)[None, :]
    u = 128 + 40 * np.sin((cx + 2 * i) / 9.0) + 0 * cy
    v = 128 + 40 * np.cos((cy - i) / 7.0) + 0 * cx
    return [p.clip(16, 235).astype(np.uint8) for p in (luma, u, v)]


def rgb_pattern(i: int) -> np.ndarray:
    y = np.arange(H)[:, None]
    x = np.arange(W)[None, :]
    r = 128 + 90 * np.sin((x + 5 * i) / 13.0) + 0 * y
    g = 128 + 90 * np.cos((y - 2 * i) / 11.0) + 0 * x
    b = 128 + 60 * np.sin((x + y + 3 * i) / 19.0)
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def to_nv12(planes: Planes) -> Planes:
    uv = np.empty((planes[1].shape[0], planes[1].shape[1] * 2), np.uint8)
    uv[:, 0::2], uv[:, 1::2] = planes[1], planes[2]
    return [planes[0], uv]


def put(mem: memoryview, off: int, planes: Planes, strides: tuple[int, ...] | None = None) -> int:
    """Write planes one after another with the given row strides; returns the length."""
    pos = off
    for i, p in enumerate(planes):
        rows, row_bytes = p.shape[0], p.shape[1] * (p.shape[2] if p.ndim == 3 else 1)
        stride = strides[i] if strides and strides[i] else row_bytes
        dst = np.ndarray((rows, row_bytes), np.uint8, buffer=mem, offset=pos, strides=(stride, 1))
        dst[:] = p.reshape(rows, row_bytes)
        del dst
        pos += rows * stride
    return pos - off


def psnr(a: Planes, b: Planes) -> float:
    x = np.concatenate([p.ravel() for p in a]).astype(np.float64)
    y = np.concatenate([p.ravel() for p in b]).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255 * 255 / mse)


def read_packets(mem: memoryview, off: int = DST) -> list[Pkt]:
    head = OutHeader.unpack_from(mem, off)
    assert head.kind == abi.OUT_PACKETS
    end = abi.out_table_size(abi.OUT_PACKETS, head.count)
    out = []
    for k in range(head.count):
        e = PacketEntry.unpack_from(mem, off + OutHeader.SIZE + k * PacketEntry.SIZE)
        assert e.reserved == 0 and e.flags & ~abi.PACKET_KEY == 0
        assert e.offset % abi.HEAP_ALIGN == 0 and e.offset >= end and e.size > 0
        end = e.offset + e.size
        out.append(Pkt(bytes(mem[off + e.offset:off + end]), e.pts, e.dts, e.flags))
    assert head.used == end
    return out


def read_frames(mem: memoryview, off: int = DST) -> list[Frm]:
    head = OutHeader.unpack_from(mem, off)
    assert head.kind == abi.OUT_FRAMES
    end = abi.out_table_size(abi.OUT_FRAMES, head.count)
    out = []
    for k in range(head.count):
        e = FrameEntry.unpack_from(mem, off + OutHeader.SIZE + k * FrameEntry.SIZE)
        # Copied out (never pooled here); FRAME_CONVERTED when the session converted it.
        assert e.flags & ~abi.FRAME_CONVERTED == 0 and e.slot == 0
        assert e.offset % abi.HEAP_ALIGN == 0 and e.offset >= end
        shapes = abi.plane_shapes(PixFmt(e.pix_fmt), e.width, e.height)
        n = e.nplanes
        assert n == len(shapes)
        offs, strides = list(e.plane_offsets[:n]), list(e.strides[:n])
        assert list(e.plane_offsets[n:]) == [0] * (3 - n)
        assert strides == [b for _, b in shapes]
        pos = 0
        planes = []
        for (rows, row_bytes), p_off in zip(shapes, offs, strict=True):
            assert p_off == pos
            start = off + e.offset + p_off
            planes.append(np.frombuffer(bytes(mem[start:start + rows * row_bytes]),
                                        np.uint8).reshape(rows, row_bytes))
            pos += rows * row_bytes
        end = e.offset + pos
        out.append(Frm(e.width, e.height, e.pix_fmt, e.pts, planes))
    assert head.used == end
    return out


def enc_cfg(codec: Codec, **kw: Any) -> SessionConfig:
    base: dict[str, Any] = {"direction": Direction.ENCODE, "codec": codec, "width": W, "height": H}
    base.update(kw)
    return SessionConfig(**base)


def dec_cfg(codec: Codec, **kw: Any) -> SessionConfig:
    return SessionConfig(direction=Direction.DECODE, codec=codec, **kw)


def encode_stream(mgr: SessionManager, mem: memoryview, sid: int, frames: list[Planes],
                  strides: tuple[int, ...] = (0, 0, 0), src: int = SRC) -> list[Pkt]:
    out: list[Pkt] = []
    for i, planes in enumerate(frames):
        length = put(mem, src, planes, strides)
        mgr.encode(sid, mem, [Input(src, length, i)], strides, False, DST, DST_LEN)
        mem[src:src + length] = bytes(length)  # the guest reuses its buffer at once
        out += read_packets(mem)
    mgr.flush(sid, mem, DST, DST_LEN)
    return out + read_packets(mem)


def decode_packets(mgr: SessionManager, mem: memoryview, sid: int, packets: list[Pkt]) -> list[Frm]:
    out: list[Frm] = []
    for p in packets:
        mem[SRC:SRC + len(p.data)] = p.data
        mgr.decode(sid, mem, [Input(SRC, len(p.data), p.pts)], False, False, DST, DST_LEN)
        out += read_frames(mem)
    mgr.flush(sid, mem, DST, DST_LEN)
    return out + read_frames(mem)


def decode_chunks(mgr: SessionManager, mem: memoryview, sid: int, stream: bytes,
                  chunk: int) -> list[Frm]:
    out: list[Frm] = []
    for pos in range(0, len(stream), chunk):
        piece = stream[pos:pos + chunk]
        mem[SRC:SRC + len(piece)] = piece
        mgr.decode(sid, mem, [Input(SRC, len(piece), None)], True, False, DST, DST_LEN)
        out += read_frames(mem)
    mgr.flush(sid, mem, DST, DST_LEN)
    return out + read_frames(mem)


def frame_planes(frame: VideoFrame) -> Planes:
    fmt = PixFmt.NV12 if frame.format.name == "nv12" else PixFmt.YUV420P
    out = []
    for plane, (rows, row_bytes) in zip(frame.planes, abi.plane_shapes(fmt, frame.width, frame.height),
                                        strict=False):
        arr = np.ndarray((rows, row_bytes), np.uint8, buffer=memoryview(plane),
                         strides=(plane.line_size, 1))
        out.append(arr.copy())
    return out


def padded(data: bytes) -> Any:
    """A zero-padded packet: PyAV's Packet(bytes) has no padding and decoders over-read."""
    pkt = av.Packet(len(data))
    memoryview(pkt)[:] = data
    return pkt


def md5(planes: Planes) -> str:
    h = hashlib.md5()
    for p in planes:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def pyav_h264(frames: list[Planes], bframes: int, gop: int = 12) -> list[Any]:
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, 30), Fraction(30)
    ctx.gop_size, ctx.max_b_frames = gop, bframes
    ctx.options = {"preset": "veryfast"}
    packets = []
    for i, planes in enumerate(frames):
        buf = np.concatenate([p.ravel() for p in planes]).reshape(H * 3 // 2, W)
        f = VideoFrame.from_numpy_buffer(buf, "yuv420p")
        f.pts = i
        packets += ctx.encode(f)
    return packets + ctx.encode(None)


def expect(code: ErrorCode, fn: Any, *args: Any) -> CodecError:
    with pytest.raises(CodecError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value


# --- tests ----------------------------------------------------------------------------
ENCODERS = [Codec.H264, Codec.HEVC, Codec.VP9, Codec.AV1, Codec.MJPEG, Codec.MPEG4]


@pytest.mark.parametrize("codec", ENCODERS, ids=lambda c: c.name)
def test_roundtrip_psnr(mgr: SessionManager, mem: memoryview, codec: Codec) -> None:
    frames = [pattern(i) for i in range(N)]
    mgr.open(1, enc_cfg(codec, gop=12))
    packets = encode_stream(mgr, mem, 1, frames)
    assert packets and packets[0].flags & abi.PACKET_KEY
    assert sorted(p.pts for p in packets) == list(range(N))
    mgr.open(2, dec_cfg(codec))
    decoded = decode_packets(mgr, mem, 2, packets)
    assert [f.pts for f in decoded] == list(range(N))
    for src, out in zip(frames, decoded, strict=True):
        assert (out.width, out.height, out.pix_fmt) == (W, H, PixFmt.YUV420P)
        assert psnr(src, out.planes) >= 35.0
    stats = mgr.statistics()
    enc = cast(dict[str, int], stats["encode"])
    assert enc["frames_in"] == N and enc["input_bytes_copied"] == 0


@pytest.mark.parametrize("codec", [Codec.H264, Codec.HEVC, Codec.MPEG4, Codec.MJPEG],
                         ids=lambda c: c.name)
def test_parse_mode_roundtrip(mgr: SessionManager, mem: memoryview, codec: Codec) -> None:
    frames = [pattern(i) for i in range(12)]
    mgr.open(1, enc_cfg(codec))
    stream = b"".join(p.data for p in encode_stream(mgr, mem, 1, frames))
    mgr.open(2, dec_cfg(codec))
    decoded = decode_chunks(mgr, mem, 2, stream, 3001)
    assert len(decoded) == len(frames)
    for src, out in zip(frames, decoded, strict=True):
        assert psnr(src, out.planes) >= 35.0


def test_packet_table_matches_direct_pyav(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(16)]
    mgr.open(1, enc_cfg(Codec.H264, gop=8, bframes=1))
    got = encode_stream(mgr, mem, 1, frames)
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "yuv420p"
    ctx.time_base, ctx.framerate, ctx.gop_size, ctx.max_b_frames = Fraction(1, 30), Fraction(30), 8, 3
    ctx.thread_type = "FRAME"
    ctx.options = {"preset": "ultrafast"}
    want = []
    for i, planes in enumerate(frames):
        buf = np.concatenate([p.ravel() for p in planes]).reshape(H * 3 // 2, W)
        f = VideoFrame.from_numpy_buffer(buf, "yuv420p")
        f.pts = i
        want += ctx.encode(f)
    want += ctx.encode(None)
    assert [(p.data, p.pts, p.dts, bool(p.flags)) for p in got] == [
        (bytes(p), p.pts, p.dts, p.is_keyframe) for p in want]
    assert any(p.pts != p.dts for p in got), "expected B-frame reordering"
    # Raw layout of one output: header, entries, zeroed table padding, aligned payloads.
    mem[DST:DST + 4096] = b"\xaa" * 4096
    mgr.encode(1, mem, [Input(SRC, put(mem, SRC, frames[0]), 100, True)], (0, 0, 0), False, DST, DST_LEN)
    mgr.flush(1, mem, DST, DST_LEN)
    head = OutHeader.unpack_from(mem, DST)
    assert (head.kind, head.count) == (abi.OUT_PACKETS, 1)
    table = abi.out_table_size(abi.OUT_PACKETS, 1)
    assert table == 64
    assert bytes(mem[DST + 16 + 40:DST + table]) == bytes(table - 56)
    e = PacketEntry.unpack_from(mem, DST + 16)
    assert (e.offset, e.pts, e.flags) == (64, 100, abi.PACKET_KEY) and head.used == 64 + e.size
    # Nothing pending: an empty table.
    assert mgr.flush(1, mem, DST, DST_LEN) == (0, 64)
    assert OutHeader.unpack_from(mem, DST) == OutHeader(abi.OUT_PACKETS, 0, 64)


def test_frame_table_layout_and_nv12_output(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i, 322, 182) for i in range(6)]
    cfg = enc_cfg(Codec.H264, width=322, height=182)
    mgr.open(1, cfg)
    packets = encode_stream(mgr, mem, 1, frames)
    direct = av.CodecContext.create("h264", "r")
    want = []
    for p in packets:
        want += direct.decode(padded(p.data))
    want += direct.decode(None)
    mgr.open(2, dec_cfg(Codec.H264))
    got = decode_packets(mgr, mem, 2, packets)
    assert [md5(f.planes) for f in got] == [md5(frame_planes(f)) for f in want]
    for src, out in zip(frames, got, strict=True):  # height % 4 == 2: not from_numpy_buffer
        assert psnr(src, out.planes) >= 35.0
    mgr.open(3, dec_cfg(Codec.H264, pix_fmt=PixFmt.NV12))
    got12 = decode_packets(mgr, mem, 3, packets)
    for src, out in zip(frames, got12, strict=True):
        assert out.pix_fmt == PixFmt.NV12 and len(out.planes) == 2
        assert out.planes[1].shape == (91, 322)
        assert psnr(to_nv12(src), out.planes) >= 35.0
    # Two frames in one output: second frame's data starts 64-aligned after the first.
    mgr.open(4, dec_cfg(Codec.H264, threads=1))
    stream = b"".join(p.data for p in packets)
    mem[SRC:SRC + len(stream)] = stream
    count, used = mgr.decode(4, mem, [Input(SRC, len(stream), None)], True, False, DST, DST_LEN)
    assert count >= 2
    entries = [FrameEntry.unpack_from(mem, DST + 16 + k * FrameEntry.SIZE) for k in range(count)]
    frame_size = abi.frame_size(PixFmt.YUV420P, 322, 182)
    for a, b in itertools.pairwise(entries):
        assert b.offset == (a.offset + frame_size + 63) // 64 * 64
    assert entries[0].offset == abi.out_table_size(abi.OUT_FRAMES, count)
    assert used == entries[-1].offset + frame_size
    assert count + mgr.flush(4, mem, DST, DST_LEN)[0] == 6
    dec = cast(dict[str, float], mgr.statistics()["decode"])
    assert dec["output_bytes_copied"] >= 18 * frame_size


@pytest.mark.parametrize("codec", [Codec.H264, Codec.VP9], ids=lambda c: c.name)
def test_input_formats(mgr: SessionManager, mem: memoryview, codec: Codec) -> None:
    n = 6
    yuv = [pattern(i) for i in range(n)]
    mgr.open(1, enc_cfg(codec, pix_fmt=PixFmt.NV12))
    nv12_packets = encode_stream(mgr, mem, 1, [to_nv12(p) for p in yuv])
    copied = cast(dict[str, int], mgr.statistics()["encode"])["input_bytes_copied"]
    assert copied == (0 if codec == Codec.H264 else n * W * H * 3 // 2)
    mgr.open(2, dec_cfg(codec))
    for src, out in zip(yuv, decode_packets(mgr, mem, 2, nv12_packets), strict=True):
        assert psnr(src, out.planes) >= 35.0

    rgb = [rgb_pattern(i) for i in range(n)]
    for sid, fmt in ((3, PixFmt.RGB24), (4, PixFmt.BGRA)):
        mgr.open(sid, enc_cfg(codec, pix_fmt=fmt))
        if fmt == PixFmt.RGB24:
            inputs = [[img] for img in rgb]
        else:
            inputs = [[np.concatenate([img[..., ::-1], np.full((H, W, 1), 255, np.uint8)], -1)]
                      for img in rgb]
        packets = encode_stream(mgr, mem, sid, inputs)
        mgr.open(sid + 10, dec_cfg(codec))
        for img, out in zip(rgb, decode_packets(mgr, mem, sid + 10, packets), strict=True):
            ref = frame_planes(VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p"))
            assert psnr(ref, out.planes) >= 35.0


def test_strided_input_zero_copy(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(8)]
    layouts = [
        (W + 64, (W + 64) // 2, (W + 64) // 2),  # from_numpy_buffer layout
        (W + 64, W // 2 + 40, W // 2 + 8),  # per-plane strides
    ]
    for sid, strides in enumerate(layouts, start=1):
        mgr.open(sid, enc_cfg(Codec.H264))
        packets = encode_stream(mgr, mem, sid, frames, strides)
        mgr.open(sid + 10, dec_cfg(Codec.H264))
        for src, out in zip(frames, decode_packets(mgr, mem, sid + 10, packets), strict=True):
            assert psnr(src, out.planes) >= 35.0
    assert cast(dict[str, int], mgr.statistics()["encode"])["input_bytes_copied"] == 0
    # A frame ending at the very end of the region is copied (no over-read slack there).
    size = abi.frame_size(PixFmt.YUV420P, W, H)
    packets = encode_stream(mgr, mem, 1, frames[:2], src=REGION - size)
    assert cast(dict[str, int], mgr.statistics()["encode"])["input_bytes_copied"] == 2 * size
    assert packets
    # Layout errors are the guest's: stride below row size, frame larger than src_len.
    expect(ErrorCode.BAD_ARG, mgr.encode, 1, mem, [Input(SRC, size, None)], (W - 1, 0, 0), False, DST, DST_LEN)
    expect(ErrorCode.BAD_ARG, mgr.encode, 1, mem, [Input(SRC, size - 1, None)], (0, 0, 0), False, DST, DST_LEN)


def test_odd_geometry_zero_copy(mgr: SessionManager, mem: memoryview) -> None:
    w, h = 161, 121
    frames = [pattern(i, w, h) for i in range(4)]
    mgr.open(1, enc_cfg(Codec.MJPEG, width=w, height=h))
    packets = encode_stream(mgr, mem, 1, frames, (176, 96, 88))
    assert cast(dict[str, int], mgr.statistics()["encode"])["input_bytes_copied"] == 0
    mgr.open(2, dec_cfg(Codec.MJPEG))
    for src, out in zip(frames, decode_packets(mgr, mem, 2, packets), strict=True):
        assert (out.width, out.height) == (w, h)
        assert psnr(src, out.planes) >= 35.0


def test_no_space_then_drain_is_lossless(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(16)]
    mgr.open(1, enc_cfg(Codec.H264, bframes=1, gop=8))
    want = encode_stream(mgr, mem, 1, frames)

    mgr.open(2, enc_cfg(Codec.H264, bframes=1, gop=8))
    got: list[Pkt] = []
    no_space = 0

    def drain_after(exc: CodecError) -> None:
        nonlocal no_space
        no_space += 1
        need = exc.required
        assert need > 64
        again = expect(ErrorCode.NO_SPACE, mgr.encode, 2, mem, [Input(0, 0, None)], (), True, DST, need - 1)
        assert again.required == need
        assert mgr.encode(2, mem, [Input(0, 0, None)], (), True, DST, need)[1] == need
        got.extend(read_packets(mem))

    for i, planes in enumerate(frames):
        length = put(mem, SRC, planes)
        try:
            mgr.encode(2, mem, [Input(SRC, length, i)], (0, 0, 0), False, DST, 64)
            got.extend(read_packets(mem))
        except CodecError as exc:
            assert exc.code == ErrorCode.NO_SPACE
            drain_after(exc)
    try:
        mgr.flush(2, mem, DST, 64)
        got.extend(read_packets(mem))
    except CodecError as exc:
        assert exc.code == ErrorCode.NO_SPACE
        drain_after(exc)
    assert no_space > 0
    assert [(p.data, p.pts, p.dts, p.flags) for p in got] == [
        (p.data, p.pts, p.dts, p.flags) for p in want]

    # Without a drain, the next normal call returns the kept packets first.
    mgr.open(3, enc_cfg(Codec.H264, bframes=1, gop=8))
    got = []
    for i, planes in enumerate(frames):
        length = put(mem, SRC, planes)
        dst_len = 64 if i % 3 == 0 else DST_LEN
        try:
            mgr.encode(3, mem, [Input(SRC, length, i)], (0, 0, 0), False, DST, dst_len)
            got.extend(read_packets(mem))
        except CodecError as exc:
            assert exc.code == ErrorCode.NO_SPACE
    mgr.flush(3, mem, DST, DST_LEN)
    got.extend(read_packets(mem))
    assert [p.data for p in got] == [p.data for p in want]
    assert set(cast(dict[str, int], mgr.statistics()["errors"])) == {"NO_SPACE"}


def test_decoder_no_space_keeps_frames(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(6)]
    mgr.open(1, enc_cfg(Codec.MJPEG))
    packets = encode_stream(mgr, mem, 1, frames)
    mgr.open(2, dec_cfg(Codec.MJPEG, threads=1))
    got: list[Frm] = []
    for p in packets:
        mem[SRC:SRC + len(p.data)] = p.data
        exc = expect(ErrorCode.NO_SPACE, mgr.decode, 2, mem, [Input(SRC, len(p.data), p.pts)], False, False, DST, 1000)
        assert exc.required == abi.out_table_size(abi.OUT_FRAMES, 1) + abi.frame_size(
            PixFmt.YUV420P, W, H)
        assert mgr.decode(2, mem, [Input(0, 0, None)], False, True, DST, exc.required) == (1, exc.required)
        got += read_frames(mem)
    for src, out in zip(frames, got, strict=True):
        assert psnr(src, out.planes) >= 35.0


def test_corrupt_h264_never_crashes(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(N)]
    mgr.open(1, enc_cfg(Codec.H264, gop=6))
    packets = encode_stream(mgr, mem, 1, frames)
    stream = b"".join(p.data for p in packets)
    rng = np.random.default_rng(1234)
    damaged = []
    for _ in range(4):
        buf = bytearray(stream)
        for pos in rng.integers(0, len(buf), 200):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        damaged.append(bytes(buf))
    damaged.append(stream[: len(stream) // 3] + stream[len(stream) // 2:])
    damaged.append(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    damaged.append(b"\x00\x00\x00\x01" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())

    allowed = {ErrorCode.INVALID_DATA, ErrorCode.TOO_LARGE}
    mgr.open(2, dec_cfg(Codec.H264))
    mgr.open(3, dec_cfg(Codec.H264))
    for bad in damaged:
        for pos in range(0, len(bad), 2500):
            piece = bad[pos:pos + 2500]
            mem[SRC:SRC + len(piece)] = piece
            for sid, parse in ((2, True), (3, False)):
                try:
                    mgr.decode(sid, mem, [Input(SRC, len(piece), pos)], parse, False, DST, DST_LEN)
                    read_frames(mem)
                except CodecError as exc:
                    assert exc.code in allowed, exc
        for sid in (2, 3):
            try:
                mgr.flush(sid, mem, DST, DST_LEN)
                read_frames(mem)
            except CodecError as exc:
                assert exc.code in allowed, exc
    assert cast(dict[str, int], mgr.statistics()["errors"])["INVALID_DATA"] > 10
    # A fresh valid stream decodes completely afterwards.
    decoded = decode_chunks(mgr, mem, 2, stream, 4096)
    assert len(decoded) == N
    for src, out in zip(frames, decoded, strict=True):
        assert psnr(src, out.planes) >= 35.0
    decoded = decode_packets(mgr, mem, 3, packets)
    assert [f.pts for f in decoded] == list(range(N))


def test_open_validation(mem: memoryview) -> None:
    mgr = SessionManager(GeometryLimits(max_width=1920, max_height=1088, max_pixels=1920 * 1088),
                         max_sessions=3)
    try:
        expect(ErrorCode.UNSUPPORTED_CODEC, mgr.open, 1, enc_cfg(cast(Codec, 99)))
        expect(ErrorCode.UNSUPPORTED_CODEC, mgr.open, 1, dec_cfg(cast(Codec, 0)))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, SessionConfig(direction=7, codec=Codec.H264))
        expect(ErrorCode.TOO_LARGE, mgr.open, 1, enc_cfg(Codec.H264, width=1922, height=64))
        expect(ErrorCode.TOO_LARGE, mgr.open, 1, enc_cfg(Codec.H264, width=1920, height=1090))
        expect(ErrorCode.TOO_LARGE, mgr.open, 1, dec_cfg(Codec.H264, width=4096, height=64))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, width=0))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, pix_fmt=9))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, dec_cfg(Codec.H264, pix_fmt=PixFmt.RGB24))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, tb_den=0))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, bframes=2))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, preset="warp9"))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.MJPEG, preset="fast"))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, profile="nope"))
        expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(Codec.H264, rc_mode=9))
        expect(ErrorCode.BAD_FLAGS, mgr.open, 1, enc_cfg(Codec.H264, flags=1))
        for opts in ((("bogus", "1"),), (("stats", "x.log"),), (("video_size", "4000x4000"),),
                     (("x264-params", "dump-yuv=out.yuv"),), (("x265-params", "csv=a"),),
                     (("thread_type", "frame"),), (("tune", "../../etc/passwd"),)):
            codec = Codec.HEVC if opts[0][0].startswith("x265") else Codec.H264
            expect(ErrorCode.BAD_ARG, mgr.open, 1, enc_cfg(codec, options=opts))
        mgr.open(1, enc_cfg(Codec.H264, rc_mode=RateControl.BITRATE, rc_value=500_000,
                            preset="veryfast", profile="high",
                            options=(("x264-params", "keyint=30"), ("g", "30"))))
        expect(ErrorCode.BAD_SESSION, mgr.open, 1, dec_cfg(Codec.H264))
        mgr.open(2, dec_cfg(Codec.AV1))
        mgr.open(3, enc_cfg(Codec.VP9, rc_mode=RateControl.QP, rc_value=30, preset="6"))
        expect(ErrorCode.BUSY, mgr.open, 4, dec_cfg(Codec.H264))
        expect(ErrorCode.BAD_SESSION, mgr.encode, 9, mem, [Input(SRC, 10, None)], (), False, DST, 64)
        expect(ErrorCode.BAD_SESSION, mgr.decode, 1, mem, [Input(SRC, 10, None)], False, False, DST, 64)
        expect(ErrorCode.BAD_SESSION, mgr.flush, 9, mem, DST, 64)
        expect(ErrorCode.BAD_SESSION, mgr.close, 9)
        expect(ErrorCode.BAD_RANGE, mgr.flush, 1, mem, REGION - 8, 64)
        mgr.close(3)
        mgr.open(4, enc_cfg(Codec.MPEG4, rc_mode=RateControl.QP, rc_value=5, bframes=1))
        stats = mgr.statistics()
        assert stats["sessions_open"] == 3
        errors = cast(dict[str, int], stats["errors"])
        assert errors["BAD_ARG"] == 17 and errors["UNSUPPORTED_CODEC"] == 2
    finally:
        mgr.close_all()


ENCODE_EXTRA = {
    Codec.H264: {"yuv422p", "yuv444p", "yuv420p10le", "p010le"},
    Codec.HEVC: {"yuv422p", "yuv444p", "yuv420p10le", "p010le"},
    Codec.VP9: {"yuv422p", "yuv444p"},
    Codec.AV1: {"yuv420p10le", "p010le"},
    Codec.MJPEG: {"yuv422p", "yuv444p"},
    Codec.MPEG4: set(),
    Codec.VP8: set(),
}


def test_write_caps(mem: memoryview) -> None:
    caps = GeometryLimits(max_width=4096, max_height=2304, max_pixels=4096 * 2304)
    count, used = write_caps(mem, DST, DST_LEN, caps)
    head = OutHeader.unpack_from(mem, DST)
    assert (head.kind, head.count, count, head.used) == (abi.OUT_JSON, 1, 1, used)
    doc = json.loads(bytes(mem[DST + OutHeader.SIZE:DST + used]).decode())
    assert [c["name"] for c in doc["codecs"]] == ["h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4", "vp8"]
    for entry in doc["codecs"]:
        codec = Codec(entry["id"])
        assert entry["encoder"]["impl"] == abi.ENCODER_IMPL[codec] and entry["encoder"]["available"]
        assert entry["decoder"]["impl"] == abi.DECODER_IMPL[codec] and entry["decoder"]["available"]
        # Every encoder takes the four base formats; the rest only where its FFmpeg encoder
        # encodes them as they are (this build's libvpx has no high bit depth).
        assert set(entry["encoder"]["pix_fmts"]) == {"yuv420p", "nv12", "rgb24", "bgra"} | ENCODE_EXTRA[codec]
        if entry["decoder"]["available"]:
            assert entry["decoder"]["pix_fmts"] == ["native", "yuv420p", "nv12", "yuv422p", "yuv444p",
                                                    "yuv420p10le", "p010le"]
    assert doc["codecs"][0]["encoder"]["zero_copy_pix_fmts"] == ["nv12", "yuv420p", "yuv422p", "yuv444p"]
    assert doc["geometry"] == {"max_width": 4096, "max_height": 2304, "max_pixels": 4096 * 2304}
    assert caps_document(caps) == doc
    exc = expect(ErrorCode.NO_SPACE, write_caps, mem, DST, 100, caps)
    assert exc.required == used


def test_bframes_md5_matches_direct_pyav(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(N)]
    packets = pyav_h264(frames, bframes=3)
    assert any(p.pts != p.dts for p in packets)
    direct = av.CodecContext.create("h264", "r")
    want = []
    for p in packets:
        want += direct.decode(p)
    want += direct.decode(None)
    want_md5 = [md5(frame_planes(f)) for f in want]
    assert len(want_md5) == N

    mgr.open(1, dec_cfg(Codec.H264))
    got = decode_packets(mgr, mem, 1, [Pkt(bytes(p), cast(int, p.pts), 0, 0) for p in packets])
    assert [md5(f.planes) for f in got] == want_md5
    assert [f.pts for f in got] == [f.pts for f in want] == list(range(N))

    mgr.open(2, dec_cfg(Codec.H264, threads=1))
    stream = b"".join(bytes(p) for p in packets)
    got = decode_chunks(mgr, mem, 2, stream, 777)
    assert [md5(f.planes) for f in got] == want_md5


def test_parse_mode_pts_follow_chunks(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(8)]
    packets = pyav_h264(frames, bframes=0)
    mgr.open(1, dec_cfg(Codec.H264))
    got: list[Frm] = []
    for p in packets:
        data = bytes(p)
        mem[SRC:SRC + len(data)] = data
        mgr.decode(1, mem, [Input(SRC, len(data), 1000 + cast(int, p.pts))], True, False, DST, DST_LEN)
        got += read_frames(mem)
    mgr.flush(1, mem, DST, DST_LEN)
    got += read_frames(mem)
    assert [f.pts for f in got] == [1000 + i for i in range(8)]


def test_mpeg4_bframes_input_is_copied(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(12)]
    mgr.open(1, enc_cfg(Codec.MPEG4, bframes=1))
    size = abi.frame_size(PixFmt.YUV420P, W, H)
    packets: list[Pkt] = []
    for i, planes in enumerate(frames):
        put(mem, SRC, planes)
        mgr.encode(1, mem, [Input(SRC, size, i)], (0, 0, 0), False, DST, DST_LEN)
        mem[SRC:SRC + size] = bytes(size)  # the guest reuses its buffer at once
        packets += read_packets(mem)
    mgr.flush(1, mem, DST, DST_LEN)
    packets += read_packets(mem)
    assert any(p.pts != p.dts for p in packets)
    assert cast(dict[str, int], mgr.statistics()["encode"])["input_bytes_copied"] == 12 * size
    mgr.open(2, dec_cfg(Codec.MPEG4))
    decoded = decode_packets(mgr, mem, 2, packets)
    assert [f.pts for f in decoded] == list(range(12))
    for src, out in zip(frames, decoded, strict=True):
        assert psnr(src, out.planes) >= 35.0


def test_flush_starts_a_new_stream(mgr: SessionManager, mem: memoryview) -> None:
    frames = [pattern(i) for i in range(6)]
    for codec in (Codec.H264, Codec.VP9):
        mgr.open(int(codec), enc_cfg(codec))
        first = encode_stream(mgr, mem, int(codec), frames)
        second = encode_stream(mgr, mem, int(codec), frames)
        assert second[0].flags & abi.PACKET_KEY
        mgr.open(100 + int(codec), dec_cfg(codec))
        decoded = decode_packets(mgr, mem, 100 + int(codec), second)
        assert len(first) == len(second) == len(decoded) == 6
        for src, out in zip(frames, decoded, strict=True):
            assert psnr(src, out.planes) >= 35.0


def test_force_keyframe_and_auto_pts(mgr: SessionManager, mem: memoryview) -> None:
    mgr.open(1, enc_cfg(Codec.H264, tb_num=1, tb_den=90000))
    got: list[Pkt] = []
    for i in range(10):
        length = put(mem, SRC, pattern(i))
        mgr.encode(1, mem, [Input(SRC, length, None, i == 5)], (0, 0, 0), False, DST, DST_LEN)
        got += read_packets(mem)
    mgr.flush(1, mem, DST, DST_LEN)
    got += read_packets(mem)
    assert [p.pts for p in got] == [3000 * i for i in range(10)]
    assert [i for i, p in enumerate(got) if p.flags & abi.PACKET_KEY] == [0, 5]


def test_bytes_copied_per_frame_720p(mgr: SessionManager, mem: memoryview) -> None:
    w, h, n = 1280, 720, 4
    frames = [pattern(i, w, h) for i in range(n)]
    mgr.open(1, enc_cfg(Codec.H264, width=w, height=h))
    packets = encode_stream(mgr, mem, 1, frames)
    enc = cast(dict[str, float], mgr.statistics()["encode"])
    assert enc["input_bytes_copied"] == 0
    assert enc["bytes_copied"] == sum(len(p.data) for p in packets)
    mgr.open(2, dec_cfg(Codec.H264))
    decoded = decode_packets(mgr, mem, 2, packets)
    dec = cast(dict[str, float], mgr.statistics()["decode"])
    assert dec["output_bytes_copied"] == n * w * h * 3 // 2
    assert dec["input_bytes_copied"] == sum(len(p.data) for p in packets)
    assert dec["bytes_copied_per_frame"] == dec["bytes_copied"] / n
    assert len(decoded) == n


def test_backlog_limit_and_empty_input(mgr: SessionManager, mem: memoryview) -> None:
    from codec_backend import av_sessions

    w, h = 16, 16
    mgr.open(1, enc_cfg(Codec.MJPEG, width=w, height=h))
    length = put(mem, SRC, pattern(0, w, h))
    for i in range(av_sessions.MAX_PENDING_ITEMS):
        expect(ErrorCode.NO_SPACE, mgr.encode, 1, mem, [Input(SRC, length, i)], (0, 0, 0), False, DST, 0)
    expect(ErrorCode.BUSY, mgr.encode, 1, mem, [Input(SRC, length, None)], (0, 0, 0), False, DST, 0)
    count, _ = mgr.encode(1, mem, [Input(0, 0, None)], (), True, DST, DST_LEN)
    assert count == av_sessions.MAX_PENDING_ITEMS
    assert [p.pts for p in read_packets(mem)] == list(range(count))
    assert mgr.encode(1, mem, [Input(SRC, length, None)], (0, 0, 0), False, DST, DST_LEN)[0] == 1
    assert read_packets(mem)[0].pts == count
    # A zero-length decode chunk consumes nothing (it must not become an EOF packet).
    mgr.open(2, dec_cfg(Codec.H264))
    assert mgr.decode(2, mem, [Input(SRC, 0, None)], False, False, DST, DST_LEN) == (0, 64)
    assert mgr.flush(2, mem, DST, DST_LEN) == (0, 64)


def test_parser_without_frame_boundary_is_reset(mgr: SessionManager, mem: memoryview) -> None:
    from codec_backend import av_sessions

    mgr.open(1, dec_cfg(Codec.H264))
    chunk = 8 << 20
    mem[SRC:SRC + chunk] = b"\xff" * chunk  # no start code anywhere
    with pytest.raises(CodecError) as info:
        for _ in range(av_sessions.MAX_PARSER_BACKLOG // chunk + 1):
            mgr.decode(1, mem, [Input(SRC, chunk, None)], True, False, DST, DST_LEN)
    assert info.value.code == ErrorCode.INVALID_DATA
    frames = [pattern(i) for i in range(4)]
    stream = b"".join(bytes(p) for p in pyav_h264(frames, bframes=0))
    assert len(decode_chunks(mgr, mem, 1, stream, 1500)) == 4


@pytest.mark.parametrize("codec", ENCODERS, ids=lambda c: c.name)
def test_shared_context_builders_match_the_sessions(mgr: SessionManager, mem: memoryview, codec: Codec) -> None:
    """open_encoder_context/open_decoder_context (the benchmark floor) are the sessions' own setup."""
    frames = [pattern(i) for i in range(12)]
    cfg = enc_cfg(codec, gop=6, bframes=1 if codec in (Codec.H264, Codec.MPEG4) else 0)
    mgr.open(1, cfg)
    got = encode_stream(mgr, mem, 1, frames)
    ctx = open_encoder_context(cfg)
    assert ctx.is_open and ctx.pix_fmt == "yuv420p" and (ctx.width, ctx.height) == (W, H)
    want: list[Any] = []
    for i, planes in enumerate(frames):
        f = VideoFrame.from_numpy_buffer(np.concatenate([p.ravel() for p in planes]).reshape(H * 3 // 2, W),
                                         "yuv420p")
        f.pts = i
        want += ctx.encode(f)
    want += ctx.encode(None)
    assert len(got) == len(want) == len(frames)
    assert [p.data for p in got] == [bytes(p) for p in want]
    dcfg = dec_cfg(codec)
    mgr.open(2, dcfg)
    for _ in range(2):  # twice: frame-threaded decoders must still be deterministic
        decoded = decode_packets(mgr, mem, 2, got)
        dctx = open_decoder_context(dcfg)
        direct = [f for p in [*got, None] for f in dctx.decode(None if p is None else padded(p.data))]
        assert [md5(f.planes) for f in decoded] == [md5(frame_planes(f)) for f in direct]
