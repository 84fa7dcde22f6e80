"""Where a device decode's time goes: one stream decoded by five paths, each adding one layer
of the device to the one before, timed one stream at a time in rotation (``bench layers``).

Layers, in order:
  direct  the floor of ``bench codec``: pre-built padded packets, frames in FFmpeg's buffers;
  copy    + every chunk copied from region memory into a fresh padded packet, with its pts
          (what the worker does with each chunk);
  pool    + the decoder writes its pictures into a C frame pool in shared memory;
  engine  the worker's SessionManager, in this process: MULTI tasks of ``batch`` chunks,
          the frame table, lending, the guest's give-back (the lent words) after each task;
  device  the whole path: hostd in this process, the guest's worker process, guestlib's
          ``decode_stream`` with bench codec's depth and batch.

A block runs every layer once on the same stream, in an order that rotates and alternates
from block to block, so a drift of the machine's speed (other tenants) reaches every layer
alike.  A layer's speed is the floor's summed time over its own, across blocks; the interval
is a bootstrap over blocks.  Before timing, every layer's pictures are checked against the
floor's (MD5 of the visible planes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vmediad import abi
from vmediad.tools.bench.common import LAYERS, machine

BOOTSTRAP = 2000
_DST_LEN = 8 << 20  # engine layer: room for a task's output table (and copied frames)


@dataclasses.dataclass(frozen=True)
class LayerResult:
    layer: str
    fps: float  # median over blocks
    speed: float  # summed floor time / summed layer time
    ci95: tuple[float, float]
    thread_us_per_frame: float  # CPU of the calling thread (the guest's, for "device")


def _digest(planes: Iterator[np.ndarray[Any, Any]]) -> bytes:
    h = hashlib.md5()
    for p in planes:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.digest()


def _av_planes(frame: Any) -> Iterator[np.ndarray[Any, Any]]:
    """The visible rows and bytes of a yuv420p VideoFrame's planes."""
    for (rows, row_bytes), plane in zip(abi.plane_shapes(abi.PixFmt.YUV420P, frame.width, frame.height),
                                        frame.planes, strict=True):
        yield np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:rows, :row_bytes]


class _Scratch:
    """Region-like shared memory for the in-process layers: the chunks, a frame pool, a table."""

    def __init__(self, stream: list[bytes], width: int, height: int, pool_frames: int) -> None:
        from guestlib.codec import pool_slot_bytes

        self.chunks: list[tuple[int, int]] = []
        off = 0
        for d in stream:
            self.chunks.append((off, len(d)))
            off = abi.align(off + len(d), abi.PAGE_SIZE)
        # chunks | engine output | pool: the output must not overlap the chunks, or a
        # long stream's later chunks are overwritten by the first task's table.
        self.dst = abi.align(off, abi.PAGE_SIZE)
        self.dst_len = _DST_LEN
        self.pool = self.dst + self.dst_len
        self.pool_len = abi.POOL_HEADER + pool_frames * pool_slot_bytes(width, height)
        # mmap(-1) is MAP_SHARED | MAP_ANONYMOUS: shmem pages, as a guest's region is.
        self.map = mmap.mmap(-1, self.pool + self.pool_len)
        self.mem = memoryview(self.map)
        for (o, n), d in zip(self.chunks, stream, strict=True):
            self.mem[o:o + n] = d
        self.base = int(np.frombuffer(self.map, np.uint8, 1).ctypes.data)
        self.lent = np.frombuffer(self.map, np.uint32, abi.POOL_MAX_SLOTS, self.pool)

    def close(self) -> None:
        self.lent = np.empty(0, np.uint32)
        self.mem.release()
        self.map.close()


def _fresh_packets(codec: str, s: _Scratch, pool: bool, on_frame: Callable[[Any], None] | None) -> tuple[float, int]:
    from av.packet import Packet

    from codec_backend.av_sessions import open_decoder_context
    from codec_backend.framepool import FramePool
    from guestlib.codec import decoder_config
    from vmediad.tools.bench.codec import timed_decode

    ctx = open_decoder_context(decoder_config(codec))
    fp = None
    if pool:
        # Attached after open here (libavcodec copies get_buffer2 into its frame threads'
        # contexts before each packet); the worker attaches before open.
        fp = FramePool(s.base + s.pool, s.pool_len)
        if not fp.attach(ctx):
            raise RuntimeError("the frame pool could not be attached")
    mem = s.mem

    def packets() -> Iterator[Any]:
        for i, (off, length) in enumerate(s.chunks):
            pkt = Packet(length)
            memoryview(pkt)[:] = mem[off:off + length]
            pkt.pts = i
            yield pkt
        yield None  # drain

    dt, n = timed_decode(ctx, packets(), on_frame)
    del ctx
    if fp is not None:
        fp.close()
    return dt, n


