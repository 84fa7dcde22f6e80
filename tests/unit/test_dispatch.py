"""Dispatch as values: channels, register files, staging, shadow loads, fair share, revocation.

``Pass`` runs a dispatch pass the way hostd/loop.py does, without the bank: whatever the
core decides is recorded instead of programmed."""

from __future__ import annotations

import pytest

from hostd.core.dispatch import Dispatcher, RegFile, Running, Staged
from hostd.core.scheduler import FifoPolicy, Pending, RoundRobinPolicy, Scheduler, WeightedPolicy
from hostd.core.sessions import SessionIds, Sessions
from hostd.core.validate import Program
from hostd.core.watchdog import NEVER, Watchdog
from vmediad import abi
from vmediad.abi import Op


def program(op: Op = Op.NOP, session: int = 0) -> Program:
    return Program(op, 0, session, 0, 0, 0, 0, 0, 0, 0, 0)


class Pass:
    def __init__(self, policy: str, channels: int, vms: tuple[int, ...] = (1, 2), cap: int = 8) -> None:
        self.sched = Scheduler(policy, cap)
        self.d = Dispatcher(channels, self.sched)
        for vm in vms:
            self.sched.add_vm(vm)
        self.seq = 0
        self.bound: dict[int, int] = {}  # slot -> channel, for tasks of a session

    def run(self) -> list[tuple[int, int, int, int]]:
        """One pass: staged tasks first, then picks; the (vm, slot, channel, file) started."""
        d, started = self.d, []
        for held in d.staged_in_order():
            ch = d.place(held, held.order)
            if ch is not None:
                d.unstage(held.pending.vm)
                self.sched.block(held.pending.vm, False)
                started.append(self.start(held, ch))
        while (p := self.sched.next()) is not None:
            st = Staged(p, program(), b"", self.bound.get(p.slot), 0)
            ch = d.place(st)
            if ch is None:
                d.stage(st)
                continue
            started.append(self.start(st, ch))
        return started

    def start(self, st: Staged, k: int) -> tuple[int, int, int, int]:
        self.seq += 1
        p = st.pending
        rf = self.d.load(k, Running(p.vm, p.slot, 0, st.prog.opcode, 0, self.seq, self.seq, 0, p.seq))
        return p.vm, p.slot, rf.channel, rf.file

    def retire(self, k: int, f: int) -> Running:
        rf = self.d.channels[k].files[f]
        assert rf.running is not None
        self.sched.finished(rf.running.vm_id)
        return self.d.retire(rf, 1000 + self.seq)


def test_fifo_goes_in_arrival_order_and_a_shadow_load_never_overtakes_a_waiting_guest() -> None:
    t = Pass("fifo", channels=2)
    for vm, slot in [(1, 0), (1, 1), (2, 0), (1, 2)]:
        t.sched.arrive(vm, slot)
    # Both channels go to vm 1; vm 2's task finds no file (the files hold vm 1's tasks) and
    # waits; vm 1's third task would fit a shadow file but arrived after vm 2's: it waits too.
    assert t.run() == [(1, 0, 0, 0), (1, 1, 1, 0)]
    assert [(s.pending.vm, s.pending.slot) for s in t.d.staged_in_order()] == [(2, 0), (1, 2)]
    assert not t.d.loadable(1, 1)
    assert t.d.loadable(1, 1, before=1)  # counting only tasks staged before the first: none
    t.retire(0, 0)
    # Channel 0 is idle: the staged tasks start in the order they were staged.
    assert t.run() == [(2, 0, 0, 0), (1, 2, 1, 1)]
    assert not t.d.staged


def test_fifo_shadow_loads_fill_a_channels_files_in_ring_order() -> None:
    t = Pass("fifo", channels=1, vms=(1,))
    for slot in range(6):
        t.sched.arrive(1, slot)
    assert t.run() == [(1, s, 0, s) for s in range(abi.CH_FILES)]
    assert [(s.pending.vm, s.pending.slot) for s in t.d.staged_in_order()] == [(1, 4)]
    chan = t.d.channels[0]
    t.retire(0, 1)  # out of order: file 0 (next in the ring) still holds a task
    assert chan.free_file(1) is None and t.run() == []
    t.retire(0, 0)
    assert t.run() == [(1, 4, 0, 0), (1, 5, 0, 1)]
    for f in range(abi.CH_FILES):
        t.retire(0, f)
    assert chan.idle and chan.next_file == 0  # an idle channel starts again at file 0


def test_a_channel_holds_one_guests_tasks_at_a_time() -> None:
    d = Dispatcher(1, Scheduler("fifo"))
    d.load(0, Running(1, 0, 0, Op.NOP, 0, 1, 0, 0))
    assert d.channels[0].free_file(2) is None and not d.loadable(0, 2)
    assert d.channels[0].free_file(1) is d.channels[0].files[1] and d.loadable(0, 1)
    with pytest.raises(AssertionError):
        d.load(0, Running(2, 0, 0, Op.NOP, 0, 2, 0, 0))


