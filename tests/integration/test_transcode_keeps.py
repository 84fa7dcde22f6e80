"""guestlib.transcode (and ``vm spawn --workload transcode``) keeps what it is given: the pixel
format (10-bit stays 10-bit, 4:4:4 stays 4:4:4), the colour tags (range, primaries, transfer,
matrix) in the bitstream and the container, and an interlaced input's field order; what the
output codec cannot keep is converted and named in the summary and in the file's ``comment``.
Every input is made by stock ffmpeg and every judgement is stock ffprobe's."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

import guestlib
from guestlib.device import Device
from guestlib.media import Keep, _conversion, _nearest, transcode
from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from vmediad.tools.cli import main

pytestmark = needs_ffmpeg

W, H, FRAMES = 320, 240, 20
COLOUR = ("color_range", "color_primaries", "color_transfer", "color_space")
# name: stock ffmpeg's arguments for a 320x240 20-frame input
INPUTS = {
    "hevc10": ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error"],
    "bt709": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-color_range", "tv", "-colorspace", "bt709",
              "-color_primaries", "bt709", "-color_trc", "bt709"],
    "full601": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-color_range", "pc", "-colorspace", "smpte170m",
                "-color_primaries", "smpte170m", "-color_trc", "smpte170m"],
    "tff": ["-vf", "setfield=tff", "-flags", "+ildct+ilme", "-c:v", "libx264", "-x264-params", "tff=1",
            "-pix_fmt", "yuv420p"],
    "bff": ["-vf", "setfield=bff", "-flags", "+ildct+ilme", "-c:v", "libx264", "-x264-params", "bff=1",
            "-pix_fmt", "yuv420p"],
    "yuv444": ["-c:v", "libx264", "-pix_fmt", "yuv444p"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keep")
    out = {}
    for name, args in INPUTS.items():
        out[name] = d / f"{name}.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=25",
                        "-frames:v", str(FRAMES), *args, str(out[name])], check=True, timeout=60)
    return out


@pytest.fixture
def dev(make_hostd: Callable[..., Hostd]) -> Iterator[Device]:
    h = make_hostd(region_default=64 << 20)
    with guestlib.attach(h.socket_path, name="keep", region_size=64 << 20) as d:
        yield d


def probe(path: Path) -> dict[str, str]:
    """ffprobe's view of the video stream (and the file's comment tag, as ``comment``)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                          "stream=codec_name,profile,pix_fmt,field_order," + ",".join(COLOUR) + ":format_tags=comment",
                          "-of", "default=nw=1", str(path)], check=True, capture_output=True, text=True,
                         timeout=30).stdout
    got = dict(line.split("=", 1) for line in out.splitlines())
    got["comment"] = got.pop("TAG:comment", got.pop("TAG:COMMENT", ""))
    return got


def bitstream(path: Path, codec: str, tmp: Path) -> dict[str, str]:
    """ffprobe's view of the elementary stream alone (no container to take tags from)."""
    raw = tmp / f"raw.{codec}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(path), "-c", "copy", "-f", codec, str(raw)],
                   check=True, timeout=30)
    return probe(raw)


