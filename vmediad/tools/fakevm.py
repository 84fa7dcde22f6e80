"""Fake VMs: guest processes that drive the device with real encode/decode/transcode work.

Each VM is a separate process (multiprocessing "spawn") with its own region.  It sends
its progress as small dicts over its own pipe; the parent (``Fleet``) collects them.
There is no multiprocessing Queue or Event: their named semaphores (/dev/shm/sem.mp-*)
outlive a parent that is killed.

How a VM stops (the parent sends the signals; see vmediad/tools/cli.py ``run_fleet``):

* SIGINT: clean stop.  The VM finishes the frame in hand, flushes its encoder, closes its
  output and detaches.  Its device stops waiting for a hostd that went away
  (``reattach_window_s = 0``), so a clean stop never waits for a re-attach.
* SIGTERM: hard stop.  ``Device.give_up()``: every device call raises DeviceGone, so the VM
  unwinds through its ``finally`` blocks (outputs closed) within one futex slice.
* the parent dying: PR_SET_PDEATHSIG delivers SIGKILL; hostd reclaims the region on EOF.

Signal handlers only set flags and plain attributes: they run in the main thread between
bytecodes, possibly while it holds the device's producer lock.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache, partial
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from vmediad.tools.play import Shower, play

WORKLOADS = ("encode", "decode", "transcode", "play")
EXTENSION = {"h264": ".mp4", "hevc": ".mp4", "av1": ".mp4", "mpeg4": ".mp4", "vp9": ".webm", "vp8": ".webm",
             "mjpeg": ".mkv"}
ENCODE_FRAMES = 120  # frames an encode runs, and the length of the built-in test clip, by default
TRANSCODE_PATTERN_CODEC = "mpeg4"  # codec of the built-in clip a transcode reads
FINAL_STATES = ("done", "failed", "stopped")
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class VmSpec:
    name: str
    socket: str
    workload: str
    codec: str = "h264"  # encode: the codec; transcode: the output codec; decode: the built-in clip's
    width: int = 1280
    height: int = 720
    frames: int | None = None  # None: encode ENCODE_FRAMES, decode/transcode the whole input
    fps: int = 30
    input: str | None = None
    output: str = "."
    region_size: int = 128 << 20
    input_codec: str | None = None  # the input's codec when the parent probed it (for the codec column)
    display: bool = False  # show the pictures it works on on the shared screen (play always does)
    audio: str = "copy"  # transcode: copy the input's other streams (audio, subtitles), or "drop"


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
    total: int | None = None  # frames the VM expects to do, when known
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def codec_label(spec: VmSpec) -> str:
    """The codec column: the encoder's codec, the input's codec, or "input->output" for a transcode."""
    if spec.workload == "encode":
        return spec.codec
    source = spec.input_codec or ("?" if spec.input else _pattern_codec(spec))
    return source if spec.workload in ("decode", "play") else f"{source}->{spec.codec}"


def _planned(spec: VmSpec) -> int | None:
    """Frames the VM will do, as far as known before it looks at its input."""
    if spec.workload == "encode" or not spec.input:
        return ENCODE_FRAMES if spec.frames is None else spec.frames
    return spec.frames


def _pattern_codec(spec: VmSpec) -> str:
    return spec.codec if spec.workload in ("decode", "play") else TRANSCODE_PATTERN_CODEC


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


class StopFlag:
    """Set by the VM's signal handlers; read between frames."""

    def __init__(self) -> None:
        self.requested = False
        self.hard = False

    def is_set(self) -> bool:
        return self.requested


class _Progress:
    def __init__(self, conn: Connection | None, report: VmReport) -> None:
        self.conn = conn
        self.report = report
        self.t0 = time.monotonic()
        self.last = 0.0

    def send(self, force: bool = False) -> None:
        now = time.monotonic()
        self.report.seconds = now - self.t0
        if self.conn is not None and (force or now - self.last > 0.2):
            self.last = now
            try:
                self.conn.send(asdict(self.report))
            except OSError:
                self.conn = None  # the parent is gone; PR_SET_PDEATHSIG ends this process


