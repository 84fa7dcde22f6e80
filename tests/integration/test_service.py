"""hostd as a service: sd_notify + watchdog + JSON logs from a real process, the systemd unit, metrics."""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import guestlib
from hostd import config as hconfig
from hostd.config import Config
from hostd.daemon import Hostd
from vmediad import abi

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "vmediad-hostd.service"
WATCHDOG_USEC = 400_000


def _short(tmp_path: Path) -> Path:
    """Unix socket paths must fit in sun_path (108 bytes)."""
    assert len(str(tmp_path)) < 90, f"tmp_path too long for Unix sockets: {tmp_path}"
    return tmp_path


# -- a stand-in for systemd's notify socket ------------------------------------------


class NotifyListener:
    """Binds a datagram socket like systemd's $NOTIFY_SOCKET and records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, key: str, value: str = "1", timeout: float = 15.0, after: int = 0) -> int:
        """Index of the first message (from ``after`` on) carrying key=value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, f) in enumerate(self.snapshot()[after:], after):
                if f.get(key) == value:
                    return i
            time.sleep(0.01)
        raise AssertionError(f"no {key}={value} within {timeout}s; got {[f for _, f in self.snapshot()]}")

    def pings(self) -> list[float]:
        return [t for t, f in self.snapshot() if f.get("WATCHDOG") == "1"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(_short(tmp_path) / "n.sock")
    yield listener
    listener.close()


def _proc_state(pid: int) -> str | None:
    """'R', 'S', 'Z', ... or None once the pid is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat_line.rpartition(")")[2].split()[0]


# -- hostd as a real process under a fake systemd -------------------------------------


def test_hostd_process_notify_watchdog_logs(tmp_path: Path, notify: NotifyListener) -> None:
    sock = _short(tmp_path) / "h.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "RUNTIME_DIRECTORY")}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "vmediad", "hostd", "--socket", str(sock), "--channels", "2"],
                             env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    dev: guestlib.Device | None = None
    try:
        # READY=1 with a STATUS= line, sent by the main process (NotifyAccess=main), socket already up.
        ready = notify.wait_for("READY")
        fields = notify.snapshot()[ready][1]
        assert fields.get("STATUS"), fields
        assert fields.get("MAINPID") == str(p.pid)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660

        # A guest runs real tasks through the region.
        dev = guestlib.attach(str(sock), name="svc1", auto_reattach=False)
        for _ in range(5):
            assert dev.nop().wait(10) is None
        payloads = [b"", b"hello, codec", os.urandom(4096), bytes(range(256)) * 33]
        for data in payloads:
            buf = dev.put(data)
            assert dev.crc32(buf).wait(10) == zlib.crc32(data)
            dev.free(buf)
        tasks = [dev.nop() for _ in range(4)]
        assert [t.wait(10) for t in tasks] == [None] * 4
        status = guestlib.hostd_status(str(sock))
        assert [vm["name"] for vm in status["vms"]] == ["svc1"]
        worker_pid = status["vms"][0]["worker_pid"]
        assert isinstance(worker_pid, int) and _proc_state(worker_pid) not in (None, "Z")

        # The device loop keeps pinging the watchdog at least every WATCHDOG_USEC / 2 or so.
        start = len(notify.pings())
        deadline = time.monotonic() + 2.0
        while len(notify.pings()) - start < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(max(0.0, deadline - time.monotonic()))
        pings = notify.pings()[start:]
        assert len(pings) >= 2, f"only {len(pings)} WATCHDOG=1 in 2 s"
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        assert gaps[len(gaps) // 2] < WATCHDOG_USEC / 1e6, gaps  # typical gap well inside the interval

        # SIGTERM with a guest still attached: STOPPING=1, exit 0, the guest sees the device go.
        n_before = len(notify.snapshot())
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", after=n_before, timeout=10)
        assert p.wait(10) == 0
        assert time.monotonic() - t0 < 10
        assert ready < n_before
        with pytest.raises(guestlib.DeviceGone):
            dev.nop().wait(5)
        # hostd stopped its codec worker: gone, or at worst a zombie awaiting its reaper.
        deadline = time.monotonic() + 5
        while _proc_state(worker_pid) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_state(worker_pid) in (None, "Z")
        assert not sock.exists()
    finally:
        if dev is not None:
            dev.close()
        if p.poll() is None:
            p.kill()
            p.wait()

    # Not a TTY: every log line is a JSON object.
    lines = [ln for path in (out_path, err_path) for ln in path.read_text().splitlines() if ln.strip()]
    assert lines, "hostd logged nothing"
    records: list[dict[str, Any]] = []
    for ln in lines:
        rec = json.loads(ln)
        assert isinstance(rec, dict) and "event" in rec and "level" in rec and "timestamp" in rec, ln
        records.append(rec)
    events = [r["event"] for r in records]
    attached = [r for r in records if r["event"] == "guest attached"]
    assert len(attached) == 1
    assert attached[0]["name"] == "svc1"
    assert isinstance(attached[0]["vm"], int) and attached[0]["vm"] == status["vms"][0]["vm"]
    assert "hostd ready" in events and "hostd stopped" in events
    assert {"event": "signal received", "signal": "SIGTERM"}.items() <= next(
        r for r in records if r["event"] == "signal received").items()
    assert not [r for r in records if r["level"] in ("error", "critical")], records


# -- the systemd unit -----------------------------------------------------------------


def _main_thread_writes_a_pipe(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/task/{pid}/wchan").read_text().endswith("pipe_write")  # anon_pipe_write on 6.x
    except OSError:
        return False


def _sigterm_pending(pid: int) -> bool:
    """SIGTERM is pending for the process or for one of its threads (not yet delivered)."""
    bit = 1 << (signal.SIGTERM - 1)
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
                return True
    return False


def test_sigterm_while_the_main_thread_writes_a_log_line_still_stops_hostd(tmp_path: Path) -> None:
    """The interleaving is forced: hostd's stderr is a pipe the test keeps full, so the main
    thread blocks inside a log write, holding structlog's lock for that file, and SIGTERM
    arrives there.  The handler runs in that thread while the lock is held; had it logged, it
    would wait for the lock forever and hostd would never stop."""
    sock = _short(tmp_path) / "w.sock"
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"#" * 4096)
    os.set_blocking(w, True)
    p = subprocess.Popen([sys.executable, "-m", "vmediad", "hostd", "--socket", str(sock), "--channels", "1"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    drained: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while not _main_thread_writes_a_pipe(p.pid):
            assert p.poll() is None and time.monotonic() < deadline, "hostd's main thread never wrote a log line"
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        while _sigterm_pending(p.pid):  # delivered: the write was interrupted and the handler ran
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reader = threading.Thread(target=lambda: drained.extend(iter(lambda: os.read(r, 65536), b"")))
        reader.start()
        assert p.wait(15) == 0
        reader.join(5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)
    records = [json.loads(ln) for ln in b"".join(drained).lstrip(b"#").decode().splitlines() if ln.strip()]
    events = [rec["event"] for rec in records]
    assert "signal received" in events and events[-1] == "hostd stopped", events


def test_hostd_started_with_stdin_closed_still_runs_its_workers(tmp_path: Path) -> None:
    """A supervisor may start hostd with fd 0 closed: the bank's memfd then becomes fd 0, which a
    worker's own stdin replaced before exec (it mapped /dev/null and died before every task)."""
    sock = _short(tmp_path) / "c.sock"
    cmd = shlex.join([sys.executable, "-m", "vmediad", "hostd", "--socket", str(sock), "--channels", "1"])
    with open(tmp_path / "hostd.log", "wb") as logf:
        p = subprocess.Popen(["bash", "-c", f"exec 0<&-; exec {cmd}"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "hostd.log").read_text()
            time.sleep(0.02)
        # hostd really runs without a stdin: its fd 0 is closed, or is one of its own files.
        assert not os.path.exists(f"/proc/{p.pid}/fd/0") or os.readlink(f"/proc/{p.pid}/fd/0") != "/dev/null"
        data = bytes(range(256)) * 64
        with guestlib.attach(str(sock), name="nostdin") as dev:
            assert dev.crc32(dev.put(data)).wait(20) == zlib.crc32(data)
            assert dev.status()["vms"][0]["worker_restarts"] == 0
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _directives(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (repeats kept), across sections; comments ignored."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or line.startswith("["):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _sections(text: str) -> dict[str, set[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {s: set(parser[s]) for s in parser.sections()}


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert m, value
    return float(m[1]) * {"ms": 1e-3, "s": 1.0, "min": 60.0, None: 1.0}[m[2]]


REQUIRED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "Restart": "on-failure",
    "RuntimeDirectory": "vmediad",
    "RuntimeDirectoryMode": "0750",
    "ConfigurationDirectory": "vmediad",
    "User": "vmediad",
    "Group": "vmediad",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "UMask": "0077",
}


def test_unit_has_the_required_directives() -> None:
    text = UNIT.read_text()
    d = _directives(text)
    for key, value in REQUIRED.items():
        assert d.get(key) == [value], (key, d.get(key))
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in d["SystemCallFilter"][0].split()
    assert re.fullmatch(r"\d+[KMGT]?", d["MemoryMax"][0])
    assert "Service" in _sections(text) and "Type" in _sections(text)["Service"]

    # Never: both would delete named regions that guests still map whenever hostd restarts.
    assert "RemoveIPC" not in d and "DynamicUser" not in d
    comments = "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#"))
    assert "RemoveIPC" in comments and "DynamicUser" in comments  # ... and the unit says why

    # The watchdog interval leaves room for hostd's ping cadence (the device loop sleeps at most
    # HEARTBEAT_PERIOD_S / 2 and pings every WatchdogSec / 2).
    watchdog = _seconds(d["WatchdogSec"][0])
    assert watchdog >= 4 * abi.HEARTBEAT_PERIOD_S
    # Stopping: hostd's own drain (shutdown_grace_s, then up to 10 s for the loop) fits before SIGKILL.
    assert _seconds(d["TimeoutStopSec"][0]) > Config().shutdown_grace_s + 10
    assert d["KillMode"] == ["mixed"]


def test_unit_execstart_runs_hostd_with_the_default_config() -> None:
    from vmediad.tools.cli import main

    argv = shlex.split(_directives(UNIT.read_text())["ExecStart"][0])
    assert argv[0].startswith("/"), "systemd wants an absolute path"
    assert Path(argv[0]).name == "env" and argv[1] == "vmediad"
    assert argv[2] == "hostd"
    # The flags parse with the real CLI, and --config is the default path (a missing file = defaults).
    sub_ctx = main.commands["hostd"].make_context("hostd", argv[3:])
    assert sub_ctx.params["config_path"] == hconfig.DEFAULT_CONFIG_PATH


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=unit.parent)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    r = _verify(UNIT)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    # The one thing allowed to differ on this machine: the ExecStart program may not be installed.
    other = [ln for ln in complaints if "is not executable" not in ln]
    assert not other, complaints
    # Verify a copy whose ExecStart runs this interpreter's hostd: it must be entirely clean.
    copy = tmp_path / UNIT.name
    exec_start = f"ExecStart={sys.executable} -m vmediad hostd --config /etc/vmediad/config.toml"
    copy.write_text(re.sub(r"(?m)^ExecStart=.*$", lambda _: exec_start, text))
    r = _verify(copy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_exposure_is_low() -> None:
    probe = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True, timeout=30)
    if "--offline" not in probe.stdout or "--threshold" not in probe.stdout:
        pytest.skip("this systemd-analyze cannot score a unit file offline (needs systemd >= 250)")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=40", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert level and float(level[1]) <= 4.0, r.stdout[-500:]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers / systemd-tmpfiles are not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to chown into a --root tree")
