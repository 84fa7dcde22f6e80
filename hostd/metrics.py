"""Prometheus metrics built from hostd's statistics() snapshot on every scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry


class DeviceCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        tasks = CounterMetricFamily("vmediad_tasks", "Tasks completed", labels=["vm", "op", "codec", "result"])
        lat = HistogramMetricFamily("vmediad_task_latency_seconds", "Submit-to-completion latency",
                                    labels=["vm"])
        depth = GaugeMetricFamily("vmediad_queue_depth", "Tasks queued, not yet started", labels=["vm"])
        inflight = GaugeMetricFamily("vmediad_inflight", "Tasks in flight", labels=["vm"])
        moved = CounterMetricFamily("vmediad_bytes_moved", "Payload bytes processed", labels=["vm"])
        copied = CounterMetricFamily("vmediad_bytes_copied", "Bytes the engine copied", labels=["vm"])
        sessions = GaugeMetricFamily("vmediad_sessions", "Open codec sessions", labels=["vm"])
        restarts = CounterMetricFamily("vmediad_worker_restarts", "Worker crashes", labels=["vm"])
        for vm in s["vms"]:
            label = vm["name"]
            for t in vm["tasks"]:
                tasks.add_metric([label, t["op"], t["codec"], t["result"]], t["count"])
            h = vm["latency"]
            buckets = [(repr(float(le)), n) for le, n in h["buckets"]] + [("+Inf", h["count"])]
            lat.add_metric([label], buckets, h["sum_s"])
            depth.add_metric([label], vm["queue_depth"])
            inflight.add_metric([label], vm["inflight"])
            moved.add_metric([label], vm["bytes_moved"])
            copied.add_metric([label], vm["bytes_copied"])
            sessions.add_metric([label], vm["sessions"])
            restarts.add_metric([label], vm["worker_restarts"])
        busy = CounterMetricFamily("vmediad_channel_busy_seconds", "Time each channel ran a task",
                                   labels=["channel"])
        for c in s["channels"]:
            busy.add_metric([str(c["index"])], c["busy_seconds"])
        up = GaugeMetricFamily("vmediad_uptime_seconds", "hostd uptime")
        up.add_metric([], s["uptime_s"])
        guests = GaugeMetricFamily("vmediad_guests", "Attached guests")
        guests.add_metric([], s["guests"])
        yield from (tasks, lat, depth, inflight, moved, copied, sessions, restarts, busy, up, guests)


def registry_for(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DeviceCollector(snapshot))
    return reg
