"""When the frame pool's probe fails (a PyAV or FFmpeg whose layout it cannot prove), decode
falls back to copying frames into the task's output and stays bit-exact.

In a real worker process the probe is made to fail by ``VMEDIAD_FRAME_POOL=0`` in its
environment; in process, by a wrong PyAV object offset, so the probe's own checks fail."""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable
from typing import Any, cast

import pytest

import guestlib
from codec_backend import framepool
from guestlib.codec import Packet, decoder_config
from hostd.daemon import Hostd
from tests.integration.test_codec_device import FPS, H, W, fill, md5, pattern, pyav_decode, vm_stats
from vmediad import abi
from vmediad.abi import ErrorCode, FrameEntry, OutHeader

N = 16


def _encode(h: Hostd) -> list[Packet]:
    with guestlib.attach(h.socket_path, name="enc", region_size=32 << 20) as g, \
            g.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
        packets: list[Packet] = [p for i in range(N) for p in enc.encode(fill(enc.new_frame(), pattern(i)))]
        packets += enc.flush()
        return packets


def test_worker_whose_probe_fails_decodes_by_copying(make_hostd: Callable[..., Hostd],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMEDIAD_FRAME_POOL", "0")  # inherited by the workers hostd spawns
    h = make_hostd()
    packets = _encode(h)
    want = pyav_decode("h264", packets)
    assert len(want) == N
    with guestlib.attach(h.socket_path, name="fb", region_size=64 << 20) as dev:
        # Asked for directly, a pool is BACKEND, with the probe's reason at dst.
        pool = dev.alloc(4 << 20)
        cfg = dataclasses.replace(decoder_config("h264"), flags=int(abi.SessionFlag.FRAME_POOL))
        blob = dev.put(cfg.pack())
        c = dev.submit(abi.Op.SESSION_OPEN, src=(blob.offset, len(cfg.pack())),
                       dst=(pool.offset, pool.size)).completion()
        assert (c.status, c.error) == (abi.Status.ERROR, ErrorCode.BACKEND)
        assert abi.unpack_error_record(pool.mem[:c.result_len], ErrorCode.BACKEND) == (
            "frame pools unavailable: frame pools are turned off (VMEDIAD_FRAME_POOL=0)")
        dev.free(blob)
        dev.free(pool)
        # guestlib asks for a pool (a size is given), gets BACKEND and opens the session without one.
        with dev.decoder("h264", parse=False, width=W, height=H) as dec:
            assert dec.pool_size == 0
            got = []
            for p in packets:
                for f in dec.decode(p.data, pts=p.pts):
                    assert not f.pooled and f.planes[0].flags.writeable  # a copy in the output buffer
                    got.append((f.pts, md5(f.to_ndarray())))
            got += [(f.pts, md5(f.to_ndarray())) for f in dec.flush()]
        assert got == want
        # The bitstream was copied once (into FFmpeg's padded packets), and every picture once.
        payload = sum(len(p.data) for p in packets)
        assert vm_stats(h, "fb")["bytes_copied"] == payload + N * W * H * 3 // 2


def test_a_probe_that_cannot_prove_pyavs_layout_falls_back(make_hostd: Callable[..., Hostd],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's own checks, run against a wrong PyAV object offset (a PyAV whose layout
    moved): no pool, and a session decodes into dst exactly as PyAV does."""
    from codec_backend.av_sessions import CodecError, SessionManager
    from codec_backend.inputs import Input

    h = make_hostd()
    packets = _encode(h)
    want = pyav_decode("h264", packets)
    monkeypatch.setattr(framepool, "_PYAV_FRAME_PTR", framepool._PYAV_FRAME_PTR + 8)
    monkeypatch.setattr(framepool, "_PROBE", None)  # probe again, this time on the wrong offset
    pr = framepool.probe()
    assert not pr.ok and not pr.loop
    assert pr.reason == "the AVFrame behind a PyAV VideoFrame is not where expected"
    area = mmap.mmap(-1, 32 << 20)
    mem = memoryview(area)
    pool_off, dst_off, dst_len, src = 16 << 20, 0, 8 << 20, 24 << 20
    sm = SessionManager()
    pooled = dataclasses.replace(decoder_config("h264"), flags=int(abi.SessionFlag.FRAME_POOL))
    with pytest.raises(CodecError) as exc:
        sm.open(1, pooled, mem, (pool_off, 4 << 20))
    assert exc.value.code == ErrorCode.BACKEND and f"frame pools unavailable: {pr.reason}" in str(exc.value)
    sm.open(1, decoder_config("h264"), mem)
    got = []
    try:
        for i, p in enumerate([*packets, None]):
            if p is None:
                sm.flush(1, mem, dst_off, dst_len)
            else:
                mem[src:src + len(p.data)] = p.data
                sm.decode(1, mem, [Input(src, len(p.data), p.pts)], False, False, dst_off, dst_len)
            head = OutHeader.unpack_from(mem, dst_off)
            assert head.kind == abi.OUT_FRAMES, i
            for k in range(head.count):
                e = FrameEntry.unpack_from(mem, dst_off + OutHeader.SIZE + k * FrameEntry.SIZE)
                assert (e.flags, e.slot, e.strides) == (0, 0, (W, W // 2, W // 2))
                start = dst_off + e.offset
                planes = bytes(mem[start:start + W * H * 3 // 2])
                got.append((None if e.pts == abi.NO_PTS else e.pts, md5(planes)))
        stats = cast(dict[str, Any], sm.statistics())
    finally:
        sm.close_all()
    assert got == want
    assert stats["frame_pool"]["available"] is False and stats["decode"]["frames_pooled"] == 0