def _encode(dev: Any, spec: VmSpec, prog: _Progress, stop: StopFlag, out: Path, show: Shower | None = None) -> None:
    from guestlib.media import Muxer

    frames = ENCODE_FRAMES if spec.frames is None else spec.frames
    prog.report.total = frames
    with dev.encoder(spec.codec, spec.width, spec.height, spec.fps) as enc:
        mux = Muxer(out, spec.codec, spec.width, spec.height, enc.time_base, Fraction(spec.fps))
        try:
            for i in range(frames):
                if stop.is_set():
                    prog.report.state = "stopped"
                    break
                f = enc.new_frame()
                picture = pattern(spec.width, spec.height, i)
                _fill(f, picture, spec.width, spec.height)
                if show is not None:
                    show.draw(spec.width, spec.height, partial(_fill, data=picture, width=spec.width,
                                                               height=spec.height))
                mux.write(enc.encode(f, pts=i))
                prog.report.frames += 1
                prog.send()
            mux.write(enc.flush())
        finally:
            mux.close()


def _pattern_clip(dev: Any, spec: VmSpec, stop: StopFlag, path: Path) -> None:
    """The built-in input: the test pattern, encoded through the device."""
    sub = VmSpec(**{**asdict(spec), "workload": "encode", "codec": _pattern_codec(spec)})
    _encode(dev, sub, _Progress(None, VmReport(spec.name, "prep", sub.codec)), stop, path)


def _expected(stream_frames: int, limit: int | None) -> int | None:
    known = stream_frames if stream_frames > 0 else None
    if limit is None:
        return known
    return limit if known is None else min(limit, known)


_Y4M_FORMATS = {"yuv420p": "yuv420p", "yuvj420p": "yuv420p", "yuv422p": "yuv422p", "yuvj422p": "yuv422p",
                "yuv444p": "yuv444p", "yuvj444p": "yuv444p", "yuv420p10le": "yuv420p10le"}


def _y4m_format(src: str | None) -> str:
    """The device format a decode workload asks for: the stream's own where a y4m file holds it
    (a full-range yuvj format has the same samples; 10-bit is y4m's unofficial C420p10), else
    8-bit 4:2:0."""
    return _Y4M_FORMATS.get(src or "", "yuv420p")


def _decode(dev: Any, spec: VmSpec, prog: _Progress, stop: StopFlag, src: Path, out: Path,
            show: Shower | None = None) -> None:
    import av

    from guestlib.media import DecodeAll, open_video

    container, vs = open_video(src)
    with container:
        prog.report.codec = vs.codec_context.name
        prog.report.total = _expected(vs.frames, spec.frames)
        prog.send(force=True)
        rate = vs.average_rate or Fraction(spec.fps)
        # The container's picture size gives the decoder a frame pool: it decodes in place.
        # Frames come out in the stream's own format (8 or 10 bits, 4:2:0/4:2:2/4:4:4) and the
        # y4m file keeps it; only a format y4m cannot hold is converted, and named.
        src_fmt = vs.codec_context.pix_fmt
        if src_fmt and src_fmt not in _Y4M_FORMATS:
            prog.report.extra.setdefault("conversions", []).append(f"{src_fmt}→{_y4m_format(src_fmt)}")
        with dev.decoder(vs.codec_context.name, parse=False, width=vs.codec_context.width,
                         height=vs.codec_context.height, pix_fmt=_y4m_format(src_fmt)) as dec, \
                av.open(str(out), "w", format="yuv4mpegpipe", options={"strict": "unofficial"}) as y4m:
            stream = y4m.add_stream("rawvideo", rate=rate)
            configured = False
            decoding = DecodeAll(dec, container, vs, prog.report.extra.setdefault("problems", []))
            for f in decoding if spec.frames is None or spec.frames > 0 else ():
                if stop.is_set():
                    prog.report.state = "stopped"
                    break
                if not configured:
                    stream.width, stream.height, stream.pix_fmt = f.width, f.height, f.format
                    configured = True
                vf = av.VideoFrame(f.width, f.height, f.format)
                for plane, data in zip(vf.planes, f.planes, strict=True):
                    # Copy the device's output rows into the muxer's frame (honouring line_size).
                    np.ndarray((data.shape[0], data.shape[1]), data.dtype, buffer=memoryview(plane),
                               strides=(plane.line_size, data.dtype.itemsize))[:] = data
                vf.pts = prog.report.frames
                if show is not None:
                    show.present(f)
                for pkt in stream.encode(vf):
                    y4m.mux(pkt)
                prog.report.frames += 1
                prog.send()
                if spec.frames is not None and prog.report.frames >= spec.frames:
                    break
            for pkt in stream.encode(None):
                y4m.mux(pkt)


