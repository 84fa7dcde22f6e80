"""Per-guest control on hostd's control socket: list, kill, the event stream (guestlib.control)."""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import guestlib
from guestlib.control import ControlError, events, kill_vm, list_vms
from hostd.daemon import Hostd
from tests.guests import CTX, as_nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid nobody")
DATA = b"the guest's own bytes" * 100


# -- a guest process the test drives over a pipe ------------------------------------------


def driven_guest(sock: str, name: str, auto_reattach: bool, cmds: Any, out: Any) -> None:
    """Attaches, reports (vm id, pid), then runs the commands it is sent until "exit"."""
    try:
        dev = guestlib.attach(sock, name=name, auto_reattach=auto_reattach)
    except Exception as e:  # pragma: no cover - reported to the test
        out.put(("error", repr(e)))
        return
    out.put(("attached", dev.vm_id, os.getpid()))
    buf = dev.put(DATA)
    while True:
        cmd = cmds.get()
        if cmd == "crc":
            try:
                out.put(("crc", dev.crc32(buf).wait(10)))
            except guestlib.DeviceGone as e:
                out.put(("gone", str(e)))
            except Exception as e:
                out.put(("error", f"{type(e).__name__}: {e}"))
        elif cmd == "socket":
            # hostd closed our control connection: a peek reads EOF (b"") instead of blocking.
            try:
                peek = dev._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                out.put(("socket", "eof" if peek == b"" else "data"))
            except BlockingIOError:
                out.put(("socket", "open"))
            except OSError as e:
                out.put(("socket", f"error {e.errno}"))
        elif cmd == "reattaches":
            out.put(("reattaches", dev.reattaches))
        elif cmd == "exit":
            dev.close()
            out.put(("closed",))
            return


class Guest:
    def __init__(self, sock: str, name: str, auto_reattach: bool = False) -> None:
        self.cmds: Any = CTX.Queue()
        self.out: Any = CTX.Queue()
        self.proc = CTX.Process(target=driven_guest, args=(sock, name, auto_reattach, self.cmds, self.out),
                                daemon=True)
        self.proc.start()
        msg = self.out.get(timeout=30)
        assert msg[0] == "attached", msg
        self.vm_id: int = msg[1]
        self.pid: int = msg[2]
        self.name = name

    def ask(self, cmd: str, timeout: float = 20) -> tuple[Any, ...]:
        self.cmds.put(cmd)
        reply: tuple[Any, ...] = self.out.get(timeout=timeout)
        return reply

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


@pytest.fixture
def spawn_guest() -> Iterator[Callable[..., Guest]]:
    started: list[Guest] = []

    def spawn(sock: str, name: str, auto_reattach: bool = False) -> Guest:
        g = Guest(sock, name, auto_reattach)
        started.append(g)
        return g

    yield spawn
    for g in started:
        g.stop()


def _maps_region(vm_id: int) -> list[str]:
    """This process's (the in-process hostd's) mappings and fds of guest ``vm_id``'s region."""
    tag = f"/memfd:vmediad-vm{vm_id} "
    hits = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if tag in ln + " "]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (target + " ").startswith(tag):
            hits.append(f"fd {fd} -> {target}")
    return hits


def wait_connections(h: Hostd, n: int) -> None:
    """hostd holds ``n`` control connections (a finished request's thread closes its own)."""
    deadline = time.monotonic() + 5
    while h.control.statistics()["connections"] != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.control.statistics()["connections"] == n


