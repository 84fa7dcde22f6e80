"""Descriptor and ring fuzzing against a real hostd (a subprocess) through a real region.

Hypothesis writes random descriptors, SQ entries, ring indices and doorbell
values straight into the region of one attached guest.  The oracle below is
written from the ABI (vmediad/abi.py docstrings), not from hostd/core/validate.py:
every task must end DONE or with the one specific error the ABI names, within
a bound, and hostd must stay up.  One hostd and one attached guest serve every
example of the module (a NOP round trip is ~60-100 µs; an attach is ~100 ms).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import guestlib
from guestlib.device import Device
from vmediad import abi
from vmediad.abi import DescFlag, Descriptor, Doorbell, ErrorCode, Op, Status
from vmediad.tools.soak import HostdProcess

U32 = abi.U32_MAX
U64 = abi.U64_MAX
REGION = 1 << 20
RING = 64
BOUND_S = 5.0  # every task ends within this
CI_EXAMPLES = int(os.environ.get("VMEDIAD_FUZZ_EXAMPLES", "10000"))


# --- the oracle (from the ABI, independent of hostd/core/validate.py) -------------------------
# Which buffers each opcode names: (reads src, writes dst).
USES = {
    Op.NOP: (False, False), Op.COPY: (True, True), Op.CRC32: (True, False), Op.CAPS: (False, True),
    Op.SESSION_OPEN: (True, True), Op.ENCODE_FRAME: (True, True), Op.DECODE: (True, True),
    Op.FLUSH: (False, True), Op.SESSION_CLOSE: (False, False),
    Op.DISPLAY_OPEN: (True, True), Op.DISPLAY_COMMIT: (True, True), Op.DISPLAY_CLOSE: (False, False),
}
EMPTY_SRC_OK = {Op.COPY, Op.CRC32, Op.ENCODE_FRAME, Op.DECODE}
SESSION_CONFIG_MAX = 4096


def range_error(off: int, length: int, lo: int, hi: int) -> ErrorCode | None:
    """u64 semantics: off + length must not wrap, and [off, off+length) must lie in [lo, hi)."""
    if off + length > U64:
        return ErrorCode.OVERFLOW
    if off < lo or off + length > hi:
        return ErrorCode.BAD_RANGE
    return None


def expected(d: Descriptor, lay: abi.Layout) -> set[ErrorCode]:
    """The outcomes the ABI allows for ``d`` (OK means DONE), before the task runs."""
    if d.opcode not in Op._value2member_map_:
        return {ErrorCode.BAD_OPCODE}
    op = Op(d.opcode)
    if d.flags & ~abi.DESC_FLAGS_MASK:
        return {ErrorCode.BAD_FLAGS}
    reads, writes = USES[op]
    heap, end = lay.heap_offset, lay.region_size
    if reads and not (d.src_len == 0 and op in EMPTY_SRC_OK):
        err = range_error(d.src_off, d.src_len, heap, end)
        if err:
            return {err}
    if writes and not (op == Op.SESSION_OPEN and d.dst_len == 0):  # an open's pool is optional
        err = range_error(d.dst_off, d.dst_len, heap, end)
        if err:
            return {err}
    # MULTI is for ENCODE_FRAME/DECODE only; elsewhere it is BAD_FLAGS once nothing above failed.
    multi = bool(d.flags & DescFlag.MULTI)
    if op == Op.COPY:
        if d.dst_len < d.src_len:
            return {ErrorCode.NO_SPACE}
        if d.src_len and d.src_off < d.dst_off + d.src_len and d.dst_off < d.src_off + d.src_len:
            return {ErrorCode.OVERLAP}
        return {ErrorCode.BAD_FLAGS} if multi else {ErrorCode.OK}
    if op in (Op.NOP, Op.CRC32):
        return {ErrorCode.BAD_FLAGS} if multi else {ErrorCode.OK}
    if op == Op.CAPS:
        return {ErrorCode.BAD_FLAGS} if multi else {ErrorCode.OK, ErrorCode.NO_SPACE}
    if op == Op.SESSION_OPEN:
        if not abi.SESSION_CONFIG.size <= d.src_len <= SESSION_CONFIG_MAX:
            return {ErrorCode.BAD_ARG}
        if multi:
            return {ErrorCode.BAD_FLAGS}
        # The heap is random bytes: the config is garbage (a real open is possible but
        # vanishingly rare; the test closes any session it gets).
        return {ErrorCode.BAD_ARG, ErrorCode.UNSUPPORTED_CODEC, ErrorCode.TOO_LARGE, ErrorCode.OK,
                ErrorCode.BUSY, ErrorCode.BACKEND}
    if op == Op.DISPLAY_OPEN:
        if d.src_len != abi.DISPLAY_OPEN.size or d.dst_len < abi.DISPLAY_REPLY_MAX:
            return {ErrorCode.BAD_ARG}
        if multi:
            return {ErrorCode.BAD_FLAGS}
        # The record is random heap bytes: refused, or (vanishingly rare) an output opened.
        return {ErrorCode.BAD_ARG, ErrorCode.BAD_FLAGS, ErrorCode.TOO_LARGE, ErrorCode.NO_SPACE, ErrorCode.BUSY,
                ErrorCode.OK}
    if op == Op.DISPLAY_COMMIT:
        if not abi.DISPLAY_COMMIT_FIXED <= d.src_len <= abi.DISPLAY_COMMIT_MAX:
            return {ErrorCode.BAD_ARG}
        if d.dst_len < abi.DISPLAY_FLIP.size:
            return {ErrorCode.NO_SPACE}
        if multi:
            return {ErrorCode.BAD_FLAGS}
        return {ErrorCode.BAD_ARG, ErrorCode.BAD_FLAGS, ErrorCode.BAD_SESSION, ErrorCode.BAD_RANGE,
                ErrorCode.OVERFLOW, ErrorCode.TOO_LARGE, ErrorCode.SLOT_BUSY, ErrorCode.OK}
    if op == Op.DISPLAY_CLOSE:
        return {ErrorCode.BAD_FLAGS} if multi else {ErrorCode.BAD_SESSION, ErrorCode.OK}
    if op in (Op.ENCODE_FRAME, Op.DECODE) and d.src_len == 0 and not d.flags & DescFlag.DRAIN_PENDING:
        return {ErrorCode.BAD_ARG}
    if multi:
        if op not in (Op.ENCODE_FRAME, Op.DECODE) or d.flags & DescFlag.DRAIN_PENDING:
            return {ErrorCode.BAD_FLAGS}
        n, rest = divmod(d.src_len, abi.MULTI_ENTRY.size)
        if rest or not 1 <= n <= abi.MULTI_MAX:
            return {ErrorCode.BAD_ARG}
        # The list is random heap bytes: an entry is rejected, or the session check fails.
        return {ErrorCode.BAD_FLAGS, ErrorCode.BAD_ARG, ErrorCode.BAD_RANGE, ErrorCode.OVERFLOW,
                ErrorCode.BAD_SESSION}
    return {ErrorCode.BAD_SESSION}  # this guest never holds an open session here


# --- strategies biased to the edges ---------------------------------------------------------
LAY = abi.compute_layout(REGION, RING)
HEAP, END = LAY.heap_offset, LAY.region_size
EDGE_OFFSETS = sorted({0, 1, HEAP - 1, HEAP, HEAP + 1, HEAP + 64, END - 4096, END - 64, END - 1, END, END + 1,
                       LAY.desc_offset, LAY.sq_offset, 2**31, U32 - 1, U32, U32 + 1, 2**63, U64 - 4096,
                       U64 - 1, U64})
EDGE_LENGTHS = sorted({0, 1, 2, 63, 64, 4095, 4096, END - HEAP - 1, END - HEAP, END - HEAP + 1, END, U32 - 1,
                       U32, U32 + 1, 2**63, U64 - HEAP, U64 - 1, U64})
OPCODES = [Op.NOP, Op.COPY, Op.CRC32] * 4 + [Op.CAPS, Op.SESSION_OPEN, Op.ENCODE_FRAME, Op.DECODE, Op.FLUSH,
                                              Op.SESSION_CLOSE, Op.DISPLAY_OPEN, Op.DISPLAY_COMMIT,
                                              Op.DISPLAY_CLOSE, 0, 5, 15, 21, 31, 35, 0x7FFF, 0xFFFF]
u64 = st.integers(0, U64)
offsets = st.one_of(st.sampled_from(EDGE_OFFSETS), st.integers(HEAP, END), u64)
lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 8192), st.integers(0, END - HEAP), u64)
flag_values = st.one_of(st.just(0), st.sampled_from([1, 2, 4, 8, 15, 16, 0x8000, 0xFFFF]), st.integers(0, 0xFFFF))


ARGS = [(0, 0, 0, 0), (1, 1, 1, 1), (U64, U64, U64, U64), (0, U64, 0, U64)]
sessions = st.one_of(st.sampled_from([0, 1, 2, U32]), st.integers(0, U32))
flags_or_zero = st.one_of(st.just(0), st.just(0), st.just(0), flag_values)


@st.composite
def descriptors(draw: st.DrawFn) -> Descriptor:
    op = draw(st.sampled_from(OPCODES))
    src_off = draw(offsets)
    shape = draw(st.integers(0, 11))
    if shape < 4:
        src_len = draw(lengths)
    else:  # lengths that end exactly at, one before, one past, or wrap around an edge
        edge = (END, U64 + 1, HEAP)[shape % 3]
        src_len = max(0, min(U64, edge - src_off + (shape % 3) - 1))
    how = draw(st.integers(-3, 12))
    if how < 4:  # overlapping or adjacent to src
        dst_off = max(0, min(U64, src_off + how * max(1, min(src_len, 1 << 16)) // 2))
    else:
        dst_off = draw(offsets)
    dst_len = src_len - how % 2 if how % 3 == 0 and src_len else draw(lengths)
    flags = draw(flags_or_zero)
    if shape == 11 and op in (Op.ENCODE_FRAME, Op.DECODE):  # a MULTI list of 0..MULTI_MAX+1 entries
        flags, src_len = int(DescFlag.MULTI), abi.MULTI_ENTRY.size * draw(st.integers(0, abi.MULTI_MAX + 1))
    return Descriptor(draw(st.integers(0, U64)), int(op), flags, draw(sessions), src_off, src_len,
                      dst_off, dst_len, *ARGS[how % 4])


def random_descriptor(rng: random.Random) -> Descriptor:
    """The same distribution as ``descriptors()`` without Hypothesis (for the 10^6 slow run)."""
    def pick_off() -> int:
        r = rng.random()
        return rng.choice(EDGE_OFFSETS) if r < 0.4 else rng.randint(HEAP, END) if r < 0.8 else rng.randint(0, U64)

    def pick_len() -> int:
        r = rng.random()
        if r < 0.3:
            return rng.choice(EDGE_LENGTHS)
        return rng.randint(0, 8192) if r < 0.6 else rng.randint(0, END - HEAP) if r < 0.9 else rng.randint(0, U64)

    op = rng.choice(OPCODES)
    src_off = pick_off()
    if rng.random() < 0.25:
        src_len = pick_len()
    else:
        src_len = max(0, min(U64, rng.choice([END, U64 + 1, HEAP]) - src_off + rng.choice([-1, 0, 1])))
    if rng.random() < 0.25:
        dst_off = max(0, min(U64, src_off + rng.choice([-1, 0, 1, 64]) * max(1, min(src_len, 1 << 16))
                             + rng.randint(-64, 64)))
    else:
        dst_off = pick_off()
    dst_len = rng.choice([pick_len(), src_len, max(0, src_len - 1)])
    flags = 0
    if rng.random() < 0.12:
        flags = rng.choice([1, 2, 4, 8, 15, 16, 18, 31, 0x8000, 0xFFFF, rng.randint(0, 0xFFFF)])
    session = rng.choice([0, 1, 2, U32, rng.randint(0, U32)])
    if op in (Op.ENCODE_FRAME, Op.DECODE) and rng.random() < 0.2:  # a MULTI list of 0..MULTI_MAX+1 entries
        flags, src_len = int(DescFlag.MULTI), abi.MULTI_ENTRY.size * rng.randint(0, abi.MULTI_MAX + 1)
    return Descriptor(rng.randint(0, U64), int(op), flags, session, src_off, src_len, dst_off, dst_len,
                      *(rng.choice([0, 1, U64]) for _ in range(4)))


# --- one hostd and one guest for the whole module ---------------------------------------------
@dataclass
class Rig:
    hostd: HostdProcess
    dev: Device
    checked: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    d = Path(tempfile.mkdtemp(prefix="vmf-"))
    h = HostdProcess(d / "h.sock", channels=2, config={"limits": {"max_inflight_per_guest": 16}})
    h.start()
    dev = guestlib.attach(h.socket, name="fuzz", region_size=REGION, ring_entries=RING, auto_reattach=False)
    assert dev.layout == LAY
    dev.region.mem[HEAP:END] = random.Random(7).randbytes(END - HEAP)
    try:
        yield Rig(h, dev)
        assert h.alive(), h.log_text()
    finally:
        dev.close()
        rc = h.stop()
        log = h.log_text()
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, log
        assert "device loop crashed" not in log, log


def run_batch(rig: Rig, descs: list[Descriptor]) -> None:
    """Submit ``descs`` back to back, then check every outcome against the oracle."""
    dev = rig.dev
    mem = dev.region.mem
    before = bytes(mem[HEAP:END])
    tasks = [dev.submit_raw(d) for d in descs]
    outs = [t.completion(timeout=BOUND_S) for t in tasks]
    # Ranges some task of this batch may have written: results that read them are not exact.
    written = []
    for d, c in zip(descs, outs, strict=True):
        if c.status == Status.DONE and d.opcode in (Op.COPY, Op.CAPS, Op.DISPLAY_OPEN, Op.DISPLAY_COMMIT):
            written.append((d.dst_off, d.dst_len))

    def clean(off: int, length: int) -> bool:
        return not any(off < w + n and w < off + length for w, n in written)

    for d, c in zip(descs, outs, strict=True):
        allowed = expected(d, LAY)
        got = c.error if c.status == Status.ERROR else ErrorCode.OK
        assert c.status in (Status.DONE, Status.ERROR), (d, c)
        assert got in allowed, f"{d} -> {c.status.name}/{got.name}, allowed {[e.name for e in allowed]}"
        assert (c.status == Status.DONE) == (got == ErrorCode.OK)
        rig.outcomes[got.name] += 1
        if c.status == Status.ERROR:
            assert c.channel == U32 or got in (ErrorCode.NO_SPACE, ErrorCode.BACKEND, ErrorCode.BAD_ARG,
                                               ErrorCode.UNSUPPORTED_CODEC, ErrorCode.TOO_LARGE, ErrorCode.BUSY)
            continue
        if d.opcode == Op.CRC32 and clean(d.src_off, d.src_len):
            lo = d.src_off - HEAP
            assert c.result == zlib.crc32(before[lo : lo + d.src_len]), d
            assert c.result_len == d.src_len
        if d.opcode == Op.COPY and clean(d.src_off, d.src_len) and len(written) == 1:
            lo = d.src_off - HEAP
            assert bytes(mem[d.dst_off : d.dst_off + d.src_len]) == before[lo : lo + d.src_len], d
        if d.opcode == Op.SESSION_OPEN:
            dev.submit(Op.SESSION_CLOSE, session=c.result).completion(timeout=BOUND_S)
    rig.checked += len(descs)


def check_alive(rig: Rig) -> None:
    assert rig.hostd.alive(), rig.hostd.log_text()
    reg = rig.dev.region
    assert reg.load32(abi.REG_MAGIC) == abi.MAGIC
    assert reg.load32(abi.REG_DEVICE_STATE) == abi.DeviceState.RUNNING


# --- property: random descriptors -----------------------------------------------------------------
@settings(max_examples=CI_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(descriptors(), min_size=1, max_size=3))
def test_random_descriptors_end_done_or_specific_error(rig: Rig, batch: list[Descriptor]) -> None:
    run_batch(rig, batch)


def test_fuzz_module_survivor_and_counts(rig: Rig) -> None:
    """Runs after the property: hostd is up, nothing leaked, statistics agree with the guest."""
    check_alive(rig)
    if rig.checked == 0:
        pytest.skip("run with the property test above")
    assert rig.checked >= CI_EXAMPLES  # every example submitted at least one descriptor
    vm = rig.hostd.status()["vms"][0]
    assert vm["inflight"] == 0 and vm["queue_depth"] == 0
    assert vm["tasks_done"] + vm["tasks_failed"] >= rig.checked
    assert rig.dev.nop().wait(timeout=BOUND_S) is None
    print(f"\nfuzz: {rig.checked} descriptors {dict(rig.outcomes.most_common())}")


# --- stateful: ring indices, tail jumps, doorbells, hostd-owned words -------------------------------
class RingMachine(RuleBasedStateMachine):
    """Drives the ring by hand (not through guestlib's producer) and tampers with everything."""

    rig: Rig

    def __init__(self) -> None:
        super().__init__()
        self.dev = self.rig.dev
        self.reg = self.dev.region
        self.pending: dict[int, tuple[Descriptor, int, set[ErrorCode]]] = {}  # slot -> (desc, D_SEQ, allowed)
        self.tampered: set[int] = set()
        self.ring_errors = 0

    @initialize()
    def take_ring(self) -> None:
        # Own the producer side: every guestlib slot is free (no task of ours is in flight).
        self.dev._lock.acquire()
        assert len(self.dev._free_slots) == RING
        self.tail = self.dev._tail
        self.free = list(range(RING))
        self.resync()
        self.ring_errors = self.reg.load32(abi.REG_RING_ERROR_COUNT)

    def teardown(self) -> None:
        if hasattr(self, "tail"):
            try:
                self.drain()
            finally:
                self.dev._tail = self.tail
                self.dev._lock.release()
        check_alive(self.rig)

    def kick(self) -> None:
        self.reg.xchg32(abi.REG_DOORBELL, Doorbell.KICK)
        self.reg.futex_wake(abi.REG_DOORBELL, 1)

    def ring_doorbell(self, value: int) -> None:
        """The doorbell is one word: wait until hostd swapped the last command out first."""
        end = time.monotonic() + BOUND_S
        while self.reg.load32(abi.REG_DOORBELL) not in (0, value):
            assert time.monotonic() < end, "hostd did not take the doorbell"
            self.reg.futex_wake(abi.REG_DOORBELL, 1)
            time.sleep(0.0002)
        self.reg.xchg32(abi.REG_DOORBELL, value)
        self.reg.futex_wake(abi.REG_DOORBELL, 1)
        while self.reg.load32(abi.REG_DOORBELL) == value:
            assert time.monotonic() < end, "hostd did not take the doorbell"
            time.sleep(0.0002)

    def resync(self) -> None:
        self.reg.store32(abi.REG_SQ_TAIL, self.tail)
        self.ring_doorbell(Doorbell.RESET)
        self.wait_head()

    def wait_head(self) -> None:
        """hostd has read every entry up to our tail (it keeps its own head; this is its copy)."""
        end = time.monotonic() + BOUND_S
        while self.reg.load32(abi.REG_SQ_HEAD) != self.tail:
            assert time.monotonic() < end, "hostd did not drain the SQ"
            self.kick()
            time.sleep(0.0005)

    def push_entry(self, value: int) -> None:
        self.reg.store32(LAY.sq_entry(self.tail), value)
        self.tail = (self.tail + 1) & U32
        self.reg.store32(abi.REG_SQ_TAIL, self.tail)

    @precondition(lambda self: bool(self.free))
    @rule(d=descriptors())
    def submit(self, d: Descriptor, allowed: set[ErrorCode] | None = None) -> None:
        slot = self.free.pop()
        at = LAY.desc(slot)
        abi.DESC_INPUT.pack_into(self.reg.mem, at + abi.D_INPUT, *_fields(d))
        seq = self.reg.load64(at + abi.D_SEQ)
        self.reg.store32(at + abi.D_STATUS, Status.SUBMITTED)
        self.pending[slot] = (d, seq, expected(d, LAY) if allowed is None else allowed)
        self.push_entry(slot)
        self.kick()

    def wait_idle(self) -> None:
        """hostd holds no task of ours (queued, staged or running)."""
        end = time.monotonic() + BOUND_S
        while True:
            vm = next(v for v in self.rig.hostd.status()["vms"] if v["vm"] == self.dev.vm_id)
            if vm["inflight"] == 0 and vm["queue_depth"] == 0:
                return
            assert time.monotonic() < end, "hostd still holds tasks"
            time.sleep(0.002)

    @rule(slot=st.one_of(st.sampled_from([RING, RING + 1, 2 * RING, U32]), st.integers(RING, U32)))
    def bad_ring_index(self, slot: int) -> None:
        self.push_entry(slot)
        self.kick()
        self.wait_head()
        assert self.reg.load32(abi.REG_RING_ERROR_COUNT) == self.ring_errors + 1
        self.ring_errors += 1

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def resubmit_in_flight_slot(self, data: st.DataObject) -> None:
        """An SQ entry naming a slot that is still in flight: SLOT_BUSY, or (if it already
        finished) a legal second submission of the same descriptor, never a crash."""
        slot = data.draw(st.sampled_from(sorted(self.pending)))
        self.push_entry(slot)
        self.kick()
        self.wait_head()
        self.drain()
        self.wait_idle()  # a second run of a slot that had finished ends before the slot is reused
        self.ring_errors = self.reg.load32(abi.REG_RING_ERROR_COUNT)

    @rule(jump=st.one_of(st.sampled_from([RING + 1, 2 * RING, 1 << 31, U32]), st.integers(RING + 1, U32)))
    def tail_jump_then_reset(self, jump: int) -> None:
        self.wait_head()
        self.drain()
        count = self.reg.load32(abi.REG_RING_ERROR_COUNT)
        self.tail = (self.tail + jump) & U32
        self.reg.store32(abi.REG_SQ_TAIL, self.tail)
        self.kick()
        end = time.monotonic() + BOUND_S
        while self.reg.load32(abi.REG_RING_ERROR_COUNT) == count:
            assert time.monotonic() < end, "no RING_OVERRUN"
            time.sleep(0.0005)
        assert self.reg.load32(abi.REG_RING_ERROR) == ErrorCode.RING_OVERRUN
        self.reg.store32(abi.REG_SQ_TAIL, self.tail)
        self.kick()
        time.sleep(0.002)
        assert self.reg.load32(abi.REG_SQ_HEAD) != self.tail  # a broken ring ignores kicks ...
        self.resync()  # ... until RESET resynchronises the head to the tail
        self.ring_errors = self.reg.load32(abi.REG_RING_ERROR_COUNT)

    @rule(value=st.one_of(st.integers(0, U32), st.sampled_from([1, Doorbell.KICK + 1, Doorbell.KICK - 1, U32])))
    def garbage_doorbell(self, value: int) -> None:
        if value in (Doorbell.KICK, Doorbell.RESET):
            value ^= 1
        self.reg.xchg32(abi.REG_DOORBELL, value)
        self.reg.futex_wake(abi.REG_DOORBELL, 1)

    @rule(word=st.sampled_from([abi.REG_SQ_HEAD, abi.REG_NEED_WAKEUP, abi.REG_RING_ERROR, abi.REG_DEVICE_STATE,
                                abi.REG_RING_ERROR_COUNT]), value=st.integers(0, U32))
    def overwrite_host_word32(self, word: int, value: int) -> None:
        """hostd-owned words are never trusted: hostd keeps its own head, state and counters."""
        old = self.reg.load32(word)
        self.reg.store32(word, value)
        if word == abi.REG_SQ_HEAD:
            # Our copy of hostd's head is rewritten by hostd on its next drain.
            self.push_entry_nop_and_wait()
        elif word in (abi.REG_DEVICE_STATE, abi.REG_RING_ERROR_COUNT):
            self.reg.store32(word, old)

    @rule(word=st.sampled_from([abi.REG_EPOCH, abi.REG_HEARTBEAT, abi.REG_IRQ_COUNT, abi.REG_TASKS_DONE,
                                abi.REG_TASKS_FAILED, abi.REG_REGION_SIZE, abi.REG_HEAP_OFFSET]),
          value=st.integers(0, U64))
    def overwrite_host_word64(self, word: int, value: int) -> None:
        old = self.reg.load64(word)
        self.reg.store64(word, value)
        self.push_entry_nop_and_wait()
        if word in (abi.REG_EPOCH, abi.REG_REGION_SIZE, abi.REG_HEAP_OFFSET):
            self.reg.store64(word, old)  # layout/identity words matter to a future re-adopt only

    def push_entry_nop_and_wait(self) -> None:
        if not self.free:
            self.drain()
        self.submit(Descriptor(opcode=Op.NOP))
        self.drain()

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), value=st.sampled_from([Status.FREE, Status.DONE, Status.ERROR, 7, U32]))
    def tamper_status_of_in_flight_task(self, data: st.DataObject, value: int) -> None:
        slot = data.draw(st.sampled_from(sorted(self.pending)))
        self.reg.store32(LAY.desc(slot) + abi.D_STATUS, value)
        self.tampered.add(slot)

    @rule()
    def drain(self) -> None:
        """Every pending task ends, with the outcome the oracle allows, within the bound."""
        self.wait_head()
        end = time.monotonic() + BOUND_S
        opened: list[int] = []
        for slot, (d, seq, allowed) in sorted(self.pending.items()):
            at = LAY.desc(slot)
            # Completion: hostd's sequence number moved (result fields are written before it)
            # and the status is final; a slot whose status word the guest scribbled on is
            # judged by the sequence number alone.
            while True:
                st_ = self.reg.load32(at + abi.D_STATUS)
                if self.reg.load64(at + abi.D_SEQ) != seq and (
                        st_ in (Status.DONE, Status.ERROR) or slot in self.tampered):
                    break
                assert time.monotonic() < end, f"slot {slot} ({d}) not done within {BOUND_S}s"
                self.reg.futex_wait(at + abi.D_STATUS, st_, 0.01)
            res = abi.DESC_RESULT.unpack_from(self.reg.mem, at + abi.D_RESULT)
            got = ErrorCode(res[2])
            assert got in allowed, f"{d} -> {got.name}, allowed {[e.name for e in allowed]}"
            if slot not in self.tampered:
                assert st_ == (Status.DONE if got == ErrorCode.OK else Status.ERROR)
            if d.opcode == Op.SESSION_OPEN and got == ErrorCode.OK:
                opened.append(res[0])
            self.reg.store32(at + abi.D_STATUS, Status.FREE)
            self.free.append(slot)
        self.pending.clear()
        self.tampered.clear()
        for sid in opened:  # a garbage config that happened to open a session: close it
            self.submit(Descriptor(opcode=Op.SESSION_CLOSE, session=sid), {ErrorCode.OK})
        if opened:
            self.drain()

    @invariant()
    def hostd_alive(self) -> None:
        assert self.rig.hostd.alive()


