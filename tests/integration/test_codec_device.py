"""Codec sessions through the whole device: real hostd, real guests (in-process and spawned
processes), real worker processes running PyAV; stock ffmpeg judges the bitstreams."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import numpy.typing as npt
import pytest
from av.video.codeccontext import VideoCodecContext

import guestlib
from guestlib.codec import Decoder, Frame, Packet, codec_id
from guestlib.device import Device, DeviceError, SessionLost
from guestlib.media import demux_elementary
from hostd.daemon import Hostd
from tests import guests
from tests.conftest import needs_ffmpeg
from vmediad import abi
from vmediad.abi import DescFlag, ErrorCode, Op

W, H, N, FPS = 320, 240, 20, 25
FRAME_BYTES = W * H * 3 // 2
ALL_CODECS = ["h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4", "vp8"]
Planes = list[npt.NDArray[np.uint8]]


# --- helpers ------------------------------------------------------------------------------
def pattern(i: int, seed: int = 0, w: int = W, h: int = H) -> Planes:
    """A moving yuv420p picture: drifting waves, a moving box and a fine fixed texture."""
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    texture = 6 * np.sin(x * 1.3 + seed) * np.cos(y * 0.9)
    luma = 128 + 50 * np.sin((x + 4 * i + 7 * seed) / 11.0) + 30 * np.cos((y - 3 * i) / 17.0) + texture
    bx, by = (13 * i + 31 * seed) % (w - 40), (7 * i + 17 * seed) % (h - 40)
    luma[by:by + 32, bx:bx + 32] = 230
    cy = np.arange(h // 2, dtype=np.float64)[:, None]
    cx = np.arange(w // 2, dtype=np.float64)[None, :]
    u = 128 + 40 * np.sin((cx + 2 * i) / 9.0) + 0 * cy
    v = 128 + 40 * np.cos((cy - i + seed) / 7.0) + 0 * cx
    return [p.clip(16, 235).astype(np.uint8) for p in (luma, u, v)]


def psnr(a: Planes, b: Planes) -> float:
    x = np.concatenate([p.ravel() for p in a]).astype(np.float64)
    y = np.concatenate([p.ravel() for p in b]).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else float(10 * np.log10(255 * 255 / mse))


def md5(data: npt.NDArray[Any] | bytes) -> str:
    return hashlib.md5(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


def fill(frame: Frame, planes: Planes) -> Frame:
    for dst, src in zip(frame.planes, planes, strict=True):
        dst[:] = src
    return frame


def encode_all(dev: Device, codec: str, src: list[Planes], **kw: Any) -> list[Packet]:
    packets: list[Packet] = []
    with dev.encoder(codec, W, H, FPS, **kw) as enc:
        for planes in src:
            packets += enc.encode(fill(enc.new_frame(), planes))
        packets += enc.flush()
    return packets


def decode_all(dec: Decoder, chunks: list[bytes] | list[Packet], parse: bool = False) -> list[Frame]:
    """Decode through the device; returns private copies (device frames are views)."""
    out: list[Frame] = []
    for c in chunks:
        if isinstance(c, Packet):
            out += [f.copy() for f in dec.decode(c.data, pts=c.pts, parse=parse)]
        else:
            out += [f.copy() for f in dec.decode(c, parse=parse)]
    return out + [f.copy() for f in dec.flush()]


def padded(data: bytes) -> Any:
    """A packet with FFmpeg's zero padding.  ``av.Packet(bytes)`` (PyAV 18) wraps the bytes
    without it, and decoders then read whatever follows them in memory: mpeg4 output
    changed from run to run that way."""
    pkt = av.Packet(len(data))
    memoryview(pkt)[:] = data
    return pkt


def pyav_decode(codec: str, packets: list[Packet]) -> list[tuple[int | None, str]]:
    """Direct in-process PyAV decode: (pts, md5 of the packed planes) per frame."""
    ctx = cast(VideoCodecContext, av.CodecContext.create(abi.DECODER_IMPL[codec_id(codec)], "r"))
    out = []
    for p in [*packets, None]:
        pkt = None if p is None else padded(p.data)
        if pkt is not None and p is not None:
            pkt.pts = p.pts
        for f in ctx.decode(pkt):
            out.append((f.pts, md5(f.to_ndarray())))
    return out


def pyav_pictures(codec: str, packets: list[Packet]) -> list[Planes]:
    """Direct in-process PyAV decode: the planes of every frame, in output order."""
    ctx = cast(VideoCodecContext, av.CodecContext.create(abi.DECODER_IMPL[codec_id(codec)], "r"))
    out: list[Planes] = []
    for p in [*packets, None]:
        for f in ctx.decode(None if p is None else padded(p.data)):
            flat = np.asarray(f.to_ndarray(), np.uint8).reshape(-1)
            out.append([flat[:W * H].reshape(H, W), flat[W * H:W * H * 5 // 4].reshape(H // 2, W // 2),
                        flat[W * H * 5 // 4:].reshape(H // 2, W // 2)])
    return out


def write_elementary(path: Path, codec: str, packets: list[Packet]) -> None:
    """Annex-B as is for h264/hevc; an IVF file (written by hand) for vp9/av1."""
    with path.open("wb") as f:
        if codec in ("h264", "hevc"):
            for p in packets:
                f.write(p.data)
            return
        fourcc = {"vp9": b"VP90", "av1": b"AV01"}[codec]
        f.write(struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, fourcc, W, H, FPS, 1, len(packets), 0))
        for p in packets:
            f.write(struct.pack("<IQ", len(p.data), p.pts or 0))
            f.write(p.data)


def ffmpeg_framemd5(path: Path) -> list[str]:
    """Stock ffmpeg decodes ``path``; the MD5 of every decoded frame, in output order."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-pix_fmt", "yuv420p",
         "-f", "framemd5", "-"], check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def vm_stats(h: Hostd, name: str) -> dict[str, Any]:
    return next(v for v in h.device.statistics()["vms"] if v["name"] == name)


