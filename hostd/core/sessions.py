"""Session book-keeping: ids, the channel each session is bound to, sessions lost.

Session ids of one hostd run are consecutive u32 values from a random base (0 is never
issued).  A guest that re-adopts its region after a restart may still hold ids of the old
run: none of them may name a session of this run, so an id the run never issued is
SESSION_LOST for an adopted guest, BAD_SESSION for any other (``SessionIds.of_this_run``).
A session lives in its guest's worker, on the thread of the one channel it is bound to;
when the worker dies its sessions are lost, and their ids stay lost until the guest closes
them (the close is the guest's acknowledgement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmediad.abi import ErrorCode, Op

if TYPE_CHECKING:
    from hostd.core.dispatch import Channel

U32 = 0xFFFFFFFF


class SessionIds:
    """The ids one hostd run hands out, from ``base`` (random per run) upwards, mod 2**32."""

    def __init__(self, base: int) -> None:
        if not 0 < base <= U32:
            raise ValueError("the base must be a non-zero u32")
        self.base = base
        self._next = base
        self.span = 0  # ids from base on that this run has passed (0, never issued, included)

    def take(self, book: Sessions) -> int:
        """A fresh id for ``book``'s guest: not one it holds open, nor one it has lost."""
        while True:
            sid = self._next
            nxt = (sid + 1) & U32
            self.span += 1 if nxt else 2
            self._next = nxt or 1
            if sid not in book.lost and sid not in book.open:
                return sid

    def of_this_run(self, sid: int) -> bool:
        """Whether ``sid`` was handed out by this run."""
        return sid != 0 and (self.span > U32 or (sid - self.base) & U32 < self.span)


@dataclass(slots=True)
class Session:
    channel: Channel  # the one channel its tasks run on, in CH_SEQ order
    codec: str  # for the statistics
    mpx: float  # its picture size in megapixels, for the watchdog


class Sessions:
    """One guest's sessions."""

    def __init__(self, ids: SessionIds, limit: int, adopted: bool = False) -> None:
        self.ids = ids
        self.limit = limit  # max_sessions_per_guest: SESSION_OPEN beyond it is BUSY
        self.adopted = adopted  # the region was served by an earlier hostd run
        self.open: dict[int, Session] = {}
        self.lost: set[int] = set()

    def __len__(self) -> int:
        return len(self.open)

    @property
    def full(self) -> bool:
        return len(self.open) >= self.limit

    def bind(self, channel: Channel, codec: str, mpx: float) -> int:
        """Open a session on ``channel``; returns its id."""
        sid = self.ids.take(self)
        self.open[sid] = Session(channel, codec, mpx)
        channel.bound_sessions += 1
        return sid

    def unbind(self, sid: int) -> None:
        """The session is closed, never opened (its SESSION_OPEN failed or was taken back)."""
        s = self.open.pop(sid, None)
        if s is not None:
            s.channel.bound_sessions -= 1

    def lose_all(self) -> int:
        """The worker died with every open session; returns how many were open."""
        n = len(self.open)
        self.lost.update(self.open)
        for sid in list(self.open):
            self.unbind(sid)
        return n

    def route(self, sid: int, op: Op) -> int | ErrorCode:
        """The channel a task of session ``sid`` runs on, or the error it ends with.

        SESSION_LOST for a session that died with a worker or with an earlier hostd run,
        BAD_SESSION for one never opened.  Closing a lost session acknowledges it."""
        s = self.open.get(sid)
        if s is not None:
            return s.channel.index
        lost = sid in self.lost or (self.adopted and sid != 0 and not self.ids.of_this_run(sid))
        if not lost:
            return ErrorCode.BAD_SESSION
        if op == Op.SESSION_CLOSE:
            self.lost.discard(sid)
        return ErrorCode.SESSION_LOST

    def clear(self) -> None:
        """The guest is gone: every session is unbound."""
        for sid in list(self.open):
            self.unbind(sid)
