"""The submission queue as values: published tail in, arrivals and ring errors out."""

from __future__ import annotations

import pytest

from hostd.core.ring import U32, Ring
from vmediad.abi import ErrorCode


def test_a_batch_arrives_in_order_and_is_held() -> None:
    r = Ring(8, head=5)
    held = {7}
    assert r.arrived(9) == 4
    arrivals, errors = r.take([3, 0, 6, 1], held)
    assert (arrivals, errors) == ([3, 0, 6, 1], [])
    assert r.head == 9 and held == {0, 1, 3, 6, 7}


def test_nothing_published_is_nothing_to_take() -> None:
    r = Ring(8, head=3)
    assert r.arrived(3) == 0
    assert r.take([], set()) == ([], [])
    assert r.head == 3 and not r.broken


def test_counts_wrap_at_u32() -> None:
    r = Ring(16, head=U32 - 1)  # two entries before the wrap, three after
    assert r.arrived(3) == 5
    arrivals, errors = r.take([10, 11, 12, 13, 14], set())
    assert arrivals == [10, 11, 12, 13, 14] and errors == []
    assert r.head == 3


def test_a_full_ring_is_not_an_overrun_one_more_is() -> None:
    r = Ring(8, head=U32 - 2)
    assert r.arrived((U32 - 2 + 8) & U32) == 8 and not r.broken
    assert r.unread((U32 - 2 + 9) & U32) == -1 and not r.broken  # unread() only looks
    assert r.arrived((U32 - 2 + 9) & U32) == -1 and r.broken
    assert r.head == U32 - 2  # nothing consumed


def test_a_tail_behind_the_head_is_an_overrun() -> None:
    r = Ring(8, head=100)
    assert r.arrived(99) == -1 and r.broken  # (99 - 100) mod 2**32 entries


def test_reset_resynchronises_on_the_tail() -> None:
    r = Ring(8, head=100, broken=True)
    r.reset(5000)
    assert (r.head, r.broken) == (5000, False)
    assert r.arrived(5002) == 2


@pytest.mark.parametrize(("slots", "held", "arrivals", "errors"), [
    ([8], set(), [], [(ErrorCode.BAD_RING_INDEX, 8)]),
    ([U32], set(), [], [(ErrorCode.BAD_RING_INDEX, U32)]),
    ([2], {2}, [], [(ErrorCode.SLOT_BUSY, 2)]),
    ([4, 4], set(), [4], [(ErrorCode.SLOT_BUSY, 4)]),  # twice in one batch
    ([1, 9, 2, 1, 3], {3}, [1, 2], [(ErrorCode.BAD_RING_INDEX, 9), (ErrorCode.SLOT_BUSY, 1),
                                    (ErrorCode.SLOT_BUSY, 3)]),
])
def test_bad_entries_are_ring_errors_and_good_ones_still_arrive(
        slots: list[int], held: set[int], arrivals: list[int], errors: list[tuple[ErrorCode, int]]) -> None:
    r = Ring(8, head=U32)
    before = set(held)
    got = r.take(slots, held)
    assert got == (arrivals, errors)
    assert r.head == (U32 + len(slots)) & U32  # every entry is consumed, good or bad
    assert held == before | set(arrivals)
    assert not r.broken  # entry errors do not break the ring
