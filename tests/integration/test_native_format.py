"""Decoded frames keep the stream's native pixel format by default (``pix_fmt="native"``,
abi.PixFmt.NATIVE), formats the device has none for are converted to the nearest one and
flagged (abi.FRAME_CONVERTED), and the frame pool takes every device format, 10-bit
included: a guest that writes garbage into its lent 10-bit slots harms only its own worker.

Streams are made here with PyAV's encoders (small pictures, a few frames); every frame is
compared with a direct PyAV decode of the same packets, hashed over its visible planes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, cast

import av
import numpy as np
import pytest
from av.video.codeccontext import VideoCodecContext

import guestlib
from guestlib.codec import Decoder, Frame, pix_fmt_id, pool_slot_bytes
from guestlib.device import Device, DeviceError
from hostd.daemon import Hostd
from vmediad import abi
from vmediad.abi import ErrorCode, PixFmt

W, H, N = 128, 96, 8
_X265: dict[str, str] = {"x265-params": "log-level=error"}
_VP9: dict[str, str] = {"deadline": "realtime", "cpu-used": "8"}


def make_stream(impl: str, pix_fmt: str, n: int = N, w: int = W, h: int = H, seed: int = 0,
                options: dict[str, str] | None = None) -> list[bytes]:
    """``n`` frames of a moving picture encoded by PyAV's ``impl`` from ``pix_fmt`` pictures."""
    enc = cast(VideoCodecContext, av.CodecContext.create(impl, "w"))
    enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, pix_fmt, Fraction(1, 25)
    enc.options = {"preset": "ultrafast", **(options or {})} if impl == "libx264" else dict(options or {})
    enc.open()
    y, x = np.mgrid[0:h, 0:w]
    out: list[bytes] = []
    for i in range(n):
        rgb = np.stack([(x * 2 + 5 * i + seed) % 256, (y * 3 + 3 * i) % 256, ((x + y) * 2 - 7 * i) % 256],
                       axis=-1).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
        frame.pts = i
        out += [bytes(p) for p in enc.encode(frame)]
    out += [bytes(p) for p in enc.encode(None)]
    return out


def _padded(data: bytes) -> av.Packet[Any]:
    pkt = av.Packet(len(data))  # FFmpeg's zero padding (av.Packet(bytes) has none)
    memoryview(pkt)[:] = data
    return pkt


def visible_md5(planes: list[Any]) -> str:
    h = hashlib.md5()
    for p in planes:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def _pyav_frames(codec: str, packets: list[bytes]) -> Iterator[av.VideoFrame]:
    ctx = cast(VideoCodecContext, av.CodecContext.create(abi.DECODER_IMPL[guestlib.codec.codec_id(codec)], "r"))
    for data in [*packets, None]:
        yield from ctx.decode(None if data is None else _padded(data))


def decoder_formats(codec: str, packets: list[bytes]) -> set[str]:
    """The libav formats a direct PyAV decode of ``packets`` outputs."""
    return {f.format.name for f in _pyav_frames(codec, packets)}


def reference(codec: str, packets: list[bytes], to: str | None = None) -> list[tuple[str, str]]:
    """(format name, MD5 of the visible planes) of every frame a direct PyAV decode outputs,
    in the decoder's own format or converted ``to`` another."""
    out = []
    for f in _pyav_frames(codec, packets):
        g = f if to is None or f.format.name == to else f.reformat(format=to)
        name = g.format.name.replace("yuvj", "yuv")  # the full-range twins share the layout
        fmt = guestlib.codec.PIX_FMTS.get(name)
        assert fmt is not None, f"the reference decoded {name}: name a target format"
        planes = [np.ndarray((rows, rb), np.uint8, buffer=memoryview(g.planes[i]), strides=(g.planes[i].line_size, 1))
                  for i, (rows, rb) in enumerate(abi.plane_shapes(fmt, g.width, g.height))]
        out.append((name, visible_md5(planes)))
    return out


def device_decode(dec: Decoder, packets: list[bytes]) -> list[tuple[str, str, bool, bool]]:
    """(format, MD5, pooled, converted) of every frame the device outputs, packet by packet."""
    out = []
    for i, data in enumerate([*packets, b""]):
        frames = dec.decode(data, pts=i) if data else dec.flush()
        out += [(f.format, visible_md5(f.planes), f.pooled, f.converted) for f in frames]
    return out


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="native", region_size=64 << 20) as d:
        yield d


