"""The submission queue, from hostd's side: published entries in, arrivals and ring errors out.

The guest writes slot indices into the SQ and release-stores SQ_TAIL; hostd keeps its own
consumer count (``Ring.head``; REG_SQ_HEAD is only a copy for the guest to read).  This module
holds that count and the rules; the device loop does the loads and stores:

    tail = acquire-load SQ_TAIL
    n = ring.arrived(tail)                      # -1: RING_OVERRUN, ring broken until RESET
    slots = [load SQ entry (ring.head + i) for i in range(n)]
    arrivals, errors = ring.take(slots, held)   # head advanced by n
    store SQ_HEAD = ring.head

Counts are free-running u32: they wrap, and only their difference matters.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmediad.abi import ErrorCode

U32 = 0xFFFFFFFF


@dataclass(slots=True)
class Ring:
    entries: int  # a power of two (abi.compute_layout)
    head: int = 0  # entries consumed, mod 2**32
    broken: bool = False  # overrun: entries are ignored until the guest rings RESET

    def unread(self, tail: int) -> int:
        """Entries published past ``head``; -1 if that is more than the ring holds."""
        n = (tail - self.head) & U32
        return n if n <= self.entries else -1

    def arrived(self, tail: int) -> int:
        """``unread``, and on an overrun the ring breaks (the guest must ring RESET)."""
        n = (tail - self.head) & U32
        if n > self.entries:
            self.broken = True
            return -1
        return n

    def reset(self, tail: int) -> None:
        """RESET: resynchronise on the guest's tail; entries before it are dropped."""
        self.head = tail
        self.broken = False

    def take(self, slots: list[int], held: set[int]) -> tuple[list[int], list[tuple[ErrorCode, int]]]:
        """Consume the entries ``slots`` (read from the SQ from ``head`` on).

        Returns the arrivals, in order, and the ring errors with their slot values: an index
        outside the ring is BAD_RING_INDEX, a slot already queued or running (in ``held``, or
        earlier in ``slots``) SLOT_BUSY.  Arrivals are added to ``held``."""
        self.head = (self.head + len(slots)) & U32
        # The usual batch: distinct, in range, none held (set operations, no loop in Python).
        new = set(slots)
        if len(new) == len(slots) and (not slots or max(slots) < self.entries) and held.isdisjoint(new):
            held |= new
            return slots, []
        arrivals: list[int] = []
        errors: list[tuple[ErrorCode, int]] = []
        for slot in slots:
            if slot >= self.entries:
                errors.append((ErrorCode.BAD_RING_INDEX, slot))
            elif slot in held:
                errors.append((ErrorCode.SLOT_BUSY, slot))
            else:
                held.add(slot)
                arrivals.append(slot)
        return arrivals, errors
