"""The codec session core shared by ``Encoder`` and ``Decoder``: task submission, output tables, streams.

``_Session`` runs one task at a time (``_run``) or keeps ``depth`` tasks queued (``_stream``), each with
its own output buffer; ``error_text``/``raise_failed`` turn a failed task into an exception with hostd's
reason.  This module imports ``guestlib.device`` only for type checking: ``device`` imports the codec.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from guestlib.frames import DEFAULT_OUT
from guestlib.heap import OutOfMemory
from vmediad import abi
from vmediad.abi import ErrorCode, FrameEntry, MultiEntry, Op, OutHeader, PacketEntry

if TYPE_CHECKING:
    from guestlib.device import Buffer, Completion, Device, Task

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
    part: bool = False  # a drain that may return part of the output (see _Session._run)


_Entry = TypeVar("_Entry", PacketEntry, FrameEntry)


class _Session:
    # Whether this session's drains (DRAIN_PENDING) return the longest prefix of the queued
    # output that fits their dst (decoders) or all of it or NO_SPACE (encoders).
    _drains_in_parts = False

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
        self.partial_drains = 0  # drain tasks that returned part of the queued output (tests, stats)
        # Items of the drains before the last one of a ``_run`` (see there).
        self._parts: list[Any] = []
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

        A decoder whose output is more than the heap can give drains it in parts into
        the largest buffer it can afford (``_grow``): a drain whose last entry has
        FRAME_MORE left the rest queued, so its items are kept (``_keep_part``: out of the
        buffer the next part overwrites) in ``self._parts`` and the next drain follows.
        The caller takes the parts (``_take_parts``) before the last table's items.  If
        this raises, the parts go to the backlog: the next call returns them first.
        """
        if self.closed:
            raise ValueError("session is closed")
        dev = self.device
        dst = (self._out.offset, self._out.size)
        drain_op, drain_flags = self._drain(op)
        parts: list[Any] = []
        partial = False  # a drain may get only a prefix: a NO_SPACE now names the first item's size
        task: Task = dev.submit(op, flags=flags, session=self.session, src=src, dst=dst, args=args)
        try:
            while True:
                c = task.completion()
                if c.error == ErrorCode.NO_SPACE and c.result_len > self._out.size:
                    self.no_space_retries += 1
                    partial = not self._grow(c.result_len, allow_part=not partial) or partial
                elif c.status != abi.Status.DONE:
                    raise_failed(dev, task, dst)  # DeviceError / SessionLost, with hostd's reason
                elif self._more(self._out.offset):
                    parts.extend(self._keep_part(self._items_at(self._out.offset)))
                    self.partial_drains += 1
                else:
                    self._parts = parts
                    return c.result, c.result_len
                dst = (self._out.offset, self._out.size)
                task = dev.submit(drain_op, flags=drain_flags, session=self.session, dst=dst)
        except BaseException:
            if parts:
                self._backlog.extend(self._private(parts))
            raise

    def _grow(self, need: int, allow_part: bool) -> bool:
        """Make the output buffer take ``need`` bytes (True), or as much as the heap
        affords (False: see ``_bigger``)."""
        self._out, fits = self._bigger(self._out, need, max(need, 2 * self._out.size), allow_part)
        return fits

    def _bigger(self, buf: Buffer, need: int, want: int, allow_part: bool) -> tuple[Buffer, bool]:
        """A buffer for output of ``need`` bytes in place of ``buf``: one of ``want`` or
        ``need`` bytes, and True.  If the heap cannot give that and ``allow_part`` (a
        session whose drains return what fits), the largest it can afford instead,
        leaving half of what is free to the rest of the guest (``buf`` itself if that is
        no larger), and False.  Otherwise OutOfMemory.  ``buf`` is freed only once the
        new one is allocated, so it is valid whatever this raises."""
        dev = self.device
        error: OutOfMemory | None = None
        for size in dict.fromkeys((want, need)):
            try:
                new = dev.alloc(size)
            except OutOfMemory as e:
                error = e
                continue
            dev.free(buf)
            return new, True
        if not (allow_part and self._drains_in_parts):
            raise OutOfMemory(f"the output needs a {need}-byte buffer: {error}") from error
        size = min(need - 1, (dev.heap.available() + buf.size) // 2) // abi.PAGE_SIZE * abi.PAGE_SIZE
        while size > buf.size:
            try:
                new = dev.alloc(size)
            except OutOfMemory:
                size = size // 2 // abi.PAGE_SIZE * abi.PAGE_SIZE
                continue
            dev.free(buf)
            return new, False
        return buf, False

    def _more(self, base: int) -> bool:
        """Whether the table at ``base`` was cut short (more output is queued)."""
        return False

    def _keep_part(self, items: list[Any]) -> list[Any]:
        """``items`` of one part of a drain, kept past the next part's write to the buffer."""
        return self._private(items)

    def _take_parts(self) -> list[Any]:
        parts, self._parts = self._parts, []
        return parts

    @staticmethod
    def _drain(op: Op) -> tuple[Op, int]:
        """The op and flags of the input-less task that collects what ``op`` left queued."""
        return _Session._drain_op(op), _Session._drain_flags(op)

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
                        try:
                            bigger = dev.alloc(self._stream_size)
                        except OutOfMemory:
                            if spec.part:  # a drain takes what fits in the buffer it has
                                continue
                            raise
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
                    need = c.result_len
                    self.no_space_retries += 1
                    if not self._drains_in_parts:
                        self._stream_size = max(self._stream_size, need + (need >> 2))
                        submit([(_Spec(drain, self._drain_flags(drain)), buf)])
                        continue
                    # A drain that was already cut short ended NO_SPACE because the first
                    # item does not fit: the buffer must take that much, or the stream fails.
                    try:
                        buf, fits = self._bigger(buf, need, need + (need >> 2), allow_part=not spec.part)
                    except BaseException:
                        spare.append(buf)
                        raise
                    if fits:
                        self._stream_size = max(self._stream_size, buf.size)
                    submit([(_Spec(drain, self._drain_flags(drain), part=not fits or spec.part), buf)])
                    continue
                if c.status != abi.Status.DONE:
                    spare.append(buf)
                    raise_failed(dev, task, (buf.offset, buf.size))
                items = self._items_at(buf.offset)
                try:
                    if self._more(buf.offset):
                        # A drain cut short: one more collects the rest, behind the tasks in
                        # flight (each of which returns what is queued first, too).
                        self.partial_drains += 1
                        submit([(_Spec(drain, self._drain_flags(drain), part=True),
                                 spare.pop() if spare else dev.alloc(self._stream_size))])
                    self._size_ahead(batch, depth, held=depth + 1)
                    if len(inflight) <= depth - group:
                        top_up()  # the device works on the next tasks while the caller consumes these
                except BaseException:
                    # No buffer for the next task (OutOfMemory) or the device went: these
                    # items are kept for the next call, and their buffer goes back.
                    self._backlog.extend(self._private(items))
                    spare.append(buf)
                    raise
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
                        self._backlog.extend(self._private(self._take_parts() + self._items_at(self._out.offset)))
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




def _returner(free: list[Buffer], buf: Buffer) -> Callable[[], None]:
    def give_back() -> None:
        free.append(buf)
    return give_back