# --- native by default ---------------------------------------------------------------------------
# (codec, PyAV encoder, libav format encoded, encoder options, the format every frame must come back in)
NATIVE_CASES = {
    "h264-yuv422p": ("h264", "libx264", "yuv422p", {}, "yuv422p"),
    "h264-yuv444p": ("h264", "libx264", "yuv444p", {}, "yuv444p"),
    "h264-yuv420p10le": ("h264", "libx264", "yuv420p10le", {}, "yuv420p10le"),
    "hevc-yuv420p10le": ("hevc", "libx265", "yuv420p10le", _X265, "yuv420p10le"),
    "mjpeg-yuvj422p": ("mjpeg", "mjpeg", "yuvj422p", {}, "yuv422p"),  # full range: the same layout
    "vp9-yuv444p": ("vp9", "libvpx-vp9", "yuv444p", _VP9, "yuv444p"),
}


@pytest.mark.parametrize("pool", [False, True], ids=["copied", "pooled"])
@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_frames_keep_the_streams_format_by_default(dev: Device, case: str, pool: bool) -> None:
    """No pix_fmt: each frame in the decoder's own format, bit-exact, not converted; with a
    frame pool every frame (10-bit ones too) is decoded in place."""
    codec, impl, fmt, opts, want = NATIVE_CASES[case]
    packets = make_stream(impl, fmt, options=opts)
    ref = reference(codec, packets)
    assert [r[0] for r in ref] == [want] * N
    size = {"width": W, "height": H} if pool else {}
    with dev.decoder(codec, parse=False, **size) as dec:
        assert bool(dec.pool_size) == pool
        got = device_decode(dec, packets)
    assert [(f, m) for f, m, _, _ in got] == ref
    assert [(p, c) for _, _, p, c in got] == [(pool, False)] * N


# --- converted: formats the device has none for ----------------------------------------------
CONVERTED_CASES = {
    "hevc-gray": ("hevc", "libx265", "gray", _X265, "yuv420p"),
    "vp9-yuv440p": ("vp9", "libvpx-vp9", "yuv440p", _VP9, "yuv444p"),
    "hevc-yuv420p12le": ("hevc", "libx265", "yuv420p12le", _X265, "yuv420p10le"),
    "hevc-gray10le": ("hevc", "libx265", "gray10le", _X265, "yuv420p10le"),
}


@pytest.mark.parametrize("case", list(CONVERTED_CASES))
def test_other_formats_are_converted_to_the_nearest_and_flagged(dev: Device, case: str) -> None:
    """gray, yuv440p, 12-bit: deeper than 8 bits become yuv420p10le, 8-bit ones the 8-bit format
    that keeps their chroma (gray: yuv420p, yuv440p: yuv444p; vmediad.avformats), exactly as
    swscale converts them, and every such frame says it was converted (FRAME_CONVERTED).
    With a pool they are copied (a slot holds only pictures emitted as decoded)."""
    codec, impl, fmt, opts, want = CONVERTED_CASES[case]
    packets = make_stream(impl, fmt, options=opts)
    assert decoder_formats(codec, packets) == {fmt}  # what the decoder itself makes
    ref = reference(codec, packets, to=want)
    assert len(ref) == N and {r[0] for r in ref} == {want}
    with dev.decoder(codec, parse=False, width=W, height=H) as dec:
        assert dec.pool_size
        got = device_decode(dec, packets)
    assert [(f, m) for f, m, _, _ in got] == ref
    assert [(p, c) for _, _, p, c in got] == [(False, True)] * N


def test_a_named_format_converts_and_flags_only_what_it_converts(dev: Device) -> None:
    """pix_fmt names the output: a 4:2:2 stream asked for as yuv420p or nv12 is converted
    (flagged); a yuv420p stream asked for as yuv420p comes back as decoded, in the pool."""
    s422 = make_stream("libx264", "yuv422p")
    s420 = make_stream("libx264", "yuv420p", seed=9)
    for name in ("yuv420p", "nv12"):
        ref = reference("h264", s422, to=name)
        with dev.decoder("h264", pix_fmt=name, parse=False, width=W, height=H) as dec:
            got = device_decode(dec, s422)
        assert [(f, m) for f, m, _, _ in got] == ref and len(ref) == N
        assert [(p, c) for _, _, p, c in got] == [(False, True)] * N
    with dev.decoder("h264", pix_fmt="yuv420p", parse=False, width=W, height=H) as dec:
        got = device_decode(dec, s420)
    assert [(f, m) for f, m, _, _ in got] == reference("h264", s420)
    assert [(p, c) for _, _, p, c in got] == [(True, False)] * N


