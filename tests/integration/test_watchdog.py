"""The watchdog: a task past its deadline ends TIMEOUT, its worker is killed and respawned, the
guest's sessions are lost and every other guest goes on.  Plus the counters that outlive a
guest (statistics()["totals"], ["departed"]) and the events hostd publishes meanwhile.

The hung task is forced, not hoped for: with fault injection a frame starting with
HANG_MARKER makes the worker report that it runs the task and wait for the guest's release;
the test stops the worker (SIGSTOP) between the two, so the task is running when it stops."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import structlog

import guestlib
from codec_backend.engine import HANG_MARKER, HANG_RELEASE, HANG_RUNNING, HANG_STATE
from guestlib.codec import Encoder, Frame
from guestlib.device import Device, DeviceError, SessionLost
from hostd.config import Config
from hostd.core.watchdog import DEFAULT_DECODE_MPX, FLUSH_FRAMES, task_budget_s
from hostd.daemon import Hostd
from hostd.events import Subscription
from tests.integration.test_hostd_gone import all_threads_stopped
from vmediad.abi import ErrorCode, Op


def vm_stats(h: Hostd, name: str) -> dict[str, Any]:
    return next(v for v in h.device.statistics()["vms"] if v["name"] == name)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def drain(sub: Subscription) -> list[dict[str, Any]]:
    out = []
    while (ev := sub.get(timeout=0)) is not None:
        out.append(ev)
    return out


def hang_frame(enc: Encoder) -> Frame:
    """A frame whose first bytes are the hang marker, then the state word (0)."""
    f = enc.new_frame()
    f.planes[0][:] = 80
    raw = HANG_MARKER + bytes(HANG_STATE - len(HANG_MARKER)) + struct.pack("<I", 0)
    f.planes[0][0, : len(raw)] = np.frombuffer(raw, np.uint8)
    return f


def hang_state(dev: Device, f: Frame) -> int:
    return dev.region.load32(f.offset + HANG_STATE)


class Call(threading.Thread):
    """Run ``fn`` on a thread; keep its result or exception and when it ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e
        self.ended = time.monotonic()


def test_budget_is_sized_to_the_work() -> None:
    cfg = Config(task_timeout_s=10.0, task_timeout_per_mpx_s=1.0)
    mpx = 1920 * 1080 / 1e6
    assert task_budget_s(cfg, Op.ENCODE_FRAME, mpx, 1) == pytest.approx(10 + mpx)
    assert task_budget_s(cfg, Op.DECODE, mpx, 16) == pytest.approx(10 + 16 * mpx)  # MULTI: each input
    assert task_budget_s(cfg, Op.FLUSH, mpx, 1) == pytest.approx(10 + FLUSH_FRAMES * mpx)
    assert task_budget_s(cfg, Op.SESSION_OPEN, mpx, 1) == pytest.approx(10 + mpx)
    assert task_budget_s(cfg, Op.CRC32, 0.0, 1) == task_budget_s(cfg, Op.SESSION_CLOSE, mpx, 1) == 10
    assert task_budget_s(Config(task_timeout_s=0), Op.FLUSH, mpx, 1) == 0  # no watchdog
    assert DEFAULT_DECODE_MPX == mpx


