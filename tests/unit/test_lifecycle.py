"""The guest lifecycle: every transition the table allows, and the ones it refuses."""

from __future__ import annotations

import pytest

from hostd.core.lifecycle import (
    RESPAWN_BACKOFF_MAX_S,
    TRANSITIONS,
    Life,
    Lifecycle,
    LifeEvent,
    respawn_delay,
)
from vmediad.errors import InternalError

LEGAL = [(state, event, new) for state, row in TRANSITIONS.items() for event, new in row.items()]
ILLEGAL = [(state, event) for state in Life for event in LifeEvent if event not in TRANSITIONS[state]]


def test_the_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(Life)
    assert len(LEGAL) == 14  # 8 about the worker, DETACH from the 5 live states, RECLAIMED
    assert len(LEGAL) + len(ILLEGAL) == len(Life) * len(LifeEvent)


@pytest.mark.parametrize(("state", "event", "new"), LEGAL, ids=[f"{s.name}-{e.name}" for s, e, _ in LEGAL])
def test_every_legal_transition(state: Life, event: LifeEvent, new: Life) -> None:
    life = Lifecycle(state)
    assert life.fire(event) is new
    assert life.state is new


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=[f"{s.name}-{e.name}" for s, e in ILLEGAL])
def test_an_illegal_transition_is_an_internal_error(state: Life, event: LifeEvent) -> None:
    life = Lifecycle(state)
    with pytest.raises(InternalError, match=f"{event.name} in state {state.name}"):
        life.fire(event)
    assert life.state is state  # unchanged


def test_a_guest_from_attach_to_reclaim() -> None:
    life = Lifecycle()
    assert life.state is Life.NO_WORKER and not life.serving
    steps = [
        (LifeEvent.SPAWNED, Life.SERVING),
        (LifeEvent.TIME_OUT, Life.TIMING_OUT),
        (LifeEvent.WORKER_EXITED, Life.NO_WORKER),
        (LifeEvent.SPAWNED, Life.SERVING),
        (LifeEvent.RECYCLE, Life.RECYCLING),
        (LifeEvent.WORKER_EXITED, Life.NO_WORKER),
        (LifeEvent.BACK_OFF, Life.BACKING_OFF),
        (LifeEvent.SPAWNED, Life.SERVING),
        (LifeEvent.DETACH, Life.DYING),
        (LifeEvent.RECLAIMED, Life.GONE),
    ]
    for event, state in steps:
        assert life.fire(event) is state
    assert life.dying


def test_detach_twice_is_refused() -> None:
    life = Lifecycle(Life.SERVING)
    life.fire(LifeEvent.DETACH)
    with pytest.raises(InternalError):
        life.fire(LifeEvent.DETACH)


def test_respawn_backs_off_from_the_second_early_death() -> None:
    assert [respawn_delay(n) for n in range(7)] == [0.0, 0.0, 0.1, 0.2, 0.4, 0.8, 1.6]
    assert respawn_delay(40) == RESPAWN_BACKOFF_MAX_S
