"""Codec sessions through the device: ``Device.encoder()`` / ``Device.decoder()``.

Frames and bitstreams live in the guest's region and move by offset (design D2, docs/architecture.md):
``Encoder.new_frame()`` hands out planes that are numpy views of region memory,
and decoded ``Frame.planes`` are views of region memory too.  A decoder given the
picture size (``width=``, ``height=``) gets a frame pool (``abi.POOL_HEADER``): the
codec allocates its pictures there and writes them itself, so nothing is copied,
and such frames are read-only (the decoder may still predict from them).  Without
a pool, frames are copied once into the task's output buffer.  Either way a
decoded frame's planes stay valid until the next ``decode()``/``flush()`` call on
the same decoder, or until a stream advances past it (``Frame.copy()`` keeps one,
``Frame.release()`` gives a pooled one back early).

``encode()``/``decode()`` run one task at a time.  ``encode_stream()`` and
``decode_stream()`` keep ``depth`` tasks queued on the session (each with its
own output buffer), so the device starts the next frame as soon as one ends
instead of waiting for the guest's round trip: use them for throughput.  They
wait and submit ``depth // 2`` tasks at a time: at depth 8 the guest sleeps
and rings the doorbell once per 4 tasks.  ``batch=k`` puts k frames or chunks in
one task (``vmediad bench codec`` streams encode at depth 4 x batch 8, decode at 3 x 12).

Output tables are read, and MULTI lists and the frame pool header written, through the ABI's
records (``abi.OutHeader``, ``PacketEntry``, ``FrameEntry``, ``MultiEntry``, ``FramePoolHeader``).
This module imports ``guestlib.device`` only for type checking: ``device`` imports it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import numpy as np
import numpy.typing as npt

from vmediad import abi
from vmediad.abi import ErrorCode, FrameEntry, FramePoolHeader, MultiEntry, Op, OutHeader, PacketEntry, PixFmt
from vmediad.errors import ClientError

if TYPE_CHECKING:
    from guestlib.device import Buffer, Completion, Device, Task

CODECS = {name: c for c, name in abi.CODEC_NAMES.items()}
CODECS.update({"h265": abi.Codec.HEVC, "avc": abi.Codec.H264, "libx264": abi.Codec.H264,
               "libx265": abi.Codec.HEVC, "libvpx-vp9": abi.Codec.VP9, "libdav1d": abi.Codec.AV1,
               "libaom-av1": abi.Codec.AV1, "libsvtav1": abi.Codec.AV1, "libvpx": abi.Codec.VP8,
               "libvpx-vp8": abi.Codec.VP8})
PIX_FMTS = {name: f for f, name in abi.PIX_FMT_NAMES.items()}
DEFAULT_OUT = 1 << 20
DEFAULT_POOL_FRAMES = 48  # a decoder's references and threads, plus a 4 x 6 stream's frames in flight
MIN_POOL_FRAMES = 8
Chunk = Any  # Buffer | bytes-like | Packet | (data, pts) | object with .pts and the buffer protocol


def codec_id(name: str | abi.Codec) -> abi.Codec:
    if isinstance(name, abi.Codec):
        return name
    try:
        return CODECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(abi.CODEC_NAMES.values()))}") from None


def pix_fmt_id(name: str | PixFmt) -> PixFmt:
    if isinstance(name, PixFmt):
        return name
    try:
        return PIX_FMTS[name]
    except KeyError:
        raise ValueError(f"unknown pix_fmt {name!r}; known: {', '.join(PIX_FMTS)}") from None


@dataclass(frozen=True, slots=True)
class Packet:
    data: bytes
    pts: int | None
    dts: int | None
    is_keyframe: bool


def _plane_views(mem: memoryview, fmt: PixFmt, width: int, height: int, base: int,
                 offsets: Iterable[int], strides: Iterable[int]) -> list[npt.NDArray[np.uint8]]:
    views = []
    for (rows, row_bytes), off, stride in zip(abi.plane_shapes(fmt, width, height), offsets, strides, strict=False):
        a = np.ndarray((rows, row_bytes), np.uint8, buffer=mem, offset=base + off, strides=(stride, 1))
        if fmt in (PixFmt.RGB24, PixFmt.BGRA):
            a = a.reshape(rows, width, row_bytes // width)
        views.append(a)
    return views


Planes = list[npt.NDArray[np.uint8]]


class Frame:
    """A picture in region memory: ``planes`` are numpy views (rows x row bytes per plane)."""

    def __init__(self, width: int, height: int, fmt: PixFmt, pts: int | None,
                 planes: Planes | Callable[[], Planes],
                 *, offset: int = -1, strides: tuple[int, ...] = (), nbytes: int = 0,
                 buffer: Buffer | None = None, release: Callable[[], None] | None = None) -> None:
        """``planes``: the views, or a function that makes them on first access (a decoder's
        pooled frames: most are passed on or counted, never looked at)."""
        self.width = width
        self.height = height
        self.pix_fmt = fmt
        self.pts = pts
        self._planes = planes
        self.offset = offset  # region offset of plane 0 when planes are packed back to back
        self.strides = strides
        self.nbytes = nbytes
        self._buffer = buffer
        self._release = release

    @property
    def planes(self) -> Planes:
        planes = self._planes
        if callable(planes):
            planes = self._planes = planes()
        return planes

    @planes.setter
    def planes(self, planes: Planes) -> None:
        self._planes = planes

    @property
    def format(self) -> str:
        return abi.PIX_FMT_NAMES[self.pix_fmt]

    @property
    def pooled(self) -> bool:
        """The decoder wrote this frame straight into the session's frame pool (read-only
        planes, lent until released)."""
        return self._release is not None

    def release(self) -> None:
        """Give a pooled frame's slot back to the decoder now instead of at the next call
        (its planes must not be read afterwards).  A no-op for other frames."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def copy(self) -> Frame:
        return Frame(self.width, self.height, self.pix_fmt, self.pts, [p.copy() for p in self.planes])

    def to_ndarray(self) -> npt.NDArray[np.uint8]:
        """All planes stacked as FFmpeg lays out an unpadded frame (yuv420p: (h*3/2, w) for even sizes)."""
        return np.concatenate([p.reshape(-1) for p in self.planes])

    def __repr__(self) -> str:
        return f"Frame({self.width}x{self.height} {self.format} pts={self.pts})"


