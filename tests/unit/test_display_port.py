"""The display port's reads ahead of the tick, driven step by step on one thread: a commit is
latched only once the read of its picture ended; a flip that gives a buffer back (DROPPED) and a
close's completion wait for every read of that buffer's picture; a read not started yet is
cancelled instead.  Also the composition slots' phase."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from hostd.core.validate import Program
from hostd.display import layout as lay
from hostd.display.core import NS, compose_slot
from hostd.display.port import DisplayPort, PrescaleRequest
from vmediad import abi
from vmediad.abi import DisplayCommit, DisplayFlip, DisplayOpen, ErrorCode, FlipFlag, Op, PixFmt

REGION = 4 << 20
HEAP_LO = 1 << 16
OPEN_AT, ARENA_AT = 0x1000, 0x20000
PRESENTED, RELEASED, DROPPED = int(FlipFlag.PRESENTED), int(FlipFlag.RELEASED), int(FlipFlag.DROPPED)


@dataclass
class FakeRead:
    """A read the test starts and ends by hand: ``running`` reads cannot be cancelled."""

    req: PrescaleRequest
    running: bool = False
    cancelled: bool = False

    def cancel(self) -> bool:
        if self.running:
            return False
        self.cancelled = True
        return True


@dataclass
class Rig:
    port: DisplayPort
    mem: memoryview
    done: list[tuple[int, int, Op, ErrorCode, int, int]] = field(default_factory=list)
    reads: list[FakeRead] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    output: int = 0
    _next_dst: int = 0x8000

    def run(self, op: Op, rec: bytes, slot: int, arg0: int = 0, dst_len: int = 64) -> int:
        """Run a display task whose record is at a fresh place; returns its dst offset."""
        src = self._next_dst + 0x400
        dst = ARENA_AT if op == Op.DISPLAY_OPEN else self._next_dst
        self._next_dst += 0x800
        self.mem[src:src + len(rec)] = rec
        self.port.run(0, slot, Program(op, 0, 0, src, len(rec), dst, dst_len, arg0, 0, 0, 0), 0)
        return dst

    def commit(self, buffer: int, slot: int) -> int:
        return self.run(Op.DISPLAY_COMMIT, DisplayCommit(self.output, buffer).pack(), slot)

    def flip_at(self, dst: int) -> DisplayFlip:
        return DisplayFlip.unpack_from(self.mem, dst)

    def slots_done(self) -> list[int]:
        return [d[1] for d in self.done]


def rig() -> Rig:
    mem = memoryview(bytearray(REGION))
    r: Rig
    port = DisplayPort.create(320, 180, lay.LayoutSpec(), abi.GeometryLimits(),
                              lambda *a: r.done.append(a))
    r = Rig(port, mem)

    def prescale(req: PrescaleRequest) -> FakeRead:
        read = FakeRead(req)
        r.reads.append(read)
        return read

    port.prescale = prescale
    port.attach(0, "vm0", mem, HEAP_LO, REGION)
    arena = abi.display_arena_size(PixFmt.BGRA, 64, 32, 3)
    r.run(Op.DISPLAY_OPEN, DisplayOpen(64, 32, PixFmt.BGRA, 3).pack(), 1, dst_len=arena)
    (vm, slot, op, err, output, _), = r.done
    assert (vm, slot, op, err) == (0, 1, Op.DISPLAY_OPEN, ErrorCode.OK)
    r.output = output
    r.done.clear()
    return r


def test_a_commit_is_handed_to_the_prescaler_with_its_viewport_and_region() -> None:
    r = rig()
    r.commit(0, 10)
    (read,) = r.reads
    assert read.req.key == (0, r.output, 1)
    assert read.req.viewport.rect == lay.Rect(0, 0, 320, 180) and read.req.frame.width == 64
    assert read.req.region.nbytes == REGION
    assert r.port._pins == {0: 1}  # the region stays mapped while the read runs
    assert r.done == []  # a commit completes at its flip only
    r.port.read_done(read.req.key)
    assert r.port._pins == {}


def test_superseded_while_read_the_dropped_flip_waits_for_the_read() -> None:
    r = rig()
    a = r.commit(0, 10)
    r.reads[0].running = True  # the compositor's worker is reading buffer 0
    r.commit(1, 11)  # replaces it before any tick
    assert r.done == []  # buffer 0 is not given back while it is read
    r.port.read_done(r.reads[0].req.key)
    assert r.slots_done() == [10]
    f = r.flip_at(a)
    assert (f.flags, f.released_buffer, f.released_seq) == (DROPPED | RELEASED, 0, 1)
    assert r.port._pins == {0: 1}  # the newer commit's read still pins the region
    r.reads[1].running = True
    frame = r.port.tick(5)
    assert frame.tick.events == ()  # its picture is still being scaled: it stays pending
    r.port.deliver(frame)
    r.port.changed.clear()
    r.port.read_done(r.reads[1].req.key)
    assert r.port.changed.is_set()  # the read's end wakes the compositor ...
    frame = r.port.tick(6)
    assert [e.flip.front_seq for e in frame.tick.events] == [2]  # ... whose tick takes the commit
    r.port.deliver(frame)
    assert r.slots_done() == [10, 11] and r.port._pins == {}


def test_superseded_before_its_read_started_is_cancelled_and_dropped_at_once() -> None:
    r = rig()
    a = r.commit(0, 10)
    r.commit(1, 11)
    assert r.reads[0].cancelled and not r.reads[1].cancelled
    assert r.slots_done() == [10] and r.flip_at(a).flags == DROPPED | RELEASED
    assert r.port._pins == {0: 1}  # only the newer read pins the region
    r.port.read_done(r.reads[0].req.key)  # a stray end of the cancelled read changes nothing
    assert r.port._pins == {0: 1} and r.slots_done() == [10]


def test_a_commit_is_latched_only_after_its_read_and_then_releases_the_old_front() -> None:
    r = rig()
    a = r.commit(0, 10)
    r.port.read_done(r.reads[0].req.key)
    r.port.deliver(r.port.tick(1))  # buffer 0 on screen
    assert r.slots_done() == [10] and r.flip_at(a).flags == PRESENTED
    b = r.commit(1, 11)
    r.reads[1].running = True
    frame = r.port.tick(2)
    assert frame.tick.events == () and not frame.tick.changed  # buffer 1 is read: nothing to compose
    r.port.deliver(frame)
    assert r.port.core.buffer_states(r.output) == {0: "front", 1: "pending", 2: "guest"}
    r.port.read_done(r.reads[1].req.key)
    frame = r.port.tick(3)
    assert [e.flip.front_seq for e in frame.tick.events] == [2]
    assert r.slots_done() == [10]  # written only once the composition is done ...
    r.port.deliver(frame)
    assert r.slots_done() == [10, 11]  # ... and then it gives buffer 0 back at once
    f = r.flip_at(b)
    assert (f.flags, f.front_buffer, f.released_buffer) == (PRESENTED | RELEASED, 1, 0)
    assert r.port.core.buffer_states(r.output) == {0: "guest", 1: "front", 2: "guest"}


def test_close_completes_after_the_reads_of_its_buffers() -> None:
    r = rig()
    a = r.commit(0, 10)
    r.reads[0].running = True
    r.run(Op.DISPLAY_CLOSE, b"", 20, arg0=r.output)
    assert r.done == []  # the close gives every buffer back: not while one is read
    r.port.read_done(r.reads[0].req.key)
    assert [(d[1], d[2], d[3]) for d in r.done] == [(10, Op.DISPLAY_COMMIT, ErrorCode.OK),
                                                     (20, Op.DISPLAY_CLOSE, ErrorCode.OK)]
    assert r.flip_at(a).flags == DROPPED | RELEASED


def test_a_departed_guest_region_is_unmapped_after_the_read() -> None:
    r = rig()
    r.commit(0, 10)
    r.reads[0].running = True
    r.port.detach(0, 1, died=True)
    r.port.close_region(0, lambda: r.closed.append(0))
    assert r.closed == []  # the read still uses the mapping
    r.port.read_done(r.reads[0].req.key)
    assert r.closed == [0] and r.done == []  # no completion for a guest that is gone


def test_no_read_for_a_hidden_viewport_and_release_all_cancels() -> None:
    r = rig()
    r.port.set_layout(lay.parse(["grid", "hide=vm0"]))
    r.commit(0, 10)
    assert r.reads == []
    r.port.set_layout(lay.LayoutSpec())
    r.port.tick(1)
    r.commit(1, 11)
    assert len(r.reads) == 1 and not r.reads[0].cancelled
    r.port.release_all()
    assert r.reads[0].cancelled and r.port._pins == {}


# --- composition slots ----------------------------------------------------------------------------
def test_compose_slots_keep_their_phase_under_late_starts() -> None:
    """A stream of commits: each composition wants its slot and starts up to 0.9 period late
    (CPU contention).  The slots stay one period apart: exactly 60 a second, none lost."""
    period = round(NS / 60)
    rnd = random.Random(7)
    anchor = None
    now = 0
    starts = []
    for _ in range(600):
        slot = compose_slot(anchor, now, period)
        start = max(now, slot) + rnd.randrange(0, period * 9 // 10)
        starts.append(start)
        anchor = slot
        now = start + period // 4  # the composition takes a quarter period; a commit is already waiting
    assert starts[-1] < 10 * NS + period  # 600 compositions in 10 s (and a bit of the last delay)
    assert starts[-1] >= 599 * period
    # What the old schedule did (the next slot one period after the actual start) loses frames.
    last, old = -period, []
    for _ in range(600):
        start = max(0, last + period) + rnd.randrange(0, period * 9 // 10)
        old.append(start)
        last = start
    assert old[-1] > 11 * NS


@pytest.mark.parametrize(("anchor", "now", "want"), [
    (None, 123, 123),  # the first composition: at once
    (1000, 1050, 1100),  # the slot is ahead: wait for it
    (1000, 1100, 1100),
    (1000, 1150, 1100),  # late by less than a period: keep the phase (compose now)
    (1000, 1199, 1100),
    (1000, 1200, 1200),  # a whole period missed: re-anchor at now
    (1000, 9000, 9000),  # after a quiet spell: at once
])
def test_compose_slot_cases(anchor: int | None, now: int, want: int) -> None:
    assert compose_slot(anchor, now, 100) == want