@pytest.fixture(scope="module")
def sources() -> list[Planes]:
    return [pattern(i) for i in range(N)]


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="codec", region_size=32 << 20) as d:
        yield d


# --- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_encode_decode_roundtrip_through_the_device(dev: Device, sources: list[Planes], codec: str) -> None:
    packets = encode_all(dev, codec, sources)
    assert packets and packets[0].is_keyframe
    assert sorted(p.pts or 0 for p in packets) == list(range(N))
    with dev.decoder(codec, parse=False) as dec:
        frames = decode_all(dec, packets)
    assert len(frames) == N
    assert [f.pts for f in frames] == list(range(N))
    assert all((f.width, f.height, f.format) == (W, H, "yuv420p") for f in frames)
    worst = min(psnr(sources[f.pts or 0], f.planes) for f in frames)
    assert worst >= 35.0, f"{codec}: worst PSNR {worst:.2f} dB"
    # The device's decoder is PyAV's: bit-identical to decoding the same packets in process.
    assert [(f.pts, md5(f.to_ndarray())) for f in frames] == pyav_decode(codec, packets)


@needs_ffmpeg
@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9"])
def test_stock_ffmpeg_decodes_device_bitstreams(dev: Device, sources: list[Planes], short_tmp: Path,
                                                codec: str) -> None:
    packets = encode_all(dev, codec, sources)
    path = short_tmp / f"out.{ {'h264': 'h264', 'hevc': 'hevc', 'vp9': 'ivf'}[codec] }"
    write_elementary(path, codec, packets)
    judged = ffmpeg_framemd5(path)
    assert len(judged) == N
    with dev.decoder(codec, parse=False) as dec:
        mine = [md5(f.to_ndarray()) for f in decode_all(dec, packets)]
    assert judged == mine  # an outside decoder sees exactly the pictures the device decodes


@pytest.fixture(scope="module")
def ffmpeg_bframes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """libx264 with B-frames made by stock ffmpeg: an mp4 and the same stream as raw Annex-B."""
    d = tmp_path_factory.mktemp("x264")
    mp4, raw = d / "bf.mp4", d / "bf.h264"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                    "-frames:v", "30", "-c:v", "libx264", "-bf", "3", "-pix_fmt", "yuv420p", str(mp4)],
                   check=True, timeout=60)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(mp4), "-c", "copy", "-bsf:v", "h264_mp4toannexb",
                    str(raw)], check=True, timeout=60)
    return mp4, raw