@pytest.mark.parametrize("policy", ["round-robin", "weighted"])
def test_fair_share_with_two_active_guests_leaves_a_channel_and_no_shadow_loads(policy: str) -> None:
    t = Pass(policy, channels=2)
    t.d.active_guests = 2
    for slot in range(3):
        t.sched.arrive(1, slot)
    assert t.run() == [(1, 0, 0, 0)]  # one channel, not both; no shadow load behind it
    assert not t.d.may_take_idle(1) and t.d.may_take_idle(2)
    assert t.d.free_channel(1) is None
    t.sched.arrive(2, 0)
    t.retire(0, 0)
    got = t.run()
    assert (2, 0, 1, 0) in got and len(got) == 2  # vm 2 gets the channel vm 1 left free
    # A task bound to its session's channel keeps its shadow load.
    st = Staged(Pending(1, 7, 99), program(Op.DECODE, 5), b"", 0, 0)
    busy = next(k for k in (0, 1) if not t.d.channels[k].idle and t.d.channels[k].loaded()[0].vm_id == 1)
    st.channel = busy
    assert t.d.place(st) == busy


@pytest.mark.parametrize("policy", ["round-robin", "weighted"])
def test_a_lone_guest_gets_every_channel_and_shadow_loads_under_fair_share(policy: str) -> None:
    t = Pass(policy, channels=2)
    t.d.active_guests = 1
    for slot in range(4):
        t.sched.arrive(1, slot)
    # Idle channels first, then shadow files of the first channel with one free.
    assert [(k, f) for _, _, k, f in t.run()] == [(0, 0), (1, 0), (0, 1), (0, 2)]


def test_fifo_is_work_conserving_with_two_active_guests() -> None:
    t = Pass("fifo", channels=2)
    t.d.active_guests = 2
    for slot in range(4):
        t.sched.arrive(1, slot)
    # Idle channels first, then shadow files of the first channel with one free.
    assert [(k, f) for _, _, k, f in t.run()] == [(0, 0), (1, 0), (0, 1), (0, 2)]


def _loaded(d: Dispatcher, vm: int, order: list[int], op: Op = Op.CRC32) -> list[RegFile]:
    """Load ``vm``'s tasks into channel 0: file order[i] gets CH_SEQ i + 1."""
    files = []
    for seq, f in enumerate(order, 1):
        rf = d.channels[0].files[f]
        rf.running = Running(vm, 10 + seq, 0, op, 0, seq, 0, 0, arrival=seq)
        files.append(rf)
    return files


def test_revocation_is_offered_newest_first_and_stops_at_the_first_lost_race() -> None:
    sched = Scheduler("round-robin")
    d = Dispatcher(1, sched)
    sched.add_vm(1)
    sched.add_vm(2)
    for slot in range(11, 15):  # the four tasks as the scheduler handed them out
        sched.arrive(1, slot)
        assert sched.next() is not None
    files = _loaded(d, 1, [2, 3, 0, 1])  # loaded out of file order: CH_SEQ decides
    sched.arrive(1, 20)
    mine = sched.next()
    assert mine is not None
    d.stage(Staged(mine, program(), b"", None, 0))  # vm 1's next task waits too
    offers = list(d.shadows_to_revoke(2, None))
    assert [(owner, [rf.file for rf in fs]) for owner, fs in offers] == [(1, [1, 0, 3])]  # file 2 runs
    assert list(d.shadows_to_revoke(1, None)) == []  # never a guest's own
    # The CAS wins for the two newest, then the worker has claimed the next: stop there.
    won = [d.revoked(files[3]), d.revoked(files[2])]
    d.give_back(1, won, Sessions(SessionIds(1), 8))
    assert d.shadow_revokes == 2
    assert [rf.file for rf in d.channels[0].loaded_files()] == [2, 3]
    assert d.channels[0].next_file == 0  # the ring stays contiguous: file 0 is loaded next
    assert not d.staged and sched.inflight(1) == 2
    again = [sched.next() for _ in range(3)]
    assert [(p.vm, p.slot) for p in again if p] == [(1, 13), (1, 14), (1, 20)]  # their order, first


def test_a_revoked_session_open_gives_its_session_back() -> None:
    sched = Scheduler("round-robin")
    d = Dispatcher(1, sched)
    sched.add_vm(1)
    book = Sessions(SessionIds(100), 8)
    files = _loaded(d, 1, [0, 1], op=Op.SESSION_OPEN)
    for rf in files:
        assert rf.running is not None
        rf.running.session = book.bind(d.channels[0], "h264", 0.0)
        sched.arrive(1, rf.running.slot)
        sched.next()
    d.give_back(1, [d.revoked(files[1])], book)
    assert len(book) == 1 and d.channels[0].bound_sessions == 1


