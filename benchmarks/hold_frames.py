"""What the device's costs do to a bare decoder: the floor of zero-copy decode through a pipeline.

`vmediad bench codec`'s floor decodes and drops every frame, so FFmpeg recycles a handful of
picture buffers that stay in the CPU's caches.  A device that lends every decoded frame to a
guest must keep each one until the guest gives it back, so its decoder writes each new picture
into a buffer last written many frames ago.  This script measures that cost without the device:
the same direct decode, holding the last K frames alive (FFmpeg then allocates K more buffers
and cycles through them), against holding none; optionally the device path too.

It can add the worker's other costs to the direct decode, one at a time or together, in
tasks of ``--batch`` packets as the worker runs them: ``copy`` copies each chunk out of a shared
mapping into a fresh padded packet just before it is decoded, as the worker does; ``gapN``
spends N microseconds of Python between two tasks (the worker's frame table, result, IRQ and
next claim), while the frame thread that delivered the last frame waits for its next packet.
A path is a ``+``-joined list of ``holdK``, ``copy`` and ``gapN``; the first path is the floor.

Blocks run every path once on the same 120-frame stream, in an order that rotates and reverses
from block to block.  Speed is the floor's summed time over the path's, with a bootstrap 95 %
interval over blocks; CPU is the process's (for the device: the worker process's) per frame.

    python benchmarks/hold_frames.py --blocks 150 --paths hold0,gap300,copy,hold16,hold16+copy+gap300 \
        --device 3x12 --json-out benchmarks/results/hold-frames.json
    python benchmarks/hold_frames.py --blocks 80 --hold 0,8,16,36 --device 3x12
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import mmap
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmediad import abi

Run = Callable[[], tuple[float, int, float]]  # seconds, frames, CPU seconds


@dataclasses.dataclass(frozen=True)
class Costs:
    """The device costs a direct path adds: frames held, chunk copies, a gap between tasks."""

    hold: int = 0
    copy: bool = False
    gap_us: int = 0

    @classmethod
    def parse(cls, spec: str) -> Costs:
        hold, copy, gap = 0, False, 0
        for term in spec.split("+"):
            if term.startswith("hold") and term[4:].isdigit():
                hold = int(term[4:])
            elif term == "copy":
                copy = True
            elif term.startswith("gap") and term[3:].isdigit():
                gap = int(term[3:])
            else:
                raise ValueError(f"unknown path term {term!r} (holdK, copy, gapN)")
        return cls(hold, copy, gap)


def _spin(us: int) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _tasks(stream: list[bytes], costs: Costs, batch: int, region: memoryview,
           spans: list[tuple[int, int]], on_frame: Callable[[Any], None] | None) -> tuple[float, int]:
    """Direct decode in tasks of ``batch`` packets, with ``costs``' copies and gaps.  (The
    floor itself is bench codec's ``_direct_decode``: paths without either take that.)"""
    from av.packet import Packet

    from codec_backend.av_sessions import open_decoder_context
    from guestlib.codec import decoder_config
    from vmediad.tools.bench.codec import _padded, timed_decode

    ctx = open_decoder_context(decoder_config("h264"))
    built = None if costs.copy else [_padded(d) for d in stream]

    def packets() -> Iterator[Any]:
        for i, (off, length) in enumerate(spans):
            if built is None:  # as the worker's _feed: a padded packet filled from the region
                p = Packet(length)
                memoryview(p)[:] = region[off:off + length]
                yield p
            else:
                yield built[i]
            if costs.gap_us and (i % batch == batch - 1 or i == len(spans) - 1):
                _spin(costs.gap_us)
        yield None  # drain

    return timed_decode(ctx, packets(), on_frame)