def test_sysusers_and_tmpfiles_snippets(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(SYSTEMD / "vmediad.sysusers.conf", root / "usr/lib/sysusers.d/vmediad.conf")
    shutil.copy(SYSTEMD / "vmediad.tmpfiles.conf", root / "usr/lib/tmpfiles.d/vmediad.conf")
    r = subprocess.run(["systemd-sysusers", f"--root={root}", "vmediad.conf"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    users = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    groups = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    assert "vmediad" in users and "vmediad" in groups
    uid, gid = int(users["vmediad"][2]), int(users["vmediad"][3])
    assert 0 < uid < 1000 and gid == int(groups["vmediad"][2])  # a system user with its own group
    assert users["vmediad"][6].endswith("nologin")

    r = subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", "vmediad.conf"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    run, etc = (root / "run/vmediad").stat(), (root / "etc/vmediad").stat()
    unit = _directives(UNIT.read_text())
    assert oct(stat.S_IMODE(run.st_mode)) == oct(int(unit["RuntimeDirectoryMode"][0], 8))
    assert (run.st_uid, run.st_gid) == (uid, gid)
    assert stat.S_IMODE(etc.st_mode) == 0o755 and (etc.st_uid, etc.st_gid) == (0, 0)


# -- Prometheus metrics from an in-process hostd -------------------------------------


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.headers.get("Content-Type", ""), resp.read().decode()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def test_metrics_endpoint(tmp_path: Path) -> None:
    # metrics_grace_s=0: a detached guest's series go at once (tests/integration/test_metrics.py keeps them).
    cfg = Config(socket=_short(tmp_path) / "m.sock", channels=2, metrics="127.0.0.1:0", metrics_grace_s=0)
    n_nop, payloads = 7, [b"abc" * 100, os.urandom(10000), b"x"]
    with Hostd(cfg) as h:
        port = h.metrics_port
        assert isinstance(port, int) and port > 0
        with guestlib.attach(h.socket_path, name="m1") as dev:
            for _ in range(n_nop):
                dev.nop().wait(10)
            for data in payloads:
                buf = dev.put(data)
                assert dev.crc32(buf).wait(10) == zlib.crc32(data)
            ctype, text = _scrape(port)
        assert ctype.startswith("text/plain")
        samples = _samples(text)

        def value(name: str, **labels: str) -> float:
            hits = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
            assert len(hits) == 1, (name, labels, hits)
            return hits[0]

        # The counter family "vmediad_tasks" is exposed as vmediad_tasks_total.
        assert re.search(r'(?m)^vmediad_tasks_total\{[^}]*op="NOP"[^}]*result="OK"[^}]*vm="m1"[^}]*\} 7\.0$', text)
        assert value("vmediad_tasks_total", vm="m1", op="NOP", result="OK") == n_nop
        assert value("vmediad_tasks_total", vm="m1", op="CRC32", result="OK") == len(payloads)
        assert not [s for s in samples if s[0] == "vmediad_tasks_total" and s[1]["result"] != "OK"]

        # Latency histogram: cumulative buckets ending in +Inf == _count == tasks run.
        total = n_nop + len(payloads)
        buckets = [(lab["le"], v) for n, lab, v in samples if n == "vmediad_task_latency_seconds_bucket"
                   and lab["vm"] == "m1"]
        assert len(buckets) > 5 and buckets[-1] == ("+Inf", total)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)
        assert value("vmediad_task_latency_seconds_count", vm="m1") == total
        assert value("vmediad_task_latency_seconds_sum", vm="m1") > 0
        assert re.search(r'(?m)^vmediad_task_latency_seconds_bucket\{le="\+Inf",vm="m1"\} ', text)

        # Gauges and the channel counters.
        assert value("vmediad_queue_depth", vm="m1") == 0
        assert value("vmediad_inflight", vm="m1") == 0
        assert value("vmediad_guests") == 1
        assert value("vmediad_bytes_moved_total", vm="m1") >= sum(map(len, payloads))
        busy = {lab["channel"]: v for n, lab, v in samples if n == "vmediad_channel_busy_seconds_total"}
        assert set(busy) == {"0", "1"}
        assert sum(busy.values()) > 0
        assert value("vmediad_uptime_seconds") > 0

        # A detached guest leaves the per-VM series (hostd reclaims it asynchronously).
        deadline = time.monotonic() + 5
        while 'vm="m1"' in (after := _scrape(port)[1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 'vm="m1"' not in after
        assert ("vmediad_guests", {}, 0.0) in _samples(after)
    # Stopped hostd: the port is closed.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _scrape(port)