@needs_ffmpeg
def test_ffmpeg_bframe_stream_decodes_bit_identical(dev: Device, ffmpeg_bframes: tuple[Path, Path]) -> None:
    mp4, raw = ffmpeg_bframes
    with av.open(str(mp4)) as c:
        want = [(f.pts, md5(f.to_ndarray())) for f in c.decode(video=0)]
    assert len(want) == 30
    with av.open(str(mp4)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.max_b_frames or stream.codec_context.has_b_frames
        packets = [Packet(bytes(p), p.pts, p.dts, p.is_keyframe) for p in demux_elementary(c, stream)]
    assert any(p.pts != p.dts for p in packets), "expected reordered (B) frames"
    with dev.decoder("h264", parse=False) as dec:
        whole = decode_all(dec, packets)
    assert [(f.pts, md5(f.to_ndarray())) for f in whole] == want
    # PARSE mode: raw Annex-B bytes cut at arbitrary places; the device's parser finds the frames.
    data = raw.read_bytes()
    chunks = [data[i:i + 1500] for i in range(0, len(data), 1500)]
    with dev.decoder("h264", parse=True) as dec:
        parsed = decode_all(dec, chunks, parse=True)
    assert [md5(f.to_ndarray()) for f in parsed] == [m for _, m in want]


# --- many guests, many sessions -------------------------------------------------------------
def two_session_guest(sock: str, k: int, codec: str, stream: list[tuple[bytes, int]], out: Any) -> None:
    """One spawned guest: an encoder thread and a decoder thread, each its own session, at once."""
    result: dict[str, Any] = {"k": k}
    barrier = threading.Barrier(2)

    def encode(dev: Device) -> None:
        src = [pattern(i, seed=k) for i in range(N)]
        barrier.wait()
        result["packets"] = [(p.data, p.pts) for p in encode_all(dev, codec, src)]

    def decode(dev: Device) -> None:
        with dev.decoder("h264", parse=False) as dec:
            barrier.wait()
            # The pipelined API: two tasks queued on the session at any time.
            result["decoded"] = [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(stream, depth=2)]

    try:
        with guestlib.attach(sock, name=f"guest{k}", region_size=32 << 20) as dev:
            errors: list[str] = []

            def run(fn: Callable[[Device], None]) -> None:
                try:
                    fn(dev)
                except BaseException as e:  # reported to the parent
                    errors.append(repr(e))
                    barrier.abort()

            threads = [threading.Thread(target=run, args=(fn,)) for fn in (encode, decode)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result["errors"] = errors
    except BaseException as e:
        result["errors"] = [repr(e)]
    out.put(result)


def test_four_guest_processes_two_sessions_each(hostd: Hostd, dev: Device, sources: list[Planes]) -> None:
    reference = encode_all(dev, "h264", sources, bframes=True, gop=8)
    want = pyav_decode("h264", reference)
    stream = [(p.data, p.pts) for p in reference]
    codecs = ["h264", "vp9", "hevc", "mpeg4"]
    q = guests.CTX.Queue()
    procs = [guests.run(two_session_guest, hostd.socket_path, k, codecs[k], stream, q) for k in range(4)]
    results = sorted((q.get(timeout=120) for _ in procs), key=lambda r: r["k"])
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for r in results:
        k = r["k"]
        assert r["errors"] == [], r["errors"]
        assert r["decoded"] == want, f"guest {k}: decoded frames differ"
        packets = [Packet(d, pts, None, False) for d, pts in r["packets"]]
        frames = pyav_decode(codecs[k], packets)
        assert len(frames) == N
        for i, planes in enumerate(pyav_pictures(codecs[k], packets)):
            assert psnr(pattern(i, seed=k), planes) >= 35.0, f"guest {k} ({codecs[k]}) frame {i}"
    st = hostd.device.statistics()
    assert sum(v["worker_restarts"] for v in st["vms"]) == 0


# --- errors ---------------------------------------------------------------------------------
def test_corrupt_stream_is_invalid_data_and_the_session_recovers(dev: Device, sources: list[Planes]) -> None:
    packets = encode_all(dev, "h264", sources)
    want = pyav_decode("h264", packets)
    garbage = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    # Single-threaded decoding reports the error on the very task that fed the bad data.
    with dev.decoder("h264", parse=False, threads=1) as dec:
        with pytest.raises(DeviceError) as ei:
            dec.decode(b"\x00\x00\x00\x01\x65" + garbage, pts=0)
        assert ei.value.code == ErrorCode.INVALID_DATA and not isinstance(ei.value, SessionLost)
        assert [(f.pts, md5(f.to_ndarray())) for f in decode_all(dec, packets)] == want
    # Frame threads report it when the frame comes due (at the latest on FLUSH); the parser
    # holds unterminated garbage until FLUSH.  Either way the same session then decodes a
    # valid stream completely.
    with dev.decoder("h264", parse=True) as dec:
        codes = []
        for call in (lambda: dec.decode(garbage), dec.flush):
            try:
                call()
            except DeviceError as e:
                codes.append(e.code)
        assert codes == [ErrorCode.INVALID_DATA]
        chunks = [p.data for p in packets]
        assert [md5(f.to_ndarray()) for f in decode_all(dec, chunks, parse=True)] == [m for _, m in want]


@pytest.mark.parametrize("victim", ["encode", "decode", "decode-list"])
def test_worker_crash_reports_every_session_of_the_guest_lost(make_hostd: Callable[..., Hostd],
                                                              sources: list[Planes], victim: str) -> None:
    from codec_backend.engine import CRASH_MARKER

    h = make_hostd(fault_injection=True)
    with guestlib.attach(h.socket_path, name="crashy", region_size=32 << 20) as dev, \
            guestlib.attach(h.socket_path, name="calm", region_size=32 << 20) as other:
        packets = encode_all(dev, "h264", sources)
        enc = dev.encoder("h264", W, H, FPS)
        dec = dev.decoder("h264", parse=False, width=W, height=H)  # decoding into a frame pool
        assert dec.pool_size
        bystander = other.encoder("vp9", W, H, FPS)
        assert enc.encode(fill(enc.new_frame(), sources[0])) is not None
        decode_all_partial(dec, packets[:3])
        bystander_packets = bystander.encode(fill(bystander.new_frame(), sources[0]))
        pid0 = vm_stats(h, "crashy")["worker_pid"]

        with pytest.raises(DeviceError) as ei:
            if victim == "encode":
                f = fill(enc.new_frame(), sources[1])
                f.planes[0][0, :len(CRASH_MARKER)] = np.frombuffer(CRASH_MARKER, np.uint8)
                enc.encode(f)
            elif victim == "decode":
                dec.decode(CRASH_MARKER + packets[3].data)
            else:  # the second chunk of a MULTI list
                list(dec.decode_stream([packets[3].data, CRASH_MARKER + packets[4].data, packets[5].data],
                                       batch=3, flush=False))
        assert ei.value.code == ErrorCode.WORKER_CRASHED and not isinstance(ei.value, SessionLost)
        # Every session the dead worker held is lost, and says so: never a silent reset.
        with pytest.raises(SessionLost):
            enc.encode(fill(enc.new_frame(), sources[2]))
        with pytest.raises(SessionLost):
            dec.decode(packets[4].data)
        with pytest.raises(SessionLost):
            enc.flush()
        enc.close()
        dec.close()
        assert dev.heap.allocated() == 0  # the lost decoder's frame pool went back to the heap
        # The other guest's worker never noticed.
        for planes in sources[1:]:
            bystander_packets += bystander.encode(fill(bystander.new_frame(), planes))
        bystander_packets += bystander.flush()
        bystander.close()
        assert len(pyav_decode("vp9", bystander_packets)) == N
        # New sessions on the respawned worker work.
        again = encode_all(dev, "h264", sources)
        with dev.decoder("h264", parse=False, width=W, height=H) as fresh:
            frames = decode_all(fresh, again)
        assert len(frames) == N and min(psnr(sources[f.pts or 0], f.planes) for f in frames) >= 35.0
        st = vm_stats(h, "crashy")
        assert st["worker_pid"] != pid0 and st["worker_restarts"] == 1
        assert st["errors"].get("WORKER_CRASHED") == 1
        assert vm_stats(h, "calm")["worker_restarts"] == 0


def decode_all_partial(dec: Decoder, packets: list[Packet]) -> list[Frame]:
    return [f.copy() for p in packets for f in dec.decode(p.data, pts=p.pts)]


# --- NO_SPACE ---------------------------------------------------------------------------------
def read_packets(mem: memoryview, off: int) -> list[Packet]:
    kind, count, used = abi.OUT_HEADER.unpack_from(mem, off)
    assert kind == abi.OUT_PACKETS
    out = []
    for i in range(count):
        pos, size, pts, dts, flags, _ = abi.PACKET_ENTRY.unpack_from(
            mem, off + abi.OUT_HEADER.size + i * abi.PACKET_ENTRY.size)
        assert pos + size <= used
        out.append(Packet(bytes(mem[off + pos:off + pos + size]), pts, dts, bool(flags & abi.PACKET_KEY)))
    return out


def test_no_space_then_drain_pending_loses_nothing(dev: Device, sources: list[Planes]) -> None:
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    assert len(want) == N

    # By hand, as any guest would: a tiny dst, NO_SPACE with the exact size, then DRAIN_PENDING.
    tiny = dev.alloc(128)
    got: list[Packet] = []
    no_space = 0
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
        frame = enc.new_frame(keep=True)

        def run(op: Op, flags: int = 0, src: tuple[int, int] = (0, 0), pts: int = 0) -> None:
            nonlocal no_space
            c = dev.submit(op, flags=flags, session=enc.session, src=src, dst=(tiny.offset, tiny.size),
                           args=(pts, 0, 0, 0)).completion()
            if c.error == ErrorCode.OK:
                got.extend(read_packets(dev.region.mem, tiny.offset))
                return
            assert c.error == ErrorCode.NO_SPACE and c.result_len > tiny.size
            no_space += 1
            big = dev.alloc(c.result_len)
            retry = Op.ENCODE_FRAME if op == Op.ENCODE_FRAME else Op.FLUSH
            flags = DescFlag.DRAIN_PENDING if retry == Op.ENCODE_FRAME else 0
            c2 = dev.submit(retry, flags=flags, session=enc.session, dst=(big.offset, c.result_len)).wait()
            assert c2.result_len == c.result_len  # exactly the size NO_SPACE asked for
            got.extend(read_packets(dev.region.mem, big.offset))
            dev.free(big)

        for i, planes in enumerate(sources):
            fill(frame, planes)
            run(Op.ENCODE_FRAME, DescFlag.PTS_VALID, (frame.offset, frame.nbytes), i)
        run(Op.FLUSH)
    dev.free(tiny)
    assert no_space >= N // 2
    assert got == want

    # guestlib does the same by itself: an output buffer far too small every time.
    auto: list[Packet] = []
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
        for planes in sources:
            dev.free(enc._out)
            enc._out = dev.alloc(128)
            auto += enc.encode(fill(enc.new_frame(), planes))
        auto += enc.flush()
        assert enc.no_space_retries >= N // 2
    assert auto == want

    # And a decoder whose output buffer holds less than one picture.
    with dev.decoder("h264", parse=False) as dec:
        frames: list[Frame] = []
        for p in want:
            dev.free(dec._out)
            dec._out = dev.alloc(4096)
            frames += [f.copy() for f in dec.decode(p.data, pts=p.pts)]
        frames += [f.copy() for f in dec.flush()]
        assert dec.no_space_retries >= N // 2
    assert [(f.pts, md5(f.to_ndarray())) for f in frames] == pyav_decode("h264", want)


# --- zero copy ------------------------------------------------------------------------------------
def test_bytes_copied_per_frame(hostd: Hostd, sources: list[Planes]) -> None:
    with guestlib.attach(hostd.socket_path, name="enc", region_size=32 << 20) as a, \
            guestlib.attach(hostd.socket_path, name="dec", region_size=32 << 20) as b:
        packets = encode_all(a, "h264", sources)
        payload = sum(len(p.data) for p in packets)
        st = vm_stats(hostd, "enc")
        # Encode copies only the packets out: the yuv420p input is wrapped in place.
        assert st["bytes_copied"] == payload
        assert st["bytes_copied_per_frame"] == round(payload / N, 1)
        assert st["bytes_copied_per_frame"] < FRAME_BYTES / 10

        with b.decoder("h264", parse=False) as dec:
            frames = decode_all(dec, packets)
        assert len(frames) == N
        st = vm_stats(hostd, "dec")
        # Decode copies the bitstream once into FFmpeg's padded packet and the planes once out.
        assert st["bytes_copied"] == payload + N * FRAME_BYTES
        per_frame = st["bytes_copied_per_frame"]
        assert per_frame == round((payload + N * FRAME_BYTES) / len(packets), 1)
        assert FRAME_BYTES <= per_frame < FRAME_BYTES * 1.2


def test_new_frame_keep_is_a_reusable_ring(dev: Device, sources: list[Planes]) -> None:
    with dev.encoder("h264", W, H, FPS) as enc:
        ring = [fill(enc.new_frame(keep=True), sources[i]) for i in range(3)]
        assert len({f.offset for f in ring}) == 3
        packets: list[Packet] = []
        for i in range(N):
            f = ring[i % 3]
            fill(f, sources[i])
            packets += enc.encode(f)
        packets += enc.flush()
        assert enc.new_frame().offset not in {r.offset for r in ring}  # encode() kept its hands off
        enc.release(ring[0])
        assert ring[0].planes == []
    frames = pyav_decode("h264", packets)
    assert len(frames) == N


# --- pipelined streams ------------------------------------------------------------------------
def test_streams_give_exactly_what_single_calls_give(dev: Device, sources: list[Planes]) -> None:
    heap0 = dev.heap.available()
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    for depth in (1, 3):
        with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
            got = list(enc.encode_stream((fill(enc.new_frame(), p) for p in sources), depth=depth))
            assert len(enc._pool) >= 1  # frames went back to the pool as their tasks ran
        assert got == want
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:  # arrays are copied in once
        arrays = [np.concatenate([p.ravel() for p in planes]) for planes in sources]
        assert list(enc.encode_stream(arrays)) == want

    ref = pyav_decode("h264", want)
    with dev.decoder("h264", parse=False) as dec:
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=3)] == ref
        staged = len(dec._staging)
        assert 1 <= staged <= 4  # staging buffers are reused, not one per chunk
        bufs = [dev.put(p.data) for p in want]  # chunks already in the region are used in place
        in_place = dec.decode_stream((b, i) for i, b in enumerate(bufs))
        assert [md5(f.to_ndarray()) for f in in_place] == [m for _, m in ref]
        assert len(dec._staging) == staged
        for b in bufs:
            dev.free(b)
    with dev.decoder("h264", parse=True) as dec:  # PARSE mode: arbitrary cuts of the byte stream
        data = b"".join(p.data for p in want)
        chunks = [data[i:i + 999] for i in range(0, len(data), 999)]
        assert [md5(f.to_ndarray()) for f in dec.decode_stream(chunks)] == [m for _, m in ref]
    assert dev.heap.available() == heap0  # every buffer the streams took is back


