"""Keeping threads off real-time scheduling policies that a codec library gives them.

SVT-AV1, run as root, switches the thread that opens an encoder to SCHED_FIFO priority 99, and
every thread it then starts inherits that.  On this project's 2-core machines such threads, or
any process started from them (a worker, a QEMU whose vCPU spins), take both cores from
everything else, hostd and the test run included: nothing else runs until they block.  So
opening a codec is wrapped in :func:`keep_scheduling`, and the test run drops any real-time
policy before each test (tests/conftest.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_REALTIME = (os.SCHED_FIFO, os.SCHED_RR)


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: only this thread is known
        return [threading.get_native_id()]


def _policy(tid: int) -> tuple[int, int] | None:
    try:
        return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
    except OSError:  # the thread has ended
        return None


def _set(tid: int, policy: tuple[int, int]) -> None:
    try:
        os.sched_setscheduler(tid, policy[0], os.sched_param(policy[1]))
    except OSError:  # ended, or not ours to change
        pass


@contextmanager
def keep_scheduling() -> Iterator[None]:
    """On exit, every thread of this process has the policy it had on entry, and a thread
    started meanwhile (by a library) has the calling thread's."""
    me = threading.get_native_id()
    before = {tid: p for tid in _threads() if (p := _policy(tid)) is not None}
    try:
        yield
    finally:
        mine = before.get(me, (os.SCHED_OTHER, 0))
        for tid in _threads():
            want = before.get(tid, mine)
            if _policy(tid) not in (None, want):
                _set(tid, want)


def drop_realtime() -> int:
    """Put every thread of this process that runs SCHED_FIFO or SCHED_RR back on SCHED_OTHER;
    how many there were."""
    n = 0
    for tid in _threads():
        p = _policy(tid)
        if p is not None and p[0] in _REALTIME:
            _set(tid, (os.SCHED_OTHER, 0))
            n += 1
    return n