def error_text(dev: Device, c: Completion, dst: tuple[int, int]) -> str | None:
    """The reason a failed codec task left at its dst (abi.ERROR_RECORD), if it left one."""
    if c.status != abi.Status.ERROR or c.error == ErrorCode.NO_SPACE or c.result_len < OutHeader.SIZE:
        return None
    off, size = dst
    if not size or c.result_len > size:
        return None
    return abi.unpack_error_record(dev.region.mem[off : off + c.result_len], c.error)


def raise_failed(dev: Device, task: Task, dst: tuple[int, int]) -> NoReturn:
    """Raise the error of ``task`` (completed, failed), with the reason hostd gave in the text."""
    c = task.completion()
    text = error_text(dev, c, dst)
    try:
        task.wait()
    except Exception as e:
        if text and e.args:
            e.args = (f"{e.args[0]}: {text}", *e.args[1:])
        raise
    raise AssertionError(f"task {task.slot} did not fail")  # pragma: no cover - callers check first


@dataclass(slots=True)
class _Spec:
    """One task of a stream: what to submit and what to release when it has run."""

    op: Op
    flags: int = 0
    src: tuple[int, int] = (0, 0)
    args: tuple[int, int, int, int] = (0, 0, 0, 0)
    done: Callable[[], None] | None = None


_Entry = TypeVar("_Entry", PacketEntry, FrameEntry)