def _transcode(dev: Any, spec: VmSpec, prog: _Progress, stop: StopFlag, src: Path, out: Path,
               show: Shower | None = None) -> None:
    from guestlib.media import open_video, transcode

    container, vs = open_video(src)
    with container:
        prog.report.codec = f"{vs.codec_context.name}->{spec.codec}"
        prog.report.total = _expected(vs.frames, spec.frames)
    prog.send(force=True)

    def tick(n: int) -> None:
        prog.report.frames = n
        prog.send()

    got = transcode(dev, src, out, spec.codec, max_frames=spec.frames, on_frame=tick, stop=stop.is_set,
                    audio=spec.audio, problems=prog.report.extra.setdefault("problems", []),
                    on_picture=None if show is None else show.present)
    # What the output could not keep (bit depth, chroma, interlacing): in the codec column too.
    prog.report.extra.update(pix_fmt=got["pix_fmt"], conversions=got["conversions"])
    if got["conversions"]:
        prog.report.codec += f" ({'; '.join(got['conversions'])})"
    if stop.is_set():
        prog.report.state = "stopped"


def _play(dev: Any, spec: VmSpec, prog: _Progress, stop: StopFlag, src: Path) -> None:
    def tick(n: int) -> None:
        prog.report.frames = n
        prog.send()

    got = play(dev, str(src), limit=spec.frames, stop=stop.is_set, on_frame=tick,
               problems=prog.report.extra.setdefault("problems", []), fps=spec.fps)
    prog.report.extra.update(presented=got.get("presented", 0), dropped=got.get("dropped", 0))


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (the parent may already be gone)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's stop and kill still apply
    # The parent may have died before prctl: then this process was re-parented already.
    if os.getppid() != parent_pid:
        os._exit(1)


def _failure(e: BaseException) -> str:
    from guestlib.device import DeviceError, DeviceGone
    from guestlib.media import MediaError

    if isinstance(e, MediaError):
        return str(e)
    if isinstance(e, DeviceGone):
        return f"the device is gone: {e}"
    if isinstance(e, DeviceError):
        return f"device error {e.code.name}: {e}"
    return f"{type(e).__name__}: {e}"


def _expected_failure(e: BaseException) -> bool:
    from guestlib.device import AttachError, DeviceError
    from guestlib.media import MediaError

    return isinstance(e, MediaError | DeviceError | AttachError | OSError)