def samples10(path: Path, index: int = 5) -> np.ndarray:
    """Luma of frame ``index`` of ``path`` decoded by PyAV, as 10-bit samples."""
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == index:
                assert frame.format.name == "yuv420p10le"
                plane = frame.planes[0]
                return np.frombuffer(memoryview(plane), np.uint16).reshape(H, plane.line_size // 2)[:, :W].copy()
    raise AssertionError(f"{path} has no frame {index}")


@pytest.mark.parametrize(("codec", "profile"), [("hevc", "Main 10"), ("h264", "High 10")])
def test_10bit_hevc_stays_10bit(dev: Device, inputs: dict[str, Path], tmp_path: Path, codec: str,
                                profile: str) -> None:
    out = tmp_path / "out.mp4"
    got = transcode(dev, inputs["hevc10"], out, codec, crf=16)
    assert (got["frames"], got["pix_fmt"], got["conversions"]) == (FRAMES, "yuv420p10le", [])
    have = probe(out)
    assert (have["codec_name"], have["profile"], have["pix_fmt"]) == (codec, profile, "yuv420p10le")
    assert have["comment"] == ""
    want, seen = samples10(inputs["hevc10"]).astype(np.int64), samples10(out)
    mse = float(np.mean((want - seen) ** 2))
    assert 10 * np.log10(1023 ** 2 / mse) >= 40.0  # the samples themselves came through, at 10 bits


@pytest.mark.parametrize(("name", "codec"), [("bt709", "h264"), ("bt709", "hevc"), ("full601", "h264"),
                                             ("full601", "hevc"), ("full601", "vp9"), ("bt709", "av1")])
def test_colour_tags_are_kept(dev: Device, inputs: dict[str, Path], tmp_path: Path, name: str, codec: str) -> None:
    out = tmp_path / ("out.webm" if codec == "vp9" else "out.mp4")
    got = transcode(dev, inputs[name], out, codec)
    assert got["conversions"] == []
    src, have = probe(inputs[name]), probe(out)
    want = {k: src[k] for k in COLOUR}
    assert want["color_space"] in ("bt709", "smpte170m") and want["color_range"] in ("tv", "pc")
    assert {k: have[k] for k in COLOUR} == want
    if codec in ("h264", "hevc"):  # in the bitstream itself too (the SPS's VUI)
        raw = bitstream(out, codec, tmp_path)
        assert {k: raw[k] for k in COLOUR} == want


@pytest.mark.parametrize(("name", "order"), [("tff", "tt"), ("bff", "bb")])
def test_interlaced_h264_keeps_its_field_order(dev: Device, inputs: dict[str, Path], tmp_path: Path, name: str,
                                               order: str) -> None:
    assert probe(inputs[name])["field_order"] == order
    out = tmp_path / "out.mp4"
    got = transcode(dev, inputs[name], out, "h264")
    assert (got["frames"], got["conversions"]) == (FRAMES, [])
    assert probe(out)["field_order"] == order
    assert bitstream(out, "h264", tmp_path)["field_order"] == order


def test_444_stays_444_where_the_codec_takes_it(dev: Device, inputs: dict[str, Path], tmp_path: Path) -> None:
    for codec, profile in (("h264", "High 4:4:4 Predictive"), ("vp9", "Profile 1")):
        out = tmp_path / f"out-{codec}.mkv"
        got = transcode(dev, inputs["yuv444"], out, codec)
        assert (got["pix_fmt"], got["conversions"]) == ("yuv444p", [])
        have = probe(out)
        assert (have["pix_fmt"], have["profile"]) == ("yuv444p", profile)


@pytest.mark.parametrize(("name", "codec", "pix_fmt", "field_order", "conversion"), [
    ("hevc10", "mpeg4", "yuv420p", "progressive", "yuv420p10le→yuv420p (bit depth)"),
    ("yuv444", "av1", "yuv420p", "progressive", "yuv444p→yuv420p (chroma)"),
    ("tff", "hevc", "yuv420p", "progressive", "interlaced→progressive"),
])
def test_what_the_codec_cannot_keep_is_converted_and_named(dev: Device, inputs: dict[str, Path], tmp_path: Path,
                                                           name: str, codec: str, pix_fmt: str, field_order: str,
                                                           conversion: str) -> None:
    out = tmp_path / "out.mkv"
    got = transcode(dev, inputs[name], out, codec)
    assert (got["frames"], got["pix_fmt"], got["conversions"]) == (FRAMES, pix_fmt, [conversion])
    have = probe(out)
    assert (have["pix_fmt"], have["field_order"]) == (pix_fmt, field_order)
    assert have["comment"] == f"vmediad conversions: {conversion}"


def test_vm_spawn_transcode_names_the_conversion(make_hostd: Callable[..., Hostd], inputs: dict[str, Path],
                                                 short_tmp: Path) -> None:
    h = make_hostd(region_default=64 << 20)
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", h.socket_path, "--output", str(short_tmp / "out"),
                                  "--json", "--workload", "transcode", "--input", str(inputs["hevc10"]),
                                  "--codec", "mpeg4"])
    assert r.exit_code == 0, r.stderr
    [vm] = json.loads(r.stdout)
    assert (vm["state"], vm["frames"]) == ("done", FRAMES)
    assert vm["codec"] == "hevc->mpeg4 (yuv420p10le→yuv420p (bit depth))"
    assert vm["extra"]["conversions"] == ["yuv420p10le→yuv420p (bit depth)"]
    assert probe(Path(vm["output"]))["comment"] == "vmediad conversions: yuv420p10le→yuv420p (bit depth)"


def test_conversion_names_and_nearest_formats() -> None:
    assert _conversion("yuv422p10le", "yuv420p") == "yuv422p10le→yuv420p (bit depth, chroma)"
    assert _conversion("gbrp", "yuv444p") == "gbrp→yuv444p (RGB→YUV)"
    assert _conversion("rgb24", "yuv420p") == "rgb24→yuv420p (chroma, RGB→YUV)"
    assert _conversion("yuvj420p", "yuv420p") is None  # the range goes in the colour tags
    assert _conversion("p010le", "yuv420p10le") is None  # the same samples
    assert [_nearest(f) for f in ("gray", "gray10le", "yuv440p", "yuv411p", "yuv410p", "gbrp", "yuv444p12le")] == \
        ["yuv420p", "yuv420p10le", "yuv444p", "yuv422p", "yuv420p", "yuv444p", "yuv420p10le"]
    keep = Keep(colour={"color_range": 1}, interlace={"flags": "+ildct+ilme", "x264-params": "tff=1"})
    assert keep.encoder_options({"x264-params": "keyint=10", "flags": "+cgop", "crf": 20}) == {
        "color_range": "1", "flags": "+cgop+ildct+ilme", "x264-params": "tff=1:keyint=10", "crf": 20}
