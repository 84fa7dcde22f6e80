"""Codec benchmark: fps through the device against direct in-process PyAV, in one run.

Floor: the same FFmpeg codec context the worker would open for the session
(``codec_backend.av_sessions.open_encoder_context`` / ``open_decoder_context``
on the very SessionConfig ``guestlib`` sends), driven directly from this process:
encode wraps pre-generated numpy frames without copying (as the worker wraps
region memory), decode feeds pre-built zero-padded packets and leaves the frames
in FFmpeg's buffers.

Device: an in-process hostd, one guest, ``guestlib`` Encoder/Decoder.  Encode
input is a ring of region frames filled before timing (``new_frame(keep=True)``),
decode input is the bitstream staged in region buffers before timing, so both
sides measure codec work plus what the device adds: the round trips, the packet
copy out (encode) and the bitstream copy in (decode; the decoder writes its pictures
straight into the guest's frame pool, sized from the case's geometry as a player
would from its container).  ``device_fps`` uses the pipelined
``encode_stream()``/``decode_stream()`` (STREAM: tasks queued, frames per task);
``device_sync_fps`` one ``encode()``/``decode()`` call at a time, for comparison.

Content is a scrolling noise texture under moving gradients: neither trivially
compressible nor pure noise.  Encoders run with the device's defaults except for
ENCODER_SETTINGS (both sides).  The 10-bit case decodes an HEVC Main 10 stream made
here by libx265 (``stream10``) into yuv420p10le on both sides: native, no conversion.

Direct and device runs alternate, ``rounds`` times each (more for short cases, see
MIN_SECONDS) after one uncounted warm-up round, and swap places every round (then
``device_sync``).
``ratio`` is the median over rounds of device fps / direct fps of the same round
(paired: this box has 2 cores and is noisy, and pairing cancels drifts of its
speed between rounds); the fps columns are medians.  ``cpu_us_per_frame`` is the
CPU time per frame of each path, summed over the counted rounds: the direct
process, and for the device the guest's thread, hostd's device thread and the
worker process (codec threads included).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmediad.tools.bench.common import CODEC_CASES, cpu_seconds, machine, name_matches, round_ratios
from vmediad.tools.bench.common import Case as Case  # re-exported: layers, display and benchmarks/ use it

RING = 30  # distinct input pictures per case (cycled)
# encode_stream()/decode_stream() settings of the "device" path, per op: (depth, batch):
# tasks queued, frames (chunks) per task.  Each was the best of those tried on this box
# (docs/benchmarks.md): 4 x 8 for encode; 3 x 12 for decode.  Since the decoder writes into
# the guest's frame pool, a bigger list no longer means more memory written per task, so it
# only saves guest and hostd CPU: at 720p 3 x 12 took 72 us of it per frame, 3 x 6 111 us.
STREAM = {"encode": (4, 8), "decode": (3, 12)}
ROUNDS = 11  # counted rounds; each round runs every path for at least RUN_SECONDS
MIN_SECONDS = 6.0  # per side and case: short cases get more rounds
QUICK_MIN_SECONDS = 1.0  # MIN_SECONDS of --quick
RUN_SECONDS = 1.0  # a path's run in a round repeats until it has lasted this long
MAX_ROUNDS = 15
# Encoder settings that differ from the device's defaults, the same on both sides (they also
# make the stream of the codec's decode case).  VP8: with a positive cpu-used (the default 8)
# libvpx's VP8 realtime mode picks its speed from how long frames take against the frame rate's
# budget, so its output and its work changed from run to run; cpu-used -8 is speed 8, fixed.
# Its threads wait for each other spinning: on this 2-core box 60 frames at 720p took 1.6-6.2 s
# of CPU with 2 threads, depending on the other load, and a steady 0.8 s with one.
ENCODER_SETTINGS: dict[str, dict[str, Any]] = {"vp8": {"threads": 1, "cpu-used": "-8"}}


FULL = list(CODEC_CASES)
QUICK = FULL[:2]


def _planes(width: int, height: int, count: int, seed: int) -> Iterator[tuple[Any, Any, Any]]:
    """Luma, u and v of ``count`` pictures in 8-bit units (float, unclipped): a scrolling
    texture under moving gradients."""
    rng = np.random.default_rng(seed)
    th, tw = height + 8 * count, width + 8 * count
    noise = rng.normal(0.0, 1.0, (th // 2 + 1, tw // 2 + 1))
    # Smooth the noise a little (2x upsample + 3-tap blur): texture like grass or gravel.
    tex = np.repeat(np.repeat(noise, 2, 0), 2, 1)[:th, :tw]
    tex = (tex + np.roll(tex, 1, 0) + np.roll(tex, 1, 1)) / 3.0
    tex = 22.0 * tex + 4.0 * rng.normal(0.0, 1.0, (th, tw))
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    cy = np.arange(height // 2, dtype=np.float32)[:, None]
    cx = np.arange(width // 2, dtype=np.float32)[None, :]
    for i in range(count):
        dy, dx = 3 * i, 5 * i
        luma = 110 + 45 * np.sin((x + 6 * i) / 97.0) * np.cos((y - 4 * i) / 71.0) + tex[dy:dy + height, dx:dx + width]
        u = 128 + 30 * np.sin((cx + 3 * i) / 53.0) + 0 * cy + tex[dy:dy + height:2, dx:dx + width:2] / 4
        v = 128 + 30 * np.cos((cy - 2 * i) / 41.0) + 0 * cx - tex[dy + 1:dy + height:2, dx + 1:dx + width:2] / 4
        yield luma, u, v


def _packed(width: int, height: int, luma: Any, u: Any, v: Any, dtype: type[np.generic]) -> npt.NDArray[Any]:
    pic = np.empty((height * 3 // 2, width), dtype)
    pic[:height] = luma
    pic[height:].reshape(-1)[: width * height // 4] = u.reshape(-1)
    pic[height:].reshape(-1)[width * height // 4:] = v.reshape(-1)
    return pic


def pictures(width: int, height: int, count: int, seed: int = 1) -> list[npt.NDArray[np.uint8]]:
    """``count`` packed yuv420p pictures, shape (h*3/2, w): a scrolling texture under moving gradients."""
    return [_packed(width, height, luma.clip(16, 235), u.clip(16, 240), v.clip(16, 240), np.uint8)
            for luma, u, v in _planes(width, height, count, seed)]


def pictures10(width: int, height: int, count: int, seed: int = 1) -> list[npt.NDArray[np.uint16]]:
    """The same pictures as ``pictures``, packed yuv420p10le (10 bits in uint16): the gradients
    keep the two bits of precision 8 bits round away."""
    return [_packed(width, height, np.rint(4 * luma).clip(64, 940), np.rint(4 * u).clip(64, 960),
                    np.rint(4 * v).clip(64, 960), np.uint16)
            for luma, u, v in _planes(width, height, count, seed)]


def stream10(codec: str, width: int, height: int, pics: list[npt.NDArray[np.uint16]], frames: int) -> list[bytes]:
    """A 10-bit bitstream of ``frames`` frames cycling through ``pics``, encoded at yuv420p10le
    in this process with the device's encoder defaults for ``codec`` (HEVC Main 10: libx265,
    preset ultrafast, no B-frames, 30 fps); the 10-bit case measures decoding only."""
    import av
    from av.video.frame import VideoFrame

    if codec != "hevc":  # libvpx-vp9 of this PyAV build has no 10-bit formats
        raise ValueError(f"no 10-bit encoder for {codec}")
    ctx = av.CodecContext.create("libx265", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p10le"
    ctx.time_base, ctx.framerate = Fraction(1, 30), Fraction(30)
    ctx.max_b_frames = 0
    ctx.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
    out: list[bytes] = []
    for i in range(frames):
        f = VideoFrame.from_ndarray(pics[i % len(pics)], format="yuv420p10le")
        f.pts = i
        out += [bytes(p) for p in ctx.encode(f)]
    out += [bytes(p) for p in ctx.encode(None)]
    return out


# --- direct PyAV (the floor) ----------------------------------------------------------------
def _direct_encode(cfg: Any, pics: list[npt.NDArray[np.uint8]], frames: int) -> tuple[float, list[bytes]]:
    from av.video.frame import VideoFrame

    from codec_backend.av_sessions import open_encoder_context

    ctx = open_encoder_context(cfg)
    out: list[bytes] = []
    t0 = time.perf_counter()
    for i in range(frames):
        f = VideoFrame.from_numpy_buffer(pics[i % len(pics)], "yuv420p")
        f.pts = i
        out += [bytes(p) for p in ctx.encode(f)]
    out += [bytes(p) for p in ctx.encode(None)]
    return time.perf_counter() - t0, out


def _padded(data: bytes) -> Any:
    import av

    pkt = av.Packet(len(data))  # zero-padded; av.Packet(bytes) is not
    memoryview(pkt)[:] = data
    return pkt


def _direct_decode(cfg: Any, stream: list[bytes],
                   on_frame: Callable[[Any], None] | None = None) -> tuple[float, int]:
    """Decode ``stream``; the frames stay in FFmpeg's buffers (``on_frame`` sees each one)."""
    from codec_backend.av_sessions import open_decoder_context

    ctx = open_decoder_context(cfg)
    packets = [_padded(d) for d in stream]
    return timed_decode(ctx, [*packets, None], on_frame)