def test_deep_streams_sleep_once_per_group_and_lose_nothing(dev: Device, sources: list[Planes]) -> None:
    """depth 8: the guest waits on every 4th task (the session's tasks end in order) and
    submits 4 at a time; the output is exactly the one-at-a-time output."""
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
        w0 = dev.wakeups
        got = list(enc.encode_stream((fill(enc.new_frame(), p) for p in sources), depth=8))
        sleeps = dev.wakeups - w0
    assert got == want
    tasks = len(sources) + 1  # + FLUSH
    assert sleeps <= -(-tasks // 4) + 1, (sleeps, tasks)  # one futex wake-up per group at most
    ref = pyav_decode("h264", want)
    with dev.decoder("h264", parse=False) as dec:
        w0 = dev.wakeups
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=8)] == ref
        assert dev.wakeups - w0 <= -(-(len(want) + 1) // 4) + 1


def test_stream_no_space_is_lossless(dev: Device, sources: list[Planes]) -> None:
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
        shrink_stream_buffers(enc, 256)
        got = list(enc.encode_stream((fill(enc.new_frame(), p) for p in sources), depth=3))
        assert enc.no_space_retries >= 1
    assert got == want
    with dev.decoder("h264", parse=False) as dec:
        dec._stream_size = 4096  # less than one picture
        frames = [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=3)]
        assert dec.no_space_retries >= 1
    assert frames == pyav_decode("h264", want)


