"""Fake VMs: guest processes that drive the device with real encode/decode/transcode work.

Each VM is a separate process (multiprocessing "spawn") with its own region.
It reports progress as small dicts on a queue; the parent renders them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

WORKLOADS = ("encode", "decode", "transcode")
EXTENSION = {"h264": ".mp4", "hevc": ".mp4", "av1": ".mp4", "mpeg4": ".mp4", "vp9": ".webm", "mjpeg": ".mkv"}


@dataclass
class VmSpec:
    name: str
    socket: str
    workload: str
    codec: str = "h264"
    width: int = 1280
    height: int = 720
    frames: int = 120
    fps: int = 30
    input: str | None = None
    output: str = "."
    region_size: int = 128 << 20


@dataclass
class VmReport:
    name: str
    workload: str
    codec: str
    frames: int = 0
    errors: int = 0
    state: str = "starting"  # starting, running, done, failed, stopped
    output: str = ""
    seconds: float = 0.0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@lru_cache(maxsize=4)
def _ramp(width: int, height: int) -> npt.NDArray[np.uint8]:
    yy, xx = np.mgrid[0:height, 0:width]
    ramp: npt.NDArray[np.uint8] = ((xx + yy) % 256).astype(np.uint8)
    return ramp


def pattern(width: int, height: int, index: int) -> npt.NDArray[np.uint8]:
    """A moving test pattern as one yuv420p array of shape (h*3/2, w): gradient, box and colour sweep."""
    y = _ramp(width, height) + np.uint8((3 * index) % 256)  # uint8 arithmetic wraps mod 256
    bx, by = (index * 7) % max(1, width - 64), (index * 5) % max(1, height - 64)
    y[by : by + 64, bx : bx + 64] = 235
    ch, cw = height // 2, width // 2
    u = np.full((ch, cw), int(128 + 40 * np.sin(index / 10)), np.uint8)
    v = ((np.arange(cw)[None, :] + index) % 256).astype(np.uint8).repeat(ch, axis=0)
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(height * 3 // 2, width)


def _fill(frame: Any, data: npt.NDArray[np.uint8], width: int, height: int) -> None:
    flat = data.reshape(-1)
    y, u, v = frame.planes
    n = width * height
    c = (width // 2) * (height // 2)
    y[:] = flat[:n].reshape(height, width)
    u[:] = flat[n : n + c].reshape(height // 2, width // 2)
    v[:] = flat[n + c : n + 2 * c].reshape(height // 2, width // 2)


class _Progress:
    def __init__(self, q: Any, report: VmReport) -> None:
        self.q = q
        self.report = report
        self.t0 = time.monotonic()
        self.last = 0.0

    def send(self, force: bool = False) -> None:
        now = time.monotonic()
        self.report.seconds = now - self.t0
        if force or now - self.last > 0.2:
            self.last = now
            self.q.put(asdict(self.report))


def _encode(dev: Any, spec: VmSpec, prog: _Progress, stop: Any, out: Path) -> None:
    from guestlib.media import Muxer

    with dev.encoder(spec.codec, spec.width, spec.height, spec.fps) as enc:
        mux = Muxer(out, spec.codec, spec.width, spec.height, enc.time_base, Fraction(spec.fps))
        try:
            for i in range(spec.frames):
                if stop.is_set():
                    prog.report.state = "stopped"
                    break
                f = enc.new_frame()
                _fill(f, pattern(spec.width, spec.height, i), spec.width, spec.height)
                mux.write(enc.encode(f, pts=i))
                prog.report.frames += 1
                prog.send()
            mux.write(enc.flush())
        finally:
            mux.close()


def _pattern_clip(dev: Any, spec: VmSpec, path: Path) -> None:
    """The built-in input: the test pattern, encoded through the device."""
    sub = VmSpec(**{**asdict(spec), "codec": "h264" if spec.workload == "decode" else "mpeg4"})
    _encode(dev, sub, _Progress(_NullQueue(), VmReport(spec.name, "prep", sub.codec)), _Never(), path)


class _NullQueue:
    def put(self, _item: Any) -> None:
        pass


class _Never:
    def is_set(self) -> bool:
        return False


def _decode(dev: Any, spec: VmSpec, prog: _Progress, stop: Any, src: Path, out: Path) -> None:
    import av

    from guestlib.media import demux_elementary

    with av.open(str(src)) as container:
        vs = container.streams.video[0]
        rate = vs.average_rate or Fraction(spec.fps)
        # The container's picture size gives the decoder a frame pool: it decodes in place.
        with dev.decoder(vs.codec_context.name, parse=False, width=vs.codec_context.width,
                         height=vs.codec_context.height) as dec, \
                av.open(str(out), "w", format="yuv4mpegpipe") as y4m:
            stream = y4m.add_stream("rawvideo", rate=rate)
            stream.pix_fmt = "yuv420p"
            configured = False

            def write(frames: list[Any]) -> None:
                nonlocal configured
                for f in frames:
                    if not configured:
                        stream.width, stream.height = f.width, f.height
                        configured = True
                    vf = av.VideoFrame(f.width, f.height, "yuv420p")
                    for plane, data in zip(vf.planes, f.planes, strict=True):
                        # Copy the device's output rows into the muxer's frame (honouring line_size).
                        np.ndarray((data.shape[0], data.shape[1]), np.uint8, buffer=memoryview(plane),
                                   strides=(plane.line_size, 1))[:] = data
                    vf.pts = prog.report.frames
                    for pkt in stream.encode(vf):
                        y4m.mux(pkt)
                    prog.report.frames += 1
                    prog.send()

            for packet in demux_elementary(container, vs):
                if stop.is_set():
                    prog.report.state = "stopped"
                    break
                if prog.report.frames >= spec.frames:
                    break
                write(dec.decode(memoryview(packet), pts=packet.pts))
            else:
                write(dec.flush())
            for pkt in stream.encode(None):
                y4m.mux(pkt)


def run_vm(spec: VmSpec, q: Any, stop: Any) -> None:
    """Process entry point of one fake VM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into `stop`
    import guestlib
    from guestlib.media import transcode

    report = VmReport(spec.name, spec.workload, spec.codec)
    prog = _Progress(q, report)
    outdir = Path(spec.output)
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        with guestlib.attach(spec.socket, name=spec.name, region_size=spec.region_size) as dev:
            report.state = "running"
            prog.send(force=True)
            if spec.workload == "encode":
                out = outdir / f"{spec.name}{EXTENSION.get(spec.codec, '.mkv')}"
                _encode(dev, spec, prog, stop, out)
            else:
                with tempfile.TemporaryDirectory(prefix=f"vmediad-{spec.name}-") as tmp:
                    src = Path(spec.input) if spec.input else Path(tmp) / "pattern.mp4"
                    if not spec.input:
                        _pattern_clip(dev, spec, src)
                    if spec.workload == "decode":
                        out = outdir / f"{spec.name}.y4m"
                        _decode(dev, spec, prog, stop, src, out)
                    else:
                        out = outdir / f"{spec.name}{EXTENSION.get(spec.codec, '.mkv')}"

                        def tick(n: int) -> None:
                            report.frames = n
                            prog.send()

                        transcode(dev, src, out, spec.codec, max_frames=spec.frames, on_frame=tick)
            report.output = str(out)
            stats = dev.statistics()
            report.extra = {"vm": stats["vm"], "wakeups": stats["wakeups"]}
        if report.state == "running":
            report.state = "done"
    except Exception as e:
        report.state = "failed"
        report.errors += 1
        report.detail = f"{type(e).__name__}: {e}"
        report.extra["traceback"] = traceback.format_exc(limit=5)
    prog.send(force=True)


def spawn(specs: list[VmSpec]) -> tuple[list[Any], Any, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = ctx.Event()
    procs = []
    for spec in specs:
        p = ctx.Process(target=run_vm, args=(spec, q, stop), name=f"fakevm-{spec.name}", daemon=False)
        p.start()
        procs.append(p)
    return procs, q, stop


def default_output_dir() -> Path:
    return Path(os.environ.get("VMEDIAD_OUTPUT", "vmediad-out"))
