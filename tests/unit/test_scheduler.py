"""The scheduler is pure logic: drive it with values, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.core.scheduler import Scheduler


def drain(s: Scheduler) -> list[tuple[int, int]]:
    out = []
    while (p := s.next()) is not None:
        out.append((p.vm, p.slot))
        s.finished(p.vm)
    return out


def test_fifo_is_global_arrival_order() -> None:
    s = Scheduler("fifo", cap=8)
    for vm in (1, 2, 3):
        s.add_vm(vm)
    arrivals = [(2, 0), (1, 0), (2, 1), (3, 0), (1, 1)]
    for vm, slot in arrivals:
        s.arrive(vm, slot)
    assert drain(s) == arrivals


def test_cap_limits_inflight_per_guest() -> None:
    s = Scheduler("fifo", cap=2)
    s.add_vm(1)
    s.add_vm(2)
    for i in range(5):
        s.arrive(1, i)
    s.arrive(2, 0)
    got = [s.next(), s.next(), s.next()]
    assert [(p.vm, p.slot) for p in got if p] == [(1, 0), (1, 1), (2, 0)]
    assert s.next() is None and s.inflight(1) == 2
    s.finished(1)
    p = s.next()
    assert p is not None and (p.vm, p.slot) == (1, 2)


def test_round_robin_alternates() -> None:
    s = Scheduler("round-robin", cap=100)
    for vm in (1, 2):
        s.add_vm(vm)
    for i in range(4):
        s.arrive(1, i)
    s.arrive(2, 0)
    s.arrive(2, 1)
    assert [vm for vm, _ in drain(s)] == [1, 2, 1, 2, 1, 1]


def test_weighted_shares() -> None:
    s = Scheduler("weighted", cap=1000)
    s.add_vm(1, weight=3)
    s.add_vm(2, weight=1)
    for i in range(40):
        s.arrive(1, i)
        s.arrive(2, i)
    first = [vm for vm, _ in drain(s)][:40]
    assert first.count(1) == 30 and first.count(2) == 10


def test_blocked_vm_is_skipped_and_remove_returns_pending() -> None:
    s = Scheduler("fifo", cap=8)
    s.add_vm(1)
    s.add_vm(2)
    s.arrive(1, 0)
    s.arrive(2, 0)
    s.block(1)
    p = s.next()
    assert p is not None and p.vm == 2
    dropped = s.remove_vm(1)
    assert [(d.vm, d.slot) for d in dropped] == [(1, 0)]
    with pytest.raises(AssertionError):
        s.finished(2)
        s.finished(2)


def test_take_queued_empties_one_queue_and_keeps_the_guest() -> None:
    s = Scheduler("round-robin", cap=1)
    s.add_vm(1)
    s.add_vm(2)
    s.arrive_many(1, [3, 4, 5])
    s.arrive(2, 7)
    first = s.next()
    assert first is not None and (first.vm, first.slot) == (1, 3)  # in flight: not taken
    assert [(p.vm, p.slot) for p in s.take_queued(1)] == [(1, 4), (1, 5)]
    assert s.depth(1) == 0 and s.inflight(1) == 1 and 1 in s
    s.arrive(1, 6)  # the guest still queues
    nxt = s.next()
    assert nxt is not None and (nxt.vm, nxt.slot) == (2, 7)
    s.finished(1)
    last = s.next()
    assert last is not None and (last.vm, last.slot) == (1, 6)


@given(st.lists(st.tuples(st.integers(1, 4), st.booleans()), max_size=200), st.integers(1, 5),
       st.sampled_from(["fifo", "round-robin", "weighted"]))
def test_every_task_runs_once_and_fifo_within_vm(ops: list[tuple[int, bool]], cap: int, policy: str) -> None:
    s = Scheduler(policy, cap=cap)
    for vm in range(1, 5):
        s.add_vm(vm, weight=vm)
    arrived: dict[int, list[int]] = {vm: [] for vm in range(1, 5)}
    started: dict[int, list[int]] = {vm: [] for vm in range(1, 5)}
    running: list[int] = []
    n = 0
    for vm, run in ops:
        s.arrive(vm, n)
        arrived[vm].append(n)
        n += 1
        if run:
            p = s.next()
            if p is not None:
                started[p.vm].append(p.slot)
                running.append(p.vm)
                assert s.inflight(p.vm) <= cap
        if running and n % 3 == 0:
            s.finished(running.pop(0))
    for vm in running:
        s.finished(vm)
    for p_vm, slot in drain(s):
        started[p_vm].append(slot)
    assert started == arrived
