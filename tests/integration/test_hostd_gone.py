"""hostd goes away and does not come back: guests end with DeviceGone, never hang.

hostd runs as a real subprocess (``python -m vmediad hostd``).  To have tasks that
are surely still SUBMITTED when it dies, hostd is SIGSTOPped first: nothing it owns can
run, so the tasks submitted then stay queued until the SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import guestlib
from guestlib.device import SLEEP_SLICE_S, Device, DeviceGone, Task
from tests.hostile_guests import wait_until
from vmediad.abi import Op
from vmediad.tools.soak import HostdProcess

WINDOW_S = 2.0


@pytest.fixture
def hostd_proc(short_tmp: Path) -> Iterator[HostdProcess]:
    h = HostdProcess(short_tmp / "h.sock", channels=1)
    h.start()
    yield h
    if h.alive():
        os.kill(h.pid, signal.SIGCONT)
        h.kill()


class Waiter(threading.Thread):
    """Runs ``fn`` and records what it raised and when."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.error: BaseException | None = None
        self.result: object = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e
        self.ended_at = time.monotonic()


def all_threads_stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks.iterdir())


def stopped_with_queued_tasks(h: HostdProcess, dev: Device, n: int) -> list[Task]:
    dev.nop().wait(10)  # attached and served
    os.kill(h.pid, signal.SIGSTOP)
    wait_until(lambda: all_threads_stopped(h.pid), 5, "hostd stopped")  # SIGSTOP lands asynchronously
    tasks = [dev.nop() for _ in range(n)]
    time.sleep(0.1)
    assert not any(t.done() for t in tasks)  # hostd is stopped: nothing can complete them
    return tasks


def assert_every_call_raises_gone(dev: Device, reason: str) -> None:
    buf = guestlib.Buffer(dev, dev.layout.heap_offset, 64)
    t0 = time.monotonic()
    for call in (dev.nop, lambda: dev.alloc(64), lambda: dev.put(b"x"), lambda: dev.submit(Op.NOP),
                 lambda: dev.submit_many([]), lambda: dev.decoder("h264"), lambda: dev.crc32(buf)):
        with pytest.raises(DeviceGone, match=reason):
            call()
    assert time.monotonic() - t0 < 0.5  # at once, no waiting
    assert dev.gone is not None and reason in dev.gone


def test_sigkill_every_waiter_and_later_call_raise_device_gone(hostd_proc: HostdProcess) -> None:
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="gone", ring_entries=8, reattach_window_s=WINDOW_S)
    try:
        tasks = stopped_with_queued_tasks(h, dev, 8)  # every ring slot is taken
        waiters = [Waiter(t.wait) for t in tasks]
        waiters.append(Waiter(dev.nop))  # sleeps for a free slot
        for w in waiters:
            w.start()
        time.sleep(0.3)
        assert all(w.is_alive() for w in waiters)
        t_kill = time.monotonic()
        h.kill()  # SIGKILL works on a stopped process
        for w in waiters:
            w.join(WINDOW_S + 5)
        for w in waiters:
            assert not w.is_alive(), "a waiter still hangs"
            assert isinstance(w.error, DeviceGone), w.error
            assert "did not come back within 2s" in str(w.error)
            # Failed when the re-attach window ended, not before and not a slice late.
            assert WINDOW_S - 0.1 <= w.ended_at - t_kill <= WINDOW_S + 2 * SLEEP_SLICE_S + 1
        assert_every_call_raises_gone(dev, "did not come back")
    finally:
        dev.close()


def test_sigterm_without_restart_ends_in_device_gone(hostd_proc: HostdProcess) -> None:
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="term", reattach_window_s=WINDOW_S)
    try:
        queued = stopped_with_queued_tasks(h, dev, 2)
        waiter = Waiter(queued[0].wait)
        waiter.start()
        os.kill(h.pid, signal.SIGTERM)
        os.kill(h.pid, signal.SIGCONT)
        assert h.proc is not None and h.proc.wait(30) == 0
        # hostd stopping ends every task it was given: run, or failed DEVICE_GONE.
        waiter.join(10)
        assert not waiter.is_alive()
        assert waiter.error is None or isinstance(waiter.error, DeviceGone), waiter.error
        # Work submitted after hostd left waits for a re-attach, then fails with the window.
        t0 = time.monotonic()
        late = Waiter(dev.nop().wait)
        late.start()
        late.join(WINDOW_S + 5)
        assert not late.is_alive() and isinstance(late.error, DeviceGone), late.error
        assert late.ended_at - t0 <= WINDOW_S + 2 * SLEEP_SLICE_S + 1
        assert_every_call_raises_gone(dev, "did not come back")
    finally:
        dev.close()