def _fields(d: Descriptor) -> tuple[int, ...]:
    return (d.tag, d.opcode, d.flags, d.session, d.src_off, d.src_len, d.dst_off, d.dst_len,
            d.arg0, d.arg1, d.arg2, d.arg3)


def fuzz_device(dev: Any, rng: random.Random, n: int) -> dict[str, Any]:
    """Submit ``n`` random descriptors through ``dev`` (any transport: the VM tests run this
    inside a guest) and judge each outcome with the oracle.  They point into a 1 MiB block of
    random bytes and anywhere else in the heap, so run this after the guest's own checks."""
    heap = dev.alloc(1 << 20)
    dev.region.mem[heap.offset:heap.offset + heap.size] = rng.randbytes(heap.size)
    outcomes: Counter[str] = Counter()
    bad: list[list[Any]] = []
    for _ in range(n):
        d = random_descriptor(rng)
        c = dev.submit_raw(d).completion(10)
        got = c.error if c.status == Status.ERROR else ErrorCode.OK
        if c.status not in (Status.DONE, Status.ERROR) or got not in expected(d, dev.layout):
            bad.append([list(_fields(d)), c.status.name, got.name])
        outcomes[got.name] += 1
        if d.opcode == Op.SESSION_OPEN and c.status == Status.DONE:
            dev.submit(Op.SESSION_CLOSE, session=c.result).completion(10)
    return {"n": n, "bad": bad[:5], "nbad": len(bad), "outcomes": dict(outcomes)}