@pytest.mark.parametrize("mode", ["packets-pool", "packets", "parse-pool"])
def test_the_format_may_change_mid_stream(dev: Device, mode: str) -> None:
    """One H.264 stream whose sequence parameters change from 4:2:0 to 4:2:2 to 10-bit and back:
    every entry names its own picture's format, every frame is bit-exact.  Unparsed with a
    pool, the C decode loop hands each new format back to the session, which lends it in a
    slot laid out again for it."""
    parts = [make_stream("libx264", fmt, n=6, seed=k) for k, fmt in
             enumerate(["yuv420p", "yuv422p", "yuv420p10le", "yuv420p"])]
    packets = [p for part in parts for p in part]
    ref = reference("h264", packets)
    assert [r[0] for r in ref] == ["yuv420p"] * 6 + ["yuv422p"] * 6 + ["yuv420p10le"] * 6 + ["yuv420p"] * 6
    parse, pool = mode.startswith("parse"), mode.endswith("-pool")
    size = {"width": W, "height": H} if pool else {}
    with dev.decoder("h264", parse=parse, threads=1, **size) as dec:
        if parse:
            stream = b"".join(packets)
            got = device_decode(dec, [stream[i:i + 4096] for i in range(0, len(stream), 4096)])
        else:
            got = device_decode(dec, packets)
    assert [(f, m) for f, m, _, _ in got] == ref
    assert not any(c for *_, c in got)
    if pool:  # each format was pooled in places (a new one only once the old is out of use)
        assert {f for f, _, p, _ in got if p} == {"yuv420p", "yuv422p", "yuv420p10le"}
    else:
        assert not any(p for _, _, p, _ in got)


def test_native_is_a_decode_format_only(dev: Device) -> None:
    assert pix_fmt_id("native") == PixFmt.NATIVE and int(PixFmt.NATIVE) == 0
    # Sizing a native decoder: its largest possible picture, a slot that holds any of them.
    for w, h in ((W, H), (1921, 1081)):
        assert abi.frame_size(PixFmt.NATIVE, w, h) == max(abi.frame_size(f, w, h) for f in abi.NATIVE_OUTPUTS)
        assert pool_slot_bytes(w, h, PixFmt.NATIVE) == max(pool_slot_bytes(w, h, f) for f in abi.NATIVE_OUTPUTS)
    cfg = guestlib.codec.decoder_config("hevc")
    assert (cfg.pix_fmt, cfg.direction) == (PixFmt.NATIVE, abi.Direction.DECODE)
    with pytest.raises(DeviceError) as ei:
        dev.encoder("h264", W, H, 25, pix_fmt="native")
    assert ei.value.code == ErrorCode.BAD_ARG
    doc = dev.caps()
    for c in doc["codecs"]:
        if c["decoder"]["available"]:
            assert c["decoder"]["pix_fmts"] == ["native", "yuv420p", "nv12", "yuv422p", "yuv444p", "yuv420p10le",
                                                "p010le"], c["name"]
        assert "native" not in c["encoder"]["pix_fmts"], c["name"]
    assert doc["pix_fmts"]["native"] == 0


# --- the pool takes 10-bit pictures: a guest that writes its slots harms only itself -------------
ALLOWED_FAILURES = {ErrorCode.WORKER_CRASHED, ErrorCode.SESSION_LOST, ErrorCode.INVALID_DATA, ErrorCode.BACKEND}


def _stats(h: Hostd, name: str) -> dict[str, Any]:
    return next(v for v in h.device.statistics()["vms"] if v["name"] == name)


