"""Counters and latency summaries kept per guest and per channel, and the snapshots of them (pure)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hostd.core.dispatch import Channel
    from hostd.loop import Guest

# Histogram bucket upper bounds in seconds (Prometheus convention).
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0,
)
RESERVOIR = 4096


@dataclass
class Latency:
    """Recent-window percentiles plus a cumulative histogram."""

    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RESERVOIR))
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.count += 1
        self.total += seconds
        for i, le in enumerate(LATENCY_BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1
                break

    def percentile(self, q: float) -> float:
        data = sorted(list(self.recent))
        if not data:
            return 0.0
        idx = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
        return data[idx]

    def snapshot(self) -> dict[str, object]:
        cumulative, acc = [], 0
        for le, n in zip(LATENCY_BUCKETS, self.buckets, strict=True):
            acc += n
            cumulative.append((le, acc))
        return {
            "p50_us": round(self.percentile(50) * 1e6, 1),
            "p99_us": round(self.percentile(99) * 1e6, 1),
            "count": self.count,
            "sum_s": self.total,
            "buckets": cumulative,
        }


@dataclass
class GuestStats:
    tasks_done: int = 0
    tasks_failed: int = 0
    doorbells: int = 0
    bad_doorbells: int = 0
    ring_errors: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    tasks: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (op, codec, result)
    bytes_moved: int = 0
    bytes_copied: int = 0
    frames: int = 0
    worker_restarts: int = 0
    timeouts: int = 0  # tasks the watchdog ended (TIMEOUT)
    latency: Latency = field(default_factory=Latency)

    def snapshot(self) -> dict[str, object]:
        return {
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "doorbells": self.doorbells,
            "bad_doorbells": self.bad_doorbells,
            "ring_errors": dict(self.ring_errors),
            "errors": dict(self.errors),
            "tasks": [
                {"op": op, "codec": codec, "result": result, "count": n}
                for (op, codec, result), n in sorted(self.tasks.items())
            ],
            "bytes_moved": self.bytes_moved,
            "bytes_copied": self.bytes_copied,
            "frames": self.frames,  # frames or chunks of successful ENCODE_FRAME/DECODE tasks (MULTI: each)
            "bytes_copied_per_frame": round(self.bytes_copied / self.frames, 1) if self.frames else 0.0,
            "worker_restarts": self.worker_restarts,
            "timeouts": self.timeouts,
            "latency": self.latency.snapshot(),
        }


@dataclass
class Totals:
    """Device-wide counters that only grow: those of the guests gone, folded in as each goes
    (``add``), plus the live guests' at each snapshot.  Nothing is added per task."""

    tasks: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (op, codec, result)
    errors: Counter[str] = field(default_factory=Counter)
    frames: int = 0
    bytes_moved: int = 0
    bytes_copied: int = 0
    timeouts: int = 0
    worker_restarts: int = 0

    def add(self, s: GuestStats) -> None:
        self.tasks.update(s.tasks)
        self.errors.update(s.errors)
        self.frames += s.frames
        self.bytes_moved += s.bytes_moved
        self.bytes_copied += s.bytes_copied
        self.timeouts += s.timeouts
        self.worker_restarts += s.worker_restarts

    def snapshot(self, live: Iterable[GuestStats] = ()) -> dict[str, object]:
        t = Totals(Counter(self.tasks), Counter(self.errors), self.frames, self.bytes_moved, self.bytes_copied,
                   self.timeouts, self.worker_restarts)
        for s in live:
            t.add(s)
        return {
            "tasks": [{"op": op, "codec": codec, "result": result, "count": n}
                      for (op, codec, result), n in sorted(t.tasks.items())],
            "frames": t.frames,
            "bytes_moved": t.bytes_moved,
            "bytes_copied": t.bytes_copied,
            "errors": dict(sorted(t.errors.items())),
            "timeouts": t.timeouts,
            "worker_restarts": t.worker_restarts,
        }


def channel_snapshot(c: Channel, now: int) -> dict[str, Any]:
    loaded = c.loaded()
    head = loaded[0] if loaded else None
    return {"index": c.index, "busy": head is not None,
            "vm": head.vm_id if head else None,
            "op": head.op.name if head else None,
            "loaded": len(loaded),  # > 1: tasks wait in shadow files
            "bound_sessions": c.bound_sessions, "tasks": c.tasks,
            "busy_seconds": round((c.busy_ns + (now - max(head.dispatch_ns, c.busy_until) if head else 0))
                                  / 1e9, 6)}


def vm_snapshot(g: Guest, now: int, sv: dict[str, Any], staged: bool) -> dict[str, Any]:
    """One guest's entry in statistics()["vms"]; ``sv``: its scheduler entry, ``staged``:
    whether a task of it waits for a channel."""
    w = g.worker
    return {
        "vm": g.vm_id,
        "name": g.name,
        "pid": g.pid,
        "kind": g.kind,
        "transport": g.transport,
        "worker_pid": w.pid if w else None,
        "worker_rss": w.rss_bytes() if w else 0,
        "region_size": g.region.layout.region_size,
        "ring_entries": g.region.layout.ring_entries,
        # Whether, not which: a name would let any peer of hostd's uid open the region.
        "named_region": g.region.name is not None,
        "queue_depth": sv.get("queued", 0) + (1 if staged else 0),
        "inflight": sv.get("inflight", 0),
        "sessions": len(g.sessions),
        "lost_sessions": len(g.sessions.lost),
        "worker_recycles": g.recycles,
        "uptime_s": round((now - g.attached_ns) / 1e9, 3),
        **g.stats.snapshot(),
    }