class EventCollector:
    """Reads an event stream on a thread so the test can wait with a deadline."""

    def __init__(self, sock: str) -> None:
        self.stream = events(sock)
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for ev in self.stream:
            self.q.put(ev)
        self.q.put(None)  # the stream ended

    def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> list[dict[str, Any]]:
        """Events received up to and including the first that matches ``pred``."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            assert ev is not None, f"stream ended; got {got}"
            got.append(ev)
            if pred(ev):
                return got

    def close(self) -> None:
        self.stream.close()
        self.thread.join(5)


# -- list ---------------------------------------------------------------------------------


def test_list_shows_each_guest_process(hostd: Hostd, spawn_guest: Callable[..., Guest]) -> None:
    a = spawn_guest(hostd.socket_path, "alpha")
    b = spawn_guest(hostd.socket_path, "beta")
    assert a.ask("crc") == ("crc", zlib.crc32(DATA))
    assert a.ask("crc") == ("crc", zlib.crc32(DATA))
    assert b.ask("crc") == ("crc", zlib.crc32(DATA))

    vms = list_vms(hostd.socket_path)
    assert [(v["vm"], v["name"], v["pid"]) for v in vms] == [(a.vm_id, "alpha", a.pid), (b.vm_id, "beta", b.pid)]
    by_name = {v["name"]: v for v in vms}
    assert {v["uid"] for v in vms} == {os.getuid()}
    assert {v["state"] for v in vms} == {"running"}
    assert (by_name["alpha"]["tasks_done"], by_name["beta"]["tasks_done"]) == (2, 1)
    assert by_name["alpha"]["tasks_failed"] == 0 and by_name["alpha"]["sessions"] == 0
    for v in vms:
        assert isinstance(v["worker_pid"], int) and Path(f"/proc/{v['worker_pid']}").exists()
    # The raw protocol reply is the same list.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(hostd.socket_path)
        c.sendall(b'{"cmd":"list"}\n')
        raw = json.loads(c.makefile("rb").readline())
    assert raw["ok"] is True and [v["vm"] for v in raw["vms"]] == [a.vm_id, b.vm_id]


def test_unreachable_hostd_is_a_control_error(short_tmp: Path) -> None:
    missing = str(short_tmp / "none.sock")
    for call in (lambda: list_vms(missing), lambda: kill_vm("vm0", missing), lambda: events(missing)):
        with pytest.raises(ControlError) as ei:
            call()
        assert ei.value.kind == "unreachable"
        assert missing in str(ei.value)


def test_default_socket_comes_from_vmediad_socket(hostd: Hostd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMEDIAD_SOCKET", hostd.socket_path)
    assert list_vms() == []


# -- kill ---------------------------------------------------------------------------------


def test_kill_detaches_one_guest_and_reclaims_everything(hostd: Hostd,
                                                         spawn_guest: Callable[..., Guest]) -> None:
    victim = spawn_guest(hostd.socket_path, "victim")
    other = spawn_guest(hostd.socket_path, "other")
    assert victim.ask("crc") == ("crc", zlib.crc32(DATA))
    assert other.ask("crc") == ("crc", zlib.crc32(DATA))
    workers = {v["name"]: v["worker_pid"] for v in list_vms(hostd.socket_path)}
    assert _maps_region(victim.vm_id), "the in-process hostd should map the victim's region"
    wait_connections(hostd, 2)  # the two guests
    watch = EventCollector(hostd.socket_path)
    try:
        reply = kill_vm("victim", hostd.socket_path)
        assert reply == {"vm": victim.vm_id, "name": "victim", "reclaimed": True}

        # hostd: the guest, its worker process, its region mapping and its connection are gone.
        assert [v["name"] for v in list_vms(hostd.socket_path)] == ["other"]
        assert not Path(f"/proc/{workers['victim']}").exists()
        assert _maps_region(victim.vm_id) == []
        wait_connections(hostd, 2)  # the other guest and the event stream
        assert hostd.control.statistics()["kills"] == 1
        # The event stream saw the detach, with the reason.
        evs = watch.until(lambda e: e["event"] == "detach" and e["data"].get("vm") == victim.vm_id)
        assert evs[-1]["data"].get("reason") == "killed"
    finally:
        watch.close()

    # The killed guest: its control socket is at EOF and its next call raises DeviceGone.
    assert victim.ask("socket") == ("socket", "eof")
    kind, msg = victim.ask("crc")
    assert kind == "gone", msg
    # The other guest is untouched: same worker, tasks still run.
    assert other.ask("crc") == ("crc", zlib.crc32(DATA))
    (left,) = list_vms(hostd.socket_path)
    assert (left["vm"], left["worker_pid"], left["state"]) == (other.vm_id, workers["other"], "running")
    assert other.ask("exit") == ("closed",)


def test_kill_by_id_and_a_killed_region_is_not_readopted(hostd: Hostd,
                                                         spawn_guest: Callable[..., Guest]) -> None:
    # auto_reattach (the default): the guest sees EOF and passes its region back, as after a
    # hostd restart.  hostd refuses that region: the guest must not come back from a kill.
    g = spawn_guest(hostd.socket_path, "stubborn", auto_reattach=True)
    assert kill_vm(str(g.vm_id), hostd.socket_path)["name"] == "stubborn"
    deadline = time.monotonic() + 1.5
    while hostd.control.bad_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hostd.control.bad_requests >= 1  # it tried to re-adopt, and was refused
    time.sleep(0.3)  # more attempts, every 50 ms
    assert list_vms(hostd.socket_path) == []
    assert g.ask("reattaches") == ("reattaches", 0)
    # A fresh attach of the same name is fine.
    fresh = guestlib.attach(hostd.socket_path, name="stubborn", auto_reattach=False)
    try:
        assert [v["vm"] for v in list_vms(hostd.socket_path)] == [fresh.vm_id]
        assert fresh.vm_id != g.vm_id
    finally:
        fresh.close()


def test_kill_refusals(hostd: Hostd) -> None:
    with pytest.raises(ControlError) as ei:
        kill_vm("nobody-here", hostd.socket_path)
    assert ei.value.kind == "not_found" and "nobody-here" in str(ei.value)
    with pytest.raises(ControlError) as ei:
        kill_vm("999", hostd.socket_path)
    assert ei.value.kind == "not_found"
    with pytest.raises(ControlError) as ei:
        kill_vm("bad name!", hostd.socket_path)
    assert ei.value.kind == "bad_request"
    a = guestlib.attach(hostd.socket_path, name="twin", auto_reattach=False)
    b = guestlib.attach(hostd.socket_path, name="twin", auto_reattach=False)
    try:
        with pytest.raises(ControlError) as ei:
            kill_vm("twin", hostd.socket_path)
        assert ei.value.kind == "ambiguous"
        assert f"vm {a.vm_id}, {b.vm_id}" in str(ei.value)
        assert len(list_vms(hostd.socket_path)) == 2  # nothing was killed
        assert kill_vm(str(b.vm_id), hostd.socket_path)["vm"] == b.vm_id
        assert [v["vm"] for v in list_vms(hostd.socket_path)] == [a.vm_id]
    finally:
        a.close()
        b.close()


@needs_root
def test_only_root_or_hostds_uid_may_kill(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(socket_mode=0o666, allowed_uids=(65534,))
    os.chmod(Path(h.socket_path).parent, 0o755)
    dev = guestlib.attach(h.socket_path, name="target", auto_reattach=False)
    try:
        def as_guest_user() -> bytes:
            out: dict[str, Any] = {"vms": [v["name"] for v in list_vms(h.socket_path)]}
            try:
                kill_vm("target", h.socket_path)
                out["kill"] = "ok"
            except ControlError as e:
                out["kill"] = e.kind
            return json.dumps(out).encode()

        # uid nobody is an allowed guest: it may list, not kill.
        assert json.loads(as_nobody(as_guest_user)) == {"vms": ["target"], "kill": "permission"}
        assert [v["name"] for v in list_vms(h.socket_path)] == ["target"]
        assert dev.crc32(dev.put(DATA)).wait(10) == zlib.crc32(DATA)
    finally:
        dev.close()


# -- events -------------------------------------------------------------------------------


def test_event_stream_delivers_attach_then_detach_in_order(hostd: Hostd,
                                                           spawn_guest: Callable[..., Guest]) -> None:
    watch = EventCollector(hostd.socket_path)
    try:
        assert watch.stream.names[:2] == ["attach", "detach"]
        st = hostd.control.statistics()
        assert st["event_streams"] == 1
        assert st["events"] == {"subscribers": 1, "published": 0}
        # ... and in the snapshot `vmediad status` prints.
        control = guestlib.hostd_status(hostd.socket_path)["control"]
        assert (control["event_streams"], control["events"]) == (1, {"subscribers": 1, "published": 0})
        g = spawn_guest(hostd.socket_path, "shortlived")
        assert g.ask("exit") == ("closed",)
        evs = watch.until(lambda e: e["event"] == "detach")
        mine = [e for e in evs if e["data"].get("vm") == g.vm_id]
        assert [e["event"] for e in mine] == ["attach", "detach"]
        assert mine[0]["data"].get("name") == "shortlived"
        for e in mine:
            assert set(e) == {"event", "data", "timestamp"}
            assert set(e["timestamp"]) == {"seconds", "microseconds"}
            assert abs(e["timestamp"]["seconds"] - time.time()) < 60
        assert (mine[0]["timestamp"]["seconds"], mine[0]["timestamp"]["microseconds"]) <= \
            (mine[1]["timestamp"]["seconds"], mine[1]["timestamp"]["microseconds"])
        assert hostd.control.statistics()["events"]["published"] >= 2  # type: ignore[index]
    finally:
        watch.close()
    # The client closed: hostd drops the subscription.
    deadline = time.monotonic() + 5
    while hostd.control.statistics()["event_streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hostd.control.statistics()["event_streams"] == 0
    assert hostd.control.statistics()["events"] == {"subscribers": 0, "published": 2}


def test_event_stream_ends_when_hostd_stops(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd()
    stream = events(h.socket_path)
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def read() -> None:
        got.extend(stream)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    h.stop()
    assert done.wait(5), "the event stream did not end when hostd stopped"
    assert got == []


def test_event_stream_refused_on_a_guest_connection(hostd: Hostd) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(hostd.socket_path)
        f = c.makefile("rb")
        c.sendall(b'{"cmd":"attach","name":"g"}\n')
        assert json.loads(f.readline())["ok"] is True
        c.sendall(b'{"cmd":"events"}\n')
        reply = json.loads(f.readline())
    assert reply["ok"] is False and reply["kind"] == "bad_request"


def test_event_stream_reports_timeout_crash_and_restarts(make_hostd: Callable[..., Hostd]) -> None:
    from tests.integration.test_metrics import hang_a_task

    h = make_hostd(task_timeout_s=0.3, region_default=160 << 20)
    watch = EventCollector(h.socket_path)
    try:
        with guestlib.attach(h.socket_path, name="flaky", auto_reattach=False) as dev:
            pid = guestlib.hostd_status(h.socket_path)["vms"][0]["worker_pid"]
            assert hang_a_task(h, dev, pid).error.name == "TIMEOUT"
            buf = dev.put(DATA)
            assert dev.crc32(buf).wait(10) == zlib.crc32(DATA)  # the respawned worker runs it
            pid2 = guestlib.hostd_status(h.socket_path)["vms"][0]["worker_pid"]
            assert pid2 != pid
            os.kill(pid2, 9)
            evs = watch.until(lambda e: e["event"] == "worker_crash")
            assert evs[-1]["data"]["rc"] == -9
            assert dev.crc32(buf).wait(10) == zlib.crc32(DATA)
        evs += watch.until(lambda e: e["event"] == "detach")
    finally:
        watch.close()
    mine = [e for e in evs if e["data"].get("vm") == dev.vm_id]
    assert [e["event"] for e in mine] == ["attach", "timeout", "restart", "worker_crash", "restart", "detach"]
    assert mine[1]["data"]["op"] == "CRC32" and mine[1]["data"]["name"] == "flaky"
    assert mine[-1]["data"]["reason"] == "detach"


# -- the protocol (pure) -------------------------------------------------------------------


def test_protocol_parses_the_control_commands() -> None:
    from vmediad import protocol
    from vmediad.errors import ProtocolError

    assert protocol.parse_request(b'{"cmd":"list"}').cmd == "list"
    assert protocol.parse_request(b'{"cmd":"events"}').cmd == "events"
    assert protocol.parse_request(b'{"cmd":"kill","vm":"vm-0.a_b"}').vm == "vm-0.a_b"
    assert protocol.parse_request(b'{"cmd":"kill","vm":7}').vm == "7"
    for bad in (b'{"cmd":"kill"}', b'{"cmd":"kill","vm":""}', b'{"cmd":"kill","vm":true}',
                b'{"cmd":"kill","vm":0}', b'{"cmd":"kill","vm":-3}', b'{"cmd":"kill","vm":"a b"}',
                b'{"cmd":"kill","vm":["x"]}', b'{"cmd":"kill","vm":"' + b"x" * 65 + b'"}'):
        with pytest.raises(ProtocolError) as ei:
            protocol.parse_request(bad)
        assert ei.value.kind == "bad_request", bad


def test_a_slow_event_reader_loses_the_oldest_and_is_told_how_many(hostd: Hostd) -> None:
    stream = events(hostd.socket_path)
    bus = hostd.device.events
    n = 8000  # far more than the socket buffer plus the subscription's queue (events.QUEUE_MAX) hold
    try:
        # Nobody reads while they are published: hostd's sender blocks on the full socket and
        # the subscription drops its oldest events.
        for i in range(n):
            bus.emit("restart", vm=999, name="synthetic", generation=i)
        got: list[dict[str, Any]] = []
        for ev in stream:
            got.append(ev)
            if ev["event"] == "restart" and ev["data"]["generation"] == n - 1:
                break
    finally:
        stream.close()
    gens = [e["data"]["generation"] for e in got if e["event"] == "restart"]
    drops = [e["data"]["dropped"] for e in got if e["event"] == "events_dropped"]
    assert gens == sorted(gens) and len(set(gens)) == len(gens)  # in order, none twice
    assert drops and drops == sorted(drops)
    assert len(gens) + drops[-1] == n  # every event either arrived or was counted as lost