def _engine(codec: str, s: _Scratch, batch: int, sm: Any, on_table: Callable[[int], None] | None) -> tuple[float, int]:
    from codec_backend.inputs import Input
    from guestlib.codec import decoder_config

    cfg = decoder_config(codec)
    cfg = dataclasses.replace(cfg, flags=cfg.flags | abi.SessionFlag.FRAME_POOL)
    s.lent[:] = 0
    sm.open(1, cfg, s.mem, (s.pool, s.pool_len))
    n = 0
    try:
        t0 = time.perf_counter()
        for i in range(0, len(s.chunks), batch):
            inputs = [Input(o, length, i + j) for j, (o, length) in enumerate(s.chunks[i:i + batch])]
            n += sm.decode(1, s.mem, inputs, False, False, s.dst, s.dst_len)[0]
            if on_table is not None:
                on_table(s.dst)
            s.lent[:] = 0  # the guest has read the task's frames and gives them back
        n += sm.flush(1, s.mem, s.dst, s.dst_len)[0]
        if on_table is not None:
            on_table(s.dst)
        dt = time.perf_counter() - t0
    finally:
        s.lent[:] = 0
        sm.close(1)
    return dt, n


def _table_digests(s: _Scratch, base: int) -> list[bytes]:
    _kind, count, _used = abi.OUT_HEADER.unpack_from(s.mem, base)
    out = []
    for i in range(count):
        e = abi.FRAME_ENTRY.unpack_from(s.mem, base + abi.OUT_HEADER.size + i * abi.FRAME_ENTRY.size)
        off, w, h, _fmt, nplanes, _pts, *rest = e
        offs, strides, flags = rest[0:3], rest[3:6], rest[6]
        start = (s.pool + off) if flags & abi.FRAME_POOLED else base + off
        shapes = abi.plane_shapes(abi.PixFmt.YUV420P, w, h)
        planes = (np.ndarray((rows, rb), np.uint8, buffer=s.mem, offset=start + o, strides=(st, 1))
                  for (rows, rb), o, st in zip(shapes, offs[:nplanes], strides[:nplanes], strict=True))
        out.append(_digest(planes))
    return out


@contextmanager
def _device_session(region_size: int) -> Iterator[tuple[Any, Any]]:
    """An in-process hostd and one attached guest: (hostd, device)."""
    import guestlib
    from hostd.config import Config
    from hostd.daemon import Hostd

    with tempfile.TemporaryDirectory(prefix="vmd-layers-") as d, ExitStack() as stack:
        h = stack.enter_context(Hostd(Config(socket=Path(d) / "h.sock", region_max=max(1024 << 20, region_size))))
        dev = stack.enter_context(guestlib.attach(h.socket_path, name="layers", region_size=region_size))
        dev.nop().wait()
        yield h, dev


def block_order(paths: tuple[str, ...] | list[str], b: int) -> list[str]:
    """The order block ``b`` runs ``paths`` in: rotated by one per block, reversed every other
    block, so a drift of the machine's speed reaches every path alike."""
    k = b % len(paths)
    order = list(paths[k:]) + list(paths[:k])
    return order[::-1] if b % 2 else order


def speed_interval(floor: list[float], times: list[float], rng: random.Random,
                   resamples: int = BOOTSTRAP) -> tuple[float, tuple[float, float]]:
    """sum(floor) / sum(times) and its bootstrap 95 % interval over blocks (resampled in pairs)."""
    if not floor or len(floor) != len(times):
        raise ValueError("need paired, non-empty timings")
    n = len(floor)
    point = sum(floor) / sum(times)
    boots = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(sum(floor[i] for i in idx) / sum(times[i] for i in idx))
    boots.sort()
    return point, (boots[int(0.025 * (resamples - 1))], boots[int(0.975 * (resamples - 1))])


