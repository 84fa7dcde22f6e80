"""hostd start-up errors: one clear line, exit 78 (EX_CONFIG), nothing left behind, no traceback.

Each case runs the real ``vmediad hostd`` command line in a subprocess; the hostd it collides
with is a live in-process hostd.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import guestlib
from hostd.config import Config
from hostd.daemon import Hostd, run_foreground
from hostd.device import Device
from vmediad.errors import EXIT_CONFIG, EXIT_INTERNAL


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY", "VMEDIAD_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_hostd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmediad", "hostd", "--channels", "1", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def the_error(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run's only output: one JSON log line at level error (stderr is not a TTY)."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines
    rec: dict[str, Any] = json.loads(lines[0])
    assert rec["level"] == "error" and rec["exit_code"] == EXIT_CONFIG, rec
    return rec


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_second_hostd_on_a_live_socket(hostd: Hostd) -> None:
    sock = Path(hostd.socket_path)
    before = sock.stat()
    r = run_hostd("--socket", str(sock))
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert the_error(r)["event"] == f"another hostd is already serving {sock}"
    # The live hostd keeps its socket (same file) and serves on.
    after = sock.stat()
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    with guestlib.attach(str(sock), name="still", auto_reattach=False) as dev:
        assert dev.crc32(dev.put(b"abc")).wait(10) == zlib.crc32(b"abc")


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    sock = short_tmp / "h.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays; nobody listens
    assert sock.exists() and not _answers(sock)
    p = subprocess.Popen([sys.executable, "-m", "vmediad", "hostd", "--channels", "1", "--socket", str(sock)],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _answers(sock):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "hostd did not take over the stale socket"
            time.sleep(0.02)
        assert guestlib.hostd_status(str(sock))["state"] == "running"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
        assert b"Traceback" not in out + err
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_second_hostd_on_a_taken_metrics_port(make_hostd: Callable[..., Hostd], short_tmp: Path) -> None:
    first = make_hostd(metrics="127.0.0.1:0")
    port = first.metrics_port
    assert port
    sock = short_tmp / "second.sock"
    r = run_hostd("--socket", str(sock), "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == EXIT_CONFIG, r.stderr
    msg = the_error(r)["event"]
    assert msg.startswith(f"cannot serve metrics on 127.0.0.1:{port}: "), msg
    assert "in use" in msg
    # Everything it had started is gone: no socket file left behind.
    assert not sock.exists()
    assert sorted(os.listdir(short_tmp)) == ["h0.sock"]
    # The first hostd still serves its metrics and its socket.
    assert "vmediad_guests 0.0" in _scrape(port)
    assert _answers(Path(first.socket_path))


@pytest.mark.parametrize("where", ["tmp", "root"])
def test_socket_in_a_missing_directory_is_refused(short_tmp: Path, where: str) -> None:
    # "root": the case from the field, a directory directly under / (hostd often runs as root).
    missing = short_tmp / "nonexistent-dir" if where == "tmp" else Path(f"/nonexistent-dir-{uuid.uuid4().hex[:8]}")
    sock = missing / "h.sock"
    try:
        r = run_hostd("--socket", str(sock))
        assert r.returncode == EXIT_CONFIG, r.stderr
        msg = the_error(r)["event"]
        assert msg.startswith(f"cannot create the control socket {sock}: directory {missing} does not exist"), msg
        assert not missing.exists()
    finally:
        if missing.is_dir():
            missing.rmdir()


def test_socket_whose_parent_is_a_file_is_refused(short_tmp: Path) -> None:
    (short_tmp / "afile").write_text("")
    r = run_hostd("--socket", str(short_tmp / "afile" / "h.sock"))
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert the_error(r)["event"].endswith(f"{short_tmp / 'afile'} is not a directory")


@pytest.mark.parametrize("mode", ['"777"', '"0666"', '"0602"', "511"])
def test_world_writable_socket_mode_is_refused(short_tmp: Path, mode: str) -> None:
    cfg = short_tmp / "c.toml"
    cfg.write_text(f"[hostd]\nsocket_mode = {mode}\n")
    sock = short_tmp / "h.sock"
    r = run_hostd("--socket", str(sock), "--config", str(cfg))
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: config key 'hostd.socket_mode': "), lines
    assert "world-writable" in lines[0]
    assert not sock.exists()


# -- in-process: the rollback and the internal-error exit code -----------------------------


@pytest.fixture
def saved_signals() -> Any:
    """run_foreground installs SIGTERM/SIGINT handlers: give pytest its own back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def test_a_bug_at_start_up_exits_70_and_stops_what_started(short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                           saved_signals: None) -> None:
    def broken_start(self: Any) -> None:
        raise RuntimeError("device cannot start")

    monkeypatch.setattr(Device, "start", broken_start)
    sock = short_tmp / "h.sock"
    cfg = Config(socket=sock, channels=1, metrics="127.0.0.1:0")
    assert run_foreground(cfg) == EXIT_INTERNAL
    assert not sock.exists()


def test_run_foreground_returns_78_for_a_live_socket(hostd: Hostd, saved_signals: None) -> None:
    assert run_foreground(Config(socket=Path(hostd.socket_path), channels=1)) == EXIT_CONFIG
    assert _answers(Path(hostd.socket_path))
