"""A decode whose output is larger than the guest's heap drains in parts and loses nothing.

One DECODE task of a PARSE-mode stream fed in big chunks may queue far more frames than the
region holds.  A drain (DRAIN_PENDING) then returns the longest prefix of whole frames that
fits its dst, with FRAME_MORE on the last entry while more is queued (docs/abi.md, output
tables); guestlib drains in parts into what its heap can afford (``guestlib/session.py``,
``_Session._run`` and ``_stream``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import pytest

import guestlib
from codec_backend import framepool
from codec_backend.av_sessions import CodecError, SessionManager, open_decoder_context
from codec_backend.inputs import Input
from guestlib.codec import decoder_config
from guestlib.device import Device
from guestlib.heap import OutOfMemory
from hostd.daemon import Hostd
from vmediad import abi
from vmediad.abi import DescFlag, ErrorCode, FrameEntry, Op, OutHeader, PixFmt

W, H, FRAMES = 640, 480, 150
REGION = 16 << 20
CHUNK = 1 << 20
FRAME_BYTES = abi.frame_size(PixFmt.YUV420P, W, H)


def md5(data: bytes | np.ndarray) -> str:
    return hashlib.md5(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """150 frames of 640x480 H.264 in 1.1 MB: one 1 MiB chunk decodes to about 139 frames,
    64 MB, four times the 16 MiB region."""
    path = Path(tmp_path_factory.mktemp("large")) / "s.h264"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=25:duration=6",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-crf", "30",
                    "-x264-params", "keyint=50", str(path)], check=True)
    raw = path.read_bytes()
    assert CHUNK < len(raw) < 2 * CHUNK
    return raw


@pytest.fixture(scope="module")
def want(stream: bytes) -> list[str]:
    """MD5 of every frame's packed planes, PyAV decoding the stream directly with the
    context a DECODE session builds (native format)."""
    ctx = open_decoder_context(decoder_config("h264"))
    out = []
    for pkt in [*ctx.parse(stream), *ctx.parse(None), None]:
        for f in ctx.decode(pkt):
            assert f.format.name == "yuv420p"
            out.append(md5(f.to_ndarray()))
    assert len(out) == FRAMES
    return out


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="large", region_size=REGION) as d:
        yield d


def packed(frame: Any) -> str:
    return md5(frame.to_ndarray())


def chunks_of(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw), size)]


# --- guestlib: decode(), flush(), decode_stream() ---------------------------------------------
@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["1MiB-chunks", "one-chunk"])
@pytest.mark.parametrize("pool", [False, True], ids=["copied", "pooled"])
def test_decode_returns_every_frame_of_an_output_larger_than_the_region(
        dev: Device, stream: bytes, want: list[str], chunk: int, pool: bool) -> None:
    size = (dict(width=W, height=H) if pool else {})
    base = dev.heap.allocated()
    got: list[str] = []
    per_call: list[int] = []
    with dev.decoder("h264", parse=True, **size) as dec:
        assert (dec.pool_size > 0) == pool
        pooled = 0
        for part in chunks_of(stream, chunk or len(stream)):
            frames = dec.decode(part)
            per_call.append(len(frames))
            pooled += sum(f.pooled for f in frames)
            got += [packed(f) for f in frames]  # valid until the next call
        frames = dec.flush()
        per_call.append(len(frames))
        got += [packed(f) for f in frames]
        assert dec.partial_drains >= 4 and dec.no_space_retries >= 1
        assert (pooled > 0) == pool
    assert got == want
    # One task's output was at least twice the region: it cannot have been one buffer.
    assert max(per_call) * FRAME_BYTES >= 2 * REGION
    assert dev.heap.allocated() == base  # every buffer of the session is back


@pytest.mark.parametrize("pool", [False, True], ids=["copied", "pooled"])
def test_decode_stream_returns_every_frame(dev: Device, stream: bytes, want: list[str], pool: bool) -> None:
    size = (dict(width=W, height=H) if pool else {})
    with dev.decoder("h264", parse=True, **size) as dec:
        got = [packed(f) for f in dec.decode_stream(chunks_of(stream, CHUNK))]
        assert dec.partial_drains >= 4
        assert got == want
        # One chunk: the whole stream in one task, then the flush.
        assert [packed(f) for f in dec.decode_stream([stream])] == want


# --- the ABI by hand: a drain returns what fits, NO_SPACE names the first frame -------------
def _table(dev: Device, off: int) -> tuple[OutHeader, list[FrameEntry]]:
    mem = dev.region.mem
    head = OutHeader.unpack_from(mem, off)
    assert head.kind == abi.OUT_FRAMES
    return head, [FrameEntry.unpack_from(mem, off + OutHeader.SIZE + i * FrameEntry.SIZE) for i in range(head.count)]


def test_a_drain_too_small_for_one_frame_names_its_size_and_loses_nothing(
        dev: Device, stream: bytes, want: list[str]) -> None:
    one = abi.out_table_size(abi.OUT_FRAMES, 1) + FRAME_BYTES
    src = dev.put(stream[:CHUNK])
    dst = dev.alloc(8 << 20)
    got: list[str] = []
    with dev.decoder("h264", parse=True) as dec:

        def run(op: Op, flags: int, size: int, src_: tuple[int, int] = (0, 0)) -> Any:
            return dev.submit(op, flags=flags, session=dec.session, src=src_, dst=(dst.offset, size)).completion()

        def collect(c: Any, size: int) -> list[FrameEntry]:
            assert (c.status, c.error) == (abi.Status.DONE, ErrorCode.OK)
            head, entries = _table(dev, dst.offset)
            assert (c.result, c.result_len) == (head.count, head.used) and head.used <= size
            for e in entries:
                assert e.flags & ~abi.FRAME_MORE == 0  # copied, as decoded
                planes = dev.region.mem[dst.offset + e.offset:dst.offset + e.offset + FRAME_BYTES]
                got.append(md5(bytes(planes)))
            return entries

        drain = int(DescFlag.DRAIN_PENDING)
        c = run(Op.DECODE, int(DescFlag.PARSE), 4096, (src.offset, CHUNK))
        assert c.error == ErrorCode.NO_SPACE
        total = c.result_len
        assert total > 2 * REGION  # every frame of the chunk: all or nothing without a drain
        for size in (0, 64, 4096, one - 1):  # not even the first frame fits: NO_SPACE, its size
            c = run(Op.DECODE, drain, size)
            assert (c.status, c.error, c.result_len) == (abi.Status.ERROR, ErrorCode.NO_SPACE, one)
        # Exactly one frame's room: that frame, FRAME_MORE on its entry.
        entries = collect(run(Op.DECODE, drain, one), one)
        assert len(entries) == 1 and entries[0].flags == abi.FRAME_MORE
        # Room for two and a half: two, the second says more.
        size = abi.out_table_size(abi.OUT_FRAMES, 3) + 2 * abi.align(FRAME_BYTES) + FRAME_BYTES // 2
        entries = collect(run(Op.DECODE, drain, size), size)
        assert [e.flags for e in entries] == [0, abi.FRAME_MORE]
        # The rest in parts, each the longest prefix that fits.
        parts = 0
        while True:
            entries = collect(run(Op.DECODE, drain, dst.size), dst.size)
            n = len(entries)
            parts += 1
            assert all(e.flags == 0 for e in entries[:-1])
            if not entries[-1].flags & abi.FRAME_MORE:
                break
            assert abi.out_table_size(abi.OUT_FRAMES, n + 1) + n * abi.align(FRAME_BYTES) + FRAME_BYTES > dst.size
        # Every frame the chunk queued arrived (the NO_SPACE size was theirs), in as few parts as fit.
        n = len(got)
        assert total == abi.out_table_size(abi.OUT_FRAMES, n) + (n - 1) * abi.align(FRAME_BYTES) + FRAME_BYTES
        per = max(k for k in range(1, 64)
                  if abi.out_table_size(abi.OUT_FRAMES, k) + (k - 1) * abi.align(FRAME_BYTES) + FRAME_BYTES <= dst.size)
        assert parts == -(-(n - 3) // per) >= 4
        # Drained: an empty table, then the rest of the stream.
        assert collect(run(Op.DECODE, drain, 64), 64) == []
        got += [packed(f) for f in dec.decode(stream[CHUNK:])]
        got += [packed(f) for f in dec.flush()]
    dev.free(src)
    dev.free(dst)
    assert got == want


# --- a failed growth: the session closes cleanly, the queued frames are kept ----------------
def test_a_session_whose_buffer_could_not_grow_closes_cleanly(dev: Device, stream: bytes,
                                                             want: list[str]) -> None:
    src = dev.put(stream)  # decoded in place: no staging buffer needed
    base = dev.heap.allocated()
    dec = dev.decoder("h264", parse=True)
    dev.free(dec._out)
    dec._out = dev.alloc(4096)  # smaller than one frame
    hog = dev.alloc(dev.heap.available() - FRAME_BYTES // 2)  # and no room for one either
    with pytest.raises(OutOfMemory, match="needs a"):
        dec.decode(src)
    assert dec.no_space_retries == 2 and dec.partial_drains == 0  # tried a part, which fit nothing
    dev.free(hog)
    # Nothing was lost: the frames stayed queued in the session and come with the next call.
    got = [packed(f) for f in dec.flush()]
    assert got == want
    dec.close()
    assert dev.heap.allocated() == base

    # Closed right after the failure, with the heap still full.
    dec = dev.decoder("h264", parse=True)
    dev.free(dec._out)
    dec._out = dev.alloc(4096)
    hog = dev.alloc(dev.heap.available() - FRAME_BYTES // 2)
    with pytest.raises(OutOfMemory):
        dec.decode(src)
    dec.close()  # no double free of the buffer that could not be replaced
    dev.free(hog)
    assert dev.heap.allocated() == base
    dev.free(src)
    assert dev.heap.allocated() == 0

    # An encoder keeps all-or-nothing drains: the same failure, the same clean close.
    with dev.encoder("h264", W, H, 25) as enc:
        dev.free(enc._out)
        enc._out = dev.alloc(128)
        frame = enc.new_frame(keep=True)
        for i, p in enumerate(frame.planes):
            p[:] = np.arange(p.size, dtype=np.uint8).reshape(p.shape) * (i + 1)
        hog = dev.alloc(dev.heap.available() - 4096)
        packets, n = [], 0
        with pytest.raises(OutOfMemory):
            for _ in range(8):
                n += 1
                packets += enc.encode(frame)
        dev.free(hog)
        packets += enc.flush()  # nothing was lost: the packets stayed queued
        assert len(packets) == n
        enc.release(frame)
    assert dev.heap.allocated() == 0


# --- the worker alone: prefixes of the C loop's lent groups and of PyAV's frames ------------
@pytest.mark.parametrize("loop", [True, False], ids=["c-loop", "pyav"])
def test_worker_drains_a_prefix_and_takes_back_the_lends_it_leaves(
        stream: bytes, want: list[str], monkeypatch: pytest.MonkeyPatch, loop: bool) -> None:
    if loop and not framepool.probe().loop:
        pytest.skip(f"decode loop unavailable: {framepool.probe().loop_reason}")
    if not framepool.probe().ok:
        pytest.skip(f"frame pools unavailable: {framepool.probe().reason}")
    monkeypatch.setenv("VMEDIAD_DECODE_LOOP", "1" if loop else "0")
    ctx = cast(Any, av.CodecContext.create("h264", "r"))
    packets = [bytes(p) for p in ctx.parse(stream)][:12]
    area = mmap.mmap(-1, 48 << 20)
    mem = memoryview(area)
    pool_off, pool_len, dst_off, src = 8 << 20, 32 << 20, 0, 40 << 20
    cfg = dataclasses.replace(decoder_config("h264", threads=1), flags=abi.SessionFlag.FRAME_POOL)
    sm = SessionManager()
    sm.open(1, cfg, mem, (pool_off, pool_len))
    inputs = []
    for i, p in enumerate(packets):
        mem[src:src + len(p)] = p
        inputs.append(Input(src, len(p), i, False))
        src += len(p)

    def lent() -> int:
        return int(np.frombuffer(mem, np.uint32, abi.POOL_MAX_SLOTS, pool_off).sum())

    got: list[str] = []

    def table() -> list[FrameEntry]:
        head = OutHeader.unpack_from(mem, dst_off)
        entries = [FrameEntry.unpack_from(mem, dst_off + OutHeader.SIZE + k * FrameEntry.SIZE)
                   for k in range(head.count)]
        for e in entries:
            assert e.flags & abi.FRAME_POOLED
            base = pool_off + e.offset
            got.append(md5(b"".join(
                np.ndarray((rows, rb), np.uint8, buffer=mem, offset=base + o, strides=(s, 1)).tobytes()
                for (rows, rb), o, s in zip(abi.plane_shapes(PixFmt.YUV420P, e.width, e.height),
                                            e.plane_offsets, e.strides, strict=True))))
            word = np.frombuffer(mem, np.uint32, 1, pool_off + abi.pool_lent_word(e.slot))
            word[0] -= 1  # the guest gives the slot back
        return entries

    try:
        with pytest.raises(CodecError) as exc:
            sm.decode(1, mem, inputs, False, False, dst_off, 64)
        queued = cast(int, sm.statistics()["pending_items"])  # all but the decoder's delay
        assert queued >= 8
        assert exc.value.code == ErrorCode.NO_SPACE and exc.value.required == abi.out_table_size(
            abi.OUT_FRAMES, queued)  # pooled frames cost only their entry
        # Room for 3 entries (and for 3 and nearly a fourth) takes 3 of them.
        for i, size in enumerate((abi.out_table_size(abi.OUT_FRAMES, 3), abi.out_table_size(abi.OUT_FRAMES, 4) - 1)):
            assert sm.decode(1, mem, [], False, True, dst_off, size) == (3, abi.out_table_size(abi.OUT_FRAMES, 3))
            entries = table()
            assert [e.flags & abi.FRAME_MORE for e in entries] == [0, 0, abi.FRAME_MORE]
            # PyAV's frames are lent when a task emits them: those left queued were taken back.
            # The C loop lends its frames as it decodes them: the queued ones stay lent.
            assert lent() == (queued - 3 * (i + 1) if loop else 0)
        with pytest.raises(CodecError) as exc:
            sm.decode(1, mem, [], False, True, dst_off, 64)  # not even one entry
        assert exc.value.code == ErrorCode.NO_SPACE and exc.value.required == abi.out_table_size(abi.OUT_FRAMES, 1)
        stats = cast(dict[str, Any], sm.statistics())
        assert stats["pending_items"] == queued - 6
        assert sm.decode(1, mem, [], False, True, dst_off, 8 << 20)[0] == queued - 6
        assert not any(e.flags & abi.FRAME_MORE for e in table())
        sm.flush(1, mem, dst_off, 8 << 20)
        table()
        assert lent() == 0
        decode = cast(dict[str, Any], sm.statistics()["decode"])
        assert decode["frames_out"] == 12 and (decode["frames_looped"] > 0) == loop
    finally:
        sm.close_all()
        mem.release()
        area.close()
    assert got == want[:12]