def timed_blocks(paths: Mapping[str, Callable[[], tuple[float, ...]]], blocks: int, frames: int,
                 progress: Callable[[int, dict[str, list[float]]], None] | None = None,
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every path once per block, in ``block_order``.  A path returns (seconds, frames
    decoded, *counters); one that decodes other than ``frames`` frames stops the run.
    Returns each path's seconds per block and its counters summed over the blocks;
    ``progress`` sees the block number (from 1) and the times so far after each block."""
    names = list(paths)
    times: dict[str, list[float]] = {k: [] for k in names}
    sums: dict[str, list[float]] = {}
    for b in range(blocks):
        for k in block_order(names, b):
            dt, n, *counters = paths[k]()
            if n != frames:
                raise RuntimeError(f"{k} gave {n} frames, not {frames}")
            times[k].append(dt)
            sums[k] = [x + c for x, c in zip(sums[k], counters, strict=True)] if k in sums else list(counters)
        if progress is not None:
            progress(b + 1, times)
    return times, sums


def block_counter(blocks: int) -> Callable[[int, dict[str, list[float]]], None]:
    """A ``timed_blocks`` progress that rewrites "block b/blocks" on one line of stderr."""
    def show(b: int, _times: dict[str, list[float]]) -> None:
        print(f"block {b}/{blocks}", file=sys.stderr, end="\r", flush=True)
    return show


def run(codec: str = "h264", width: int = 1280, height: int = 720, frames: int = 120, blocks: int = 60,
        layers: tuple[str, ...] = LAYERS, progress: Callable[[str], None] | None = None,
        seed: int = 1) -> dict[str, Any]:
    from codec_backend.av_sessions import SessionManager
    from guestlib.codec import DEFAULT_POOL_FRAMES, decoder_config, encoder_config
    from vmediad.tools.bench.codec import STREAM, Case, _device_decode, _direct_decode, _direct_encode, pictures

    unknown = [x for x in layers if x not in LAYERS]
    if unknown or not layers:
        raise ValueError(f"unknown layers {unknown}; known: {', '.join(LAYERS)}")
    if "direct" not in layers:
        layers = ("direct", *layers)
    if blocks < 2:
        raise ValueError("blocks must be at least 2")
    say = progress or (lambda _m: None)
    depth, batch = STREAM["decode"]
    say(f"encoding {frames} frames of {width}x{height} {codec}")
    stream = _direct_encode(encoder_config(codec, width, height), pictures(width, height, min(30, frames)), frames)[1]
    scratch = _Scratch(stream, width, height, DEFAULT_POOL_FRAMES)
    sm = SessionManager()
    region = max(256 << 20, 2 * scratch.pool_len + sum(abi.align(len(d), abi.PAGE_SIZE) for d in stream) + (64 << 20))
    with ExitStack() as stack:
        stack.callback(scratch.close)
        dev = stack.enter_context(_device_session(region))[1] if "device" in layers else None

        def one(layer: str, check: list[bytes] | None = None) -> tuple[float, int]:
            def on_frame(f: Any) -> None:
                assert check is not None
                if layer == "device":
                    check.append(_digest(iter(f.planes)))
                else:
                    check.append(_digest(_av_planes(f)))
            cb = on_frame if check is not None else None
            if layer == "direct":
                return _direct_decode(decoder_config(codec), stream, cb)
            if layer in ("copy", "pool"):
                return _fresh_packets(codec, scratch, layer == "pool", cb)
            if layer == "engine":
                return _engine(codec, scratch, batch, sm,
                               None if check is None else (lambda base: check.extend(_table_digests(scratch, base))))
            return _device_decode(dev, Case(codec, "decode", width, height), stream, depth, batch, cb)[:2]

        # Every layer must decode the very pictures the floor does.
        ref: list[bytes] = []
        one("direct", ref)
        if len(ref) != frames:
            raise RuntimeError(f"direct decode gave {len(ref)} frames, not {frames}")
        for layer in layers[1:]:
            got: list[bytes] = []
            one(layer, got)
            if got != ref:
                bad = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b),
                           min(len(got), len(ref)))
                raise RuntimeError(f"layer {layer} decoded different pictures from frame {bad} "
                                   f"({len(got)} frames against {len(ref)})")
        say(f"all {len(layers)} layers decode the same {frames} pictures (MD5 of the visible planes)")

        def on_thread_clock(layer: str) -> Callable[[], tuple[float, int, float]]:
            def go() -> tuple[float, int, float]:
                c0 = time.thread_time()
                dt, n = one(layer)
                return dt, n, time.thread_time() - c0
            return go

        def report(b: int, times: dict[str, list[float]]) -> None:
            if b % max(1, blocks // 10) == 0 or b == blocks:
                say(f"block {b}/{blocks}: " + ", ".join(f"{x} {frames / times[x][-1]:.0f} fps" for x in layers))

        times, sums = timed_blocks({x: on_thread_clock(x) for x in layers}, blocks, frames, report)
    rng = random.Random(seed)
    results = []
    for layer in layers:
        speed, ci = speed_interval(times["direct"], times[layer], rng)
        fps = sorted(frames / t for t in times[layer])[len(times[layer]) // 2]
        results.append(LayerResult(layer, round(fps, 1), round(speed, 4), (round(ci[0], 4), round(ci[1], 4)),
                                   round(sums[layer][0] / (blocks * frames) * 1e6, 1)))
    return {"machine": machine(), "codec": codec, "width": width, "height": height, "frames": frames,
            "blocks": blocks, "stream": {"depth": depth, "batch": batch, "pool_frames": DEFAULT_POOL_FRAMES},
            "layers": [dataclasses.asdict(r) for r in results],
            "seconds": {x: times[x] for x in layers}}