def timed_decode(ctx: Any, packets: Iterable[Any],
                 on_frame: Callable[[Any], None] | None = None) -> tuple[float, int]:
    """Seconds and frames of feeding ``packets`` (end with None to drain) to ``ctx``; the
    clock covers whatever producing them costs, as a generator's copies or pauses."""
    n = 0
    t0 = time.perf_counter()
    for p in packets:
        frames = ctx.decode(p)
        n += len(frames)
        if on_frame is not None:
            for f in frames:
                on_frame(f)
    return time.perf_counter() - t0, n


# --- through the device ---------------------------------------------------------------------
def _device_encode(dev: Any, case: Case, pics: list[npt.NDArray[np.uint8]], frames: int,
                   depth: int, batch: int = 1) -> tuple[float, int, int]:
    """Seconds, packets, NO_SPACE retries."""
    from guestlib.codec import Encoder

    with Encoder(dev, case.codec, case.width, case.height, **ENCODER_SETTINGS.get(case.codec, {})) as enc:
        ring = [enc.new_frame(keep=True) for _ in pics]
        for f, pic in zip(ring, pics, strict=True):
            _fill(f, pic, case)
        t0 = time.perf_counter()
        if depth:
            n = sum(1 for _ in enc.encode_stream((ring[i % len(ring)] for i in range(frames)), depth=depth,
                                                 batch=batch))
        else:
            n = 0
            for i in range(frames):
                n += len(enc.encode(ring[i % len(ring)], pts=i))
            n += len(enc.flush())
        dt = time.perf_counter() - t0
    return dt, n, enc.no_space_retries


