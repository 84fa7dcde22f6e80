"""VP8 through the device: libvpx encode and FFmpeg's native vp8 decode.

Encode quality (PSNR against the source), rate control that really moves the quality,
containers stock ffprobe accepts (IVF, WebM), decode bit-exact against direct PyAV on a
stream stock ffmpeg makes (alt-ref on, not whole macroblocks) from demuxed packets and in PARSE
mode, each with and without a frame pool, and what caps says about VP8.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from click.testing import CliRunner

import guestlib
from guestlib.codec import Packet
from guestlib.device import Device, DeviceError
from guestlib.media import Muxer
from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from tests.integration.test_codec_device import (
    FPS,
    H,
    N,
    Planes,
    W,
    decode_all,
    encode_all,
    ffmpeg_framemd5,
    fill,
    md5,
    padded,
    pattern,
    psnr,
    pyav_decode,
)
from vmediad import abi
from vmediad.abi import ErrorCode
from vmediad.tools.cli import main

STOCK_FRAMES = 30
SW, SH = 202, 122


@pytest.fixture(scope="module")
def sources() -> list[Planes]:
    return [pattern(i) for i in range(N)]


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="vp8", region_size=32 << 20) as d:
        yield d


def write_ivf(path: Path, packets: list[Packet], fps: int = FPS) -> None:
    path.write_bytes(b"".join([
        struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, b"VP80", W, H, fps, 1, len(packets), 0),
        *(struct.pack("<IQ", len(p.data), p.pts or 0) + p.data for p in packets)]))


def ffprobe(path: Path) -> dict[str, Any]:
    r = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                        "stream=codec_name,width,height,pix_fmt,nb_read_frames", "-of", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stream: dict[str, Any] = json.loads(r.stdout)["streams"][0]
    return stream


def stream_psnr(sources: list[Planes], dec_frames: list[Any]) -> float:
    return min(psnr(sources[f.pts or 0], f.planes) for f in dec_frames)


# --- encode ---------------------------------------------------------------------------------
def test_encode_psnr_and_bit_exact_decode(dev: Device, sources: list[Planes]) -> None:
    packets = encode_all(dev, "vp8", sources)
    assert packets[0].is_keyframe and sorted(p.pts or 0 for p in packets) == list(range(N))
    assert sum(p.is_keyframe for p in packets) == 1  # one keyframe: later frames are inter-coded
    with dev.decoder("vp8", parse=False) as dec:
        frames = decode_all(dec, packets)
    assert [(f.width, f.height, f.format) for f in frames] == [(W, H, "yuv420p")] * N
    worst = stream_psnr(sources, frames)
    assert worst >= 35.0, f"worst PSNR {worst:.2f} dB"
    assert [(f.pts, md5(f.to_ndarray())) for f in frames] == pyav_decode("vp8", packets)


def test_rate_control_moves_quality(dev: Device, sources: list[Planes]) -> None:
    """CRF is constant quality (not held at libvpx's 256 kbit/s default cap), QP fixes the
    quantiser, a bitrate is a budget."""
    def run(**rc: Any) -> tuple[int, float]:
        packets = encode_all(dev, "vp8", sources, **rc)
        with dev.decoder("vp8", parse=False) as dec:
            frames = decode_all(dec, packets)
        assert len(frames) == N, rc
        return sum(len(p.data) for p in packets), stream_psnr(sources, frames)

    fine, coarse = run(crf=4), run(crf=50)
    assert fine[0] > 1.5 * coarse[0] and fine[1] > coarse[1] + 6, (fine, coarse)
    assert fine[1] >= 45.0, fine
    q10, q50 = run(qp=10), run(qp=50)
    assert q10[0] > 2 * q50[0] and q10[1] > q50[1] + 6, (q10, q50)
    low = run(bitrate=100_000)
    assert low[0] * 8 * FPS / N < 400_000, low  # bounded by the budget, key frame included
    assert low[0] < fine[0] / 4, (low, fine)


def test_presets_and_low_delay(dev: Device, sources: list[Planes]) -> None:
    for preset in ("12", "good", "-3"):  # VP8's cpu-used reaches 16 (VP9's only 9)
        assert len(encode_all(dev, "vp8", sources[:4], preset=preset)) == 4, preset
    # Low delay: every frame comes back as its packet at once (VP8 has no B-frames).
    for bframes in (False, True):
        with dev.encoder("vp8", W, H, FPS, bframes=bframes) as enc:
            assert [len(enc.encode(fill(enc.new_frame(), s))) for s in sources] == [1] * N
            assert enc.flush() == []
    for bad in ("fast", "123"):
        with pytest.raises(DeviceError) as ei:
            dev.encoder("vp8", W, H, FPS, preset=bad)
        assert ei.value.code == ErrorCode.BAD_ARG
        assert str(ei.value) == f"task failed: BAD_ARG: bad libvpx preset {bad!r}"


@needs_ffmpeg
def test_ffprobe_accepts_ivf_and_webm(dev: Device, sources: list[Planes], short_tmp: Path) -> None:
    packets = encode_all(dev, "vp8", sources)
    ivf = short_tmp / "out.ivf"
    write_ivf(ivf, packets)
    want = {"codec_name": "vp8", "width": W, "height": H, "pix_fmt": "yuv420p", "nb_read_frames": str(N)}
    assert ffprobe(ivf) == want
    with dev.decoder("vp8", parse=False) as dec:
        mine = [md5(f.to_ndarray()) for f in decode_all(dec, packets)]
    assert ffmpeg_framemd5(ivf) == mine  # stock ffmpeg sees exactly the pictures the device decodes
    webm = short_tmp / "out.webm"
    mux = Muxer(webm, "vp8", W, H, Fraction(1, FPS), Fraction(FPS))
    mux.write(packets)
    mux.close()
    assert ffprobe(webm) == want
    assert ffmpeg_framemd5(webm) == mine


# --- decode ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stock_stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[bytes, int]], list[tuple[int, str]]]:
    """A VP8 IVF stream stock ffmpeg makes (202x122: not whole macroblocks; alt-ref on; a key
    frame every 10), its packets and direct PyAV's (pts, md5) per frame."""
    path = tmp_path_factory.mktemp("vp8") / "stock.ivf"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={SW}x{SH}:rate=25",
                    "-frames:v", str(STOCK_FRAMES), "-c:v", "libvpx", "-deadline", "good", "-cpu-used", "4",
                    "-auto-alt-ref", "1", "-lag-in-frames", "16", "-g", "10", "-b:v", "500k", "-f", "ivf",
                    str(path)], check=True, timeout=60)
    with av.open(str(path)) as c:
        packets = [(bytes(p), int(p.pts or 0)) for p in c.demux(video=0) if p.size]
    ctx = av.CodecContext.create("vp8", "r")
    want: list[tuple[int, str]] = []
    for data, pts in [*packets, (b"", 0)]:
        pkt = None
        if data:
            pkt = padded(data)
            pkt.pts = pts
        want += [(int(f.pts or 0), md5(f.to_ndarray())) for f in ctx.decode(pkt)]
    assert len(want) == STOCK_FRAMES and len(set(m for _, m in want)) == STOCK_FRAMES
    assert sum(not d[0] & 1 for d, _ in packets) == STOCK_FRAMES // 10  # VP8 key frames: bit 0 clear
    return packets, want


