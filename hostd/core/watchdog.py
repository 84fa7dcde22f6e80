"""The watchdog's arithmetic: every running task has a deadline sized to its work.

A task that never ends (an FFmpeg loop on a hostile stream looks like a stopped worker)
would hang its guest.  A task's budget is ``task_timeout_s + task_timeout_per_mpx_s *
megapixels * frames``, counted from the moment it became its channel's oldest loaded task
(the worker runs a channel's files in CH_SEQ order).  The device loop bounds its sleep by
``Watchdog.next_ns`` and, past it, asks ``overdue`` which tasks to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from vmediad import abi
from vmediad.abi import Op

if TYPE_CHECKING:
    from hostd.core.dispatch import RegFile, Running

# A FLUSH drains what the codec holds (encoder look-ahead, decoder reorder): counted as this
# many frames.  A decode session opened without a size counts as 1080p.
FLUSH_FRAMES = abi.MULTI_MAX
DEFAULT_DECODE_MPX = 1920 * 1080 / 1e6
NEVER = 1 << 63


class Budgets(Protocol):
    """The configuration keys the budget is made of (hostd.config.Config has them)."""

    @property
    def task_timeout_s(self) -> float: ...

    @property
    def task_timeout_per_mpx_s(self) -> float: ...


def task_budget_s(cfg: Budgets, op: int, mpx: float, inputs: int) -> float:
    """How long a task may run before the watchdog ends it (0: no deadline).

    ``task_timeout_s + task_timeout_per_mpx_s * megapixels * frames``: frames are the task's
    inputs for ENCODE_FRAME/DECODE (a MULTI list: each), FLUSH_FRAMES for FLUSH, one for
    SESSION_OPEN and none for the other ops; megapixels are the session's picture size."""
    if cfg.task_timeout_s <= 0:
        return 0.0
    if op in (Op.ENCODE_FRAME, Op.DECODE):
        frames = inputs
    elif op == Op.FLUSH:
        frames = FLUSH_FRAMES
    elif op == Op.SESSION_OPEN:
        frames = 1
    else:
        frames = 0
    return cfg.task_timeout_s + cfg.task_timeout_per_mpx_s * mpx * frames


def session_mpx(cfg: abi.SessionConfig) -> float:
    """The picture size a session's tasks are sized by (an encoder without one: none)."""
    if cfg.width and cfg.height:
        return cfg.width * cfg.height / 1e6
    return 0.0 if cfg.direction == abi.Direction.ENCODE else DEFAULT_DECODE_MPX


class Watchdog:
    """The nearest deadline of the running tasks."""

    __slots__ = ("next_ns",)

    def __init__(self) -> None:
        self.next_ns = NEVER

    def started(self, run: Running, now: int) -> None:
        """``run`` became its channel's oldest task: it runs (or is about to) from ``now``."""
        run.started_ns = now
        if run.budget_ns:
            self.next_ns = min(self.next_ns, now + run.budget_ns)

    def overdue(self, files: Iterable[RegFile], now: int) -> list[RegFile]:
        """The files whose task is past its deadline and not yet being ended; ``next_ns``
        becomes the nearest deadline of the others.  A file the caller finds DONE after all
        (its IRQ is on the way or held back) is to be looked at again: ``recheck(now)``."""
        nearest = NEVER
        late: list[RegFile] = []
        for rf in files:
            run = rf.running
            if run is None or not run.started_ns or not run.budget_ns or run.timed_out:
                continue
            deadline = run.started_ns + run.budget_ns
            if now < deadline:
                nearest = min(nearest, deadline)
            else:
                late.append(rf)
        self.next_ns = nearest
        return late

    def recheck(self, now: int) -> None:
        self.next_ns = min(self.next_ns, now)