def _paths(stream: list[bytes], specs: list[str], batch: int, device: str | None, dev: Any, wpid: int,
           width: int, height: int) -> dict[str, Run]:
    from guestlib.codec import decoder_config
    from vmediad.tools.bench.codec import Case, _device_decode, _direct_decode
    from vmediad.tools.bench.common import cpu_seconds

    # The chunks sit in a shared mapping, as they do in a guest's region.
    region = memoryview(mmap.mmap(-1, sum(abi.align(len(d)) for d in stream) or 1))
    spans, pos = [], 0
    for d in stream:
        region[pos:pos + len(d)] = d
        spans.append((pos, len(d)))
        pos = abi.align(pos + len(d))

    def direct(costs: Costs) -> Run:
        def go() -> tuple[float, int, float]:
            held: collections.deque[Any] | None = collections.deque(maxlen=costs.hold) if costs.hold else None
            on_frame = held.append if held is not None else None
            c0 = cpu_seconds()
            if costs.copy or costs.gap_us:
                dt, n = _tasks(stream, costs, batch, region, spans, on_frame)
            else:
                dt, n = _direct_decode(decoder_config("h264"), stream, on_frame=on_frame)
            return dt, n, cpu_seconds() - c0
        return go

    paths: dict[str, Run] = {spec: direct(Costs.parse(spec)) for spec in specs}
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
    from vmediad.tools.bench.codec import _direct_decode

    held: collections.deque[Any] = collections.deque(maxlen=k)  # maxlen 0 keeps nothing
    seen: set[int] = set()

    def on_frame(f: Any) -> None:
        seen.add(f.planes[0].buffer_ptr)
        held.append(f)
    _direct_decode(decoder_config("h264"), stream, on_frame=on_frame)
    return len(seen)


def main(argv: list[str] | None = None) -> int:
    from guestlib.codec import encoder_config
    from vmediad.tools.bench.codec import _direct_encode, pictures
    from vmediad.tools.bench.common import machine, save
    from vmediad.tools.bench.layers import _device_session, block_counter, speed_interval, timed_blocks

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=60)
    p.add_argument("--hold", default="0,8,16,36", help="frames held alive, comma-separated; the first is the floor")
    p.add_argument("--paths", default="", help="direct paths instead of --hold: holdK, copy, gapN joined by +, "
                   "comma-separated; the first is the floor")
    p.add_argument("--batch", type=int, default=12, help="packets per task for copy and gap paths")
    p.add_argument("--device", default="", help="also the device path at DEPTHxBATCH, e.g. 3x12")
    p.add_argument("--size", default="1280x720")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    try:
        specs = a.paths.split(",") if a.paths else [f"hold{int(x)}" for x in a.hold.split(",")]
        for spec in specs:
            Costs.parse(spec)
    except ValueError as exc:
        p.error(str(exc))
    if a.blocks < 2 or a.batch < 1 or len(set(specs)) != len(specs):
        p.error("need --blocks >= 2, --batch >= 1 and distinct paths")
    width, height = (int(x) for x in a.size.split("x"))
    stream = _direct_encode(encoder_config("h264", width, height), pictures(width, height, 30), 120)[1]
    with _device_session(512 << 20) as (h, dev):
        wpid = int(h.device.statistics()["vms"][0]["worker_pid"])  # the one guest's worker
        paths = _paths(stream, specs, a.batch, a.device or None, dev, wpid, width, height)
        names = list(paths)
        for k in names:
            paths[k]()  # warm-up, not counted
        times, sums = timed_blocks(paths, a.blocks, len(stream), block_counter(a.blocks))
    frames = a.blocks * len(stream)
    cpu = {k: sums[k][0] for k in names}
    rng = random.Random(1)
    floor = names[0]
    rows = []
    name_width = max(len(k) for k in names)
    buffers: dict[int, int] = {}  # frames held -> buffers cycled (copies and gaps change nothing)
    for k in names:
        speed, (lo, hi) = speed_interval(times[floor], times[k], rng)
        row = {"path": k, "speed": round(speed, 4), "ci95": [round(lo, 4), round(hi, 4)],
               "fps": round(frames / sum(times[k]), 1), "cpu_us_per_frame": round(cpu[k] / frames * 1e6, 1)}
        if not k.startswith("device"):
            hold = Costs.parse(k).hold
            if hold not in buffers:
                buffers[hold] = distinct_buffers(stream, hold)
            row["distinct_buffers"] = buffers[hold]
        rows.append(row)
        print(f"{k:{name_width}s} speed {speed:.3f} ({lo:.3f}-{hi:.3f})  {row['fps']:6.1f} fps  "
              f"CPU {row['cpu_us_per_frame']:6.0f} us/frame"
              + (f"  buffers {row['distinct_buffers']}" if "distinct_buffers" in row else ""))
    save({"machine": machine(), "blocks": a.blocks, "size": a.size, "batch": a.batch, "rows": rows}, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