def test_nothing_is_offered_from_a_guest_that_is_detaching_or_without_a_shadow() -> None:
    sched = Scheduler("round-robin")
    d = Dispatcher(2, sched)
    _loaded(d, 1, [0, 1])
    d.channels[1].files[0].running = Running(3, 1, 0, Op.NOP, 0, 9, 0, 0)  # one task: no shadow
    assert list(d.shadows_to_revoke(2, None)) == []  # vm 1 left the scheduler (detaching)
    sched.add_vm(1)
    assert [owner for owner, _ in d.shadows_to_revoke(2, None)] == [1]
    assert list(d.shadows_to_revoke(2, 1)) == []  # only the task's own channel counts


def test_retire_counts_busy_time_and_starts_the_next_tasks_deadline() -> None:
    d = Dispatcher(1, Scheduler("fifo"))
    a = Running(1, 0, 0, Op.CRC32, 0, 1, dispatch_ns=100, submit_ns=0, budget_ns=50)
    b = Running(1, 1, 0, Op.CRC32, 0, 2, dispatch_ns=120, submit_ns=0, budget_ns=70)
    d.load(0, a)
    d.load(0, b)
    assert (a.started_ns, b.started_ns) == (100, 0)  # b waits behind a: no deadline yet
    assert d.watchdog.next_ns == 150
    assert d.retire(d.channels[0].files[0], 130) is a
    assert b.started_ns == 130 and d.watchdog.next_ns == 150
    d.retire(d.channels[0].files[1], 180)
    chan = d.channels[0]
    assert (chan.busy_ns, chan.tasks, chan.idle) == (80, 2, True)  # [100, 180], overlaps once


def test_a_file_never_claimed_goes_back_to_the_end_of_the_queue() -> None:
    sched = Scheduler("fifo")
    d = Dispatcher(1, sched)
    sched.add_vm(1)
    book = Sessions(SessionIds(1), 8)
    sched.arrive(1, 4)
    p = sched.next()
    assert p is not None
    sched.arrive(1, 5)
    sid = book.bind(d.channels[0], "h264", 0.0)
    rf = d.load(0, Running(1, 4, 0, Op.SESSION_OPEN, sid, 1, 0, 0))
    d.requeue(rf, book)
    assert rf.running is None and len(book) == 0 and sched.inflight(1) == 0
    assert [sched.next(), sched.next()] == [Pending(1, 5, 2), Pending(1, 4, 3)]


def test_a_new_session_goes_to_the_channel_with_fewest_sessions_idle_first() -> None:
    d = Dispatcher(3, Scheduler("fifo"))
    d.channels[0].bound_sessions = 1
    d.load(1, Running(1, 0, 0, Op.NOP, 0, 1, 0, 0))
    assert d.session_channel().index == 2
    d.channels[2].bound_sessions = 1
    assert d.session_channel().index == 1  # busy, but the fewest sessions
    assert not d.codec_busy()
    d.load(1, Running(1, 1, 0, Op.DECODE, 0, 2, 0, 0))
    assert d.codec_busy()


def test_policies_are_classes_with_their_dispatch_rules() -> None:
    assert [type(Scheduler(n).policy) for n in ("fifo", "round-robin", "weighted")] == [
        FifoPolicy, RoundRobinPolicy, WeightedPolicy]
    assert not FifoPolicy.fair_share and not FifoPolicy.revokes_shadows
    assert RoundRobinPolicy.fair_share and RoundRobinPolicy.revokes_shadows and not RoundRobinPolicy.strides
    assert WeightedPolicy.fair_share and WeightedPolicy.revokes_shadows and WeightedPolicy.strides
    assert str(Scheduler("weighted").policy) == "weighted"
    with pytest.raises(ValueError, match="lottery"):
        Scheduler("lottery")


def test_the_watchdog_names_the_overdue_and_keeps_the_nearest_deadline() -> None:
    w = Watchdog()
    files = [RegFile(0, f) for f in range(4)]
    runs = [Running(1, f, 0, Op.DECODE, 0, f, 0, 0, budget_ns=100) for f in range(4)]
    for rf, run in zip(files, runs, strict=True):
        rf.running = run
    w.started(runs[0], 1000)  # due at 1100
    w.started(runs[1], 1050)  # due at 1150
    runs[2].budget_ns = 0  # no deadline
    w.started(runs[2], 1000)
    assert w.next_ns == 1100  # runs[3] waits behind another task: no deadline yet
    assert w.overdue(files, 1120) == [files[0]] and w.next_ns == 1150
    runs[0].timed_out = True  # being ended: not named again
    assert w.overdue(files, 1200) == [files[1]] and w.next_ns == NEVER
    w.recheck(1200)
    assert w.next_ns == 1200