def shrink_stream_buffers(session: Any, size: int) -> None:
    """Stream output buffers of ``size`` bytes, not sized ahead: every task may hit NO_SPACE."""
    session._stream_size = size
    session._task_output = lambda batch: 0


def test_decode_stream_sizes_output_buffers_from_the_picture(dev: Device, sources: list[Planes]) -> None:
    """A decode stream's output buffers fit ``batch`` frames from the start when the decoder
    knows the picture size (a hint), and from the first frames it sees otherwise: NO_SPACE
    is then limited to the tasks already in flight, not repeated through the stream."""
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    ref = pyav_decode("h264", want)
    depth, batch = 3, 2
    table = abi.out_table_size(abi.OUT_FRAMES, batch + 1)
    with dev.decoder("h264", parse=False, width=W, height=H, pool_frames=0) as dec:
        dec._stream_size = 4096  # less than one picture: only the hint can size the buffers
        got = [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=depth, batch=batch, flush=False)]
        assert dec.no_space_retries == 0  # (a FLUSH emits what frame threads and reordering held back)
        assert got + [(f.pts, md5(f.to_ndarray())) for f in dec.flush()] == ref
        assert dec._stream_size >= table + (batch + 1) * FRAME_BYTES
    # With a frame pool the pictures stay in the pool: a buffer holds the table and one
    # picture that found no free slot (from the hint, before any frame is seen: for a native
    # decoder the largest picture its stream may have, for a named format that format's).
    for fmt, picture in (("native", abi.frame_size(abi.PixFmt.NATIVE, W, H)), ("yuv420p", FRAME_BYTES)):
        with dev.decoder("h264", pix_fmt=fmt, parse=False, width=W, height=H) as dec:
            assert dec.pool_size
            dec._stream_size = 4096
            assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=depth, batch=batch)] == ref
            assert dec.no_space_retries == 0
            assert dec._stream_size == table + abi.align(picture)
    with dev.decoder("h264", parse=False) as dec:
        dec._stream_size = 4096
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=depth, batch=batch)] == ref
        # Only tasks submitted before the first frame came back (depth, and a group's top-up),
        # and the FLUSH.
        assert 1 <= dec.no_space_retries <= depth + max(1, depth // 2) + 1
    with pytest.raises(ValueError, match="negative"):
        dev.decoder("h264", width=-1, height=H)
    # A hint far larger than the region sizes the buffers only as far as the heap allows.
    with dev.decoder("h264", parse=False, width=8192, height=8192) as dec:
        free = dev.heap.available()
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=depth, batch=batch)] == ref
        assert dec.no_space_retries == 0
        assert (depth + 1) * dec._stream_size <= free
    # An encoder sizes them for one raw picture (the burst of packets with the first keyframe),
    # and half a picture per input of a MULTI task beyond that (a packet per frame).
    for batch, pictures in ((1, 1), (4, 2)):
        with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
            enc._stream_size = 256
            frames = (fill(enc.new_frame(), p) for p in sources)
            assert list(enc.encode_stream(frames, depth=depth, batch=batch)) == want
            assert enc.no_space_retries == 0
            assert enc._stream_size == pictures * FRAME_BYTES


