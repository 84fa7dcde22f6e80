"""hostd's event stream (QMP-style): attach, detach, worker_crash, timeout, restart.

The device thread publishes; the control server's subscribers each own a bounded queue.  A
subscriber that does not keep up loses its oldest events and is told how many (``dropped``);
publishing never blocks the device thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

EVENTS = ("attach", "detach", "worker_crash", "timeout", "restart")
QUEUE_MAX = 1024


class Subscription:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[dict[str, Any]] = deque(maxlen=QUEUE_MAX)
        self.dropped = 0
        self.closed = False

    def put(self, ev: dict[str, Any]) -> None:
        with self._cond:
            if len(self._items) == QUEUE_MAX:
                self.dropped += 1
            self._items.append(ev)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds or once closed."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self.published = 0

    def emit(self, event: str, **data: Any) -> None:
        """Publish one event; ``data`` must be JSON-serialisable (vm=, name=, task=, reason=...)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        now = time.time()
        ev = {"event": event, "data": data,
              "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}}
        with self._lock:
            self.published += 1
            subs = list(self._subs)
        for s in subs:
            s.put(ev)

    def subscribe(self) -> Subscription:
        s = Subscription()
        with self._lock:
            self._subs.append(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        with self._lock:
            if s in self._subs:
                self._subs.remove(s)
        s.close()

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"subscribers": len(self._subs), "published": self.published}