def test_ring_state_machine(rig: Rig) -> None:
    RingMachine.rig = rig
    run = settings(max_examples=int(os.environ.get("VMEDIAD_RING_EXAMPLES", "200")), stateful_step_count=30,
                   deadline=None, database=None, suppress_health_check=list(HealthCheck))
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(RingMachine, settings=run)
    check_alive(rig)
    assert rig.dev.crc32(rig.dev.put(b"after the machine")).wait(timeout=BOUND_S) == zlib.crc32(b"after the machine")


# --- slow: >= 10^6 descriptors -----------------------------------------------------------------
@pytest.mark.slow
def test_million_random_descriptors(rig: Rig) -> None:
    n = int(os.environ.get("VMEDIAD_FUZZ_SLOW", "1000000"))
    rng = random.Random(int(os.environ.get("VMEDIAD_FUZZ_SEED", "12345")))
    t0 = time.monotonic()
    done = 0
    while done < n:
        batch = [random_descriptor(rng) for _ in range(min(16, n - done))]
        run_batch(rig, batch)
        done += len(batch)
    rate = done / (time.monotonic() - t0)
    check_alive(rig)
    print(f"\nfuzz slow: {done} descriptors, {rate:.0f}/s; outcomes {dict(rig.outcomes.most_common())}")
