"""What keeping decoded frames alive costs a decoder: the floor of zero-copy decode through a pipeline.

`vmediad bench codec`'s floor decodes and drops every frame, so FFmpeg recycles a handful of
picture buffers that stay in the CPU's caches.  A device that lends every decoded frame to a
guest must keep each one until the guest gives it back, so its decoder writes each new picture
into a buffer last written many frames ago.  This script measures that cost without the device:
the same direct decode, holding the last K frames alive (FFmpeg then allocates K more buffers
and cycles through them), against holding none; optionally the device path too.

Blocks run every path once on the same 120-frame stream, in an order that rotates and reverses
from block to block.  Speed is the floor's summed time over the path's, with a bootstrap 95 %
interval over blocks; CPU is the process's (for the device: the worker process's) per frame.

    python benchmarks/hold_frames.py --blocks 80 --hold 0,8,16,36 --device 3x12 \
        --json-out benchmarks/results/hold-frames.json
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Run = Callable[[], tuple[float, int, float]]  # seconds, frames, CPU seconds


def _paths(stream: list[bytes], holds: list[int], device: str | None, dev: Any, wpid: int,
           width: int, height: int) -> dict[str, Run]:
    from guestlib.codec import decoder_config
    from vmediad.bench.codec import Case, _device_decode, _direct_decode
    from vmediad.bench.common import cpu_seconds

    def direct(k: int) -> Run:
        def go() -> tuple[float, int, float]:
            held: collections.deque[Any] | None = collections.deque(maxlen=k) if k else None
            c0 = cpu_seconds()
            dt, n = _direct_decode(decoder_config("h264"), stream, on_frame=held.append if held is not None else None)
            return dt, n, cpu_seconds() - c0
        return go

    paths: dict[str, Run] = {f"hold{k}": direct(k) for k in holds}
    if device:
        depth, batch = (int(x) for x in device.split("x"))
        case = Case("h264", "decode", width, height)

        def through_device() -> tuple[float, int, float]:
            c0 = cpu_seconds(wpid)
            dt, n, _retries = _device_decode(dev, case, stream, depth, batch)
            return dt, n, cpu_seconds(wpid) - c0
        paths[f"device {device}"] = through_device
    return paths


def distinct_buffers(stream: list[bytes], k: int) -> int:
    """How many picture buffers the direct decoder cycles through while K frames are held."""
    from guestlib.codec import decoder_config
    from vmediad.bench.codec import _direct_decode

    held: collections.deque[Any] = collections.deque(maxlen=k)  # maxlen 0 keeps nothing
    seen: set[int] = set()

    def on_frame(f: Any) -> None:
        seen.add(f.planes[0].buffer_ptr)
        held.append(f)
    _direct_decode(decoder_config("h264"), stream, on_frame=on_frame)
    return len(seen)


def main(argv: list[str] | None = None) -> int:
    from guestlib.codec import encoder_config
    from vmediad.bench.codec import _direct_encode, pictures
    from vmediad.bench.common import machine, save
    from vmediad.bench.layers import _device_session, block_order, speed_interval

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60)
    p.add_argument("--hold", default="0,8,16,36", help="frames held alive, comma-separated; the first is the floor")
    p.add_argument("--device", default="", help="also the device path at DEPTHxBATCH, e.g. 3x12")
    p.add_argument("--size", default="1280x720")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    holds = [int(x) for x in a.hold.split(",")]
    if a.blocks < 2 or not holds or min(holds) < 0:
        p.error("need --blocks >= 2 and non-negative --hold values")
    width, height = (int(x) for x in a.size.split("x"))
    stream = _direct_encode(encoder_config("h264", width, height), pictures(width, height, 30), 120)[1]
    with _device_session(512 << 20) as (h, dev):
        wpid = int(h.device.statistics()["vms"][0]["worker_pid"])  # the one guest's worker
        paths = _paths(stream, holds, a.device or None, dev, wpid, width, height)
        names = list(paths)
        times: dict[str, list[float]] = {k: [] for k in names}
        cpu = dict.fromkeys(names, 0.0)
        frames = dict.fromkeys(names, 0)
        for k in names:
            paths[k]()  # warm-up, not counted
        for b in range(a.blocks):
            for k in block_order(names, b):
                dt, n, c = paths[k]()
                if n != len(stream):
                    raise RuntimeError(f"{k}: {n} frames decoded, expected {len(stream)}")
                times[k].append(dt)
                cpu[k] += c
                frames[k] += n
            print(f"block {b + 1}/{a.blocks}", file=sys.stderr, end="\r", flush=True)
    rng = random.Random(1)
    floor = names[0]
    rows = []
    for k in names:
        speed, (lo, hi) = speed_interval(times[floor], times[k], rng)
        row = {"path": k, "speed": round(speed, 4), "ci95": [round(lo, 4), round(hi, 4)],
               "fps": round(frames[k] / sum(times[k]), 1), "cpu_us_per_frame": round(cpu[k] / frames[k] * 1e6, 1)}
        if k.startswith("hold"):
            row["distinct_buffers"] = distinct_buffers(stream, int(k[4:]))
        rows.append(row)
        print(f"{k:14s} speed {speed:.3f} ({lo:.3f}-{hi:.3f})  {row['fps']:6.1f} fps  "
              f"CPU {row['cpu_us_per_frame']:6.0f} us/frame"
              + (f"  buffers {row['distinct_buffers']}" if "distinct_buffers" in row else ""))
    save({"machine": machine(), "blocks": a.blocks, "size": a.size, "rows": rows}, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
