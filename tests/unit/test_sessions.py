"""Session ids, their channels, and sessions lost with a worker or an earlier hostd run."""

from __future__ import annotations

import pytest

from hostd.core.dispatch import Channel
from hostd.core.sessions import U32, SessionIds, Sessions
from vmediad.abi import ErrorCode, Op


def test_ids_run_from_the_base_and_skip_zero_at_the_wrap() -> None:
    ids = SessionIds(U32 - 1)
    book = Sessions(ids, limit=8)
    ch = Channel.new(0)
    got = [book.bind(ch, "h264", 0.0) for _ in range(4)]
    assert got == [U32 - 1, U32, 1, 2]
    assert all(ids.of_this_run(sid) for sid in got)
    assert not ids.of_this_run(3) and not ids.of_this_run(0) and not ids.of_this_run(U32 - 2)


def test_a_fresh_id_is_never_one_the_guest_holds_or_lost() -> None:
    ids = SessionIds(10)
    book = Sessions(ids, limit=8)
    book.lost.update({10, 12})
    ch = Channel.new(0)
    assert [book.bind(ch, "h264", 0.0) for _ in range(2)] == [11, 13]


def test_binding_counts_sessions_per_channel() -> None:
    book = Sessions(SessionIds(1), limit=2)
    a, b = Channel.new(0), Channel.new(1)
    s1 = book.bind(a, "h264", 0.3)
    s2 = book.bind(b, "hevc", 2.1)
    assert book.full and len(book) == 2
    assert (a.bound_sessions, b.bound_sessions) == (1, 1)
    assert book.route(s1, Op.ENCODE_FRAME) == 0 and book.route(s2, Op.DECODE) == 1
    book.unbind(s1)
    book.unbind(s1)  # twice: a no-op
    assert a.bound_sessions == 0 and not book.full
    book.clear()
    assert b.bound_sessions == 0 and len(book) == 0


def test_sessions_lost_with_a_worker_stay_lost_until_closed() -> None:
    book = Sessions(SessionIds(500), limit=8)
    ch = Channel.new(0)
    sids = [book.bind(ch, "h264", 0.0) for _ in range(3)]
    assert book.lose_all() == 3
    assert ch.bound_sessions == 0 and len(book) == 0
    for sid in sids:
        assert book.route(sid, Op.DECODE) == ErrorCode.SESSION_LOST
    assert book.route(sids[0], Op.SESSION_CLOSE) == ErrorCode.SESSION_LOST  # the acknowledgement
    assert book.route(sids[0], Op.DECODE) == ErrorCode.BAD_SESSION  # closed now: never open here
    assert book.route(sids[1], Op.DECODE) == ErrorCode.SESSION_LOST


@pytest.mark.parametrize("adopted", [False, True])
def test_ids_of_an_earlier_run_are_lost_only_for_an_adopted_region(adopted: bool) -> None:
    base = 0x8000_0000  # this run; the earlier run handed out ids from elsewhere
    ids = SessionIds(base)
    book = Sessions(ids, limit=8, adopted=adopted)
    mine = book.bind(Channel.new(0), "h264", 0.0)
    assert mine == base
    earlier = 0x1234
    assert book.route(earlier, Op.DECODE) == (ErrorCode.SESSION_LOST if adopted else ErrorCode.BAD_SESSION)
    assert book.route(0, Op.DECODE) == ErrorCode.BAD_SESSION  # 0 is never a session
    book.unbind(mine)  # closed normally: an id of this run, not lost
    assert book.route(mine, Op.DECODE) == ErrorCode.BAD_SESSION


def test_every_id_is_of_this_run_once_the_run_went_all_the_way_round() -> None:
    ids = SessionIds(7)
    ids.span = U32 + 1
    assert ids.of_this_run(6) and ids.of_this_run(U32)


def test_a_zero_base_is_refused() -> None:
    with pytest.raises(ValueError):
        SessionIds(0)
