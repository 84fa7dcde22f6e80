"""Zero-copy decode: decoders allocate their pictures in a frame pool in guest memory
(``fp_get_buffer2`` in ``codec_backend/framepool.c``), frames are reported by slot and
lent to the guest, and frames that find no free slot are copied as without a pool."""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator
from typing import Any, cast

import av
import numpy as np
import pytest
from av.codec.context import ThreadType

import guestlib
from codec_backend import framepool
from codec_backend.framepool import FramePool
from guestlib.codec import MIN_POOL_FRAMES, Decoder, Packet, decoder_config, pool_slot_bytes
from guestlib.device import Device
from hostd.daemon import Hostd
from tests.integration.test_codec_device import FPS, H, W, fill, md5, padded, pattern, pyav_decode, vm_stats
from vmediad import abi
from vmediad.abi import ErrorCode, FrameEntry, Op, OutHeader

N = 24


def encode(dev: Device, w: int, h: int, n: int = N, **kw: Any) -> list[Packet]:
    packets: list[Packet] = []
    with dev.encoder("h264", w, h, FPS, **kw) as enc:
        for i in range(n):
            packets += enc.encode(fill(enc.new_frame(), pattern(i, w=w, h=h)))
        packets += enc.flush()
    return packets


def lent(dec: Decoder) -> list[int]:
    """The pool's lent counters, as the guest sees them."""
    pool = cast(Any, dec)._pool
    return [dec.device.region.load32(pool.offset + abi.pool_lent_word(i)) for i in range(abi.POOL_MAX_SLOTS)]


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="pool", region_size=64 << 20) as d:
        yield d


# --- the libav side, in process -------------------------------------------------------------
def test_probe_proves_the_libav_layout_it_relies_on() -> None:
    pr = framepool.probe()
    assert pr.ok, pr.reason
    assert pr.off_get_buffer2 % 8 == 0 and 0 < pr.off_get_buffer2 < 1024
    assert pr.off_buf % 8 == 0 and 120 <= pr.off_buf < 1024
    area = mmap.mmap(-1, 1 << 20)
    base = int(np.frombuffer(area, np.uint8, 1).ctypes.data)
    pool = FramePool(base, 1 << 20)
    try:
        # Anything that is not a PyAV decoder context is refused, never written to.
        assert not pool.attach(object())
        assert not pool.attach(av.VideoFrame(16, 16, "yuv420p"))
        assert not pool.attach(av.CodecContext.create("libdav1d", "r"))  # no AV_CODEC_CAP_DR1
        assert pool.statistics().hits == 0
    finally:
        pool.close()
    with pytest.raises(ValueError, match="at least"):
        FramePool(base, abi.POOL_MIN - 1)


