"""A guest's lifecycle as hostd sees it: a state, events, and a transition table.

The states say what the guest's worker is doing; hostd starts a task for a guest only
in SERVING.  An event that the table does not allow in the current state is a bug in
hostd (``InternalError``), never a guest's doing::

    NO_WORKER ──SPAWNED──▶ SERVING ──RECYCLE──▶ RECYCLING ──┐
        ▲  │                  │  └──TIME_OUT──▶ TIMING_OUT ──┤ WORKER_EXITED
        │  └─BACK_OFF─▶ BACKING_OFF ──SPAWNED──▶ SERVING     │
        └──────────────── WORKER_EXITED ◀─────────────────────┘   (and from SERVING)

    any of the above ──DETACH──▶ DYING ──RECLAIMED──▶ GONE

Whether a guest re-adopted its region is a fact of its attach, not a state.
"""

from __future__ import annotations

import enum

from vmediad.errors import InternalError

# A worker that dies twice in a row before it ran a task is respawned after a delay that
# doubles from RESPAWN_BACKOFF_S up to RESPAWN_BACKOFF_MAX_S (it would only die again).
RESPAWN_BACKOFF_S = 0.1
RESPAWN_BACKOFF_MAX_S = 5.0
# After this many workers in a row died before running a task (about 10 s of backoff), hostd
# stops holding the guest's tasks for the next one: its waiting tasks end WORKER_CRASHED, and so
# do later ones at each further such death.  A worker that cannot start (a broken codec install,
# no memory) must not hang its guest.  Respawns go on, with the backoff.
EARLY_DEATHS_FAIL = 8


class Life(enum.Enum):
    NO_WORKER = "no_worker"  # attached, or its worker reaped: a worker is spawned next
    SERVING = "serving"  # a worker serves the guest: its tasks may start
    RECYCLING = "recycling"  # the worker is killed between tasks, to be replaced
    TIMING_OUT = "timing_out"  # the watchdog killed the worker of a task past its deadline
    BACKING_OFF = "backing_off"  # workers keep dying before running a task: a respawn is timed
    DYING = "dying"  # detaching: its worker is killed, its resources reclaimed when it is reaped
    GONE = "gone"  # reclaimed


class LifeEvent(enum.Enum):
    SPAWNED = "spawned"  # a worker was started
    RECYCLE = "recycle"  # hostd kills the worker to recycle it
    TIME_OUT = "time_out"  # hostd kills the worker: a task ran past its deadline
    WORKER_EXITED = "worker_exited"  # the worker's reaper reported its death
    BACK_OFF = "back_off"  # the respawn waits
    DETACH = "detach"  # the guest went away or was killed
    RECLAIMED = "reclaimed"  # everything it held is given back


_LIVE = (Life.NO_WORKER, Life.SERVING, Life.RECYCLING, Life.TIMING_OUT, Life.BACKING_OFF)

TRANSITIONS: dict[Life, dict[LifeEvent, Life]] = {
    Life.NO_WORKER: {LifeEvent.SPAWNED: Life.SERVING, LifeEvent.BACK_OFF: Life.BACKING_OFF},
    Life.SERVING: {LifeEvent.RECYCLE: Life.RECYCLING, LifeEvent.TIME_OUT: Life.TIMING_OUT,
                   LifeEvent.WORKER_EXITED: Life.NO_WORKER},
    Life.RECYCLING: {LifeEvent.WORKER_EXITED: Life.NO_WORKER},
    Life.TIMING_OUT: {LifeEvent.WORKER_EXITED: Life.NO_WORKER},
    Life.BACKING_OFF: {LifeEvent.SPAWNED: Life.SERVING},
    Life.DYING: {LifeEvent.RECLAIMED: Life.GONE},
    Life.GONE: {},
}
for _state in _LIVE:
    TRANSITIONS[_state][LifeEvent.DETACH] = Life.DYING


class Lifecycle:
    __slots__ = ("state",)

    def __init__(self, state: Life = Life.NO_WORKER) -> None:
        self.state = state

    def fire(self, event: LifeEvent) -> Life:
        """Apply ``event``; returns the new state.  Raises InternalError if it is not allowed now."""
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise InternalError(f"guest lifecycle: {event.name} in state {self.state.name}") from None
        self.state = new
        return new

    @property
    def serving(self) -> bool:
        return self.state is Life.SERVING

    @property
    def dying(self) -> bool:
        return self.state is Life.DYING or self.state is Life.GONE

    def __repr__(self) -> str:
        return f"Lifecycle({self.state.name})"


def respawn_delay(early_deaths: int) -> float:
    """How long to wait before the next worker after ``early_deaths`` consecutive workers died
    before running a task (0: at once)."""
    if early_deaths < 2:
        return 0.0
    return min(RESPAWN_BACKOFF_MAX_S, RESPAWN_BACKOFF_S * 2.0 ** (early_deaths - 2))