def run_vm(spec: VmSpec, conn: Connection, parent_pid: int) -> None:
    """Process entry point of one fake VM (started with SIGINT and SIGTERM blocked)."""
    _die_with_parent(parent_pid)
    stop = StopFlag()
    device: list[Any] = []  # the attached Device, for the handlers

    def clean_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.requested = True
        for dev in device:
            dev.reattach_window_s = 0.0

    def hard_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.requested = stop.hard = True
        for dev in device:
            dev.give_up("the VM was stopped (SIGTERM)")

    signal.signal(signal.SIGINT, clean_stop)
    signal.signal(signal.SIGTERM, hard_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    import guestlib
    from guestlib.device import DeviceGone

    report = VmReport(spec.name, spec.workload, codec_label(spec), total=_planned(spec))
    prog = _Progress(conn, report)
    outdir = Path(spec.output)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with guestlib.attach(spec.socket, name=spec.name, region_size=spec.region_size) as dev:
            device.append(dev)
            if stop.hard:
                dev.give_up("the VM was stopped (SIGTERM)")
            elif stop.requested:
                dev.reattach_window_s = 0.0
            report.state = "running"
            prog.send(force=True)
            if spec.workload == "decode":
                out = outdir / f"{spec.name}.y4m"
            elif spec.workload == "play":
                out = outdir / f"{spec.name}.screen"  # nothing is written: the output is the screen
            else:
                out = outdir / f"{spec.name}{EXTENSION.get(spec.codec, '.mkv')}"
            report.output = "" if spec.workload == "play" else str(out)
            show = Shower(dev) if spec.display and spec.workload != "play" else None
            if spec.workload == "encode":
                _encode(dev, spec, prog, stop, out, show)
            else:
                with tempfile.TemporaryDirectory(prefix=f"vmediad-{spec.name}-") as tmp:
                    if spec.input:
                        src = Path(spec.input)
                    else:
                        src = Path(tmp) / f"pattern{EXTENSION.get(_pattern_codec(spec), '.mkv')}"
                        _pattern_clip(dev, spec, stop, src)
                    if spec.workload == "decode":
                        _decode(dev, spec, prog, stop, src, out, show)
                    elif spec.workload == "play":
                        _play(dev, spec, prog, stop, src)
                    else:
                        _transcode(dev, spec, prog, stop, src, out, show)
            if show is not None:
                show.close()
            stats = dev.statistics()
            report.extra.update(vm=stats["vm"], wakeups=stats["wakeups"])
        if stop.is_set():
            report.state = "stopped"
        elif report.state == "running":
            report.state = "done"
        problems = report.extra.get("problems") or []
        if problems:
            report.errors += len(problems)
            report.detail = problems[0] if len(problems) == 1 else f"{problems[0]} (+{len(problems) - 1} more)"
    except Exception as e:
        if stop.is_set() and isinstance(e, DeviceGone):
            report.state = "stopped"
        else:
            report.state = "failed"
            report.errors += 1
            report.detail = _failure(e)
            if not _expected_failure(e):  # a bug: the demo shows where
                report.extra["traceback"] = traceback.format_exc(limit=5)
    finally:
        prog.send(force=True)
        conn.close()


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """A child starts with SIGINT/SIGTERM blocked (the mask survives fork and exec); run_vm
    unblocks them once its handlers are in place, so none is lost and none kills it half
    started.  In the parent they are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Fleet:
    """The VM processes and their progress pipes.

    Start it from the main thread: PR_SET_PDEATHSIG fires when the thread that forked a
    VM exits, not only when the process does.
    """

    def __init__(self, specs: list[VmSpec]) -> None:
        self.specs = specs
        self.reports: dict[str, VmReport] = {s.name: VmReport(s.name, s.workload, codec_label(s), total=_planned(s))
                                             for s in specs}
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Connection] = {}  # open until the VM's end of the pipe closes
        self.stopping = False  # a VM that dies without a final report was stopped, not failed

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        for spec in self.specs:
            receiver, sender = ctx.Pipe(duplex=False)
            p = ctx.Process(target=run_vm, args=(spec, sender, os.getpid()), name=f"fakevm-{spec.name}",
                            daemon=False)
            with _stop_signals_blocked():
                p.start()
            sender.close()  # the VM holds the only writer: its exit is EOF here
            self.procs[spec.name] = p
            self.conns[spec.name] = receiver

    def finished(self) -> bool:
        return not self.conns and all(p.exitcode is not None for p in self.procs.values())

    def poll(self, timeout: float) -> list[VmReport]:
        """Reports that changed within ``timeout`` seconds."""
        by_conn = {id(c): name for name, c in self.conns.items()}
        waiting: list[Any] = list(self.conns.values())
        exiting = [p.sentinel for name, p in self.procs.items() if name not in self.conns and p.exitcode is None]
        changed: list[VmReport] = []
        for ready in wait(waiting + exiting, timeout):
            name = by_conn.get(id(ready))
            if name is None:
                continue  # a sentinel: exitcode is read below
            conn = self.conns[name]
            try:
                while conn.poll():
                    r = VmReport(**conn.recv())
                    self.reports[name] = r
                    changed.append(r)
            except (EOFError, OSError):
                conn.close()
                del self.conns[name]
        for name, p in self.procs.items():
            r = self.reports[name]
            if name not in self.conns and p.exitcode is not None and r.state not in FINAL_STATES:
                r.detail = (f"process killed by signal {-p.exitcode}" if p.exitcode < 0
                            else f"process exited {p.exitcode}")
                if self.stopping:
                    r.state = "stopped"
                else:
                    r.state = "failed"
                    r.errors += 1
                changed.append(r)
        return changed

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every VM still running; from then on the fleet is stopping."""
        self.stopping = True
        for p in self.procs.values():
            if p.exitcode is None and p.pid is not None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def close(self, timeout: float = 5.0) -> None:
        """Reap every VM (SIGKILL after ``timeout``) and close the pipes."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(5)
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        for p in self.procs.values():
            if p.exitcode is not None:
                p.close()

    def results(self) -> list[VmReport]:
        return [self.reports[s.name] for s in self.specs]


def default_output_dir() -> Path:
    return Path(os.environ.get("VMEDIAD_OUTPUT", "vmediad-out"))