def _fill(frame: Any, pic: npt.NDArray[np.uint8], case: Case) -> None:
    w, h = case.width, case.height
    flat = pic.reshape(-1)
    frame.planes[0][:] = pic[:h]
    frame.planes[1][:] = flat[w * h: w * h * 5 // 4].reshape(h // 2, w // 2)
    frame.planes[2][:] = flat[w * h * 5 // 4:].reshape(h // 2, w // 2)


def _device_decode(dev: Any, case: Case, stream: list[bytes], depth: int, batch: int = 1,
                   on_frame: Callable[[Any], None] | None = None) -> tuple[float, int, int]:
    """Seconds, frames, NO_SPACE retries (``on_frame`` sees each streamed frame while it is lent)."""
    from guestlib.codec import Decoder

    bufs = [dev.put(d) for d in stream]  # the bitstream is in guest memory before the clock starts
    try:
        # The geometry hint is what a player has from its container: output buffers are
        # sized for it from the first task (without it the first tasks end in NO_SPACE).
        with Decoder(dev, case.codec, pix_fmt=case.pix_fmt, parse=False, width=case.width,
                     height=case.height) as dec:
            t0 = time.perf_counter()
            if depth:
                it = dec.decode_stream(((b, i) for i, b in enumerate(bufs)), depth=depth, batch=batch)
                if on_frame is None:
                    n = sum(1 for _ in it)
                else:
                    n = 0
                    for f in it:
                        on_frame(f)
                        n += 1
            else:
                n = 0
                for i, b in enumerate(bufs):
                    n += len(dec.decode(b, pts=i))
                n += len(dec.flush())
            dt = time.perf_counter() - t0
    finally:
        for b in bufs:
            dev.free(b)
    return dt, n, dec.no_space_retries


def _vm(h: Any, name: str) -> dict[str, Any]:
    return dict(next(v for v in h.device.statistics()["vms"] if v["name"] == name))


def _cpu(h: Any, guest_tid: int, worker_pid: int | None) -> dict[str, float]:
    """CPU seconds so far: the whole process for the direct paths (``worker_pid`` None); for
    the device paths the guest's thread, hostd's device thread and the guest's worker
    process (its codec threads included).  Read from /proc, so the figures are in clock
    ticks (10 ms): summed over a case's rounds they are good to about 1 %.  Nothing between
    two readings may ask hostd for statistics(): that runs on the device thread."""
    if worker_pid is None:
        return {"direct": cpu_seconds()}
    return {"guest": cpu_seconds(tid=guest_tid), "hostd": cpu_seconds(tid=h.device.thread_id),
            "worker": cpu_seconds(worker_pid)}


def _per_frame_us(cpu: dict[str, float], frames: int) -> dict[str, float]:
    out = {k: round(v / max(1, frames) * 1e6, 1) for k, v in cpu.items()}
    if len(out) > 1:
        out["total"] = round(sum(out.values()), 1)
    return out


def _copied(h: Any, name: str) -> int:
    return int(_vm(h, name)["bytes_copied"])


def _one_run(path: str, case: Case, dev: Any, ecfg: Any, pics: list[npt.NDArray[np.uint8]], frames: int,
             stream: list[bytes]) -> tuple[float, int, int]:
    """Seconds, frames and NO_SPACE retries of one run of ``path`` over ``frames`` frames."""
    from guestlib.codec import decoder_config

    if path == "direct":
        if case.op == "encode":
            return _direct_encode(ecfg, pics, frames)[0], frames, 0
        return (*_direct_decode(decoder_config(case.codec, pix_fmt=case.pix_fmt), stream), 0)
    depth, batch = STREAM[case.op] if path == "device" else (0, 1)
    if case.op == "encode":
        dt, _, retries = _device_encode(dev, case, pics, frames, depth, batch)
        return dt, frames, retries
    return _device_decode(dev, case, stream, depth, batch)


def output_formats(dev: Any, case: Case, stream: list[bytes]) -> dict[str, str]:
    """The pixel format each path's decoder hands out for ``stream`` (decoded once, untimed):
    a decode case compares the same pictures in the same format, with no conversion."""
    from guestlib.codec import decoder_config

    seen: dict[str, str] = {}

    def first(path: str, name: str) -> None:
        seen.setdefault(path, name)

    _direct_decode(decoder_config(case.codec, pix_fmt=case.pix_fmt), stream,
                   lambda f: first("direct", f.format.name))
    depth, batch = STREAM["decode"]
    _device_decode(dev, case, stream, depth, batch, lambda f: first("device", f.format))
    return seen


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """The cases whose name contains every word of one of ``only`` (all cases if none given)."""
    if not only:
        return cases
    picked = [c for c in cases if name_matches(c.name, only)]
    if not picked:
        raise ValueError(f"no case matches {only}; cases: {', '.join(c.name for c in cases)}")
    return picked


def run(frames: int = 120, quick: bool = False, progress: Callable[[str], None] | None = None,
        rounds: int = ROUNDS, hostd_overrides: dict[str, Any] | None = None,
        only: list[str] | None = None) -> dict[str, Any]:
    """Measure every case (or those ``select`` picks with ``only``); ``quick``: fewer frames and
    rounds, and the QUICK cases unless ``only`` picks others.  ``hostd_overrides`` are hostd
    Config fields (experiments, e.g. spin_us)."""
    import guestlib
    from guestlib.codec import encoder_config
    from hostd.config import Config
    from hostd.daemon import Hostd

    say = progress or (lambda _m: None)
    cases = select(QUICK if quick and not only else FULL, only)
    min_seconds, run_seconds = MIN_SECONDS, RUN_SECONDS
    if quick:
        frames = min(frames, 60)
        rounds = min(rounds, 2)
        min_seconds, run_seconds = QUICK_MIN_SECONDS, 0.0
    result: dict[str, Any] = {"machine": machine(), "frames": frames, "rounds": rounds,
                              "stream": {op: {"depth": d, "batch": b} for op, (d, b) in STREAM.items()},
                              "hostd_overrides": hostd_overrides or {}, "cases": []}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vmd-bench-") as d:
        cfg = Config(socket=Path(d) / "h.sock", region_max=1024 << 20, **(hostd_overrides or {}))
        with Hostd(cfg) as h, guestlib.attach(h.socket_path, name="bench", region_size=512 << 20) as dev:
            dev.nop().wait()
            guest_tid = threading.get_native_id()
            streams: dict[tuple[str, int, int, str], list[bytes]] = {}
            for case in cases:
                say(f"{case.name}: generating {RING} pictures")
                pics = pictures(case.width, case.height, min(RING, frames))
                ecfg = encoder_config(case.codec, case.width, case.height, **ENCODER_SETTINGS.get(case.codec, {}))
                key = (case.codec, case.width, case.height, case.pix_fmt)
                if case.op == "decode" and key not in streams:
                    if case.pix_fmt == "yuv420p10le":
                        pics10 = pictures10(case.width, case.height, min(RING, frames))
                        streams[key] = stream10(case.codec, case.width, case.height, pics10, frames)
                    else:
                        streams[key] = _direct_encode(ecfg, pics, frames)[1]
                formats: dict[str, str] = {}
                if case.op == "decode":
                    formats = output_formats(dev, case, streams[key])
                    if formats != {"direct": case.pix_fmt, "device": case.pix_fmt}:
                        raise RuntimeError(f"{case.name}: decoded {formats}, not {case.pix_fmt} on both paths")
                runs: dict[str, list[float]] = {"direct": [], "device": [], "device_sync": []}
                copied = 0.0  # bytes per frame of the last "device" run
                no_space = 0  # NO_SPACE retries of the counted "device" rounds
                spent = 0.0
                cpu: dict[str, dict[str, float]] = {path: {} for path in runs}
                cpu_frames = dict.fromkeys(runs, 0)

                r = 0
                # Round 0 warms every path up and is not counted.  Short cases get more
                # rounds (up to MAX_ROUNDS) until each path has run min_seconds in total.
                while r <= rounds or (spent < min_seconds and r <= MAX_ROUNDS):
                    fps: dict[str, float] = {}
                    secs: dict[str, float] = {}
                    # Direct and device swap places every round, so neither always runs
                    # right after the other (a codec's threads winding down, caches).
                    order = ["direct", "device"] if r % 2 else ["device", "direct"]
                    for path in [*order, "device_sync"]:
                        vm0 = _vm(h, "bench") if path.startswith("device") else None
                        wpid = None if vm0 is None else int(vm0["worker_pid"])
                        c0 = _cpu(h, guest_tid, wpid)
                        # One 120-frame run lasts 0.15 s on the fastest cases: a scheduling
                        # hiccup then moves a round's ratio by 20 %.  So a round's run of a
                        # path repeats until it has lasted run_seconds.
                        dt, n = 0.0, 0
                        while not n or dt < run_seconds:
                            dt1, n1, retries = _one_run(path, case, dev, ecfg, pics, frames, streams.get(key, []))
                            if n1 != frames:
                                raise RuntimeError(f"{case.name}: {path} gave {n1} frames, not {frames}")
                            if r and path == "device":
                                no_space += retries
                            dt, n = dt + dt1, n + n1
                        fps[path] = n / dt
                        secs[path] = dt
                        c1 = _cpu(h, guest_tid, wpid)
                        if path == "device" and vm0 is not None:
                            copied = (_copied(h, "bench") - int(vm0["bytes_copied"])) / n
                        if r:
                            for k, v in c1.items():
                                cpu[path][k] = cpu[path].get(k, 0.0) + v - c0[k]
                            cpu_frames[path] += n
                    if r:
                        spent += min(secs.values())
                        for path, v in fps.items():
                            runs[path].append(v)
                        say(f"{case.name}: round {r}: " + ", ".join(f"{k} {v:.1f} fps" for k, v in fps.items()))
                    r += 1
                med = {k: statistics.median(v) for k, v in runs.items()}
                # Paired: each round's device run against the direct run next to it, so a
                # drift of the machine's speed between rounds (other tenants) cancels out.
                paired = {k: statistics.median(round_ratios(runs["direct"], v))
                          for k, v in runs.items() if k != "direct"}
                result["cases"].append({
                    "case": case.name, "pix_fmt": case.pix_fmt,
                    "encoder_settings": dict(ENCODER_SETTINGS.get(case.codec, {})), "output_formats": formats,
                    "direct_fps": round(med["direct"], 1), "device_fps": round(med["device"], 1),
                    "ratio": round(paired["device"], 3),
                    "ratio_of_medians": round(med["device"] / med["direct"], 3),
                    "bytes_copied_per_frame": round(copied),
                    "no_space_retries": no_space,
                    "device_sync_fps": round(med["device_sync"], 1),
                    "sync_ratio": round(paired["device_sync"], 3),
                    "cpu_us_per_frame": {k: _per_frame_us(cpu[k], cpu_frames[k]) for k in runs},
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                })
    result["machine"]["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after
    return result
