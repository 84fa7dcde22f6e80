"""Prometheus metrics scraped from the real HTTP endpoint: device-wide totals that only grow,
per-guest series kept for metrics_grace_s after the guest detached, one series per name."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import guestlib
from hostd.daemon import Hostd
from vmediad import abi
from vmediad.abi import Op

Sample = tuple[str, dict[str, str], float]
PAYLOADS = [b"abc" * 100, bytes(range(256)) * 40, b"x"]


def scrape(h: Hostd) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def pick(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s[0] == name and labels.items() <= s[1].items()]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    hits = pick(samples, name, **labels)
    assert len(hits) == 1, (name, labels, hits)
    return hits[0][2]


def wait_detached(h: Hostd, name: str) -> None:
    deadline = time.monotonic() + 10
    while any(v["name"] == name for v in guestlib.hostd_status(h.socket_path)["vms"]):
        assert time.monotonic() < deadline, f"{name} was not reclaimed"
        time.sleep(0.02)


def run_short_guest(h: Hostd, name: str, nops: int = 5, bad: int = 2, frames: int = 3) -> dict[str, Any]:
    """NOPs, CRC32s, tasks that fail BAD_RANGE and a small H.264 encode; returns the guest's
    statistics() entry taken just before it detaches."""
    with guestlib.attach(h.socket_path, name=name, auto_reattach=False) as dev:
        for _ in range(nops):
            assert dev.nop().wait(10) is None
        for data in PAYLOADS:
            buf = dev.put(data)
            assert dev.crc32(buf).wait(10) == zlib.crc32(data)
            dev.free(buf)
        for _ in range(bad):  # offset 0 is the register page, outside the guest's heap
            t = dev.submit(Op.CRC32, src=(0, 16))
            assert t.completion(10).error.name == "BAD_RANGE"
        if frames:
            with dev.encoder("h264", 64, 64, 30) as enc:
                for _ in range(frames):
                    enc.encode(enc.new_frame())
                enc.flush()
        (snap,) = [v for v in guestlib.hostd_status(h.socket_path)["vms"] if v["name"] == name]
    wait_detached(h, name)
    return snap  # type: ignore[no-any-return]


PER_VM_COUNTERS = ("vmediad_bytes_moved_total", "vmediad_bytes_copied_total", "vmediad_frames_total",
                   "vmediad_timeouts_total", "vmediad_worker_restarts_total")
DEVICE_COUNTERS = ("vmediad_device_bytes_moved_total", "vmediad_device_bytes_copied_total",
                   "vmediad_device_frames_total", "vmediad_device_timeouts_total",
                   "vmediad_device_worker_restarts_total")


def test_departed_guest_keeps_its_series_and_totals_are_the_sum(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(metrics="127.0.0.1:0")  # metrics_grace_s: the default, minutes
    snap = run_short_guest(h, "short")
    with guestlib.attach(h.socket_path, name="long", auto_reattach=False) as live:
        for _ in range(4):
            live.nop().wait(10)
        s = scrape(h)

        # The departed guest's counters are still there, exactly.
        assert value(s, "vmediad_tasks_total", vm="short", op="NOP", result="OK") == 5
        assert value(s, "vmediad_tasks_total", vm="short", op="CRC32", result="OK") == len(PAYLOADS)
        assert value(s, "vmediad_tasks_total", vm="short", op="CRC32", result="BAD_RANGE") == 2
        assert value(s, "vmediad_errors_total", vm="short", code="BAD_RANGE") == 2
        assert value(s, "vmediad_frames_total", vm="short") == snap["frames"] >= 3
        assert value(s, "vmediad_bytes_moved_total", vm="short") == snap["bytes_moved"] > 0
        assert value(s, "vmediad_timeouts_total", vm="short") == 0
        short_tasks = sum(v for _, lab, v in pick(s, "vmediad_tasks_total", vm="short"))
        assert short_tasks == snap["tasks_done"] + snap["tasks_failed"]
        assert value(s, "vmediad_task_latency_seconds_count", vm="short") == short_tasks
        # ... but no gauges: it has no queue, tasks in flight or sessions any more.
        for gauge in ("vmediad_queue_depth", "vmediad_inflight", "vmediad_sessions"):
            assert pick(s, gauge, vm="short") == []
            assert value(s, gauge, vm="long") == 0
        assert value(s, "vmediad_tasks_total", vm="long", op="NOP", result="OK") == 4
        assert value(s, "vmediad_guests") == 1
        assert value(s, "vmediad_departed_guests") == 1

        # Device-wide totals: every (op, codec, result) of every guest, equal to the per-VM sums.
        per_vm: Counter[tuple[str, str, str]] = Counter()
        for _, lab, v in pick(s, "vmediad_tasks_total"):
            per_vm[(lab["op"], lab["codec"], lab["result"])] += int(v)
        device = Counter({(lab["op"], lab["codec"], lab["result"]): int(v)
                          for _, lab, v in pick(s, "vmediad_device_tasks_total")})
        assert device == per_vm
        assert device[("NOP", "", "OK")] == 9
        assert device[("ENCODE_FRAME", "h264", "OK")] >= 3
        for vm_name, dev_name in zip(PER_VM_COUNTERS, DEVICE_COUNTERS, strict=True):
            assert value(s, dev_name) == sum(v for _, _, v in pick(s, vm_name)), dev_name
        errors = {lab["code"]: v for _, lab, v in pick(s, "vmediad_device_errors_total")}
        assert errors == {"BAD_RANGE": 2.0}
        assert value(s, "vmediad_device_frames_total") >= 3

    # Totals never go down: the other guest leaves too, and nothing it counted is lost.
    wait_detached(h, "long")
    after = scrape(h)
    assert Counter({(lab["op"], lab["codec"], lab["result"]): int(v)
                    for _, lab, v in pick(after, "vmediad_device_tasks_total")}) == device
    assert value(after, "vmediad_departed_guests") == 2


def test_grace_zero_drops_per_vm_series_but_keeps_totals(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(metrics="127.0.0.1:0", metrics_grace_s=0)
    run_short_guest(h, "gone", frames=0)
    s = scrape(h)
    assert [x for x in s if x[1].get("vm") == "gone"] == []
    assert value(s, "vmediad_departed_guests") == 0
    assert value(s, "vmediad_guests") == 0
    assert value(s, "vmediad_device_tasks_total", op="NOP", result="OK") == 5
    assert value(s, "vmediad_device_tasks_total", op="CRC32", result="OK") == len(PAYLOADS)
    assert value(s, "vmediad_device_tasks_total", op="CRC32", result="BAD_RANGE") == 2
    assert value(s, "vmediad_device_errors_total", code="BAD_RANGE") == 2
    assert value(s, "vmediad_device_bytes_moved_total") >= sum(map(len, PAYLOADS))


def test_departed_series_age_out_after_the_grace_period(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(metrics="127.0.0.1:0", metrics_grace_s=1.0)
    run_short_guest(h, "brief", bad=0, frames=0)
    deadline = time.monotonic() + 10
    while pick(s := scrape(h), "vmediad_tasks_total", vm="brief"):
        assert time.monotonic() < deadline, "the departed guest's series outlived metrics_grace_s"
        time.sleep(0.1)
    assert value(s, "vmediad_device_tasks_total", op="NOP", result="OK") == 5


def test_guests_sharing_a_name_share_one_series(make_hostd: Callable[..., Hostd]) -> None:
    """A departed guest and a live one of the same name (a re-attach): one summed series, never
    two samples with identical labels (Prometheus rejects such a scrape)."""
    h = make_hostd(metrics="127.0.0.1:0")
    with guestlib.attach(h.socket_path, name="dup", auto_reattach=False) as first:
        for _ in range(2):
            first.nop().wait(10)
    wait_detached(h, "dup")
    with guestlib.attach(h.socket_path, name="dup", auto_reattach=False) as second:
        for _ in range(3):
            second.nop().wait(10)
        with guestlib.attach(h.socket_path, name="dup", auto_reattach=False) as third:
            third.nop().wait(10)
            s = scrape(h)
    keys = Counter((name, tuple(sorted(lab.items()))) for name, lab, _ in s)
    assert [k for k, n in keys.items() if n > 1] == []
    assert value(s, "vmediad_tasks_total", vm="dup", op="NOP", result="OK") == 6
    assert value(s, "vmediad_task_latency_seconds_count", vm="dup") == 6
    assert value(s, "vmediad_inflight", vm="dup") == 0  # the two live ones
    assert value(s, "vmediad_guests") == 2


def hang_a_task(h: Hostd, dev: guestlib.Device, worker_pid: int) -> Any:
    """Submit a long CRC32 (128 MiB, tens of ms), SIGSTOP the worker once it has claimed the
    task (CTRL RUNNING, not yet DONE: a codec stuck in a loop), and return the completion.

    The interleaving is checked, not hoped for: if the worker finished before the stop landed,
    the attempt is repeated."""
    buf = dev.alloc(128 << 20)
    for _ in range(10):
        task = dev.crc32(buf)
        deadline = time.monotonic() + 5
        stopped = False
        while time.monotonic() < deadline and not stopped:
            for rf in h.device.files:
                run = rf.running
                if run is None or run.vm_id != dev.vm_id:
                    continue
                if h.device.bank.load32(rf.offset + abi.CH_CTRL) == abi.Ctrl.RUNNING:
                    os.kill(worker_pid, signal.SIGSTOP)
                    # Stopped mid-task only if it is still RUNNING now that the stop landed.
                    stopped = h.device.bank.load32(rf.offset + abi.CH_CTRL) == abi.Ctrl.RUNNING
                    if not stopped:
                        os.kill(worker_pid, signal.SIGCONT)
                    break
            if task.done():
                break
        if stopped:
            c = task.completion(10)
            try:
                os.kill(worker_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the watchdog killed it, as it should
            dev.free(buf)
            return c
        task.completion(10)
    raise AssertionError("could not stop the worker in the middle of a task in 10 tries")


def test_timeouts_are_counted_per_vm_and_device_wide(make_hostd: Callable[..., Hostd]) -> None:
    """A worker stopped in the middle of a task (a codec stuck in a loop): the watchdog ends it TIMEOUT."""
    h = make_hostd(metrics="127.0.0.1:0", task_timeout_s=0.3, metrics_grace_s=0, region_default=160 << 20)
    with guestlib.attach(h.socket_path, name="hung", auto_reattach=False) as dev, \
            guestlib.attach(h.socket_path, name="fine", auto_reattach=False, region_size=2 << 20) as ok:
        (vm,) = [v for v in guestlib.hostd_status(h.socket_path)["vms"] if v["name"] == "hung"]
        c = hang_a_task(h, dev, vm["worker_pid"])
        assert c.error.name == "TIMEOUT"
        assert not os.path.exists(f"/proc/{vm['worker_pid']}")  # killed and reaped
        assert ok.nop().wait(10) is None
        assert dev.nop().wait(10) is None  # the respawned worker serves the guest again
        s = scrape(h)
        assert value(s, "vmediad_timeouts_total", vm="hung") == 1
        assert value(s, "vmediad_timeouts_total", vm="fine") == 0
        assert value(s, "vmediad_device_timeouts_total") == 1
        assert value(s, "vmediad_tasks_total", vm="hung", op="CRC32", result="TIMEOUT") == 1
        assert value(s, "vmediad_device_errors_total", code="TIMEOUT") == 1
    wait_detached(h, "hung")
    wait_detached(h, "fine")
    after = scrape(h)
    assert pick(after, "vmediad_timeouts_total") == []  # metrics_grace_s=0: per-VM series gone
    assert value(after, "vmediad_device_timeouts_total") == 1  # the total stays