def _scribble(dev: Device, frames: list[Frame]) -> int:
    """Fill every lent 10-bit frame's planes (whole rows, padding included) with 0xFF bytes:
    samples of 65535, far above 1023.  Returns the bytes written."""
    mem = dev.region.mem
    n = 0
    for f in frames:
        assert f.pooled and f.format == "yuv420p10le"
        for off, stride, (rows, _) in zip(f.plane_offsets, f.strides,
                                          abi.plane_shapes(f.pix_fmt, f.width, f.height), strict=True):
            mem[off:off + rows * stride] = b"\xff" * (rows * stride)
            n += rows * stride
    return n


@pytest.mark.parametrize("crash", [False, True], ids=["as-it-goes", "worker-dies"])
def test_a_guest_writing_into_its_lent_ten_bit_slots_harms_only_itself(make_hostd: Callable[..., Hostd],
                                                                       crash: bool) -> None:
    """The writer decodes a 10-bit stream into its frame pool and, while each task's frames are
    lent (the decoder still predicts from them), overwrites them with 0xFF.  Its decode goes
    on with garbage or fails with an allowed status; hostd goes on; a second guest, whose
    pooled 10-bit decode is under way before the writer starts and finishes after it, is
    bit-exact; and the writer's next session decodes the same stream bit-exact again.

    Whether garbage samples crash a decoder is FFmpeg's business (here it goes on): the
    ``worker-dies`` case makes the writer's worker die of a real SIGSEGV halfway through the
    scribbled stream (fault injection), as a decoder indexing a table with them could."""
    from codec_backend.engine import CRASH_MARKER

    hostd = make_hostd(fault_injection=crash)
    packets = make_stream("libx265", "yuv420p10le", n=16, w=192, h=128, options=_X265)
    other_packets = make_stream("libx264", "yuv420p10le", n=16, w=192, h=128, seed=5)
    ref = reference("hevc", packets)
    other_ref = reference("h264", other_packets)
    assert len(ref) == len(other_ref) == 16
    with guestlib.attach(hostd.socket_path, name="writer", region_size=64 << 20) as bad, \
            guestlib.attach(hostd.socket_path, name="bystander", region_size=64 << 20) as good:
        with good.decoder("h264", parse=False, width=192, height=128) as other:
            mid = len(other_packets) // 2
            seen: list[tuple[str, str, bool]] = []
            for i, data in enumerate(other_packets[:mid]):
                seen += [(f.format, visible_md5(f.planes), f.pooled) for f in other.decode(data, pts=i)]

            written, failures, outputs = 0, [], []
            with bad.decoder("hevc", parse=False, width=192, height=128) as dec:
                assert dec.pool_size
                for i, data in enumerate([*packets, b""]):
                    if crash and i == len(packets) // 2:
                        data = CRASH_MARKER + data
                    try:
                        frames = dec.decode(data, pts=i) if data else dec.flush()
                    except DeviceError as e:
                        failures.append(e.code)
                        continue
                    outputs += [visible_md5(f.planes) for f in frames]
                    written += _scribble(bad, frames)
            assert written > 0  # lent 10-bit slots were overwritten
            assert set(failures) <= ALLOWED_FAILURES, failures
            if crash:  # the task in flight, then every later one on the lost session
                assert failures == [ErrorCode.WORKER_CRASHED] + [ErrorCode.SESSION_LOST] * (len(packets) // 2)
            if not failures:
                # It went on: the decoder predicted from the scribbled references.
                assert len(outputs) == len(ref) and outputs != [m for _, m in ref]
                assert outputs[0] == ref[0][1]  # the first picture was output before any write

            for i, data in enumerate(other_packets[mid:], mid):
                seen += [(f.format, visible_md5(f.planes), f.pooled) for f in other.decode(data, pts=i)]
            seen += [(f.format, visible_md5(f.planes), f.pooled) for f in other.flush()]
        assert [(f, m) for f, m, _ in seen] == other_ref
        assert all(p for *_, p in seen)

        # hostd is alive and serves both guests; the writer's worker was respawned if it died.
        assert hostd.device.state.value == "running"
        assert _stats(hostd, "bystander")["worker_restarts"] == 0
        assert _stats(hostd, "writer")["worker_restarts"] == (1 if ErrorCode.WORKER_CRASHED in failures else 0)
        assert bad.heap.allocated() == 0  # the writer's pool went back to its heap
        with bad.decoder("hevc", parse=False, width=192, height=128) as dec:
            again = device_decode(dec, packets)
        assert [(f, m) for f, m, _, _ in again] == ref and all(p for _, _, p, _ in again)