class _Session:
    def _table(self, base: int, kind: int, entry: type[_Entry]) -> list[_Entry]:
        """The entries of the output table at ``base`` (written by the device, checked for its kind)."""
        mem = self.device.region.mem
        head = OutHeader.unpack_from(mem, base)
        if head.kind != kind:
            raise ValueError(f"unexpected output table kind {head.kind}")
        first, size = base + OutHeader.SIZE, entry.SIZE
        return [entry.unpack_from(mem, first + i * size) for i in range(head.count)]

    def _region_block(self, data: object) -> tuple[int, int] | None:
        """(offset, size) of ``data`` if it is a block of this device's heap (a
        ``guestlib.device.Buffer``, known by its owner), else None: bytes-like data."""
        if getattr(data, "device", None) is not self.device:
            return None
        block = cast("Buffer", data)
        return block.offset, block.size

    def __init__(self, dev: Device, cfg: abi.SessionConfig, pool: Buffer | None = None) -> None:
        self.device = dev
        self.config = cfg
        self._out: Buffer = dev.alloc(DEFAULT_OUT)
        blob = dev.put(cfg.pack())
        # Without a pool, dst is only where a failure's reason goes (abi.ERROR_RECORD).
        record = None
        if pool is None and dev.region.load64(abi.REG_CAPS) & abi.Caps.ERROR_TEXT:
            record = dev.alloc(abi.ERROR_RECORD_SIZE)
        dst = (pool.offset, pool.size) if pool is not None else (
            (record.offset, record.size) if record is not None else (0, 0))
        try:
            task = dev.submit(Op.SESSION_OPEN, src=(blob.offset, len(cfg.pack())), dst=dst)
            c = task.completion()
            if c.status != abi.Status.DONE:
                raise_failed(dev, task, dst)
        except BaseException:
            dev.free(self._out)
            raise
        finally:
            dev.free(blob)
            if record is not None:
                dev.free(record)
        self.session: int = c.result
        self.closed = False
        self.no_space_retries = 0  # times an output buffer had to grow (tests, stats)
        # Output a stream had already received when it stopped (error, early close):
        # private copies, handed out first by the next call.
        self._backlog: list[Any] = []
        self._stream_size = DEFAULT_OUT  # output buffer size for streams; grows on NO_SPACE

    def _items_at(self, base: int) -> list[Any]:
        raise NotImplementedError

    def _private(self, items: list[Any]) -> list[Any]:
        """Copies of ``items`` the caller may keep (the originals are given back)."""
        return items

    def _given(self, item: Any) -> None:
        """A stream's consumer has advanced past ``item``."""

    def _stopped_at(self, item: Any) -> None:
        """A stream was closed while its consumer held ``item``: valid until the next call."""

    def _task_output(self, batch: int) -> int:
        """Bytes a stream task of ``batch`` inputs is expected to emit (0: unknown)."""
        return 0

    def _size_ahead(self, batch: int, depth: int, held: int) -> None:
        """Grow the stream buffer size to what a task is expected to emit, so a stream does
        not start with a NO_SPACE (a wasted round trip and a drain task) per task in flight.

        Only as far as the heap allows ``depth + 1`` buffers (``held`` of them allocated
        now) with room to spare: a hint larger than the region must not fail the stream.
        A task emitting more still ends in NO_SPACE, and the size grows then."""
        want = self._task_output(batch)
        if want <= self._stream_size:
            return
        total = self.device.heap.available() + held * self._stream_size
        self._stream_size = max(self._stream_size, min(want, total // (depth + 2)))

    def _take_backlog(self) -> list[Any]:
        items, self._backlog = self._backlog, []
        return items

    def _run(self, op: Op, *, flags: int = 0, src: tuple[int, int] = (0, 0),
             args: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[int, int]:
        """Submit and wait; on NO_SPACE grow the output buffer and collect what hostd kept.

        NO_SPACE means the input was consumed and every output item stayed queued in
        the session; ``result_len`` is the exact size that takes all of it.  The retry
        carries no input: ENCODE_FRAME/DECODE with DRAIN_PENDING, or FLUSH again.
        """
        if self.closed:
            raise ValueError("session is closed")
        dev = self.device
        dst = (self._out.offset, self._out.size)
        task: Task = dev.submit(op, flags=flags, session=self.session, src=src, dst=dst, args=args)
        while True:
            c = task.completion()
            if c.error == ErrorCode.NO_SPACE and c.result_len > self._out.size:
                dev.free(self._out)
                self._out = dev.alloc(max(c.result_len, 2 * self._out.size))
                self.no_space_retries += 1
                dst = (self._out.offset, self._out.size)
                task = dev.submit(self._drain_op(op), flags=self._drain_flags(op), session=self.session, dst=dst)
                continue
            if c.status != abi.Status.DONE:
                raise_failed(dev, task, dst)  # DeviceError / SessionLost, with hostd's reason
            return c.result, c.result_len

    @staticmethod
    def _drain_op(op: Op) -> Op:
        return op if op in (Op.ENCODE_FRAME, Op.DECODE, Op.FLUSH) else Op.FLUSH

    @staticmethod
    def _drain_flags(op: Op) -> int:
        return abi.F_DRAIN_PENDING if op in (Op.ENCODE_FRAME, Op.DECODE) else 0

    def _batched(self, specs: Iterable[_Spec], batch: int, pool: list[Buffer],
                 held: list[_Spec]) -> Generator[_Spec, None, None]:
        """Merge runs of up to ``batch`` inputs into MULTI tasks (one descriptor, one list).

        Inputs are merged only while they share what the descriptor holds for all of
        them (op, PARSE, strides); a FLUSH or a change ends the run.  Whenever this
        generator is suspended, ``held`` lists the inputs it took from ``specs`` and
        has not yielded yet, so a stream that stops early can still run them.  The
        list lives in a small region buffer that goes back to ``pool`` when its task
        has run (the caller frees the pool once nothing is in flight)."""
        dev = self.device
        if batch <= 1 or not dev.region.load64(abi.REG_CAPS) & abi.Caps.MULTI:
            yield from specs
            return
        batch = min(batch, abi.MULTI_MAX)

        def mergeable(spec: _Spec) -> bool:
            return spec.op in (Op.ENCODE_FRAME, Op.DECODE) and not spec.flags & abi.F_DRAIN_PENDING

        def key(spec: _Spec) -> tuple[int, ...]:
            return (spec.op, spec.flags & abi.F_PARSE, spec.args[1], spec.args[2])

        def merge() -> _Spec:
            run, held[:] = held[:], []
            if len(run) == 1:
                return run[0]
            buf = pool.pop() if pool else dev.alloc(abi.MULTI_MAX * MultiEntry.SIZE)
            for i, sp in enumerate(run):
                MultiEntry(offset=sp.src[0], length=sp.src[1], pts=abi.as_i64(sp.args[0]),
                           flags=sp.flags & abi.MULTI_ENTRY_FLAGS).pack_into(buf.mem, i * MultiEntry.SIZE)

            def done() -> None:
                pool.append(buf)
                for sp in run:
                    if sp.done is not None:
                        sp.done()
            first = run[0]
            return _Spec(first.op, abi.F_MULTI | (first.flags & abi.F_PARSE),
                         (buf.offset, len(run) * MultiEntry.SIZE), (0, first.args[1], first.args[2], 0), done)

        for spec in specs:
            if not mergeable(spec):
                if held:
                    m = merge()
                    held.append(spec)
                    yield m
                    held.remove(spec)
                yield spec
            elif held and key(held[0]) != key(spec):
                m = merge()
                held.append(spec)  # the first input of the next run
                yield m
            else:
                held.append(spec)
                if len(held) == batch:
                    yield merge()
        if held:
            yield merge()

    def _stream(self, specs: Iterable[_Spec], depth: int, drain: Op, batch: int = 1) -> Iterator[Any]:
        """Run ``specs`` with up to ``depth`` tasks in flight; yield their output in order.

        Tasks of one session run in submission order and each emits whatever the
        session has queued, oldest first, so reading completions in submission order
        yields the stream in order.  A task that ends with NO_SPACE left its output
        queued: its buffer grows and one more (input-less) ``drain`` task collects
        it, behind the tasks already in flight.  Items from one task's buffer stay
        valid until the iterator is advanced past them.

        Completions are awaited, and tasks submitted, in groups of ``depth // 2``:
        the thread sleeps once per group (on its last task: the session's tasks end
        in order) and rings the doorbell once per group, so between ``depth - group``
        and ``depth`` tasks stay queued.  Each sleep and each doorbell is a context
        switch on the device's CPUs.
        """
        if self.closed:
            raise ValueError("session is closed")
        if depth < 1:
            raise ValueError("depth must be at least 1")
        dev = self.device
        group = max(1, depth // 2)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._size_ahead(batch, depth, held=0)
        spare: list[Buffer] = [dev.alloc(self._stream_size) for _ in range(depth + 1)]
        inflight: deque[tuple[Task, Buffer, _Spec]] = deque()
        lists: list[Buffer] = []  # MULTI lists not in flight
        held: list[_Spec] = []  # inputs taken from ``specs`` for a MULTI task not submitted yet
        todo = self._batched(specs, batch, lists, held)
        exhausted = False

        def submit(pairs: list[tuple[_Spec, Buffer]]) -> None:
            try:
                for i, (spec, buf) in enumerate(pairs):
                    if buf.size < self._stream_size:  # another buffer of this stream needed more
                        bigger = dev.alloc(self._stream_size)
                        dev.free(buf)
                        pairs[i] = (spec, bigger)
                tasks = dev.submit_many([
                    abi.Descriptor(0, int(spec.op), spec.flags, self.session, spec.src[0], spec.src[1],
                                   buf.offset, buf.size, *spec.args) for spec, buf in pairs])
            except BaseException:
                for spec, buf in pairs:
                    spare.append(buf)
                    if spec.done is not None:
                        spec.done()
                raise
            inflight.extend((task, buf, spec) for task, (spec, buf) in zip(tasks, pairs, strict=True))

        def top_up() -> None:
            nonlocal exhausted
            pairs: list[tuple[_Spec, Buffer]] = []
            while not exhausted and len(inflight) + len(pairs) < depth and spare:
                spec = next(todo, None)
                if spec is None:
                    exhausted = True
                    break
                pairs.append((spec, spare.pop()))
            if pairs:
                submit(pairs)

        try:
            top_up()
            while inflight:
                last = min(len(inflight), group) - 1
                if last and not inflight[0][0].done():
                    inflight[last][0].completion()  # one sleep for the group
                task, buf, spec = inflight.popleft()
                c = task.completion()
                if spec.done is not None:
                    spec.done()  # the device has read the input: the guest may reuse it
                if c.error == ErrorCode.NO_SPACE and c.result_len > buf.size:
                    self._stream_size = max(self._stream_size, c.result_len + (c.result_len >> 2))
                    self.no_space_retries += 1
                    submit([(_Spec(drain, self._drain_flags(drain)), buf)])
                    continue
                if c.status != abi.Status.DONE:
                    spare.append(buf)
                    raise_failed(dev, task, (buf.offset, buf.size))
                items = self._items_at(buf.offset)
                self._size_ahead(batch, depth, held=depth + 1)
                if len(inflight) <= depth - group:
                    top_up()  # the device works on the next tasks while the caller consumes these
                given = 0
                try:
                    for item in items:
                        yield item
                        self._given(item)
                        given += 1
                except GeneratorExit:
                    self._stopped_at(items[given])
                    self._backlog.extend(self._private(items[given + 1:]))
                    raise
                finally:
                    spare.append(buf)
        finally:
            # Stopped early (an error, or the caller closed the iterator): finish what is
            # in flight and keep its output for the next call instead of losing it.
            while inflight:
                task, buf, spec = inflight.popleft()
                try:
                    c = task.completion()
                    if c.status == abi.Status.DONE:
                        self._backlog.extend(self._private(self._items_at(buf.offset)))
                except Exception:
                    pass  # the device is gone: nothing to keep
                finally:
                    if spec.done is not None:
                        spec.done()
                    spare.append(buf)
            todo.close()
            # Inputs gathered for a MULTI task that was never submitted were taken from the
            # caller's iterator: run them one by one and keep their output too.  (A held
            # FLUSH is dropped, as it would have been had it not been taken yet.)
            for spec in held:
                try:
                    if spec.op != Op.FLUSH:
                        self._run(spec.op, flags=spec.flags, src=spec.src, args=spec.args)
                        self._backlog.extend(self._private(self._items_at(self._out.offset)))
                except Exception:
                    pass  # a bad input or a gone device: the caller already has the error
                finally:
                    if spec.done is not None:
                        spec.done()
            held.clear()
            for b in spare + lists:
                dev.free(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.device.submit(Op.SESSION_CLOSE, session=self.session).wait()
        except Exception:
            pass  # a lost session or a gone device has nothing left to close
        self.closed = True
        self.device.free(self._out)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encoder_config(codec: str | abi.Codec = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                   bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                   pix_fmt: str | PixFmt = "yuv420p", *, qp: int | None = None, bframes: bool = False,
                   preset: str = "", profile: str = "", threads: int = 0, time_base: Fraction | None = None,
                   **options: Any) -> abi.SessionConfig:
    """The SessionConfig ``Encoder`` opens with these arguments (also the benchmark floor's)."""
    rate = Fraction(fps).limit_denominator(1001)
    tb = time_base or 1 / rate
    if bitrate is not None:
        rc, rv = abi.RateControl.BITRATE, int(bitrate)
    elif crf is not None:
        rc, rv = abi.RateControl.CRF, int(crf)
    elif qp is not None:
        rc, rv = abi.RateControl.QP, int(qp)
    else:
        rc, rv = abi.RateControl.DEFAULT, 0
    return abi.SessionConfig(
        direction=abi.Direction.ENCODE, codec=codec_id(codec), width=width, height=height,
        pix_fmt=pix_fmt_id(pix_fmt), tb_num=tb.numerator, tb_den=tb.denominator, fps_num=rate.numerator,
        fps_den=rate.denominator, rc_mode=rc, rc_value=rv, gop=gop or 0, bframes=1 if bframes else 0,
        threads=threads, preset=preset, profile=profile, options=tuple((k, str(v)) for k, v in options.items()),
    )


def decoder_config(codec: str | abi.Codec = "h264", *, pix_fmt: str | PixFmt = "yuv420p", threads: int = 0,
                   **options: Any) -> abi.SessionConfig:
    """The SessionConfig ``Decoder`` opens with these arguments."""
    return abi.SessionConfig(direction=abi.Direction.DECODE, codec=codec_id(codec), pix_fmt=pix_fmt_id(pix_fmt),
                             threads=threads, options=tuple((k, str(v)) for k, v in options.items()))


class Encoder(_Session):
    def __init__(self, dev: Device, codec: str = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                 bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                 pix_fmt: str = "yuv420p", *, qp: int | None = None, bframes: bool = False, preset: str = "",
                 profile: str = "", threads: int = 0, time_base: Fraction | None = None, **options: Any) -> None:
        cfg = encoder_config(codec, width, height, fps, bitrate, crf, gop, pix_fmt, qp=qp, bframes=bframes,
                             preset=preset, profile=profile, threads=threads, time_base=time_base, **options)
        self.fmt = PixFmt(cfg.pix_fmt)
        self.width, self.height = width, height
        self.time_base = Fraction(cfg.tb_num, cfg.tb_den)
        self.fps = Fraction(cfg.fps_num, cfg.fps_den)
        self.frame_bytes = abi.frame_size(self.fmt, width, height)
        self._pool: list[Buffer] = []
        self._kept: dict[int, Buffer] = {}
        self._next_pts = 0
        super().__init__(dev, cfg)

    def new_frame(self, *, keep: bool = False) -> Frame:
        """A frame whose planes are writable views of region memory.

        By default ``encode()`` takes the frame back (its buffer returns to a pool
        for the next ``new_frame()``).  With ``keep=True`` the caller owns it and may
        fill and encode it again and again (a ring of input frames); ``release()``
        or ``close()`` frees it.  The encoder never keeps a reference to the frame's
        memory after ``encode()`` returns, so refilling it then is safe.
        """
        buf = self._pool.pop() if self._pool else self.device.alloc(self.frame_bytes)
        shapes = abi.plane_shapes(self.fmt, self.width, self.height)
        offs, strides, acc = [], [], 0
        for rows, row_bytes in shapes:
            offs.append(acc)
            strides.append(row_bytes)
            acc += rows * row_bytes
        planes = _plane_views(self.device.region.mem, self.fmt, self.width, self.height, buf.offset, offs, strides)
        if keep:
            self._kept[buf.offset] = buf
        return Frame(self.width, self.height, self.fmt, None, planes, offset=buf.offset, strides=tuple(strides),
                     nbytes=self.frame_bytes, buffer=None if keep else buf)

    def release(self, frame: Frame) -> None:
        """Give back a frame made with ``new_frame(keep=True)``."""
        buf = self._kept.pop(frame.offset, None)
        if buf is not None:
            frame.planes = []
            self._pool.append(buf)

    def _from_array(self, data: npt.NDArray[Any]) -> Frame:
        frame = self.new_frame()
        flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if flat.size != self.frame_bytes:
            self._pool.append(frame._buffer)  # type: ignore[arg-type]
            raise ValueError(f"array has {flat.size} bytes, a {self.width}x{self.height} "
                             f"{abi.PIX_FMT_NAMES[self.fmt]} frame has {self.frame_bytes}")
        dst = np.frombuffer(self.device.region.mem, np.uint8, self.frame_bytes, frame.offset)
        np.copyto(dst, flat)  # the one copy from private memory into the region
        return frame

    def encode(self, frame: Frame | npt.NDArray[Any], pts: int | None = None,
               force_keyframe: bool = False) -> list[Packet]:
        f = self._prepare(frame)
        if pts is None:
            pts = f.pts if f.pts is not None else self._next_pts
        self._next_pts = pts + 1
        s = (*f.strides, 0, 0, 0)[:3]
        flags = abi.F_PTS_VALID | (abi.F_FORCE_KEYFRAME if force_keyframe else 0)
        try:
            self._run(Op.ENCODE_FRAME, flags=flags, src=(f.offset, f.nbytes),
                      args=(pts & abi.U64_MAX, s[0] | s[1] << 32, s[2], 0))
        finally:
            if f._buffer is not None:
                self._pool.append(f._buffer)
                f._buffer = None
        return self._take_backlog() + self._packets()

    def flush(self) -> list[Packet]:
        self._run(Op.FLUSH)
        return self._take_backlog() + self._packets()

    def encode_stream(self, frames: Iterable[Frame | npt.NDArray[Any]], *, flush: bool = True,
                      depth: int = 2, batch: int = 1) -> Iterator[Packet]:
        """Encode ``frames`` with ``depth`` tasks queued on the device; yields packets in order.

        With ``batch`` > 1 each task carries up to that many frames (one MULTI
        descriptor; at most ``abi.MULTI_MAX``): fewer round trips per frame, at the
        cost of output arriving ``batch`` frames at a time.  A frame is handed to the
        device when its task is submitted and given back (to ``new_frame()``'s pool,
        unless made with ``keep=True``) once its task has run; a kept frame must not
        be refilled before then, so a ring of kept frames needs more than
        ``(depth + 1) * batch`` entries.  ``flush`` ends the stream (``flush()``);
        without it, output the codec holds back stays queued.
        """
        yield from self._take_backlog()
        yield from self._stream(self._encode_specs(frames, flush), depth, Op.ENCODE_FRAME, batch)

    def _encode_specs(self, frames: Iterable[Frame | npt.NDArray[Any]], flush: bool) -> Iterator[_Spec]:
        for frame in frames:
            f = self._prepare(frame)
            pts = f.pts if f.pts is not None else self._next_pts
            self._next_pts = pts + 1
            s = (*f.strides, 0, 0, 0)[:3]
            yield _Spec(Op.ENCODE_FRAME, abi.F_PTS_VALID, (f.offset, f.nbytes),
                        (pts & abi.U64_MAX, s[0] | s[1] << 32, s[2], 0), self._giver(f))
        if flush:
            yield _Spec(Op.FLUSH)

    def _giver(self, f: Frame) -> Callable[[], None] | None:
        buf = f._buffer
        if buf is None:
            return None
        f._buffer = None

        def give_back() -> None:
            self._pool.append(buf)
        return give_back

    def _prepare(self, frame: Frame | npt.NDArray[Any]) -> Frame:
        f = self._from_array(frame) if isinstance(frame, np.ndarray) else frame
        if f.pix_fmt != self.fmt or (f.width, f.height) != (self.width, self.height):
            raise ValueError(f"frame is {f.width}x{f.height} {f.format}, encoder takes "
                             f"{self.width}x{self.height} {abi.PIX_FMT_NAMES[self.fmt]}")
        if f.offset < 0:  # not packed in the region (a private copy, a pooled decoded frame)
            packed = self.new_frame()
            for dst, src in zip(packed.planes, f.planes, strict=True):
                np.copyto(dst, src)  # the one copy, plane by plane
            f = packed
        return f

    def _items_at(self, base: int) -> list[Any]:
        return self._packets(base)

    def _task_output(self, batch: int) -> int:
        # Encoders hold frames back (lookahead, B-frames, frame threads) and then emit a
        # burst with the first keyframe: x264 at 1080p emits 1.2-1.9 MB at once.  One raw
        # frame covers that burst in practice; larger output still ends in NO_SPACE.
        return self.frame_bytes

    def _packets(self, base: int | None = None) -> list[Packet]:
        mem = self.device.region.mem
        base = self._out.offset if base is None else base
        out = []
        for e in self._table(base, abi.OUT_PACKETS, PacketEntry):
            start = base + e.offset
            out.append(Packet(bytes(mem[start : start + e.size]), None if e.pts == abi.NO_PTS else e.pts,
                              None if e.dts == abi.NO_PTS else e.dts, bool(e.flags & abi.PACKET_KEY)))
        return out

    def close(self) -> None:
        if not self.closed:
            for b in [*self._pool, *self._kept.values()]:
                self.device.free(b)
            self._pool.clear()
            self._kept.clear()
        super().close()


def pool_slot_bytes(width: int, height: int) -> int:
    """A generous estimate of one frame pool slot for a 4:2:0 picture: the decoder pads
    the picture (codec alignment, 64-byte strides, edge rows) before laying slots out."""
    return abi.align((abi.align(width, 64) + 64) * (abi.align(height, 64) + 8) * 3 // 2 + 3 * 192, abi.PAGE_SIZE)


class Decoder(_Session):
    def __init__(self, dev: Device, codec: str = "h264", *, pix_fmt: str = "yuv420p", threads: int = 0,
                 parse: bool = True, width: int = 0, height: int = 0, pool_frames: int | None = None,
                 **options: Any) -> None:
        """``width``/``height`` (optional) are the expected picture size, e.g. from a
        container: ``decode_stream()`` sizes its output buffers from them until it has
        seen a frame.  The stream's own geometry is what the device decodes.

        With a size, the session also gets a frame pool of ``pool_frames`` pictures
        (default ``DEFAULT_POOL_FRAMES``, fewer if the heap is short; 0: none): the
        decoder then writes pictures straight into it and nothing is copied.  Pooled
        frames are read-only and lent until the next call (or ``Frame.release()``);
        frames that find no free slot are copied as without a pool."""
        if width < 0 or height < 0:
            raise ValueError("width and height must not be negative")
        if pool_frames is not None and pool_frames < 0:
            raise ValueError("pool_frames must not be negative")
        if pool_frames and not (width and height):
            raise ValueError("a frame pool needs the picture size (width, height)")
        cfg = decoder_config(codec, pix_fmt=pix_fmt, threads=threads, **options)
        self.parse = parse
        # Largest decoded picture so far (bytes in the output buffer), or the hint's size.
        self._frame_bytes = abi.frame_size(pix_fmt_id(pix_fmt), width, height) if width and height else 0
        self._in: Buffer | None = None
        self._staging: list[Buffer] = []
        self._lent: list[Frame] = []  # pooled frames handed out by the last decode()/flush()
        self._geom: tuple[Any, ...] = ((),)  # see _geometry
        self._givers: dict[int, Callable[[], None]] = {}  # see _lender
        self._pool: Buffer | None = None
        pool = self._make_pool(dev, width, height, DEFAULT_POOL_FRAMES if pool_frames is None else pool_frames)
        if pool is not None:
            try:
                super().__init__(dev, dataclasses.replace(cfg, flags=cfg.flags | abi.SessionFlag.FRAME_POOL), pool)
                self._pool = pool
            except BaseException as e:
                dev.free(pool)
                # This decoder cannot use a pool (BAD_FLAGS: no direct rendering, e.g.
                # libdav1d) or the worker's libav cannot (BACKEND): decode with copies.
                # (A DeviceError, the ClientError with a ``code``.)
                if not (isinstance(e, ClientError)
                        and getattr(e, "code", None) in (ErrorCode.BAD_FLAGS, ErrorCode.BACKEND)):
                    raise
        if self._pool is None:
            super().__init__(dev, cfg)
        self.device.free(self._out)
        self._out = dev.alloc(8 << 20)

    @staticmethod
    def _make_pool(dev: Device, width: int, height: int, frames: int) -> Buffer | None:
        if not (frames and width and height) or not dev.region.load64(abi.REG_CAPS) & abi.Caps.FRAME_POOL:
            return None
        slot = pool_slot_bytes(width, height)
        # At most half the free heap: the stream's output buffers need the rest.
        frames = min(frames, abi.POOL_MAX_SLOTS, (dev.heap.available() // 2 - abi.POOL_HEADER) // slot)
        if frames < MIN_POOL_FRAMES:
            return None
        pool = dev.alloc(FramePoolHeader.SIZE + frames * slot)
        # Every slot starts with no frame lent (the heap memory may hold old bytes).
        FramePoolHeader().pack_into(pool.mem)
        return pool

    def _lender(self, slot: int) -> Callable[[], None]:
        """The give-back of pool slot ``slot`` (made once per slot and session)."""
        give = self._givers.get(slot)
        if give is not None:
            return give
        pool = self._pool
        assert pool is not None
        word = pool.offset + abi.pool_lent_word(slot)
        region = self.device.region

        def give_back() -> None:
            # Only while the pool is this session's: once close() has freed it, the word may
            # belong to another buffer.  Release ordering (a seq-cst RMW): the guest's reads
            # of the frame happen before the decoder may write the slot again.
            if self._pool is pool:
                region.fadd32(word, -1)
        self._givers[slot] = give_back
        return give_back

    @property
    def pool_size(self) -> int:
        """Bytes of the session's frame pool (0: none)."""
        return 0 if self._pool is None else self._pool.size

    def _release_lent(self) -> None:
        lent, self._lent = self._lent, []
        for f in lent:
            f.release()

    def _stage(self, data: bytes | bytearray | memoryview | Buffer) -> tuple[int, int]:
        block = self._region_block(data)
        if block is not None:
            return block
        mv = memoryview(cast("bytes | bytearray | memoryview", data)).cast("B")
        if self._in is None or self._in.size < mv.nbytes:
            if self._in is not None:
                self.device.free(self._in)
            self._in = self.device.alloc(max(mv.nbytes, 64 << 10))
        self._in.mem[: mv.nbytes] = mv  # the one copy of the bitstream into the region
        return self._in.offset, mv.nbytes

    def decode(self, data: bytes | bytearray | memoryview | Buffer, pts: int | None = None,
               parse: bool | None = None) -> list[Frame]:
        self._release_lent()
        src = self._stage(data)
        backlog = self._take_backlog()
        if src[1] == 0:
            return backlog
        parse = self.parse if parse is None else parse
        flags = (abi.F_PARSE if parse else 0) | (abi.F_PTS_VALID if pts is not None else 0)
        self._run(Op.DECODE, flags=flags, src=src, args=((pts or 0) & abi.U64_MAX, 0, 0, 0))
        return backlog + self._lend(self._frames())

    def flush(self) -> list[Frame]:
        self._release_lent()
        self._run(Op.FLUSH)
        return self._take_backlog() + self._lend(self._frames())

    def _lend(self, frames: list[Frame]) -> list[Frame]:
        self._lent.extend(f for f in frames if f.pooled)
        return frames

    def decode_stream(self, chunks: Iterable[Chunk], *, flush: bool = True, parse: bool | None = None,
                      depth: int = 2, batch: int = 1) -> Iterator[Frame]:
        """Decode ``chunks`` with ``depth`` tasks queued on the device; yields frames in order.

        A chunk is a region ``Buffer`` (used in place), bytes-like (copied into the
        region once), a guestlib ``Packet`` or any object with a ``pts`` attribute
        and the buffer protocol (``av.Packet``), or a ``(data, pts)`` tuple.  With
        ``batch`` > 1 each task carries up to that many chunks (a MULTI descriptor);
        its output buffer then holds that many frames.  A yielded frame's planes
        stay valid until the iterator is advanced past it (``Frame.copy()`` keeps
        one).  ``flush`` ends the stream (``flush()``).
        """
        self._release_lent()
        yield from self._take_backlog()
        parse = self.parse if parse is None else parse
        yield from self._stream(self._decode_specs(chunks, flush, parse), depth, Op.DECODE, batch)

    def _decode_specs(self, chunks: Iterable[Chunk], flush: bool, parse: bool) -> Iterator[_Spec]:
        dev = self.device
        free = self._staging  # staging buffers whose task has run; freed by close()
        for chunk in chunks:
            pts: int | None
            if isinstance(chunk, tuple):
                data, pts = chunk
            elif isinstance(chunk, Packet):
                data, pts = chunk.data, chunk.pts
            else:
                data, pts = chunk, getattr(chunk, "pts", None)
            done: Callable[[], None] | None = None
            block = self._region_block(data)
            if block is not None:
                src = block
            else:
                mv = memoryview(data).cast("B")
                if mv.nbytes == 0:
                    continue
                buf = free.pop() if free else None
                if buf is None or buf.size < mv.nbytes:
                    if buf is not None:
                        dev.free(buf)
                    buf = dev.alloc(max(mv.nbytes, 64 << 10))
                buf.mem[: mv.nbytes] = mv  # the one copy of the bitstream into the region
                src = (buf.offset, mv.nbytes)
                done = _returner(free, buf)
            flags = (abi.F_PARSE if parse else 0) | (abi.F_PTS_VALID if pts is not None else 0)
            yield _Spec(Op.DECODE, flags, src, ((pts or 0) & abi.U64_MAX, 0, 0, 0), done)
        if flush:
            yield _Spec(Op.FLUSH)

    def _items_at(self, base: int) -> list[Any]:
        return self._frames(base)

    def _task_output(self, batch: int) -> int:
        if not self._frame_bytes:
            return 0
        # A task emits about one frame per chunk; one more covers a decoder catching up
        # (frame threads, reordering).  Frames start HEAP_ALIGN-aligned after the table.
        # With a frame pool the pictures are decoded in place: the buffer holds the table
        # and one picture that found no free slot (more ends in NO_SPACE and grows it).
        n = batch + 1
        pictures = 1 if self._pool is not None else n
        return abi.out_table_size(abi.OUT_FRAMES, n) + pictures * abi.align(self._frame_bytes)

    def _private(self, items: list[Any]) -> list[Any]:
        copies = [f.copy() for f in items]
        for f in items:
            f.release()
        return copies

    def _given(self, item: Any) -> None:
        item.release()

    def _stopped_at(self, item: Any) -> None:
        if item.pooled:
            self._lent.append(item)

    def _frames(self, base: int | None = None) -> list[Frame]:
        base = self._out.offset if base is None else base
        entries = self._table(base, abi.OUT_FRAMES, FrameEntry)
        frames: list[Frame] = []
        try:
            for entry in entries:
                frames.append(self._frame(entry, base))
        except BaseException:
            # A malformed table: give back every slot the worker lent for it, or the
            # pool would lose them for the rest of the session.
            for f in frames:
                f.release()
            for entry in entries[len(frames):]:
                if entry.flags & abi.FRAME_POOLED and self._pool is not None and entry.slot < abi.POOL_MAX_SLOTS:
                    self._lender(entry.slot)()
            raise
        return frames

    def _geometry(self, key: tuple[int, int, int, int, int, int, int],
                  ) -> tuple[PixFmt, list[tuple[int, int]], tuple[int, ...], int, list[int]]:
        """For a table entry's (fmt, width, height, planes, strides x 3): the pixel format,
        plane shapes, strides, bytes and each plane's extent (from its first byte to past its
        last visible one).  The last one is kept: a stream's entries rarely change."""
        g = self._geom
        if g[0] != key:
            fmt, w, h, nplanes = key[:4]
            pf = PixFmt(fmt)
            shapes = abi.plane_shapes(pf, w, h)
            if nplanes != len(shapes):
                raise ValueError(f"{nplanes} planes for {abi.PIX_FMT_NAMES[pf]}")
            strides = key[4:4 + nplanes]
            g = self._geom = (key, pf, shapes, strides, sum(r * s for (r, _), s in zip(shapes, strides, strict=True)),
                              [(r - 1) * s + rb for (r, rb), s in zip(shapes, strides, strict=True)])
        return g[1], g[2], g[3], g[4], g[5]

    def _frame(self, entry: FrameEntry, base: int) -> Frame:
        mem = self.device.region.mem
        w, h, nplanes, slot, off = entry.width, entry.height, entry.nplanes, entry.slot, entry.offset
        pf, shapes, strides, nbytes, extents = self._geometry((entry.pix_fmt, w, h, nplanes, *entry.strides))
        offs = entry.plane_offsets[:nplanes]
        pts = None if entry.pts == abi.NO_PTS else entry.pts
        if entry.flags & abi.FRAME_POOLED:
            pool = self._pool
            if pool is None or slot >= abi.POOL_MAX_SLOTS:
                raise ValueError(f"pooled frame in slot {slot} without a frame pool")
            start = pool.offset + off
            lo, hi = pool.offset + FramePoolHeader.SIZE, pool.offset + pool.size
            for o, ext in zip(offs, extents, strict=True):
                if not lo <= start + o or start + o + ext > hi:
                    raise ValueError("pooled frame outside the frame pool")

            def views() -> Planes:
                planes = _plane_views(mem, pf, w, h, start, offs, strides)
                for p in planes:
                    p.flags.writeable = False  # the decoder may still predict from it
                return planes
            return Frame(w, h, pf, pts, views, strides=strides, nbytes=nbytes, release=self._lender(slot))
        planes = _plane_views(mem, pf, w, h, base + off, offs, strides)
        packed, acc = True, 0
        for (rows, _), o, s in zip(shapes, offs, strides, strict=True):
            packed, acc = packed and o == acc, acc + rows * s
        self._frame_bytes = max(self._frame_bytes, nbytes)
        return Frame(w, h, pf, pts, planes, offset=base + off if packed else -1, strides=strides, nbytes=nbytes)

    def close(self) -> None:
        if not self.closed:
            self._release_lent()
            if self._in is not None:
                self.device.free(self._in)
                self._in = None
            for b in self._staging:
                self.device.free(b)
            self._staging.clear()
        super().close()
        if self._pool is not None:  # after SESSION_CLOSE: the worker has let go of it
            self.device.free(self._pool)
            self._pool = None


def _returner(free: list[Buffer], buf: Buffer) -> Callable[[], None]:
    def give_back() -> None:
        free.append(buf)
    return give_back


def caps(dev: Device) -> dict[str, Any]:
    """What this device's FFmpeg build really offers (the CAPS op)."""
    out = dev.alloc(64 << 10)
    try:
        task = dev.submit(Op.CAPS, dst=(out.offset, out.size))
        if task.completion().status != abi.Status.DONE:
            raise_failed(dev, task, (out.offset, out.size))
        head = OutHeader.unpack_from(dev.region.mem, out.offset)
        doc: dict[str, Any] = json.loads(bytes(out.mem[OutHeader.SIZE : head.used]).rstrip(b"\0"))
        return doc
    finally:
        dev.free(out)