def test_a_restart_inside_the_window_completes_the_waiting_task(hostd_proc: HostdProcess) -> None:
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="back", reattach_window_s=10.0)
    try:
        [task] = stopped_with_queued_tasks(h, dev, 1)
        h.kill()
        time.sleep(1.0)
        h.start()
        assert task.wait(10) is None  # re-attached: the queued task ran
        assert dev.gone is None and dev.reattaches == 1
        dev.nop().wait(10)
    finally:
        dev.close()


def test_give_up_fails_a_waiter_in_another_thread_within_a_slice(hostd_proc: HostdProcess) -> None:
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="giveup")
    try:
        [task] = stopped_with_queued_tasks(h, dev, 1)
        waiter = Waiter(task.wait)
        waiter.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        dev.give_up("test gives up")
        waiter.join(5)
        assert isinstance(waiter.error, DeviceGone) and str(waiter.error) == "test gives up"
        assert waiter.ended_at - t0 <= SLEEP_SLICE_S + 0.5  # noticed within a slice (never, before)
        assert_every_call_raises_gone(dev, "test gives up")
    finally:
        dev.close()


def test_closing_the_window_while_hostd_is_down_fails_at_once(hostd_proc: HostdProcess) -> None:
    """What a VM does on a clean stop: it will not wait 30 s for a hostd that may never return."""
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="window")  # the default 30 s window
    try:
        [task] = stopped_with_queued_tasks(h, dev, 1)
        waiter = Waiter(task.wait)
        waiter.start()
        h.kill()
        time.sleep(0.5)
        assert waiter.is_alive() and dev.gone is None  # inside the window: still waiting
        t0 = time.monotonic()
        dev.reattach_window_s = 0.0
        waiter.join(5)
        assert isinstance(waiter.error, DeviceGone), waiter.error
        assert waiter.ended_at - t0 < 1.5
    finally:
        dev.close()


def test_without_auto_reattach_eof_means_gone_at_once(hostd_proc: HostdProcess) -> None:
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="noreattach", auto_reattach=False)
    try:
        [task] = stopped_with_queued_tasks(h, dev, 1)
        waiter = Waiter(task.wait)
        waiter.start()
        t0 = time.monotonic()
        h.kill()
        waiter.join(5)
        assert isinstance(waiter.error, DeviceGone), waiter.error
        assert waiter.ended_at - t0 < 1.5
        wait_until(lambda: dev.gone is not None, 2, "gone")
        assert_every_call_raises_gone(dev, "hostd closed the control connection")
    finally:
        dev.close()


def test_a_socket_that_never_answers_does_not_outlast_the_window(hostd_proc: HostdProcess) -> None:
    """Something listens on hostd's path after it died (a new hostd that hangs): the re-attach
    handshake is bounded by what is left of the window."""
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="mute", reattach_window_s=WINDOW_S)
    try:
        [task] = stopped_with_queued_tasks(h, dev, 1)
        h.kill()
        h.socket_path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
            mute.bind(str(h.socket_path))
            mute.listen(16)  # connects succeed (backlog); nobody ever accepts or replies
            t0 = time.monotonic()
            waiter = Waiter(task.wait)
            waiter.start()
            waiter.join(WINDOW_S + 5)
            assert isinstance(waiter.error, DeviceGone), waiter.error
            assert waiter.ended_at - t0 <= WINDOW_S + 2 * SLEEP_SLICE_S + 1
    finally:
        dev.close()


def test_close_with_a_thread_still_waiting_fails_it_and_unmaps_safely(hostd_proc: HostdProcess) -> None:
    """close() wakes the waiters and unmaps the region only once they have left it."""
    h = hostd_proc
    dev = guestlib.attach(h.socket, name="closing")
    [task] = stopped_with_queued_tasks(h, dev, 1)
    waiter = Waiter(task.wait)
    waiter.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    dev.close()  # a segfault here, or later in the waiter, would kill the test process
    waiter.join(5)
    assert isinstance(waiter.error, DeviceGone) and str(waiter.error) == "device closed"
    assert waiter.ended_at - t0 < 1.0
    with pytest.raises(DeviceGone, match="device closed"):
        dev.nop()