@pytest.mark.parametrize(("depth", "batch", "before_bad"), [(3, 1, 10), (2, 4, 8)])
def test_stream_error_and_early_stop_keep_decoded_frames(dev: Device, sources: list[Planes], depth: int,
                                                         batch: int, before_bad: int) -> None:
    """A corrupt chunk fails its task with INVALID_DATA (with batch=4: the list of chunks
    8, 9, the bad one and 10, whose good chunks are still decoded); nothing else is lost."""
    packets = encode_all(dev, "h264", sources, gop=10)  # frame 10 is a keyframe
    ref = [m for _, m in pyav_decode("h264", packets)]
    garbage = np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with dev.decoder("h264", parse=False, threads=1) as dec:
        chunks = iter([*(p.data for p in packets[:10]), garbage, *(p.data for p in packets[10:])])
        seen: list[str] = []
        with pytest.raises(DeviceError) as ei:
            for f in dec.decode_stream(chunks, depth=depth, batch=batch):
                seen.append(md5(f.to_ndarray()))
        assert ei.value.code == ErrorCode.INVALID_DATA
        assert seen == ref[:before_bad]
        # Frames of the tasks that were in flight behind the bad one come first next time.
        for c in chunks:
            seen += [md5(f.to_ndarray()) for f in dec.decode(c)]
        seen += [md5(f.to_ndarray()) for f in dec.flush()]
        assert seen == ref

    with dev.decoder("h264", parse=False, threads=1) as dec:
        chunks = iter(p.data for p in packets)
        seen = []
        stream = dec.decode_stream(chunks, depth=depth, batch=batch)
        for f in stream:
            seen.append(md5(f.to_ndarray()))
            if len(seen) == 4:
                break
        stream.close()  # the caller stops early: nothing decoded is dropped
        seen += [md5(f.to_ndarray()) for f in dec.decode_stream(chunks)]
        assert seen == ref