@pytest.mark.parametrize("mode", ["packets", "packets-pool", "parse", "parse-pool"])
def test_decode_bit_exact_with_and_without_pool(
        dev: Device, stock_stream: tuple[list[tuple[bytes, int]], list[tuple[int, str]]], mode: str) -> None:
    packets, want = stock_stream
    parse, pooled = mode.startswith("parse"), mode.endswith("-pool")
    size = {"width": SW, "height": SH} if pooled else {}
    got: list[tuple[int, str]] = []
    n_pooled = 0
    with dev.decoder("vp8", parse=parse, **size) as dec:
        assert (dec.pool_size > 0) == pooled
        for data, pts in packets:
            for f in dec.decode(data, pts=pts, parse=parse):
                assert (f.width, f.height, f.format) == (SW, SH, "yuv420p")
                got.append((int(f.pts or 0), md5(f.to_ndarray())))
                n_pooled += f.pooled
        for f in dec.flush():
            got.append((int(f.pts or 0), md5(f.to_ndarray())))
            n_pooled += f.pooled
    assert got == want
    assert n_pooled == (len(want) if pooled else 0)


# --- caps -----------------------------------------------------------------------------------
def test_caps_lists_vp8(hostd: Hostd, dev: Device) -> None:
    r = CliRunner().invoke(main, ["caps", "--socket", hostd.socket_path, "--json"])
    assert r.exit_code == 0, r.output
    [vp8] = [c for c in json.loads(r.output)["codecs"] if c["name"] == "vp8"]
    assert vp8["id"] == int(abi.Codec.VP8) == 7
    assert vp8["encoder"] == {"impl": "libvpx", "available": True, "pix_fmts": ["yuv420p", "nv12", "rgb24", "bgra"],
                              "zero_copy_pix_fmts": ["yuv420p"], "bframes": False}
    assert vp8["decoder"]["impl"] == "vp8" and vp8["decoder"]["available"]
    assert "yuv420p" in vp8["decoder"]["pix_fmts"]
    assert (vp8["decoder"]["parser"], vp8["decoder"]["parser_splits"]) == (True, False)
    assert dev.caps()["codecs"] == json.loads(r.output)["codecs"]
    table = CliRunner().invoke(main, ["caps", "--socket", hostd.socket_path])
    assert table.exit_code == 0 and "libvpx " in table.output.replace("\t", " ")
