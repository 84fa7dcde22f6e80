"""10-bit and 4:2:2/4:4:4 encode through the device, judged by stock ffprobe and by decoding.

Each 10-bit encoder (x265 Main 10, SVT-AV1, libvpx-vp9 profile 2, and x264 High 10) encodes a
10-bit gradient; ffprobe must report a 10-bit stream with the right profile, and the decoded
output must match the input at PSNR >= 40 dB on 10-bit samples, with the low two bits in use
(a stream that went through 8 bits has them all zero).  P010 input encodes exactly as the same
picture in yuv420p10le; samples above 10 bits are cut; a format the codec cannot take is
BAD_ARG naming the formats it does take.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest

import guestlib
from guestlib.device import Device, DeviceError
from guestlib.frames import Frame, Packet, pix_fmt_id
from guestlib.media import Muxer
from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from vmediad.abi import ErrorCode

pytestmark = needs_ffmpeg

W, H, N, FPS = 160, 96, 8, 25
U16 = npt.NDArray[np.uint16]
VP9_10BIT = "yuv420p10le" in {f.name for f in av.Codec("libvpx-vp9", "w").video_formats or ()}


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="tenbit", region_size=32 << 20) as d:
        yield d


def gradient(i: int) -> list[U16]:
    """A 10-bit 4:2:0 picture: a luma ramp over all 1024 levels (moving with ``i``) and smooth
    chroma ramps; most samples are not multiples of 4."""
    x, y = np.arange(W)[None, :], np.arange(H)[:, None]
    luma = (x * 1023 // (W - 1) * 3 // 4 + y + 5 * i) % 1024 + 0 * y
    cx, cy = np.arange(W // 2)[None, :], np.arange(H // 2)[:, None]
    u = 300 + cx * 5 + cy * 3 + i
    v = 700 - cx * 3 - cy * 2 - i
    return [luma.astype(np.uint16), u.astype(np.uint16), v.astype(np.uint16)]


def as_yuv420p10le(planes: list[U16]) -> U16:
    return np.concatenate([p.ravel() for p in planes])


def as_p010le(planes: list[U16]) -> U16:
    y, u, v = planes
    uv = np.empty((H // 2, W), np.uint16)
    uv[:, 0::2], uv[:, 1::2] = u, v
    return np.concatenate([(y << 6).ravel(), (uv << 6).ravel()])


def encode(dev: Device, codec: str, frames: list[U16], pix_fmt: str = "yuv420p10le", **kw: Any) -> list[Packet]:
    with dev.encoder(codec, W, H, FPS, pix_fmt=pix_fmt, **kw) as enc:
        out: list[Packet] = []
        for f in frames:
            out += enc.encode(f)
        out += enc.flush()
        return out


def write(packets: list[Packet], path: Path, codec: str, pix_fmt: str) -> None:
    mux = Muxer(path, codec, W, H, Fraction(1, FPS), Fraction(FPS), pix_fmt)
    try:
        mux.write(packets)
    finally:
        mux.close()


def probe(path: Path) -> dict[str, str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                          "stream=codec_name,profile,pix_fmt", "-of", "default=nw=1", str(path)],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def decoded_planes(path: Path) -> list[list[U16]]:
    """Every frame of ``path`` decoded by PyAV (FFmpeg's decoders), as 10-bit sample planes."""
    out = []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            assert frame.format.name == "yuv420p10le"
            planes = []
            for plane, (rows, cols) in zip(frame.planes, ((H, W), (H // 2, W // 2), (H // 2, W // 2)), strict=True):
                a = np.frombuffer(memoryview(plane), np.uint16).reshape(rows, plane.line_size // 2)
                planes.append(a[:, :cols].copy())
            out.append(planes)
    return out


def psnr10(a: list[U16], b: list[U16]) -> float:
    diff = np.concatenate([(x.astype(np.int64) - y).ravel() for x, y in zip(a, b, strict=True)])
    mse = float(np.mean(diff * diff))
    return 99.0 if mse == 0 else 10 * float(np.log10(1023 ** 2 / mse))


CASES = [
    pytest.param("hevc", "Main 10", {}, id="x265-main10"),
    pytest.param("av1", "Main", {}, id="svtav1-10bit"),
    pytest.param("vp9", "Profile 2", {}, id="vp9-profile2", marks=pytest.mark.skipif(
        not VP9_10BIT, reason="this PyAV build's libvpx has no high bit depth (libvpx-vp9 takes no yuv420p10le)")),
    pytest.param("h264", "High 10", {}, id="x264-high10"),
]


@pytest.mark.parametrize(("codec", "profile", "kw"), CASES)
def test_10bit_encode_is_10bit_and_close(dev: Device, tmp_path: Path, codec: str, profile: str,
                                         kw: dict[str, Any]) -> None:
    sources = [gradient(i) for i in range(N)]
    packets = encode(dev, codec, [as_yuv420p10le(p) for p in sources], crf=12, **kw)
    path = tmp_path / "out.mkv"
    write(packets, path, codec, "yuv420p10le")
    assert probe(path) == {"codec_name": codec, "profile": profile, "pix_fmt": "yuv420p10le"}
    got = decoded_planes(path)
    assert len(got) == N
    for want, have in zip(sources, got, strict=True):
        assert psnr10(want, have) >= 40.0
        # 10 bits really came through: an 8-bit path leaves every sample a multiple of 4.
        assert np.count_nonzero(have[0] % 4) > have[0].size // 2


def test_p010_input_encodes_as_yuv420p10le(dev: Device) -> None:
    sources = [gradient(i) for i in range(3)]
    planar = encode(dev, "hevc", [as_yuv420p10le(p) for p in sources], qp=20)
    p010 = encode(dev, "hevc", [as_p010le(p) for p in sources], pix_fmt="p010le", qp=20)
    assert [p.data for p in p010] == [p.data for p in planar]


def test_samples_above_10_bits_are_cut(dev: Device) -> None:
    """The encoder never sees more than 10 bits, whatever the guest wrote."""
    full = np.full(W * H * 3 // 2, 0x3FF, np.uint16)
    over = np.full(W * H * 3 // 2, 0xFFFF, np.uint16)
    assert [p.data for p in encode(dev, "hevc", [over], qp=20)] == [p.data for p in encode(dev, "hevc", [full], qp=20)]


@pytest.mark.parametrize(("codec", "pix_fmt", "profile"), [
    ("h264", "yuv422p", "High 4:2:2"), ("h264", "yuv444p", "High 4:4:4 Predictive"),
    ("hevc", "yuv444p", "Rext"), ("vp9", "yuv444p", "Profile 1"), ("vp9", "yuv422p", "Profile 1"),
    ("mjpeg", "yuv422p", "Baseline"),
])
def test_8bit_422_444_encode_keeps_chroma(dev: Device, tmp_path: Path, codec: str, pix_fmt: str,
                                          profile: str) -> None:
    cw = W if pix_fmt == "yuv444p" else W // 2
    rng = np.random.default_rng(1)
    frames = [rng.integers(16, 235, W * H + 2 * cw * H, dtype=np.uint8) for _ in range(2)]
    with dev.encoder(codec, W, H, FPS, pix_fmt=pix_fmt) as enc:
        packets = [p for f in frames for p in enc.encode(f)] + enc.flush()
    path = tmp_path / "out.mkv"
    write(packets, path, codec, pix_fmt)
    probed = "yuvj422p" if codec == "mjpeg" else pix_fmt  # JPEG's full range shows in the name
    assert probe(path) == {"codec_name": codec, "profile": profile, "pix_fmt": probed}


@pytest.mark.parametrize(("codec", "pix_fmt", "takes"), [
    ("vp8", "yuv420p10le", "yuv420p, nv12, rgb24, bgra"),
    ("av1", "yuv444p", "yuv420p, nv12, rgb24, bgra, yuv420p10le, p010le"),
    ("mpeg4", "p010le", "yuv420p, nv12, rgb24, bgra"),
])
def test_a_format_the_codec_cannot_take_is_bad_arg(dev: Device, codec: str, pix_fmt: str, takes: str) -> None:
    impl = {"vp8": "libvpx", "av1": "libsvtav1", "mpeg4": "mpeg4"}[codec]
    with pytest.raises(DeviceError) as e:
        dev.encoder(codec, W, H, FPS, pix_fmt=pix_fmt)
    assert e.value.code == ErrorCode.BAD_ARG
    assert str(e.value) == f"task failed: BAD_ARG: {impl} cannot encode {pix_fmt}; it takes {takes}"


@pytest.mark.skipif(VP9_10BIT, reason="this PyAV build's libvpx-vp9 encodes 10-bit")
def test_vp9_10bit_without_high_bit_depth_libvpx_is_refused(dev: Device) -> None:
    with pytest.raises(DeviceError) as e:
        dev.encoder("vp9", W, H, FPS, pix_fmt="yuv420p10le")
    assert e.value.code == ErrorCode.BAD_ARG
    assert str(e.value) == ("task failed: BAD_ARG: libvpx-vp9 cannot encode yuv420p10le; "
                            "it takes yuv420p, nv12, rgb24, bgra, yuv422p, yuv444p")


@pytest.mark.parametrize("pix_fmt", ["yuv420p10le", "p010le"])
def test_strided_odd_sized_10bit_input_encodes_as_packed(dev: Device, pix_fmt: str) -> None:
    """Padded rows at odd offsets (strides the guest chose) and an odd picture size: the
    worker reads the same samples as from a packed frame, so the packets are the same."""
    w, h = 97, 53
    cw, ch = (w + 1) // 2, (h + 1) // 2
    rng = np.random.default_rng(7)
    y, u, v = (rng.integers(0, 1024, shape, dtype=np.uint16) for shape in ((h, w), (ch, cw), (ch, cw)))
    planes: list[npt.NDArray[Any]]
    if pix_fmt == "yuv420p10le":
        planes = [y, u, v]
    else:
        uv = np.empty((ch, 2 * cw), np.uint16)
        uv[:, 0::2], uv[:, 1::2] = u, v
        planes = [y << 6, uv << 6]
    packed = np.concatenate([p.ravel() for p in planes])
    with dev.encoder("av1", w, h, FPS, pix_fmt=pix_fmt, qp=30) as enc:
        want = [p.data for p in enc.encode(packed) + enc.flush()]
    strides = tuple(p.shape[1] * 2 + 37 for p in planes)  # odd: every row starts unaligned
    total = sum(p.shape[0] * s for p, s in zip(planes, strides, strict=True)) + 1
    buf = dev.alloc(total)
    try:
        views, pos = [], 1  # the picture starts one byte into the buffer
        for p, s in zip(planes, strides, strict=True):
            rows = np.ndarray(p.shape, "<u2", buffer=dev.region.mem, offset=buf.offset + pos, strides=(s, 2))
            rows[:] = p
            views.append(np.ndarray((p.shape[0], p.shape[1] * 2), np.uint8, buffer=dev.region.mem,
                                    offset=buf.offset + pos, strides=(s, 1)))
            pos += p.shape[0] * s
        frame = Frame(w, h, pix_fmt_id(pix_fmt), None, views, offset=buf.offset + 1, strides=strides,
                      nbytes=total - 1)
        with dev.encoder("av1", w, h, FPS, pix_fmt=pix_fmt, qp=30) as enc:
            got = [p.data for p in enc.encode(frame) + enc.flush()]
    finally:
        dev.free(buf)
    assert want and got == want
