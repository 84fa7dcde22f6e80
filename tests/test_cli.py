"""The vmediad CLI against a real hostd; outputs judged by stock ffprobe when installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from vmediad.cli import main


def ffprobe_frames(path: Path) -> int:
    r = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                        "stream=nb_read_frames,codec_name,width,height", "-of", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["streams"][0]["nb_read_frames"])


def test_caps_lists_every_codec(hostd: Hostd) -> None:
    r = CliRunner().invoke(main, ["caps", "--socket", hostd.socket_path, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    names = {c["name"]: c for c in doc["codecs"]}
    assert set(names) == {"h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4"}
    assert names["av1"]["decoder"]["impl"] == "libdav1d" and names["av1"]["encoder"]["impl"] == "libsvtav1"
    table = CliRunner().invoke(main, ["caps", "--socket", hostd.socket_path])
    assert table.exit_code == 0 and "libx265" in table.output


def test_status_json_and_table(hostd: Hostd) -> None:
    import guestlib

    with guestlib.attach(hostd.socket_path, name="stat-vm") as dev:
        for _ in range(5):
            dev.nop().wait()
        r = CliRunner().invoke(main, ["status", "--socket", hostd.socket_path, "--json"])
        assert r.exit_code == 0, r.output
        s = json.loads(r.output)
        vm = next(v for v in s["vms"] if v["name"] == "stat-vm")
        assert vm["tasks_done"] == 5 and vm["queue_depth"] == 0 and vm["inflight"] == 0
        assert vm["latency"]["count"] == 5 and vm["latency"]["p99_us"] >= vm["latency"]["p50_us"] > 0
        assert {"channels", "policy", "uptime_s", "epoch"} <= set(s)
        assert s["control"]["accepted"] >= 2 and s["control"]["refused"] == 0 and s["control"]["connections"] >= 1
        assert len(s["channels"]) == 2
        t = CliRunner().invoke(main, ["status", "--socket", hostd.socket_path])
        assert t.exit_code == 0 and "stat-vm" in t.output


def test_clear_errors_for_bad_input(short_tmp: Path) -> None:
    r = CliRunner().invoke(main, ["status", "--socket", str(short_tmp / "nope.sock")])
    assert r.exit_code != 0 and "cannot reach hostd" in r.output
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", str(short_tmp / "nope.sock"), "--size", "12x7"])
    assert r.exit_code != 0 and "even" in r.output
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", str(short_tmp / "nope.sock")])
    assert r.exit_code != 0 and "no hostd socket" in r.output
    r = CliRunner().invoke(main, ["bench", "codec", "--case", "av1 decode"])  # no such case: no run
    assert r.exit_code == 2 and "no case matches" in r.output and "h264 decode 720p" in r.output


def test_vm_spawn_encode_decode_transcode(hostd: Hostd, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--count", "2", "--workload",
                                  "encode", "--size", "320x240", "--frames", "24", "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    reports = json.loads(r.output[r.output.index("[\n"):])
    assert [(x["name"], x["state"], x["frames"]) for x in reports] == [("vm0", "done", 24), ("vm1", "done", 24)]
    assert (out / "vm0.mp4").stat().st_size > 1000
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--workload", "decode",
                                  "--input", str(out / "vm0.mp4"), "--name-prefix", "dec", "--frames", "1000",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--workload", "transcode",
                                  "--input", str(out / "vm1.mp4"), "--codec", "hevc", "--name-prefix", "tx",
                                  "--output", str(out)])
    assert r.exit_code == 0, r.output
    y4m = (out / "dec0.y4m").read_bytes()
    assert y4m.startswith(b"YUV4MPEG2 W320 H240") and y4m.count(b"FRAME\n") == 24
    if os.environ.get("VMEDIAD_NO_FFPROBE") is None and _have_ffprobe():
        assert ffprobe_frames(out / "vm0.mp4") == 24
        assert ffprobe_frames(out / "tx0.mp4") == 24
        assert ffprobe_frames(out / "dec0.y4m") == 24


def _have_ffprobe() -> bool:
    from tests.conftest import HAVE_FFMPEG

    return HAVE_FFMPEG


@needs_ffmpeg
def test_demo_runs_four_vms_and_leaves_valid_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "vmediad.cli", "demo", "--output", str(out), "--frames", "20",
                        "--size", "320x240", "--channels", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo summary" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["vm0.mp4", "vm1.y4m", "vm2.mp4", "vm3.webm"]
    for f in files:
        assert ffprobe_frames(out / f) == 20


def test_ctrl_c_stops_vms_cleanly(hostd: Hostd, tmp_path: Path) -> None:
    out = tmp_path / "cc"
    p = subprocess.Popen([sys.executable, "-m", "vmediad.cli", "vm", "spawn", "--socket", hostd.socket_path,
                          "--count", "2", "--size", "160x120", "--frames", "100000", "--output", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def both_encoding() -> bool:
        vms = hostd.device.statistics()["vms"]
        return len(vms) == 2 and all(v["tasks_done"] >= 20 for v in vms)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not both_encoding():
        time.sleep(0.1)
    assert both_encoding(), "both VMs should be encoding before Ctrl-C"
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 0, text
    assert "stopping the VMs cleanly" in text and "stopped" in text
    for name in ("vm0.mp4", "vm1.mp4"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and b"moov" in data  # the muxer was closed: a finished mp4
        if _have_ffprobe():
            assert ffprobe_frames(out / name) > 0
    deadline = time.monotonic() + 10
    while hostd.device.statistics()["guests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hostd.device.statistics()["guests"] == 0


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_status_watch_refreshes_until_ctrl_c(hostd: Hostd) -> None:
    p = subprocess.Popen([sys.executable, "-m", "vmediad.cli", "status", "--socket", hostd.socket_path, "--watch",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    snaps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(snaps) >= 2 and all(s["state"] == "running" for s in snaps)
    assert snaps[-1]["uptime_s"] > snaps[0]["uptime_s"]


def test_soak_command_small(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "vmediad.cli", "soak", "--tasks", "1500", "--guests", "2",
                        "--restarts", "1", "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ok"] is True and res["mismatches"] == 0 and res["tasks"] >= 1500
    assert res["restarts"] == 1 and len(res["reattach_s"]) == 1 and res["reattach_s"][0] < 5
    assert res["hostd"]["shm_after"] == res["hostd"]["shm_before"]
    assert res["hostd"]["fd_idle_after"] == res["hostd"]["fd_idle_before"]
