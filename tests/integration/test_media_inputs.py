"""Inputs a user meets: audio-only, garbage, truncated files; each ends in one clear line.

Inputs are made here with PyAV (a short clip, then its bytes cut); stock ffprobe is the
judge of how many frames a truncated file holds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from av.audio.stream import AudioStream
from av.video.stream import VideoStream
from click.testing import CliRunner

import guestlib
from guestlib.device import Device
from guestlib.media import MediaError, demux_elementary, open_video
from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from vmediad.tools.cli import main

W, H = 160, 120


def make_clip(path: Path, frames: int = 150, codec: str = "libx264", faststart: bool = True) -> Path:
    """A moving gradient, ``frames`` long, 30 fps, keyframe every 30 frames."""
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as c:
        s = c.add_stream(codec, rate=30)
        assert isinstance(s, VideoStream)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"g": "30", "threads": "1"}  # one thread: the same bytes, so the same cut, every run
        for i in range(frames):
            y = ((np.arange(W)[None, :] + 2 * np.arange(H)[:, None] + 5 * i) % 256).astype(np.uint8)
            f = av.VideoFrame.from_ndarray(np.dstack([y, y // 2, 255 - y]), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def make_truncated(tmp: Path) -> Path:
    """A faststart mp4 (moov first) cut in the middle of its media data."""
    data = make_clip(tmp / "full.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: the index survives the cut
    cut = tmp / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 5])
    return cut


def make_audio_only(tmp: Path) -> Path:
    path = tmp / "audio.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=48000)
        assert isinstance(s, AudioStream)
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 48000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def ffprobe_frames(path: Path) -> int:
    r = subprocess.run(["ffprobe", "-v", "quiet", "-select_streams", "v:0", "-count_frames", "-show_entries",
                        "stream=nb_read_frames", "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["streams"][0]["nb_read_frames"])


@pytest.fixture
def dev(hostd: Hostd) -> Iterator[Device]:
    with guestlib.attach(hostd.socket_path, name="media", region_size=32 << 20) as d:
        yield d


def spawn(hostd: Hostd, out: Path, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--output", str(out), *args])
    return r.exit_code, r.stdout, r.stderr


def test_open_video_says_why_an_input_is_unusable(short_tmp: Path) -> None:
    with pytest.raises(MediaError, match=r"audio\.m4a: no video stream \(it has audio streams\)"):
        open_video(make_audio_only(short_tmp))
    garbage = short_tmp / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 80)
    with pytest.raises(MediaError, match=r"garbage\.mp4: cannot read it as a media file \(Invalid data"):
        open_video(garbage)
    with pytest.raises(MediaError, match="no such file"):
        open_video(short_tmp / "missing.mp4")


@pytest.mark.parametrize("kind", ["audio", "garbage"])
def test_vm_spawn_refuses_unusable_input_in_one_line(hostd: Hostd, short_tmp: Path, kind: str) -> None:
    if kind == "audio":
        path, why = make_audio_only(short_tmp), "no video stream (it has audio streams)"
    else:
        path = short_tmp / "garbage.mp4"
        path.write_bytes(bytes(range(256)) * 80)
        why = "cannot read it as a media file (Invalid data found when processing input)"
    for workload in ("decode", "transcode"):
        code, out, err = spawn(hostd, short_tmp / "out", "--workload", workload, "--input", str(path))
        assert code == 1
        assert err == f"Error: cannot use --input: {path}: {why}\n"
        assert out == ""
    assert hostd.device.statistics()["guests"] == 0  # refused before any VM was started


@needs_ffmpeg
def test_truncated_faststart_mp4_decodes_every_frame_ffmpeg_gets(hostd: Hostd, short_tmp: Path) -> None:
    cut = make_truncated(short_tmp)
    want = ffprobe_frames(cut)
    assert 60 < want < 120  # cut in the middle of the media data
    code, out, err = spawn(hostd, short_tmp / "out", "--workload", "decode", "--input", str(cut), "--json")
    assert code == 0, err
    [r] = json.loads(out)
    # The cut-off packet is skipped (as ffmpeg does); the frames the decoder buffered are flushed.
    assert (r["state"], r["frames"], r["codec"], r["errors"]) == ("done", want, "h264", 1)
    assert r["detail"].startswith("packet ") and "skipped" in r["detail"]
    assert (short_tmp / "out" / "vm0.y4m").read_bytes().count(b"FRAME\n") == want
    assert f"vm0: done with 1 error(s): {r['detail']}\n" in err
    assert "Traceback" not in err


@needs_ffmpeg
def test_transcode_of_a_truncated_mp4_keeps_every_frame(dev: Device, short_tmp: Path) -> None:
    cut = make_truncated(short_tmp)
    want = ffprobe_frames(cut)
    problems: list[str] = []
    stats = guestlib.transcode(dev, cut, short_tmp / "t.mkv", "vp9", problems=problems)
    assert stats["frames"] == want and stats["problems"] == len(problems) == 1
    assert ffprobe_frames(short_tmp / "t.mkv") == want


def test_demux_elementary_without_damage_notes_nothing(short_tmp: Path) -> None:
    clip = make_clip(short_tmp / "c.mp4", frames=40)
    problems: list[str] = []
    container, stream = open_video(clip)
    with container:
        packets = list(demux_elementary(container, stream, problems))
    assert len(packets) == 40 and problems == []
    assert bytes(packets[0])[:4] == b"\x00\x00\x00\x01"  # Annex-B: in-band start codes
