"""Prometheus metrics built from hostd's statistics() snapshot on every scrape.

Two kinds of series:

* per guest (label ``vm``, the guest's name): its live counters, and, for ``metrics_grace_s``
  after it detached, the last snapshot of them (``"departed"``), so a short run still shows in a
  scrape.  Guests sharing a name (two processes, or a guest that re-attached after a kill) share
  a series: their counters are summed, so the exposition never holds a duplicate series.
  Gauges (queue depth, tasks in flight, sessions) are for attached guests only.
* device-wide (``vmediad_device_*``): counters over every guest hostd ever served in this run;
  they only grow.  They equal the sum of the per-guest series while no departed guest has aged
  out.

Names follow the Prometheus conventions: a unit suffix in the plural where there is a unit
(``_seconds``, ``_bytes``), and counters exposed with ``_total`` (prometheus_client appends it to a
CounterMetricFamily).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry


@dataclass
class _VmSeries:
    """The counters of every snapshot that shares one ``vm`` label, summed."""

    tasks: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    buckets: Counter[float] = field(default_factory=Counter)
    latency_count: int = 0
    latency_sum: float = 0.0
    bytes_moved: int = 0
    bytes_copied: int = 0
    frames: int = 0
    timeouts: int = 0
    worker_restarts: int = 0

    def add(self, vm: dict[str, Any]) -> None:
        for t in vm.get("tasks", ()):
            self.tasks[(t["op"], t["codec"], t["result"])] += t["count"]
        self.errors.update(vm.get("errors", {}))
        h = vm.get("latency", {})
        for le, n in h.get("buckets", ()):
            self.buckets[float(le)] += n
        self.latency_count += h.get("count", 0)
        self.latency_sum += h.get("sum_s", 0.0)
        self.bytes_moved += vm.get("bytes_moved", 0)
        self.bytes_copied += vm.get("bytes_copied", 0)
        self.frames += vm.get("frames", 0)
        self.timeouts += vm.get("timeouts", 0)
        self.worker_restarts += vm.get("worker_restarts", 0)


def _by_name(snapshots: Iterable[dict[str, Any]]) -> dict[str, _VmSeries]:
    out: dict[str, _VmSeries] = {}
    for vm in snapshots:
        out.setdefault(str(vm["name"]), _VmSeries()).add(vm)
    return out


def _bounded(s: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = s.get(key, [])
    return v if isinstance(v, list) else []


class DeviceCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        live = _bounded(s, "vms")
        departed = _bounded(s, "departed")
        yield from self._per_vm(live, departed)
        yield from self._device(s, len(departed))
        display = s.get("display")
        if isinstance(display, dict):
            yield from self._display(display)

    @staticmethod
    def _per_vm(live: list[dict[str, Any]], departed: list[dict[str, Any]]) -> Iterator[Any]:
        tasks = CounterMetricFamily("vmediad_tasks", "Tasks the guest submitted that ended, by result",
                                    labels=["vm", "op", "codec", "result"])
        lat = HistogramMetricFamily("vmediad_task_latency_seconds", "Submit-to-completion latency",
                                    labels=["vm"])
        moved = CounterMetricFamily("vmediad_bytes_moved", "Payload bytes processed", labels=["vm"])
        copied = CounterMetricFamily("vmediad_bytes_copied", "Bytes the engine copied", labels=["vm"])
        frames = CounterMetricFamily("vmediad_frames", "Frames (or chunks) encoded or decoded", labels=["vm"])
        errors = CounterMetricFamily("vmediad_errors", "Failed tasks by error code", labels=["vm", "code"])
        timeouts = CounterMetricFamily("vmediad_timeouts", "Tasks ended by the watchdog (TIMEOUT)", labels=["vm"])
        restarts = CounterMetricFamily("vmediad_worker_restarts", "Workers replaced after a crash or a watchdog kill",
                                       labels=["vm"])
        for name, v in sorted(_by_name([*live, *departed]).items()):
            for (op, codec, result), n in sorted(v.tasks.items()):
                tasks.add_metric([name, op, codec, result], n)
            buckets = [(repr(le), n) for le, n in sorted(v.buckets.items())] + [("+Inf", v.latency_count)]
            lat.add_metric([name], buckets, v.latency_sum)
            moved.add_metric([name], v.bytes_moved)
            copied.add_metric([name], v.bytes_copied)
            frames.add_metric([name], v.frames)
            for code, n in sorted(v.errors.items()):
                errors.add_metric([name, code], n)
            timeouts.add_metric([name], v.timeouts)
            restarts.add_metric([name], v.worker_restarts)
        yield from (tasks, lat, moved, copied, frames, errors, timeouts, restarts)

        depth = GaugeMetricFamily("vmediad_queue_depth", "Tasks queued, not yet started", labels=["vm"])
        inflight = GaugeMetricFamily("vmediad_inflight", "Tasks in flight", labels=["vm"])
        sessions = GaugeMetricFamily("vmediad_sessions", "Open codec sessions", labels=["vm"])
        gauges: dict[str, list[int]] = {}
        for vm in live:
            g = gauges.setdefault(str(vm["name"]), [0, 0, 0])
            g[0] += vm.get("queue_depth", 0)
            g[1] += vm.get("inflight", 0)
            g[2] += vm.get("sessions", 0)
        for name, (q, i, n) in sorted(gauges.items()):
            depth.add_metric([name], q)
            inflight.add_metric([name], i)
            sessions.add_metric([name], n)
        yield from (depth, inflight, sessions)

    @staticmethod
    def _display(d: dict[str, Any]) -> Iterator[Any]:
        """The shared screen (per VM on it, and the compositor)."""
        yield from _display_families(d)

    @staticmethod
    def _device(s: dict[str, Any], departed: int) -> Iterator[Any]:
        t = s.get("totals", {})
        tasks = CounterMetricFamily("vmediad_device_tasks", "Tasks of every guest that ended, by result",
                                    labels=["op", "codec", "result"])
        for row in t.get("tasks", ()):
            tasks.add_metric([row["op"], row["codec"], row["result"]], row["count"])
        errors = CounterMetricFamily("vmediad_device_errors", "Failed tasks of every guest by error code",
                                     labels=["code"])
        for code, n in sorted(t.get("errors", {}).items()):
            errors.add_metric([code], n)
        yield from (tasks, errors)
        for key, name, doc in (
            ("frames", "vmediad_device_frames", "Frames (or chunks) encoded or decoded by every guest"),
            ("bytes_moved", "vmediad_device_bytes_moved", "Payload bytes processed for every guest"),
            ("bytes_copied", "vmediad_device_bytes_copied", "Bytes the engine copied for every guest"),
            ("timeouts", "vmediad_device_timeouts", "Tasks of every guest ended by the watchdog (TIMEOUT)"),
            ("worker_restarts", "vmediad_device_worker_restarts",
             "Workers of every guest replaced after a crash or a watchdog kill"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], t.get(key, 0))
            yield c
        busy = CounterMetricFamily("vmediad_channel_busy_seconds", "Time each channel ran a task",
                                   labels=["channel"])
        for ch in s.get("channels", ()):
            busy.add_metric([str(ch["index"])], ch["busy_seconds"])
        up = GaugeMetricFamily("vmediad_uptime_seconds", "hostd uptime")
        up.add_metric([], s.get("uptime_s", 0.0))
        guests = GaugeMetricFamily("vmediad_guests", "Attached guests")
        guests.add_metric([], s.get("guests", 0))
        gone = GaugeMetricFamily("vmediad_departed_guests",
                                 "Detached guests whose series are kept for hostd.metrics_grace_s")
        gone.add_metric([], departed)
        yield from (busy, up, guests, gone)


def _display_families(d: dict[str, Any]) -> Iterator[Any]:
    commits = CounterMetricFamily("vmediad_display_commits", "Display commits by what became of them",
                                  labels=["vm", "result"])
    fps = GaugeMetricFamily("vmediad_display_commit_fps", "Display commits in the last second", labels=["vm"])
    lat = GaugeMetricFamily("vmediad_display_latch_latency_p99_seconds",
                            "Commit-to-latch latency, p99 of the recent commits", labels=["vm"])
    per: dict[str, list[float]] = {}
    for vm in d.get("vms", ()):
        if not vm.get("commits") and vm.get("output") is None:
            continue  # a guest that never showed anything (a codec-only guest) has no display series
        p = per.setdefault(str(vm["name"]), [0, 0, 0, 0.0, 0.0])
        p[0] += vm.get("presented", 0)
        p[1] += vm.get("dropped", 0)
        p[2] += vm.get("rejected", 0)
        p[3] += vm.get("commit_fps", 0.0)
        p[4] = max(p[4], vm.get("latency_p99_ms", 0.0) / 1e3)
    for name, (presented, dropped, rejected, rate, p99) in sorted(per.items()):
        for result, n in (("presented", presented), ("dropped", dropped), ("rejected", rejected)):
            commits.add_metric([name, result], n)
        fps.add_metric([name], rate)
        lat.add_metric([name], p99)
    yield from (commits, fps, lat)
    comps = CounterMetricFamily("vmediad_display_compositions", "Screens the compositor composed")
    comps.add_metric([], d.get("compositions", 0))
    cpu = CounterMetricFamily("vmediad_display_compose_cpu_seconds", "CPU time of the compositions")
    cpu.add_metric([], d.get("compose_cpu_s", 0.0))
    screen = GaugeMetricFamily("vmediad_display_screen_fps", "Screens composed in the last second")
    screen.add_metric([], d.get("screen_fps", 0.0))
    yield from (comps, cpu, screen)


def registry_for(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DeviceCollector(snapshot))
    return reg
