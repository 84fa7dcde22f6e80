"""`vmediad vm spawn`: stopping (exit codes, no process or semaphore left), output streams,
whole-input decode, the codec column, mjpeg, help and refusals.

The fleet runs as a real subprocess (so it can be signalled and killed); its VMs are its
children, found through /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from tests.hostile_guests import wait_until
from tests.integration.test_media_inputs import ffprobe_frames, make_clip
from vmediad.tools.cli import main
from vmediad.tools.soak import HostdProcess


@pytest.fixture
def hostd_proc(short_tmp: Path) -> Iterator[HostdProcess]:
    h = HostdProcess(short_tmp / "h.sock", channels=2)
    h.start()
    yield h
    if h.alive():
        h.kill()


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def named_semaphores(pid: int) -> list[str]:
    """POSIX named semaphores a process has open (sem_open maps /dev/shm/sem.NAME)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [line.split()[-1] for line in maps.splitlines() if "/dev/shm/sem." in line]


class Fleet:
    """`vmediad vm spawn` of two endless encoders, as a subprocess."""

    def __init__(self, socket: str, out: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmediad", "vm", "spawn", "--socket", socket, "--count", "2", "--size",
             "160x120", "--frames", "1000000", "--output", str(out), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.kids: list[int] = []

    def wait_encoding(self, h: HostdProcess) -> None:
        def both() -> bool:
            vms = h.status()["vms"]
            return len(vms) == 2 and all(v["tasks_done"] >= 20 for v in vms)

        wait_until(both, 60, "both VMs encoding", 0.1)
        self.kids = descendants(self.proc.pid)
        assert len(self.kids) >= 2  # the two VMs (and multiprocessing's resource tracker)
        for pid in [self.proc.pid, *self.kids]:
            assert named_semaphores(pid) == [], pid  # nothing that could be left in /dev/shm

    def finish(self, timeout: float) -> tuple[int, str, str, float]:
        t0 = time.monotonic()
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err, time.monotonic() - t0

    def assert_nothing_left(self) -> None:
        wait_until(lambda: not any(alive(k) for k in self.kids), 5, "the VM processes to end")


def test_ctrl_c_with_hostd_gone_ends_in_seconds_with_130(hostd_proc: HostdProcess, short_tmp: Path) -> None:
    h = hostd_proc
    fleet = Fleet(h.socket, short_tmp / "out")
    fleet.wait_encoding(h)
    time.sleep(2.2)  # one round of plain progress lines
    h.kill()  # and it never comes back: the VMs' next tasks wait for a re-attach
    time.sleep(0.5)
    fleet.proc.send_signal(signal.SIGINT)
    code, out, err, took = fleet.finish(30)
    assert code == 130, err
    assert took < 5.0
    fleet.assert_nothing_left()
    assert "SIGINT: stopping the VMs cleanly" in err
    # stderr is a pipe: plain progress lines, one per VM per round, and the final states.
    assert "vm0 encode h264 running " in err and "vm1 encode h264 running " in err
    assert "vm0 encode h264 stopped " in err and "vm1 encode h264 stopped " in err
    assert "running" not in out and "stopping" not in out  # progress never goes to stdout
    rows = [line for line in out.splitlines() if line.startswith("│ vm")]
    assert len(rows) == 2 and all("│ stopped │" in row for row in rows)


def test_sigterm_stops_cleanly_with_143_and_json_only_on_stdout(hostd_proc: HostdProcess, short_tmp: Path) -> None:
    h = hostd_proc
    fleet = Fleet(h.socket, short_tmp / "out", "--json")
    fleet.wait_encoding(h)
    fleet.proc.send_signal(signal.SIGTERM)
    code, out, err, took = fleet.finish(30)
    assert code == 143, err
    assert took < 7.0
    reports = json.loads(out)  # the whole of stdout is the JSON summary
    assert [(r["name"], r["state"]) for r in reports] == [("vm0", "stopped"), ("vm1", "stopped")]
    assert "SIGTERM: stopping the VMs cleanly" in err
    fleet.assert_nothing_left()
    for r in reports:
        data = Path(r["output"]).read_bytes()
        assert r["frames"] > 0 and b"moov" in data  # each muxer was closed: a finished mp4
    wait_until(lambda: h.status()["guests"] == 0, 10, "hostd to see the guests detach")


def test_guests_die_with_a_killed_parent(hostd_proc: HostdProcess, short_tmp: Path) -> None:
    h = hostd_proc
    fleet = Fleet(h.socket, short_tmp / "out")
    fleet.wait_encoding(h)
    fleet.proc.kill()
    fleet.proc.wait(10)
    fleet.assert_nothing_left()  # PR_SET_PDEATHSIG
    wait_until(lambda: h.status()["guests"] == 0, 10, "hostd to reclaim the guests")


def test_a_second_ctrl_c_stops_at_once(hostd_proc: HostdProcess, short_tmp: Path) -> None:
    h = hostd_proc
    fleet = Fleet(h.socket, short_tmp / "out")
    fleet.wait_encoding(h)
    vms = [pid for pid in fleet.kids if "spawn_main" in _cmdline(pid)]
    assert len(vms) == 2
    for pid in vms:  # stopped, the VMs see both signals at once when continued
        os.kill(pid, signal.SIGSTOP)
    fleet.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    fleet.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    for pid in vms:
        os.kill(pid, signal.SIGCONT)
    code, _out, err, took = fleet.finish(30)
    assert code == 130, err
    assert took < 5.0
    assert "stopping the VMs at once (SIGTERM)" in err
    fleet.assert_nothing_left()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def spawn(hostd: Hostd, out: Path, *args: str) -> list[dict[str, object]]:
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--output", str(out), "--json",
                                  *args])
    assert r.exit_code == 0, r.stderr
    reports: list[dict[str, object]] = json.loads(r.stdout)
    return reports


