"""Transport benchmark: the device's nop/COPY path against its floors, in one run.

Floors: a raw spin-then-futex ping-pong between two processes over the same C
core (the least any cross-process round trip can cost here), and a memcpy of
the same bytes for COPY.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vmediad.shm import MappedRegion, create_memfd
from vmediad.tools.bench.common import cpu_seconds, machine, summary_us

PING, PONG = 0, 64
SPINS = 2000


def _wait_word(reg: MappedRegion, off: int, old: int, spins: int) -> int:
    v = reg.spin32(off, old, spins) if spins else reg.load32(off)
    while v == old:
        reg.futex_wait(off, old, 1.0)
        v = reg.load32(off)
    return v


def _pong(fd: int, n: int, spins: int) -> None:
    reg = MappedRegion(fd, 4096)
    seen = 0
    for _ in range(n):
        seen = _wait_word(reg, PING, seen, spins)
        reg.store32(PONG, seen)
        reg.futex_wake(PONG, 1)


def futex_pingpong(n: int, spins: int) -> dict[str, float]:
    """Round trips between two processes: store, wake, the peer answers the same way."""
    fd = create_memfd("bench-pingpong", 4096)
    reg = MappedRegion(fd, 4096)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_pong, args=(fd, n, spins))
    p.start()
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        reg.store32(PING, i)
        reg.futex_wake(PING, 1)
        _wait_word(reg, PONG, i - 1, spins)
        samples.append(time.perf_counter() - t0)
    p.join()
    reg.close()
    os.close(fd)
    return summary_us(samples[n // 10:])


def run(n: int = 5000, batch: int = 256, batches: int = 40, copy_mib: int = 4, idle_s: float = 30.0,
        channels: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import guestlib
    from hostd.config import Config
    from hostd.daemon import Hostd

    say = progress or (lambda _m: None)
    out: dict[str, Any] = {"machine": machine()}
    say("floor: spin-then-futex ping-pong")
    out["floor_pingpong_spin"] = futex_pingpong(n, SPINS)
    say("floor: pure futex ping-pong")
    out["floor_pingpong_futex"] = futex_pingpong(max(500, n // 5), 0)
    with tempfile.TemporaryDirectory(prefix="vmd-bench-") as d:
        cfg = Config(socket=Path(d) / "h.sock", channels=channels or 0, region_default=64 << 20,
                     ring_default=256, max_inflight_per_guest=256)
        with Hostd(cfg) as h, guestlib.attach(h.socket_path, name="bench") as dev:
            dev.nop().wait()  # worker up
            say(f"device: {n} nop round trips")
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                dev.nop().wait()
                samples.append(time.perf_counter() - t0)
            out["nop_roundtrip"] = summary_us(samples[n // 10:])
            out["nop_roundtrip"]["ratio_p50_vs_pingpong"] = round(
                out["nop_roundtrip"]["p50_us"] / out["floor_pingpong_spin"]["p50_us"], 2)
            say(f"device: {batches} batches of {batch} nops")
            t0 = time.perf_counter()
            sys0 = dev.syscalls_doorbell
            for _ in range(batches):
                with dev.batch() as b:
                    for _ in range(batch):
                        b.nop()
                for t in b.tasks:
                    t.wait()
            dt = time.perf_counter() - t0
            out["nop_batched"] = {"tasks_per_s": round(batch * batches / dt), "batch": batch,
                                  "doorbell_syscalls_per_task": round((dev.syscalls_doorbell - sys0)
                                                                      / (batch * batches), 4)}
            say(f"device: COPY {copy_mib} MiB vs memcpy")
            nbytes = copy_mib << 20
            src = dev.alloc(nbytes)
            dst = dev.alloc(nbytes)
            src.array()[:] = np.frombuffer(os.urandom(nbytes), np.uint8)
            a, b2 = src.array(), dst.array()
            reps = 50
            t0 = time.perf_counter()
            for _ in range(reps):
                np.copyto(b2, a)
            floor = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for _ in range(reps):
                dev.copy(src, dst).wait()
            dev_t = (time.perf_counter() - t0) / reps
            out["copy"] = {"bytes": nbytes, "memcpy_us": round(floor * 1e6, 1), "device_us": round(dev_t * 1e6, 1),
                           "ratio_vs_memcpy": round(dev_t / floor, 3)}
            del a, b2
            if idle_s > 0:
                say(f"idle: hostd CPU over {idle_s:.0f} s")
                stats = h.device.statistics()
                wpid = stats["vms"][0]["worker_pid"]
                time.sleep(1.0)
                c0, w0, t0 = cpu_seconds(), cpu_seconds(wpid), time.monotonic()
                time.sleep(idle_s)
                c1, w1, t1 = cpu_seconds(), cpu_seconds(wpid), time.monotonic()
                out["idle"] = {"seconds": round(t1 - t0, 1),
                               "hostd_cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 3),
                               "worker_cpu_percent": round(100 * (w1 - w0) / (t1 - t0), 3)}
    return out
