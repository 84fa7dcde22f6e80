"""The device's decode overhead with and without the kernel's time-sharing scheduler in the way.

Under SCHED_OTHER (CFS/EEVDF) the bare 720p H.264 decoder of ``vmediad bench codec``'s floor
keeps its two cores busy only part of the time: its frame threads wake each other many times a
frame, and a woken thread often waits on a busy core while the other one idles.  Under
SCHED_FIFO a woken thread runs at once on any core not running a real-time thread, so the same
decode becomes CPU-bound.  This script runs the floor and the device path under each policy,
on the same stream, so that the device's overhead can be read both ways:

* against the standard floor (``direct other``), as ``bench codec`` reports it;
* against the floor of the same policy, i.e. what the device costs when the decoder is bound
  by CPU rather than by thread placement.

A path's policy is set on every thread of this process (the guest, hostd and the floor's
decoder) and of the guest's worker process just before it runs, and reset to SCHED_OTHER
after; decoder threads are created per session and inherit it from the thread that opens the
session.  SCHED_FIFO needs CAP_SYS_NICE (root).  Blocks run every path once, in an order that
rotates and reverses from block to block; speeds are ratios of summed times with bootstrap 95 %
intervals over blocks.

    python benchmarks/sched_policy.py --blocks 100 --device 3x12,3x24 \\
        --json-out benchmarks/results/sched-policy.json
    python benchmarks/sched_policy.py --codec hevc --blocks 60
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLICIES = {"other": os.SCHED_OTHER, "fifo": os.SCHED_FIFO}
Run = Callable[[], tuple[float, int, float, float]]  # seconds, frames, CPU here, CPU of the worker


def _set_policy(pid: int, policy: int) -> None:
    prio = os.sched_param(1 if policy == os.SCHED_FIFO else 0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setscheduler(int(tid), policy, prio)
        except ProcessLookupError:  # a thread that ended since the listing
            pass


def _check_allowed(policies: list[str]) -> str | None:
    """Why a requested policy cannot be set here, or None."""
    for name in policies:
        try:
            os.sched_setscheduler(0, POLICIES[name], os.sched_param(1 if name == "fifo" else 0))
        except PermissionError:
            return f"setting SCHED_{name.upper()} needs CAP_SYS_NICE (run as root)"
        finally:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return None


def _under(policy: int, pids: list[int], run: Callable[[], tuple[float, int]], wpid: int) -> Run:
    from vmediad.tools.bench.common import cpu_seconds

    def go() -> tuple[float, int, float, float]:
        c0, w0 = cpu_seconds(), cpu_seconds(wpid)
        try:
            for pid in pids:
                _set_policy(pid, policy)
            dt, n = run()
        finally:
            for pid in pids:
                _set_policy(pid, os.SCHED_OTHER)
        return dt, n, cpu_seconds() - c0, cpu_seconds(wpid) - w0
    return go


def main(argv: list[str] | None = None) -> int:
    from guestlib.codec import decoder_config, encoder_config
    from vmediad.tools.bench.codec import Case, _device_decode, _direct_decode, _direct_encode, pictures
    from vmediad.tools.bench.common import machine, save
    from vmediad.tools.bench.layers import _device_session, block_counter, speed_interval, timed_blocks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60)
    p.add_argument("--policies", default="other,fifo", help="comma-separated: other, fifo; the first is the floor's")
    p.add_argument("--device", default="3x12", help="device shapes DEPTHxBATCH, comma-separated")
    p.add_argument("--codec", default="h264", choices=["h264", "hevc", "vp9"])
    p.add_argument("--size", default="1280x720")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    policies = a.policies.split(",")
    if a.blocks < 2 or not policies or any(x not in POLICIES for x in policies) or len(set(policies)) != len(policies):
        p.error("need --blocks >= 2 and distinct policies from: " + ", ".join(POLICIES))
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.device.split(",")] if a.device else []
        width, height = (int(x) for x in a.size.split("x"))
    except ValueError:
        p.error("--device takes DEPTHxBATCH[,...] and --size WIDTHxHEIGHT")
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        p.error("--device takes DEPTHxBATCH[,...] with both at least 1")
    if why := _check_allowed(policies):
        p.error(why)

    stream = _direct_encode(encoder_config(a.codec, width, height), pictures(width, height, 30), 120)[1]
    case = Case(a.codec, "decode", width, height)
    me = os.getpid()
    with _device_session(512 << 20) as (h, dev):
        wpid = int(h.device.statistics()["vms"][0]["worker_pid"])  # the one guest's worker
        paths: dict[str, Run] = {}
        for name in policies:
            pol = POLICIES[name]
            paths[f"direct {name}"] = _under(pol, [me], lambda: _direct_decode(decoder_config(a.codec), stream), wpid)
            for depth, batch in shapes:
                def device(depth: int = depth, batch: int = batch) -> tuple[float, int]:
                    dt, n, _retries = _device_decode(dev, case, stream, depth, batch)
                    return dt, n
                paths[f"device {depth}x{batch} {name}"] = _under(pol, [me, wpid], device, wpid)
        names = list(paths)
        for k in names:
            paths[k]()  # warm-up, not counted
        times, cpu = timed_blocks(paths, a.blocks, len(stream), block_counter(a.blocks))
    frames = a.blocks * len(stream)
    rng = random.Random(1)
    floor = names[0]
    rows: list[dict[str, Any]] = []
    width_col = max(len(k) for k in names)
    for k in names:
        speed, (lo, hi) = speed_interval(times[floor], times[k], rng)
        here_us, worker_us = (c / frames * 1e6 for c in cpu[k])
        row: dict[str, Any] = {"path": k, "speed": round(speed, 4), "ci95": [round(lo, 4), round(hi, 4)],
                               "fps": round(frames / sum(times[k]), 1)}
        line = f"{k:{width_col}s} speed {speed:.3f} ({lo:.3f}-{hi:.3f})  {row['fps']:6.1f} fps"
        if k.startswith("device"):
            same = f"direct {k.rsplit(' ', 1)[1]}"
            ratio, (rlo, rhi) = speed_interval(times[same], times[k], rng)
            row.update(ratio_same_policy=round(ratio, 4), ratio_ci95=[round(rlo, 4), round(rhi, 4)],
                       worker_cpu_us_per_frame=round(worker_us, 1), guest_hostd_cpu_us_per_frame=round(here_us, 1))
            line += (f"  vs {same}: {ratio:.3f} ({rlo:.3f}-{rhi:.3f})  CPU worker {worker_us:5.0f}"
                     f" + guest/hostd {here_us:3.0f} us/frame")
        else:
            row["cpu_us_per_frame"] = round(here_us, 1)
            line += f"  CPU {here_us:5.0f} us/frame"
        rows.append(row)
        print(line)
    save({"machine": machine(), "codec": a.codec, "blocks": a.blocks, "size": a.size, "rows": rows}, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