@needs_ffmpeg
def test_decode_and_transcode_run_the_whole_input_and_show_its_codec(hostd: Hostd, short_tmp: Path) -> None:
    clip = make_clip(short_tmp / "in.mp4", frames=150)
    out = short_tmp / "out"
    [dec] = spawn(hostd, out, "--workload", "decode", "--input", str(clip), "--name-prefix", "dec")
    assert (dec["state"], dec["frames"], dec["total"], dec["codec"]) == ("done", 150, 150, "h264")
    assert (out / "dec0.y4m").read_bytes().count(b"FRAME\n") == 150
    [tx] = spawn(hostd, out, "--workload", "transcode", "--input", str(clip), "--codec", "vp9", "--name-prefix", "tx")
    assert (tx["state"], tx["frames"], tx["codec"]) == ("done", 150, "h264->vp9")
    assert ffprobe_frames(out / "tx0.webm") == 150
    [cut] = spawn(hostd, out, "--workload", "decode", "--input", str(clip), "--frames", "40", "--name-prefix", "cut")
    assert (cut["state"], cut["frames"], cut["total"]) == ("done", 40, 40)
    assert (out / "cut0.y4m").read_bytes().count(b"FRAME\n") == 40
    # No --input: the built-in clip, in --codec for a decode, mpeg4 for a transcode.
    [pd, pt] = [spawn(hostd, out, "--workload", w, "--codec", "vp9", "--size", "96x64", "--frames", "12",
                      "--name-prefix", w)[0] for w in ("decode", "transcode")]
    assert (pd["codec"], pd["frames"], pt["codec"], pt["frames"]) == ("vp9", 12, "mpeg4->vp9", 12)


@needs_ffmpeg
def test_decode_keeps_a_10_bit_streams_samples(hostd: Hostd, short_tmp: Path) -> None:
    """A 10-bit 4:2:0 HEVC input decodes into a 10-bit y4m, sample for sample what stock ffmpeg
    decodes: nothing is cut to 8 bits on the way."""
    clip = short_tmp / "in10.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=0.4",
                    "-pix_fmt", "yuv420p10le", "-c:v", "libx265", "-x265-params", "log-level=error", str(clip)],
                   check=True)
    want = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip), "-f", "rawvideo", "-pix_fmt", "yuv420p10le",
                           "-"], check=True, capture_output=True).stdout
    out = short_tmp / "out"
    [dec] = spawn(hostd, out, "--workload", "decode", "--input", str(clip), "--name-prefix", "ten")
    assert (dec["state"], dec["frames"], dec["codec"]) == ("done", 10, "hevc")
    y4m = (out / "ten0.y4m").read_bytes()
    header, _, body = y4m.partition(b"\n")
    assert b" C420p10" in header
    frames = body.split(b"FRAME\n")[1:]
    assert len(frames) == 10 and b"".join(frames) == want  # 96x64x1.5 samples x 2 bytes, each frame


@needs_ffmpeg
def test_mjpeg_encode_makes_a_file_ffprobe_reads(hostd: Hostd, short_tmp: Path) -> None:
    out = short_tmp / "out"
    [r] = spawn(hostd, out, "--workload", "encode", "--codec", "mjpeg", "--size", "320x240", "--frames", "17")
    assert (r["state"], r["frames"], r["codec"]) == ("done", 17, "mjpeg")
    assert ffprobe_frames(out / "vm0.mkv") == 17
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=codec_name,width,height,color_range", "-of", "csv=p=0", str(out / "vm0.mkv")],
                           capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert probe == "mjpeg,320,240,pc"


def test_help_describes_every_option_and_input_with_encode_is_refused(short_tmp: Path) -> None:
    r = CliRunner().invoke(main, ["vm", "spawn", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--count INTEGER RANGE number of VMs" in text
    assert "transcode: the OUTPUT codec" in text
    assert "--size TEXT WIDTHxHEIGHT" in text
    assert "--frames INTEGER RANGE encode: frames to encode [default: 120]; decode/transcode: stop after" in text
    assert "130 Ctrl-C, 143 SIGTERM" in text and "1 when a VM failed" in text
    clip = short_tmp / "x.mp4"
    clip.write_bytes(b"not looked at")
    sock = short_tmp / "nope.sock"
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", str(sock), "--workload", "encode", "--input", str(clip)])
    assert r.exit_code == 2
    assert "Error: --input is for decode and transcode" in r.stderr