def test_lend_frame_reads_the_avframe_behind_a_pyav_frame(dev: Device) -> None:
    """The worker's per-frame path: slot, offsets and line sizes straight from the AVFrame
    must be what PyAV's own plane objects say; a bad shape lends nothing."""
    packets = encode(dev, W, H, n=6)
    area = mmap.mmap(-1, 64 << 20)
    base = int(np.frombuffer(area, np.uint8, 1).ctypes.data)
    lent_words = np.frombuffer(area, np.uint32, abi.POOL_MAX_SLOTS)
    pool = FramePool(base, 64 << 20)
    ctx = av.CodecContext.create("h264", "r")
    assert pool.attach(ctx)
    shapes = abi.plane_shapes(abi.PixFmt.YUV420P, W, H)
    shape = FramePool.shape(shapes)
    frames: list[Any] = []
    try:
        frames = [f for p in [*packets, None] for f in ctx.decode(None if p is None else padded(p.data))]
        assert len(frames) == 6
        slots = set()
        for f in frames:
            got = pool.lend_frame(f, shape)
            assert got is not None
            slot, slot_off, offs, lines = got
            slots.add(slot)
            assert lent_words[slot] == 1
            assert [base + slot_off + o for o in offs] == [p.buffer_ptr for p in f.planes]
            assert lines == [p.line_size for p in f.planes]
            pool.unlend(slot)
            assert lent_words[slot] == 0
        assert len(slots) == 6
        # Wider rows than the planes have, or more rows than the slot holds: refused, not lent.
        for bad in ([(H, W + 4096), (H // 2, W // 2), (H // 2, W // 2)], [(1 << 20, W), (1, 1), (1, 1)]):
            with pytest.raises(ValueError, match=r"narrower|outside"):
                pool.lend_frame(frames[0], FramePool.shape(bad))
            assert not lent_words.any()
        # A picture in libav's own memory is not the pool's; anything but a VideoFrame is refused.
        assert pool.lend_frame(av.VideoFrame(W, H, "yuv420p"), shape) is None
        with pytest.raises(TypeError):
            pool.lend_frame(cast(Any, object()), shape)
    finally:
        del ctx, frames
        pool.close()
        del lent_words
        area.close()


def _pyav_pool_decode(packets: list[Packet], pool: FramePool | None, hold: int = 0) -> tuple[list[str], int]:
    """Decode with frame threads; returns the MD5s and how many frames were in the pool."""
    ctx = av.CodecContext.create("h264", "r")
    ctx.thread_type, ctx.thread_count = ThreadType.AUTO, 0
    if pool is not None:
        assert pool.attach(ctx)
    out: list[str] = []
    held: list[Any] = []
    pooled = 0
    for p in [*packets, None]:
        for f in ctx.decode(None if p is None else padded(p.data)):
            out.append(md5(f.to_ndarray()))
            pooled += pool is not None and pool.owns(f.planes[0].buffer_ptr)
            held = [*held, f][-hold:] if hold else []
    del ctx, held
    return out, pooled


def test_decoder_writes_into_the_pool_bit_identically(dev: Device) -> None:
    packets = encode(dev, W, H, bframes=True, gop=8)
    ref = [m for _, m in pyav_decode("h264", packets)]
    size = 8 << 20
    area = mmap.mmap(-1, size)
    base = int(np.frombuffer(area, np.uint8, 1).ctypes.data)
    pool = FramePool(base, size)
    got, pooled = _pyav_pool_decode(packets, pool, hold=4)
    st = pool.statistics()
    assert got == ref and pooled == len(ref)
    assert st.misses == 0 and st.hits >= len(ref) and st.relayouts == 1
    assert st.in_use == 0  # every slot went back once the context and the frames were gone
    assert st.slots * st.slot_size <= size - abi.POOL_HEADER and st.slot_size >= W * H * 3 // 2
    # Too few slots for the decoder's references and threads: the rest is decoded into
    # libav's own memory, and the output is the same.
    pool.close()
    small = FramePool(base, abi.POOL_HEADER + 2 * st.slot_size)
    got, pooled = _pyav_pool_decode(packets, small, hold=4)
    st2 = small.statistics()
    small.close()
    assert got == ref and 0 < pooled < len(ref) and st2.misses > 0 and st2.slots == 2
    # A counter the guest never brings back to 0 keeps its slot out of use.
    lent = np.frombuffer(area, np.uint32, abi.POOL_MAX_SLOTS)
    lent[:] = 1
    blocked = FramePool(base, size)
    got, pooled = _pyav_pool_decode(packets, blocked)
    assert got == ref and pooled == 0
    blocked.close()


def test_pool_follows_a_change_of_picture_size(dev: Device) -> None:
    """A stream that switches from 320x240 to 640x480: the slots are laid out again once
    no picture of the old size is in use, and frames in between are copied."""
    packets = encode(dev, W, H, 12) + encode(dev, 640, 480, 12)
    ref = pyav_decode("h264", packets)
    size = 16 << 20
    area = mmap.mmap(-1, size)
    pool = FramePool(int(np.frombuffer(area, np.uint8, 1).ctypes.data), size)
    got, pooled = _pyav_pool_decode(packets, pool)
    st = pool.statistics()
    pool.close()
    assert got == [m for _, m in ref]
    assert st.relayouts == 2 and pooled >= 20
    assert st.slot_size >= 640 * 480 * 3 // 2


# --- through the device ------------------------------------------------------------------------
def test_device_decode_is_zero_copy_with_a_pool(hostd: Hostd, dev: Device) -> None:
    packets = encode(dev, W, H, bframes=True, gop=8)
    ref = pyav_decode("h264", packets)
    payload = sum(len(p.data) for p in packets)
    with guestlib.attach(hostd.socket_path, name="zc", region_size=64 << 20) as g:
        with g.decoder("h264", parse=False, width=W, height=H) as dec:
            assert dec.pool_size > 0
            got = []
            for p in packets:
                frames = dec.decode(p.data, pts=p.pts)
                for f in frames:
                    assert f.pooled and not f.planes[0].flags.writeable
                    with pytest.raises(ValueError):
                        f.planes[0][0, 0] = 1  # the decoder may still predict from it
                    got.append((f.pts, md5(f.to_ndarray())))
                # Lent until the next call: one count per frame handed out by this one.
                assert sum(lent(dec)) == len(frames)
            got += [(f.pts, md5(f.to_ndarray())) for f in dec.flush()]
            assert got == ref
            dec.decode(b"")  # the next call gives the flushed frames back
            assert sum(lent(dec)) == 0
        st = vm_stats(hostd, "zc")
        # Only the bitstream was copied (once, into FFmpeg's padded packets): no planes.
        assert st["bytes_copied"] == payload
        # Frame.release() gives a slot back at once.
        with g.decoder("h264", parse=False, width=W, height=H) as dec:
            frames = dec.decode(b"".join(p.data for p in packets[:12]), parse=True)
            assert frames and sum(lent(dec)) == len(frames)
            frames[0].release()
            frames[0].release()  # idempotent
            assert sum(lent(dec)) == len(frames) - 1
            assert not frames[0].pooled and frames[1].pooled


def test_a_guest_that_keeps_every_slot_gets_copies(dev: Device) -> None:
    packets = encode(dev, W, H)
    ref = pyav_decode("h264", packets)
    with dev.decoder("h264", parse=False, width=W, height=H, pool_frames=8) as dec:
        pool = cast(Any, dec)._pool
        for i in range(abi.POOL_MAX_SLOTS):
            dev.region.store32(pool.offset + abi.pool_lent_word(i), 1)
        got = [(f.pts, md5(f.to_ndarray()), f.pooled) for f in dec.decode_stream(packets, depth=3, batch=2)]
        assert [g[:2] for g in got] == ref and not any(g[2] for g in got)
    # The same memory as a fresh pool (the guest zeroes the counters): every frame in place.
    with dev.decoder("h264", parse=False, width=W, height=H) as dec:
        assert cast(Any, dec)._pool.offset == pool.offset
        got = [(f.pts, md5(f.to_ndarray()), f.pooled) for f in dec.decode_stream(packets, depth=3, batch=2)]
        assert [g[:2] for g in got] == ref and all(g[2] for g in got)


def test_streams_lend_a_frame_until_the_consumer_moves_on(dev: Device) -> None:
    packets = encode(dev, W, H)
    ref = pyav_decode("h264", packets)
    with dev.decoder("h264", parse=False, width=W, height=H) as dec:
        got = []
        for f in dec.decode_stream(packets, depth=3, batch=2):
            # Lent: this frame, the rest of its task's output and what the tasks in flight
            # have emitted, never the frames the consumer has moved past (or it would grow).
            assert f.pooled and 1 <= sum(lent(dec)) <= 3 * (2 + 1) + 1
            got.append((f.pts, md5(f.to_ndarray())))
        assert got == ref and sum(lent(dec)) == 0
        # Stopped early: the frame in hand stays valid until the next call; the frames
        # still in flight come back later as private copies (nothing lost, nothing lent).
        it = dec.decode_stream(packets, depth=3, batch=2, flush=True)
        first = []
        for _ in range(5):
            held = next(it)
            first.append((held.pts, md5(held.to_ndarray())))
        it.close()
        assert held.pooled and sum(lent(dec)) == 1
        assert md5(held.to_ndarray()) == ref[4][1]
        rest = dec.decode(b"")  # the next call: the backlog, and the held frame is given back
        assert sum(lent(dec)) == 0 and rest and not any(f.pooled for f in rest)
        got = first + [(f.pts, md5(f.to_ndarray())) for f in rest]
        assert got == ref[:len(got)]


def test_frame_pool_requests_are_checked(dev: Device) -> None:
    def open_raw(cfg: abi.SessionConfig, dst: tuple[int, int]) -> ErrorCode:
        blob = dev.put(cfg.pack())
        try:
            c = dev.submit(Op.SESSION_OPEN, src=(blob.offset, len(cfg.pack())), dst=dst).completion()
        finally:
            dev.free(blob)
        if c.error == ErrorCode.OK:
            dev.submit(Op.SESSION_CLOSE, session=c.result).completion()
        return ErrorCode(c.error)

    pool = dev.alloc(1 << 20)
    try:
        dec = decoder_config("h264")
        flagged = dataclasses.replace(dec, flags=int(abi.SessionFlag.FRAME_POOL))
        enc = abi.SessionConfig(direction=abi.Direction.ENCODE, codec=abi.Codec.H264, width=W, height=H,
                                flags=int(abi.SessionFlag.FRAME_POOL))
        assert open_raw(flagged, (pool.offset, pool.size)) == ErrorCode.OK
        assert open_raw(flagged, (0, 0)) == ErrorCode.BAD_ARG
        assert open_raw(flagged, (pool.offset, abi.POOL_MIN - 1)) == ErrorCode.BAD_ARG
        assert open_raw(dec, (pool.offset, pool.size)) == ErrorCode.BAD_ARG  # a pool without the flag
        assert open_raw(enc, (pool.offset, pool.size)) == ErrorCode.BAD_FLAGS
        unknown = abi.SessionConfig(direction=abi.Direction.DECODE, codec=abi.Codec.H264, flags=1 << 7)
        assert open_raw(unknown, (0, 0)) == ErrorCode.BAD_FLAGS
        assert open_raw(flagged, (dev.layout.region_size - 4096, 1 << 20)) == ErrorCode.BAD_RANGE
        assert open_raw(flagged, (pool.offset + 4, pool.size - 4)) == ErrorCode.BAD_ARG  # lent counters unaligned
        # libdav1d has no direct rendering: libavcodec allows it no custom allocator.
        av1 = dataclasses.replace(decoder_config("av1"), flags=int(abi.SessionFlag.FRAME_POOL))
        assert open_raw(av1, (pool.offset, pool.size)) == ErrorCode.BAD_FLAGS
    finally:
        dev.free(pool)
    with pytest.raises(ValueError, match="negative"):
        dev.decoder("h264", width=W, height=H, pool_frames=-1)
    with pytest.raises(ValueError, match="picture size"):
        dev.decoder("h264", pool_frames=8)
    # No size, or pool_frames=0: no pool (frames are copied into the output buffers).
    with dev.decoder("h264") as a, dev.decoder("h264", width=W, height=H, pool_frames=0) as b:
        assert a.pool_size == b.pool_size == 0
    # A pool never takes more than half the free heap: 48 pictures of 1080p would not fit
    # in this 64 MB region, so the pool holds as many as half of it does (whole pages).
    # Native sizes for the largest pictures (3 bytes a pixel) and is made if it holds at
    # least MIN_POOL_FRAMES 8-bit 4:2:0 ones; a named format sizes for its own.
    free = dev.heap.available()
    room = (free // 2 - abi.POOL_HEADER) // abi.PAGE_SIZE * abi.PAGE_SIZE
    assert MIN_POOL_FRAMES * pool_slot_bytes(1920, 1088, abi.PixFmt.YUV420P) <= room
    assert room < MIN_POOL_FRAMES * pool_slot_bytes(1920, 1088, abi.PixFmt.NATIVE) < 2 * room
    for fmt in ("native", "yuv420p"):
        with dev.decoder("h264", pix_fmt=fmt, width=1920, height=1088) as big:
            assert big.pool_size == abi.POOL_HEADER + room
    # Both: at most the pictures asked for.
    with dev.decoder("h264", width=320, height=240, pool_frames=9) as small:
        assert small.pool_size == abi.POOL_HEADER + 9 * pool_slot_bytes(320, 240, abi.PixFmt.NATIVE)
    with dev.decoder("h264", pix_fmt="yuv420p", width=320, height=240, pool_frames=9) as small:
        assert small.pool_size == abi.POOL_HEADER + 9 * pool_slot_bytes(320, 240, abi.PixFmt.YUV420P)


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4", "vp8"])
def test_every_decoder_is_bit_identical_with_a_pool(dev: Device, codec: str) -> None:
    """Six of the seven decoders allocate through get_buffer2 and decode in place; libdav1d
    (av1) has no AV_CODEC_CAP_DR1 (it allocates its own pictures), so the pool is not
    attached and its frames are copied, equal all the same."""
    packets: list[Packet] = []
    with dev.encoder(codec, W, H, FPS) as enc:
        for i in range(12):
            packets += enc.encode(fill(enc.new_frame(), pattern(i)))
        packets += enc.flush()
    ref = pyav_decode(codec, packets)
    with dev.decoder(codec, parse=False, width=W, height=H) as dec:
        # The worker refuses a pool for av1 (BAD_FLAGS) and guestlib opens without one.
        assert bool(dec.pool_size) == (codec != "av1")
        got, pooled = [], 0
        for p in [*packets, None]:
            for f in dec.flush() if p is None else dec.decode(p.data, pts=p.pts):
                got.append((f.pts, md5(f.to_ndarray())))
                pooled += f.pooled
    assert got == ref and len(got) == 12
    assert pooled == (0 if codec == "av1" else 12)


def test_worker_reports_pooled_frames_by_slot_and_counts_no_plane_bytes(dev: Device) -> None:
    """The worker side alone (SessionManager on a private mapping): the exact table entry of
    a pooled frame, the lent counter it bumps, and the statistics."""
    from codec_backend.av_sessions import SessionManager
    from codec_backend.inputs import Input

    packets = encode(dev, W, H, 8)
    ref = [m for _, m in pyav_decode("h264", packets)]
    area = mmap.mmap(-1, 64 << 20)
    mem = memoryview(area)
    src, dst, pool, pool_len = 0, 1 << 20, 8 << 20, 32 << 20
    mgr = SessionManager()
    cfg = dataclasses.replace(decoder_config("h264", threads=1), flags=int(abi.SessionFlag.FRAME_POOL))
    mgr.open(1, cfg, mem, (pool, pool_len))
    got, payload = [], 0
    for p in [*packets, None]:
        if p is None:
            count, used = mgr.flush(1, mem, dst, 1 << 20)
        else:
            mem[src:src + len(p.data)] = p.data
            payload += len(p.data)
            count, used = mgr.decode(1, mem, [Input(src, len(p.data), p.pts)], False, False, dst, 1 << 20)
        assert used == abi.out_table_size(abi.OUT_FRAMES, count)  # no plane bytes in dst
        for k in range(count):
            e = FrameEntry.unpack_from(mem, dst + OutHeader.SIZE + k * FrameEntry.SIZE)
            s0, s1, s2 = e.strides
            assert (e.width, e.height, e.pix_fmt, e.nplanes, e.flags) == (W, H, abi.PixFmt.YUV420P, 3,
                                                                          abi.FRAME_POOLED)
            assert e.offset >= abi.POOL_HEADER and e.offset % 64 == 0 and s0 >= W and s1 >= W // 2 and s2 >= W // 2
            lent_at = pool + abi.pool_lent_word(e.slot)
            assert int.from_bytes(mem[lent_at:lent_at + 4], "little") == 1
            mem[lent_at:lent_at + 4] = bytes(4)  # the guest gives it back
            planes = [np.ndarray((rows, rb), np.uint8, buffer=mem, offset=pool + e.offset + o, strides=(s, 1))
                      for (rows, rb), o, s in zip(abi.plane_shapes(abi.PixFmt.YUV420P, W, H), e.plane_offsets,
                                                  e.strides, strict=True)]
            got.append(md5(np.concatenate([p_.reshape(-1) for p_ in planes])))
    assert got == ref
    st = mgr.statistics()
    dec = cast(dict[str, Any], st["decode"])
    assert dec["frames_out"] == dec["frames_pooled"] == len(ref)
    assert dec["output_bytes_copied"] == 0 and dec["input_bytes_copied"] == payload
    fp = cast(dict[str, Any], st["frame_pool"])
    assert fp["available"] and fp["pools"] == 1 and fp["hits"] >= len(ref) and fp["misses"] == 0
    mgr.close_all()
    assert cast(dict[str, Any], mgr.statistics()["frame_pool"])["pools"] == 0
    mem.release()


def test_ten_bit_pictures_are_decoded_in_place(dev: Device) -> None:
    """A 10-bit H.264 stream in a native session: every picture decoded into a slot, bit-exact
    in its own format.  Asked for as yuv420p, its pictures are decoded into libav's memory
    and converted (the decoder never writes a slot: only formats emitted as decoded get one).
    Why a guest's writes into a 10-bit slot are its own business: test_native_format.py."""
    from fractions import Fraction

    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = W, H, "yuv420p10le", Fraction(1, FPS)
    enc.options = {"preset": "ultrafast"}
    enc.open()
    data = []
    for i in range(8):
        src = av.VideoFrame.from_ndarray(pattern(i)[0].astype(np.uint16) * 4, format="gray16le").reformat(
            format="yuv420p10le")
        src.pts = i
        data += [bytes(p) for p in enc.encode(src)]
    data += [bytes(p) for p in enc.encode(None)]
    ref_ctx = av.CodecContext.create("h264", "r")
    decoded = [f for d in [*data, None] for f in ref_ctx.decode(None if d is None else padded(d))]
    native = [md5(b"".join(np.ndarray((rows, rb), np.uint8, buffer=memoryview(f.planes[i]),
                                      strides=(f.planes[i].line_size, 1)).tobytes()
                           for i, (rows, rb) in enumerate(abi.plane_shapes(abi.PixFmt.YUV420P10LE, W, H))))
              for f in decoded]
    as_420 = [md5(f.reformat(format="yuv420p").to_ndarray()) for f in decoded]
    assert len(native) == 8
    with dev.decoder("h264", parse=False, width=W, height=H) as dec:
        got = [(md5(f.to_ndarray()), f.pooled, f.format) for d in data for f in dec.decode(d)]
        got += [(md5(f.to_ndarray()), f.pooled, f.format) for f in dec.flush()]
    assert got == [(m, True, "yuv420p10le") for m in native]
    with dev.decoder("h264", pix_fmt="yuv420p", parse=False, width=W, height=H) as dec:
        assert dec.pool_size
        slots = cast(Any, dec)._pool.mem[abi.POOL_HEADER:]
        slots[:] = b"\x5a" * len(slots)
        got = [(md5(f.to_ndarray()), f.pooled, f.converted) for d in data for f in dec.decode(d)]
        got += [(md5(f.to_ndarray()), f.pooled, f.converted) for f in dec.flush()]
        assert bytes(slots) == b"\x5a" * len(slots)  # the decoder never wrote a slot
    assert got == [(m, False, True) for m in as_420]


def test_a_release_after_close_touches_nothing(dev: Device) -> None:
    """A stream still suspended when its decoder is closed: the pool's memory may already
    belong to another buffer, so giving frames back must not write there."""
    packets = encode(dev, W, H)
    dec = dev.decoder("h264", parse=False, width=W, height=H)
    pool_off, pool_size = cast(Any, dec)._pool.offset, dec.pool_size
    it = dec.decode_stream(packets, depth=3, batch=2)
    first = next(it)
    assert first.pooled
    dec.close()
    other = dev.alloc(pool_size)  # the heap hands the same memory out again
    assert other.offset == pool_off
    other.mem[:4096] = b"\xa5" * 4096
    it.close()  # type: ignore[attr-defined]  # a generator: gives back the frames of the tasks in flight, and the one in hand
    first.release()
    assert bytes(other.mem[:4096]) == b"\xa5" * 4096
    dev.free(other)


def test_guest_checks_every_pooled_entry_before_it_makes_views(dev: Device) -> None:
    """guestlib reads a pooled entry's planes only inside its pool and makes the views on
    first access; a malformed table fails the call and gives back every slot it lent."""
    w, h, step = 64, 48, 8192
    with dev.decoder("h264", parse=False, width=W, height=H) as dec:
        pool = cast(Any, dec)._pool
        out = cast(Any, dec)._out
        mem = dev.region.mem

        def entry(slot: int, o2: int = 64 * 48 + 32 * 24, nplanes: int = 3) -> FrameEntry:
            return FrameEntry(offset=abi.POOL_HEADER + slot * step, width=w, height=h,
                              pix_fmt=int(abi.PixFmt.YUV420P), nplanes=nplanes, pts=7 + slot,
                              plane_offsets=(0, 64 * 48, o2), strides=(64, 32, 32), flags=abi.FRAME_POOLED,
                              slot=slot)

        def table(*entries: FrameEntry) -> None:
            for slot in range(len(entries)):
                dev.region.store32(pool.offset + abi.pool_lent_word(slot), 1)  # as the worker lends
            OutHeader(abi.OUT_FRAMES, len(entries), 0).pack_into(mem, out.offset)
            for i, e in enumerate(entries):
                e.pack_into(mem, out.offset + OutHeader.SIZE + i * FrameEntry.SIZE)

        for slot in range(3):
            start = pool.offset + abi.POOL_HEADER + slot * step
            mem[start:start + w * h * 3 // 2] = bytes([slot + 1]) * (w * h * 3 // 2)
        table(entry(0), entry(1), entry(2))
        frames = cast(Any, dec)._frames(out.offset)
        assert [f.pts for f in frames] == [7, 8, 9] and all(f.pooled for f in frames)
        assert lent(dec)[:3] == [1, 1, 1]
        for slot, f in enumerate(frames):
            assert [p.shape for p in f.planes] == [(h, w), (h // 2, w // 2), (h // 2, w // 2)]
            assert all((p == slot + 1).all() and not p.flags.writeable for p in f.planes)
            assert f.planes is f.planes  # made once
            f.release()
        assert lent(dec)[:3] == [0, 0, 0]
        # A plane past the pool's end, then a plane count that is not the format's: refused,
        # and the slots of the whole table are given back.
        for bad in (entry(1, o2=pool.size), entry(1, nplanes=2)):
            table(entry(0), bad, entry(2))
            with pytest.raises(ValueError):
                cast(Any, dec)._frames(out.offset)
            assert lent(dec)[:3] == [0, 0, 0]


def _session_decode(packets: list[Packet], tasks: list[list[int]], loop: bool,
                    monkeypatch: pytest.MonkeyPatch, threads: int = 0) -> tuple[list[Any], dict[str, Any]]:
    """Decode ``packets`` in a worker's SessionManager (in process) with a frame pool, in tasks
    of the given packet indexes, then flush.  Per task: the error name, or per frame (pts,
    width, height, pooled, MD5 of its visible planes read through its table entry, planes,
    pixel format); every
    slot is given back after the task, as a guest does."""
    from codec_backend.av_sessions import CodecError, SessionManager
    from codec_backend.inputs import Input

    monkeypatch.setenv("VMEDIAD_DECODE_LOOP", "1" if loop else "0")
    area = mmap.mmap(-1, 64 << 20)
    mem = memoryview(area)
    pool_off, pool_len, dst_off, dst_len, src = 16 << 20, 24 << 20, 0, 16 << 20, 48 << 20
    cfg = dataclasses.replace(decoder_config("h264", threads=threads), flags=abi.SessionFlag.FRAME_POOL)
    sm = SessionManager()
    sm.open(1, cfg, mem, (pool_off, pool_len))
    inputs = []
    for p in packets:
        mem[src:src + len(p.data)] = p.data
        inputs.append(Input(src, len(p.data), p.pts, False))
        src += len(p.data)
    out: list[Any] = []

    def table() -> list[Any]:
        frames = []
        for k in range(OutHeader.unpack_from(mem, dst_off).count):
            e = FrameEntry.unpack_from(mem, dst_off + OutHeader.SIZE + k * FrameEntry.SIZE)
            w, h, pooled = e.width, e.height, bool(e.flags & abi.FRAME_POOLED)
            base = (pool_off if pooled else dst_off) + e.offset
            planes = b"".join(
                bytes(np.ndarray((rows, rb), np.uint8, buffer=mem, offset=base + o, strides=(s, 1)).tobytes())
                for (rows, rb), o, s in zip(abi.plane_shapes(abi.PixFmt.YUV420P, w, h), e.plane_offsets, e.strides,
                                            strict=True))
            frames.append((e.pts, w, h, pooled, md5(planes), e.nplanes, e.pix_fmt))
            if pooled:  # the guest gives the slot back
                word = np.frombuffer(mem, np.uint32, 1, pool_off + abi.pool_lent_word(e.slot))
                word[0] -= 1
        return frames

    for task in tasks:
        try:
            sm.decode(1, mem, [inputs[i] for i in task], False, False, dst_off, dst_len)
            out.append(table())
        except CodecError as exc:
            out.append(exc.code.name)
    sm.flush(1, mem, dst_off, dst_len)
    out.append(table())
    stats = cast(dict[str, Any], sm.statistics()["decode"])
    sm.close(1)
    return out, stats


def _unpooled(out: list[Any]) -> list[Any]:
    """``_session_decode``'s output without each frame's pooled flag."""
    return [t if not isinstance(t, list) else [(*f[:3], *f[4:]) for f in t] for t in out]


@pytest.mark.parametrize("threads", [1, 0], ids=["one-thread", "frame-threads"])
def test_the_c_decode_loop_returns_what_pyav_decode_returns(dev: Device, monkeypatch: pytest.MonkeyPatch,
                                                             threads: int) -> None:
    """framepool.DecodeLoop against the PyAV path it replaces, in the same session code:
    same frames, pts, sizes and pooling, task by task, through a change of picture size
    (pictures the loop hands back to PyAV), a corrupt chunk (INVALID_DATA, the session goes
    on) and a flush.

    With frame threads, which pictures after the size change get a slot is timing: the pool
    is relaid only once libav's threads have dropped every old-size picture, so either path
    may pool the first new-size picture or not (seen on both).  There the pooled flags and
    counts are left out; one decoding thread makes them exact."""
    if not framepool.probe().loop:
        pytest.skip(f"decode loop unavailable: {framepool.probe().loop_reason}")
    packets = encode(dev, W, H, 12, bframes=True, gop=6) + encode(dev, 640, 480, 12)
    bad = Packet(b"\x00\x00\x01\x65" + b"\xff" * 700, packets[5].pts, packets[5].dts, False)
    packets = [*packets[:5], bad, *packets[5:]]
    n = len(packets)
    tasks = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    on, on_stats = _session_decode(packets, tasks, True, monkeypatch, threads)
    off, off_stats = _session_decode(packets, tasks, False, monkeypatch, threads)
    frames = [f for t in on if isinstance(t, list) for f in t]
    assert "INVALID_DATA" in on and len(frames) >= 20
    assert {(f[1], f[2]) for f in frames} == {(W, H), (640, 480)}
    assert {f[5:] for f in frames} == {(3, abi.PixFmt.YUV420P)}  # entries the C wrote, too
    assert off_stats["frames_looped"] == 0 and on_stats["frames_looped"] >= len(frames) // 2
    for key in ("chunks_in", "packets_in", "bytes_in", "frames_out"):
        assert on_stats[key] == off_stats[key], key
    if threads == 1:
        assert on == off
        assert on_stats["frames_pooled"] == off_stats["frames_pooled"] >= on_stats["frames_looped"]
        # Both sizes are pooled in places: the loop lent some of each, and gave some back.
        assert {(f[1], f[2]) for f in frames if f[3]} == {(W, H), (640, 480)}
        assert not all(f[3] for f in frames)
    else:
        assert _unpooled(on) == _unpooled(off)
        assert on_stats["frames_pooled"] >= on_stats["frames_looped"]


def test_bind_follows_a_context_that_reuses_the_old_ones_id() -> None:
    """A context reopened after FLUSH may be a new PyAV object with the freed one's id: the C
    loop must then use the new AVCodecContext, not the freed one (a use after free).

    CPython hands a freed object's id to the next one often but not always, so the reuse is
    forced: the loop's cached id is set to the new context's id while its cached pointer is
    still the old context's, exactly the state id reuse leaves behind."""
    if not framepool.probe().loop:
        pytest.skip(f"decode loop unavailable: {framepool.probe().loop_reason}")
    from codec_backend.framepool import DecodeLoop, _context_pointer

    area = mmap.mmap(-1, 8 << 20)
    pool = FramePool(int(np.frombuffer(area, np.uint8, 1).ctypes.data), 8 << 20)
    loop = DecodeLoop(pool)
    try:
        old = av.CodecContext.create("h264", "r")
        assert pool.attach(old)
        old.open()
        assert loop.bind(old)
        old_ptr = loop._avctx
        assert old_ptr == _context_pointer(old)
        new = av.CodecContext.create("h264", "r")
        assert pool.attach(new)
        new.open()
        live = _context_pointer(new)
        assert live is not None and live != old_ptr
        loop._ctx_id = id(new)  # what id reuse leaves: the same key, the old pointer
        assert loop.bind(new)
        assert loop._avctx == live
    finally:
        loop.close()
        pool.close()


def test_pooled_unparsed_decode_after_flush(dev: Device) -> None:
    """Decode, FLUSH (the context is dropped), decode the stream again in the same pooled,
    unparsed session: the C loop runs on the reopened context and the frames are exact."""
    if not framepool.probe().loop:
        pytest.skip(f"decode loop unavailable: {framepool.probe().loop_reason}")
    from codec_backend.av_sessions import SessionManager, _DecoderSession
    from codec_backend.framepool import _ABI, _AV, _context_pointer, _free
    from codec_backend.inputs import Input

    assert _AV is not None
    packets = encode(dev, W, H, 10)
    want = [m for _, m in pyav_decode("h264", packets)]
    area = mmap.mmap(-1, 48 << 20)
    mem = memoryview(area)
    pool_off, pool_len, dst_off, dst_len, src = 16 << 20, 24 << 20, 0, 16 << 20, 40 << 20
    cfg = dataclasses.replace(decoder_config("h264", threads=1), flags=abi.SessionFlag.FRAME_POOL)
    sm = SessionManager()
    sm.open(1, cfg, mem, (pool_off, pool_len))
    session = cast(_DecoderSession, sm._sessions[1])
    assert session._loop is not None
    inputs = []
    for p in packets:
        mem[src:src + len(p.data)] = p.data
        inputs.append(Input(src, len(p.data), p.pts, False))
        src += len(p.data)

    def frames() -> list[str]:
        out = []
        for k in range(OutHeader.unpack_from(mem, dst_off).count):
            e = FrameEntry.unpack_from(mem, dst_off + OutHeader.SIZE + k * FrameEntry.SIZE)
            pooled = bool(e.flags & abi.FRAME_POOLED)
            base = (pool_off if pooled else dst_off) + e.offset
            planes = b"".join(np.ndarray((rows, rb), np.uint8, buffer=mem, offset=base + o, strides=(s, 1)).tobytes()
                              for (rows, rb), o, s in zip(abi.plane_shapes(abi.PixFmt.YUV420P, e.width, e.height),
                                                          e.plane_offsets, e.strides, strict=True))
            out.append(md5(planes))
            if pooled:
                np.frombuffer(mem, np.uint32, 1, pool_off + abi.pool_lent_word(e.slot))[0] -= 1
        return out

    def run() -> list[str]:
        got: list[str] = []
        for i in range(0, len(inputs), 4):
            sm.decode(1, mem, inputs[i:i + 4], False, False, dst_off, dst_len)
            assert session._loop is not None and session._ctx is not None
            assert session._loop._avctx == _context_pointer(session._ctx)  # the live context
            got += frames()
        sm.flush(1, mem, dst_off, dst_len)
        return got + frames()

    try:
        assert run() == want
        looped = cast(dict[str, int], sm.statistics()["decode"])["frames_looped"]
        assert looped > 0
        # The flushed context is freed; its memory is taken so the reopened one lies elsewhere.
        hold = _AV.codec.avcodec_alloc_context3(_ABI.NULL)
        try:
            assert run() == want
        finally:
            _free(_AV.codec.avcodec_free_context, hold)
        assert cast(dict[str, int], sm.statistics()["decode"])["frames_looped"] > looped
    finally:
        sm.close(1)
