"""The vmediad CLI against a real hostd; outputs judged by stock ffprobe when installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import av
import pytest
from click.testing import CliRunner

from hostd.daemon import Hostd
from tests.conftest import needs_ffmpeg
from vmediad.tools.cli import main


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
    assert set(names) == {"h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4", "vp8"}
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
        assert "timeouts" in t.output and "since start: 5 tasks (0 failed)" in t.output


def test_clear_errors_for_bad_input(short_tmp: Path) -> None:
    r = CliRunner().invoke(main, ["status", "--socket", str(short_tmp / "nope.sock")])
    assert r.exit_code == 1 and "cannot reach hostd" in r.output
    # The same hint as vm spawn's, on one line.
    assert r.stderr.endswith("(start `vmediad hostd` or pass --socket / set VMEDIAD_SOCKET)\n")
    assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", str(short_tmp / "nope.sock"), "--size", "12x7"])
    assert r.exit_code != 0 and "even" in r.output
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", str(short_tmp / "nope.sock")])
    assert r.exit_code == 1 and r.stderr == (f"Error: no hostd socket at {short_tmp / 'nope.sock'} "
                                             "(start `vmediad hostd` or pass --socket / set VMEDIAD_SOCKET)\n")
    r = CliRunner().invoke(main, ["bench", "codec", "--case", "av1 decode"])  # no such case: no run
    assert r.exit_code == 2 and "no case matches" in r.output and "h264 decode 720p" in r.output


def test_hostd_help_states_the_default_socket_rule() -> None:
    r = CliRunner().invoke(main, ["hostd", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "$RUNTIME_DIRECTORY/hostd.sock under systemd" in text
    assert "/run/vmediad/hostd.sock when writable (root)" in text
    assert "else $XDG_RUNTIME_DIR/vmediad/hostd.sock" in text
    assert "Guests and client commands use $VMEDIAD_SOCKET, else the same rule" in text


def test_vm_spawn_encode_decode_transcode(hostd: Hostd, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["vm", "spawn", "--socket", hostd.socket_path, "--count", "2", "--workload",
                                  "encode", "--size", "320x240", "--frames", "24", "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    reports = json.loads(r.stdout)  # progress went to stderr
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
    r = subprocess.run([sys.executable, "-m", "vmediad", "demo", "--output", str(out), "--frames", "20",
                        "--size", "320x240", "--channels", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo summary" in r.stdout and "the shared screen, live: http://127.0.0.1:" in r.stdout
    assert "screen.png saved; screen.mp4: " in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["screen.mp4", "screen.png", "vm0.mp4", "vm1.y4m", "vm2.mp4"]
    for f in files[2:]:
        assert ffprobe_frames(out / f) == 20
    # 3 s of the screen, encoded on the device; only changes make frames (the VMs may be done).
    assert ffprobe_frames(out / "screen.mp4") >= 1
    with av.open(str(out / "screen.png")) as c:
        png = next(c.decode(video=0))
    assert (png.width, png.height) == (1280, 720)


def test_ctrl_c_stops_vms_cleanly(hostd: Hostd, tmp_path: Path) -> None:
    out = tmp_path / "cc"
    p = subprocess.Popen([sys.executable, "-m", "vmediad", "vm", "spawn", "--socket", hostd.socket_path,
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
    assert p.returncode == 130, text  # 128 + SIGINT
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


class LineReader(threading.Thread):
    """Collects a subprocess's stdout lines with the time each arrived."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[tuple[float, dict[str, Any]]] = []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append((time.monotonic(), json.loads(line)))  # every line is one JSON object

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for at, obj in list(self.lines):
                if pred(obj):
                    return at
            time.sleep(0.01)
        raise AssertionError(f"no such line within {timeout}s: {self.lines}")