def _task_count(h: Hostd, op: str) -> int:
    return sum(t["count"] for t in vm_stats(h, "codec")["tasks"] if t["op"] == op)


def test_multi_input_streams_give_what_single_tasks_give(hostd: Hostd, dev: Device, sources: list[Planes]) -> None:
    """batch=k: k frames or chunks per task (DescFlag.MULTI), same output as one per task."""
    heap0 = dev.heap.available()
    want = encode_all(dev, "h264", sources, bframes=True, gop=8)
    for batch, depth in ((4, 2), (7, 3)):
        tasks0, frames0 = _task_count(hostd, "ENCODE_FRAME"), vm_stats(hostd, "codec")["frames"]
        with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:
            got = list(enc.encode_stream((fill(enc.new_frame(), p) for p in sources), depth=depth, batch=batch))
        assert got == want
        assert _task_count(hostd, "ENCODE_FRAME") - tasks0 == -(-N // batch)  # ceil: one task per batch
        assert vm_stats(hostd, "codec")["frames"] - frames0 == N  # hostd counts every frame of a list
    ref = pyav_decode("h264", want)
    with dev.decoder("h264", parse=False) as dec:
        tasks0 = _task_count(hostd, "DECODE")
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=2, batch=3)] == ref
        assert _task_count(hostd, "DECODE") - tasks0 <= -(-len(want) // 3) + 3  # + NO_SPACE drains
    with dev.decoder("h264", parse=True) as dec:  # PARSE applies to every chunk of a list
        data = b"".join(p.data for p in want)
        chunks = [data[i:i + 999] for i in range(0, len(data), 999)]
        assert [md5(f.to_ndarray()) for f in dec.decode_stream(chunks, batch=abi.MULTI_MAX)] == [m for _, m in ref]
    with dev.encoder("h264", W, H, FPS, bframes=True, gop=8) as enc:  # NO_SPACE on a list loses nothing
        shrink_stream_buffers(enc, 256)
        assert list(enc.encode_stream((fill(enc.new_frame(), p) for p in sources), depth=2, batch=5)) == want
        assert enc.no_space_retries >= 1
    with dev.decoder("h264", parse=False) as dec:
        dec._stream_size = 4096  # less than one picture
        assert [(f.pts, md5(f.to_ndarray())) for f in dec.decode_stream(want, depth=2, batch=4)] == ref
        assert dec.no_space_retries >= 1
    assert dev.heap.available() == heap0  # output buffers and lists are all back


def test_multi_batching_holds_only_what_it_must_and_a_stopped_stream_runs_it(
        dev: Device, sources: list[Planes]) -> None:
    """Frames share a list only while their stride registers match; the frame that ends a
    run is held (taken from the caller, not yet submitted), and a stream that stops then
    still encodes it."""
    with dev.encoder("h264", W, H, FPS, gop=4) as enc:
        frames = [fill(enc.new_frame(keep=True), p) for p in sources[:6]]
        orig = enc._encode_specs

        def specs(bad: tuple[int, ...] = ()) -> list[Any]:
            out = list(orig(frames, True))
            sp = out[2]  # strides 0 mean "packed" to the worker: the same frame, other registers
            out[2] = type(sp)(sp.op, sp.flags, sp.src, (sp.args[0], 0, 0, 0), sp.done)
            for i in bad:  # too short for a frame: the whole list fails BAD_ARG, nothing fed
                out[i] = type(out[i])(out[i].op, out[i].flags, (out[i].src[0], 16), out[i].args, out[i].done)
            return out

        pool: list[Any] = []
        held: list[Any] = []
        all_specs = specs()
        gen = enc._batched(all_specs, 4, pool, held)
        first = next(gen)
        assert first.flags & DescFlag.MULTI and first.src[1] == 2 * abi.MULTI_ENTRY.size
        assert held == [all_specs[2]]  # taken from the caller, in no task yet
        assert next(gen) is all_specs[2] and held == [all_specs[3]]  # alone: nothing else has its registers
        rest = next(gen)
        assert rest.src[1] == 3 * abi.MULTI_ENTRY.size  # frames 3..5; the FLUSH ended the run
        assert held == [all_specs[6]] and all_specs[6].op == Op.FLUSH
        assert next(gen) is all_specs[6] and held == []
        gen.close()
        for s_ in (first, rest):
            assert s_.done is not None
            s_.done()
        assert len(pool) == 2
        for b in pool:
            dev.free(b)

        # depth 1: the list of frames 0-1 is in flight and frame 2 held when that list fails.
        failing = specs(bad=(0, 1))
        enc._encode_specs = lambda *_a, **_k: iter(failing)
        with pytest.raises(DeviceError) as ei:
            list(enc.encode_stream(frames, depth=1, batch=4))
        assert ei.value.code == ErrorCode.BAD_ARG
        enc._encode_specs = orig
        assert [p.pts for p in enc.flush()] == [failing[2].args[0]]  # frame 2 was encoded, not dropped


def test_hostile_multi_lists_end_with_their_own_error(dev: Device) -> None:
    """The list is copied once and every entry checked before the task starts."""
    with dev.decoder("h264", parse=False) as dec:
        lst = dev.alloc(4 * abi.MULTI_ENTRY.size)
        chunk = dev.put(b"\x00\x00\x00\x01" + bytes(60))
        out = dev.alloc(1 << 16)
        heap_end = dev.layout.region_size

        def run(*rows: tuple[int, int, int, int, int], nbytes: int | None = None) -> ErrorCode:
            for i, r in enumerate(rows):
                abi.MULTI_ENTRY.pack_into(lst.mem, i * abi.MULTI_ENTRY.size, *r)
            n = len(rows) * abi.MULTI_ENTRY.size if nbytes is None else nbytes
            c = dev.submit(Op.DECODE, flags=DescFlag.MULTI, session=dec.session, src=(lst.offset, n),
                           dst=(out.offset, out.size)).completion()
            return c.error

        ok = (chunk.offset, chunk.size, 0, 0, 0)
        assert run(ok, (0, 64, 0, 0, 0)) == ErrorCode.BAD_RANGE  # the register page
        assert run(ok, (heap_end - 8, 16, 0, 0, 0)) == ErrorCode.BAD_RANGE
        assert run((2**64 - 8, 16, 0, 0, 0)) == ErrorCode.OVERFLOW
        assert run(ok, (chunk.offset, 0, 0, 0, 0)) == ErrorCode.BAD_ARG  # an empty chunk
        assert run((chunk.offset, chunk.size, 0, int(DescFlag.FORCE_KEYFRAME), 0)) == ErrorCode.BAD_FLAGS
        assert run(ok, nbytes=abi.MULTI_ENTRY.size + 1) == ErrorCode.BAD_ARG
        assert run(ok, ok, ok) in (ErrorCode.OK, ErrorCode.INVALID_DATA)  # zeros: nothing to decode, or junk
        assert dev.submit(Op.COPY, flags=DescFlag.MULTI, src=(chunk.offset, 8),
                          dst=(out.offset, 8)).completion().error == ErrorCode.BAD_FLAGS
        # The session is still open after all of that (the junk chunks' error may surface at the flush).
        try:
            dec.flush()
        except DeviceError as e:
            assert e.code == ErrorCode.INVALID_DATA
        assert dec.flush() == []
        for b in (lst, chunk, out):
            dev.free(b)


@needs_ffmpeg
def test_transcode_mp4_through_the_device(dev: Device, ffmpeg_bframes: tuple[Path, Path], short_tmp: Path) -> None:
    # guestlib.media is imported above: importing the submodule must not shadow guestlib.transcode.
    out = short_tmp / "out.mkv"
    stats = guestlib.transcode(dev, ffmpeg_bframes[0], out, "hevc")
    assert stats["frames"] == 30 and stats["packets_in"] == 30 and stats["packets_out"] == 30
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                            "stream=codec_name,nb_read_frames,width,height", "-of", "csv=p=0", str(out)],
                           check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    assert probe == "hevc,320,240,30"
