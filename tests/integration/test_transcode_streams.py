"""guestlib.transcode keeps what it is given: every frame's timestamp (a variable frame rate
stays variable) and, by default, the audio, copied unchanged.  Judged by stock ffprobe against
the input that stock ffmpeg made."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import guestlib
from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg

pytestmark = needs_ffmpeg


def _packets(path: Path, select: str, entries: str = "pts_time") -> list[list[str]]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", select, "-show_entries", f"packet={entries}",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    return [[f for f in line.split(",") if f] for line in out.splitlines() if line.strip(",")]


def _pts(path: Path, select: str) -> list[float]:
    return sorted(float(p[0]) for p in _packets(path, select))


@pytest.fixture(scope="module")
def vfr_with_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """H.264 at 25 fps with a 0.5 s hole after frame 20 (variable frame rate) plus AAC audio."""
    path = tmp_path_factory.mktemp("tx") / "in.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "2",
                    "-vf", "setpts='N/(25*TB)+gte(N\\,20)*0.5/TB'", "-fps_mode", "passthrough",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
                   check=True, timeout=60)
    return path


def test_timestamps_and_audio_are_kept(make_hostd: Callable[..., Hostd], vfr_with_audio: Path,
                                       tmp_path: Path) -> None:
    h = make_hostd(region_default=64 << 20)
    out = tmp_path / "out.mp4"
    with guestlib.attach(h.socket_path, name="tx", region_size=64 << 20) as dev:
        got = guestlib.transcode(dev, vfr_with_audio, out, "h264")
    want_v = _pts(vfr_with_audio, "v")
    assert len(want_v) == 38 and want_v[20] - want_v[19] > 0.5  # the input really has its hole
    assert got["frames"] == 38 and got["streams_copied"] == 1
    assert _pts(out, "v") == want_v  # every frame at its own time: the frame rate stays variable
    # The audio is the input's, packet for packet: timestamps and bytes.
    assert _packets(out, "a", "pts,dts,duration,size") == _packets(vfr_with_audio, "a", "pts,dts,duration,size")
    assert got["packets_copied"] == len(_packets(vfr_with_audio, "a"))


def test_audio_drop_and_a_cut_transcode_keeps_audio_to_the_cut(make_hostd: Callable[..., Hostd],
                                                                vfr_with_audio: Path, tmp_path: Path) -> None:
    h = make_hostd(region_default=64 << 20)
    with guestlib.attach(h.socket_path, name="tx", region_size=64 << 20) as dev:
        dropped = guestlib.transcode(dev, vfr_with_audio, tmp_path / "drop.mp4", "h264", audio="drop")
        cut = guestlib.transcode(dev, vfr_with_audio, tmp_path / "cut.mp4", "h264", max_frames=10)
        with pytest.raises(ValueError, match="audio must be 'copy' or 'drop'"):
            guestlib.transcode(dev, vfr_with_audio, tmp_path / "x.mp4", "h264", audio="mix")
    assert dropped["streams_copied"] == 0 and _pts(tmp_path / "drop.mp4", "a") == []
    assert _pts(tmp_path / "drop.mp4", "v") == _pts(vfr_with_audio, "v")
    assert cut["frames"] == 10
    audio = _pts(tmp_path / "cut.mp4", "a")
    # Audio up to the end of the 10th frame (0.40 s; a frame's length is taken from the average
    # rate, 19 fps here): cut with the video, not the whole 2 s.
    assert audio and 0.38 <= max(audio) < 0.45 and max(_pts(vfr_with_audio, "a")) > 1.9