def test_stopped_worker_times_out_and_only_its_guest_notices(make_hostd: Callable[..., Hostd]) -> None:
    # A deadline well above what the other guest's five tasks take on a loaded two-core box.
    h = make_hostd(fault_injection=True, task_timeout_s=5.0, task_timeout_per_mpx_s=0.0)
    sub = h.device.events.subscribe()
    with structlog.testing.capture_logs() as logs, \
            guestlib.attach(h.socket_path, name="hung", region_size=16 << 20) as dev, \
            guestlib.attach(h.socket_path, name="calm", region_size=16 << 20) as other:
        enc = dev.encoder("h264", 64, 64)
        assert enc.encode(np.full(64 * 64 * 3 // 2, 50, np.uint8)) is not None
        data = os.urandom(4096)
        buf = other.put(data)
        assert other.crc32(buf).wait(timeout=30) == zlib.crc32(data)  # its worker is up
        pid0 = vm_stats(h, "hung")["worker_pid"]
        other_pid = vm_stats(h, "calm")["worker_pid"]

        f = hang_frame(enc)
        t0 = time.monotonic()
        call = Call(lambda: enc.encode(f))
        wait_until(lambda: hang_state(dev, f) == HANG_RUNNING, what="the worker to run the task")
        os.kill(pid0, signal.SIGSTOP)
        # kill() returns before the stop takes effect: a worker thread still running could see
        # the release.  Only once every thread of the worker is stopped is it too late.
        wait_until(lambda: all_threads_stopped(pid0), what="the worker to stop")
        dev.region.store32(f.offset + HANG_STATE, HANG_RELEASE)  # too late: the worker is stopped

        # While the worker is stopped, another guest's tasks go through.
        for _ in range(5):
            assert other.crc32(buf).wait(timeout=5) == zlib.crc32(data)
        assert call.is_alive(), f"the hung task ended before the other guest's tasks: {call.error!r}"

        call.join(10)
        assert not call.is_alive()
        took = call.ended - t0
        assert isinstance(call.error, DeviceError) and call.error.code == ErrorCode.TIMEOUT
        assert 5.0 <= took < 5.0 + 3.0, took
        assert "past its deadline of 5 s: its worker was killed and respawned" in str(call.error)

        # Killed (reaped: no such process) and respawned; its sessions are lost.
        with pytest.raises(ProcessLookupError):
            os.kill(pid0, 0)
        wait_until(lambda: vm_stats(h, "hung")["worker_pid"] not in (None, pid0), what="the respawn")
        with pytest.raises(SessionLost):
            enc.encode(np.full(64 * 64 * 3 // 2, 50, np.uint8))
        enc.close()
        with dev.encoder("h264", 64, 64) as enc2:
            packets = enc2.encode(np.full(64 * 64 * 3 // 2, 70, np.uint8)) + enc2.flush()
        assert packets and packets[0].is_keyframe
        assert other.crc32(buf).wait(timeout=5) == zlib.crc32(data)

        hung, calm = vm_stats(h, "hung"), vm_stats(h, "calm")
        # SESSION_LOST twice: the encode on the lost session, and its close (the acknowledgement).
        assert (hung["timeouts"], hung["worker_restarts"], hung["errors"]) == (1, 1, {"TIMEOUT": 1, "SESSION_LOST": 2})
        assert (calm["timeouts"], calm["worker_restarts"], calm["worker_pid"]) == (0, 0, other_pid)
        totals = h.device.statistics()["totals"]
        assert (totals["timeouts"], totals["worker_restarts"], totals["errors"]["TIMEOUT"]) == (1, 1, 1)

    events = [(e["event"], e["data"]) for e in drain(sub) if e["event"] in ("timeout", "restart", "worker_crash")]
    vm = hung["vm"]
    assert [e for e, _ in events] == ["timeout", "restart"]  # a watchdog kill is no crash
    assert events[0][1]["vm"] == vm and events[0][1]["op"] == "ENCODE_FRAME" and events[0][1]["seconds"] >= 5.0
    assert events[1][1] == {"vm": vm, "name": "hung", "generation": 2}
    warned = [e for e in logs if e["log_level"] == "warning" and e.get("vm") == vm]
    assert [e["event"] for e in warned][:3] == ["task timed out; killing its worker", "task failed",
                                                "worker killed by the watchdog; respawning"]
    assert warned[1]["error"] == "TIMEOUT" and "past its deadline" in warned[1]["reason"]


def test_deadline_grows_with_the_picture(make_hostd: Callable[..., Hostd]) -> None:
    """Held for 0.6 s, a 1 Mpx frame is within 0.2 + 1.0 s/Mpx; a 64x64 one is not."""
    h = make_hostd(fault_injection=True, task_timeout_s=0.2, task_timeout_per_mpx_s=1.0)
    with guestlib.attach(h.socket_path, name="sized", region_size=16 << 20) as dev:
        for (w, ht), want in (((1000, 1000), ErrorCode.OK), ((64, 64), ErrorCode.TIMEOUT)):
            enc = dev.encoder("h264", w, ht)
            f = hang_frame(enc)
            call = Call(lambda: enc.encode(f))  # noqa: B023  (joined below, in this iteration)
            wait_until(lambda: hang_state(dev, f) == HANG_RUNNING, what="the worker to run the task")  # noqa: B023
            time.sleep(0.6)
            dev.region.store32(f.offset + HANG_STATE, HANG_RELEASE)
            call.join(10)
            got = ErrorCode.OK if call.error is None else getattr(call.error, "code", None)
            assert got == want, call.error
            enc.close()
        assert vm_stats(h, "sized")["timeouts"] == 1


def test_a_task_that_really_runs_long_times_out(make_hostd: Callable[..., Hostd]) -> None:
    """x264 veryslow at 1080p, one thread: FLUSH encodes the look-ahead's frame (about 2 s)."""
    frame = np.random.default_rng(3).integers(0, 256, 1920 * 1088 * 3 // 2, dtype=np.uint8)

    def flush_time(h: Hostd) -> tuple[float, DeviceError | None, int]:
        with guestlib.attach(h.socket_path, name="slow", region_size=32 << 20) as dev:
            enc = dev.encoder("h264", 1920, 1088, preset="veryslow", threads=1)
            assert enc.encode(frame) == []  # the look-ahead keeps it
            t0 = time.monotonic()
            try:
                packets = len(enc.flush())
                error = None
            except DeviceError as e:
                packets, error = 0, e
            took = time.monotonic() - t0
            enc.close()
            if error is not None:  # the respawned worker opens the next session
                with dev.encoder("h264", 64, 64) as small:
                    assert small.encode(np.full(64 * 64 * 3 // 2, 9, np.uint8)) is not None
            return took, error, packets

    took, error, packets = flush_time(make_hostd(task_timeout_s=0.6, task_timeout_per_mpx_s=0.0))
    assert isinstance(error, DeviceError) and error.code == ErrorCode.TIMEOUT and packets == 0
    assert 0.6 <= took < 0.6 + 1.5, took
    # The same flush with the default deadline (10 s + 1 s/Mpx per frame) finishes, and it really
    # takes longer than the deadline the first run had.
    full, error, packets = flush_time(make_hostd())
    assert error is None and packets == 1
    assert full > 0.6 + 0.3, full


def test_totals_outlive_guests_and_departed_ones_stay_for_the_grace(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(metrics_grace_s=1.0)
    sub = h.device.events.subscribe()
    data = b"x" * 1000
    with guestlib.attach(h.socket_path, name="brief", region_size=4 << 20) as dev:
        vm = dev.vm_id
        for _ in range(3):
            dev.copy(dev.put(data), dev.alloc(len(data))).wait()
        with pytest.raises(DeviceError):
            dev.submit(Op.COPY, src=(0, 10), dst=(0, 10)).wait()  # outside the heap: BAD_RANGE
    wait_until(lambda: not h.device.statistics()["vms"], what="the guest to be reclaimed")
    st = h.device.statistics()
    [gone] = st["departed"]
    assert (gone["vm"], gone["name"], gone["tasks_done"], gone["tasks_failed"]) == (vm, "brief", 3, 1)
    assert gone["errors"] == {"BAD_RANGE": 1} and gone["worker_pid"] is None
    assert abs(gone["detached_at"] - time.time()) < 5
    assert set(gone) >= {"vm", "name", "tasks", "latency", "timeouts", "bytes_moved", "detached_at"}
    totals = st["totals"]
    tasks = {(t["op"], t["result"]): t["count"] for t in totals["tasks"]}
    assert tasks == {("COPY", "OK"): 3, ("COPY", "BAD_RANGE"): 1}
    assert (totals["bytes_moved"], totals["errors"], totals["timeouts"]) == (3000, {"BAD_RANGE": 1}, 0)

    # A new guest's counters add to the totals; the departed one goes after the grace only.
    with guestlib.attach(h.socket_path, name="next", region_size=4 << 20) as dev2:
        dev2.copy(dev2.put(data), dev2.alloc(len(data))).wait()
        totals = h.device.statistics()["totals"]
        assert {(t["op"], t["result"]): t["count"] for t in totals["tasks"]} == {("COPY", "OK"): 4,
                                                                                  ("COPY", "BAD_RANGE"): 1}
        assert totals["bytes_moved"] == 4000
    wait_until(lambda: not h.device.statistics()["departed"], timeout=5, what="the grace to end")
    assert h.device.statistics()["totals"]["bytes_moved"] == 4000

    events = [(e["event"], e["data"]) for e in drain(sub)]
    assert events[0] == ("attach", {"vm": vm, "name": "brief", "pid": os.getpid()})
    assert events[1] == ("detach", {"vm": vm, "name": "brief", "reason": events[1][1]["reason"]})
    assert [e for e, _ in events] == ["attach", "detach", "attach", "detach"]


def test_worker_crash_is_an_event(make_hostd: Callable[..., Hostd]) -> None:
    from codec_backend.engine import CRASH_MARKER

    h = make_hostd(fault_injection=True)
    sub = h.device.events.subscribe()
    with guestlib.attach(h.socket_path, name="crashy", region_size=4 << 20) as dev:
        with pytest.raises(DeviceError) as ei:
            dev.crc32(dev.put(CRASH_MARKER + bytes(64))).wait(timeout=30)
        assert ei.value.code == ErrorCode.WORKER_CRASHED
        assert dev.nop().wait(timeout=30) is None
        vm = dev.vm_id
    events = [(e["event"], e["data"]) for e in drain(sub) if e["event"] in ("worker_crash", "restart", "timeout")]
    assert events == [("worker_crash", {"vm": vm, "name": "crashy", "rc": -signal.SIGSEGV}),
                      ("restart", {"vm": vm, "name": "crashy", "generation": 2})]
    assert h.device.statistics()["totals"]["worker_restarts"] == 1