def test_status_watch_json_streams_snapshots_and_events_until_ctrl_c(hostd: Hostd) -> None:
    import guestlib

    p = subprocess.Popen([sys.executable, "-m", "vmediad", "status", "--socket", hostd.socket_path, "--watch",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    reader = LineReader(p.stdout)
    reader.start()
    try:
        reader.wait_for(lambda o: "status" in o, 30)
        dev = guestlib.attach(hostd.socket_path, name="watched")
        reader.wait_for(lambda o: o.get("event") == "attach" and o["data"]["name"] == "watched")
        r = CliRunner().invoke(main, ["vm", "kill", "--socket", hostd.socket_path, "watched"])
        killed_at = time.monotonic()
        assert r.exit_code == 0, r.output
        at = reader.wait_for(lambda o: o.get("event") == "detach" and o["data"]["name"] == "watched")
        assert at - killed_at < 0.9  # flushed on arrival, not with the next snapshot
        dev.close()
        time.sleep(1.2)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
        reader.join(5)
    assert p.returncode == 130, err  # as vm spawn: 128 + SIGINT
    snaps = [o["status"] for _, o in reader.lines if "status" in o]
    assert len(snaps) >= 2 and all(s["state"] == "running" for s in snaps)
    assert snaps[-1]["uptime_s"] > snaps[0]["uptime_s"]
    events = [o for _, o in reader.lines if "event" in o]
    detach = next(e for e in events if e["event"] == "detach")
    assert detach["data"]["reason"] == "killed"
    assert set(detach["timestamp"]) == {"seconds", "microseconds"}
    assert all(set(o) in ({"status"}, {"event", "data", "timestamp"}) for _, o in reader.lines)


def test_vm_list_and_kill(hostd: Hostd, short_tmp: Path) -> None:
    import guestlib

    a = guestlib.attach(hostd.socket_path, name="ga")
    b = guestlib.attach(hostd.socket_path, name="gb")
    try:
        a.nop().wait(10)
        r = CliRunner().invoke(main, ["vm", "list", "--socket", hostd.socket_path, "--json"])
        assert r.exit_code == 0, r.output
        vms = json.loads(r.stdout)
        assert [(v["vm"], v["name"], v["pid"], v["state"]) for v in vms] == [
            (a.vm_id, "ga", os.getpid(), "running"), (b.vm_id, "gb", os.getpid(), "running")]
        assert vms[0]["tasks_done"] == 1 and vms[0]["tasks_failed"] == 0 and vms[0]["sessions"] == 0
        table = CliRunner().invoke(main, ["vm", "list", "--socket", hostd.socket_path])
        assert table.exit_code == 0 and "2 guests" in table.output and "gb" in table.output
        # By name, then by numeric id.
        r = CliRunner().invoke(main, ["vm", "kill", "--socket", hostd.socket_path, "ga"])
        assert (r.exit_code, r.stdout) == (0, f"killed vm {a.vm_id} (ga): reclaimed\n")
        with pytest.raises(guestlib.DeviceGone, match="killed"):
            a.nop().wait(10)
        r = CliRunner().invoke(main, ["vm", "kill", "--socket", hostd.socket_path, str(b.vm_id)])
        assert (r.exit_code, r.stdout) == (0, f"killed vm {b.vm_id} (gb): reclaimed\n")
        assert hostd.device.statistics()["guests"] == 0
        r = CliRunner().invoke(main, ["vm", "kill", "--socket", hostd.socket_path, "ga"])
        assert (r.exit_code, r.stderr) == (1, "Error: no guest 'ga' is attached\n")
        r = CliRunner().invoke(main, ["vm", "list", "--socket", str(short_tmp / "nope.sock")])
        assert r.exit_code == 1 and r.stderr.startswith("Error: cannot reach hostd at ")
        assert r.stderr.endswith("(start `vmediad hostd` or pass --socket / set VMEDIAD_SOCKET)\n")
    finally:
        a.close()
        b.close()


def test_soak_command_small(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "vmediad", "soak", "--tasks", "1500", "--guests", "2",
                        "--restarts", "1", "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ok"] is True and res["mismatches"] == 0 and res["tasks"] >= 1500
    assert res["restarts"] == 1 and len(res["reattach_s"]) == 1 and res["reattach_s"][0] < 5
    assert res["hostd"]["shm_after"] == res["hostd"]["shm_before"]
    assert res["hostd"]["fd_idle_after"] == res["hostd"]["fd_idle_before"]
