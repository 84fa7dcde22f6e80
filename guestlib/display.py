"""A display output on the shared screen: framebuffers in the region, committed as page flips.

``dev.display(width, height, fmt="bgra", buffers=2)`` opens an output; hostd lays its buffers out
in an arena of this guest's heap, so their planes are numpy views of the very bytes the
compositor scales.  The guest draws into ``back()`` in place and ``commit()``s it: a commit hands
the buffer to hostd, never blocks, and its task completes with the flip record (DRM's page-flip
event) once the compositor latched it (PRESENTED) or a newer commit replaced it (DROPPED).

Which buffers the guest may write (vmediad.abi, "Ownership of a buffer"): those it holds.  A
commit's own flip gives its buffer back if DROPPED; a PRESENTED flip gives back the buffer of
the commit it replaced on screen (``released_seq``).  Flips complete in commit order, and this
class reads them in that order.  ``present(frame)`` shows a decoder's pooled frame without a
copy: its slot stays lent (``Frame.retain``) until a flip releases it.  Close the display
before the decoder whose frames it shows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from guestlib.frames import Frame, _plane_views, pix_fmt_id
from vmediad import abi
from vmediad.abi import (
    BUFFER_EXTERNAL,
    DamageRect,
    DisplayCommit,
    DisplayFlip,
    DisplayOpen,
    DisplayReply,
    ExternalBuffer,
    FlipFlag,
    Op,
    PixFmt,
    Status,
)

if TYPE_CHECKING:
    from guestlib.device import Buffer, Device, Task

_RECORD = abi.align(abi.DISPLAY_COMMIT_MAX) + abi.align(abi.DISPLAY_FLIP.size)  # a commit's src + dst


@dataclass(slots=True)
class _Commit:
    task: Task
    buffer: int  # an index, or BUFFER_EXTERNAL
    release: Callable[[], None] | None  # an external picture's give-back
    record: int  # its record block (src, then the flip at dst)


class Display:
    def __init__(self, dev: Device, width: int, height: int, fmt: str | PixFmt = "bgra", buffers: int = 2,
                 timeout: float | None = 10.0) -> None:
        pf = pix_fmt_id(fmt)
        if pf not in abi.DISPLAY_FORMATS:
            names = ", ".join(sorted(abi.PIX_FMT_NAMES[f] for f in abi.DISPLAY_FORMATS))
            raise ValueError(f"a display is {names}, not {abi.PIX_FMT_NAMES[pf]}")
        if not abi.DISPLAY_MIN_BUFFERS <= buffers <= abi.DISPLAY_MAX_BUFFERS:
            raise ValueError(f"a display has {abi.DISPLAY_MIN_BUFFERS} or {abi.DISPLAY_MAX_BUFFERS} buffers")
        if width <= 0 or height <= 0:
            raise ValueError(f"bad display size {width}x{height}")
        self.device = dev
        self.width, self.height, self.pix_fmt = width, height, pf
        self.closed = False
        self.presented = 0
        self.dropped = 0
        self._arena: Buffer = dev.alloc(abi.display_arena_size(pf, width, height, buffers))
        # One record block per commit that can be in flight: every buffer plus as many externals.
        self._records: Buffer = dev.alloc(_RECORD * 2 * (buffers + 1))
        self._free_records = [self._records.offset + i * _RECORD for i in range(2 * (buffers + 1))]
        try:
            rec = self._free_records[-1]
            dev.region.mem[rec : rec + DisplayOpen.SIZE] = DisplayOpen(width, height, pf, buffers).pack()
            c = dev.submit(Op.DISPLAY_OPEN, src=(rec, DisplayOpen.SIZE),
                           dst=(self._arena.offset, self._arena.size)).wait(timeout)
            a = self._arena.offset
            self.reply = DisplayReply.unpack(bytes(dev.region.mem[a : a + c.result_len]))
        except BaseException:
            dev.free(self._records)
            dev.free(self._arena)
            raise
        self.output = self.reply.output
        self.frames: list[Frame] = []
        for b in self.reply.buffers:
            n = self.reply.nplanes
            views = _plane_views(dev.region.mem, pf, width, height, b.offset, b.plane_offsets[:n], b.strides[:n])
            self.frames.append(Frame(width, height, pf, None, views, offset=b.offset, strides=b.strides[:n],
                                     nbytes=b.size, plane_offsets=tuple(b.offset + o for o in b.plane_offsets[:n])))
        self._held: set[int] = set(range(len(self.frames)))
        self._inflight: deque[_Commit] = deque()
        self._front: dict[int, _Commit] = {}  # commit seq -> the commit on screen (at most one)

    # --- drawing and committing -----------------------------------------------------------------
    def back(self, timeout: float | None = 10.0) -> Frame:
        """A buffer the guest holds, to draw into (waits for a flip if hostd holds them all)."""
        self._check_open()
        self._reap()
        while not self._held:
            if not self._inflight:
                raise RuntimeError("no display buffer is held and no commit is in flight")
            self._inflight[0].task.completion(timeout)
            self._reap()
        return self.frames[min(self._held)]

    def commit(self, frame: Frame | None = None,
               damage: Iterable[tuple[int, int, int, int] | DamageRect] | None = None) -> Task:
        """Hand ``frame`` (default: ``back()``) to hostd; it shows from the next composition.
        Returns the commit's task: ``wait()`` returns once it was composed or replaced."""
        self._check_open()
        f = self.back() if frame is None else frame
        try:
            index = next(i for i, b in enumerate(self.frames) if b is f or b.offset == f.offset)
        except StopIteration:
            raise ValueError("not a buffer of this display (use present() for other frames)") from None
        if index not in self._held:
            raise ValueError(f"buffer {index} is not the guest's: it is on screen or committed")
        rects = tuple(r if isinstance(r, DamageRect) else DamageRect(*r) for r in (damage or ()))
        return self._submit(DisplayCommit(self.output, index, rects), index, None)

    def present(self, frame: Frame) -> Task:
        """Show a decoded frame.  A pooled frame of a display format is shown where it lies
        (no pixel is copied); any other frame is copied into ``back()`` (same size and format)."""
        self._check_open()
        if frame.pooled and frame.pix_fmt in abi.DISPLAY_FORMATS and frame.plane_offsets:
            n = len(frame.plane_offsets)
            base = frame.plane_offsets[0]
            offs = tuple(o - base for o in frame.plane_offsets)
            ext = ExternalBuffer(base, frame.width, frame.height, frame.pix_fmt, n, _pad3(offs),
                                 _pad3(tuple(frame.strides[:n])))
            give_back = frame.retain()
            try:
                return self._submit(DisplayCommit(self.output, BUFFER_EXTERNAL, (), ext), BUFFER_EXTERNAL,
                                    give_back)
            except BaseException:
                give_back()
                raise
        if (frame.width, frame.height, frame.pix_fmt) != (self.width, self.height, self.pix_fmt):
            raise ValueError(f"cannot present a {frame.width}x{frame.height} {frame.format} frame on a "
                             f"{self.width}x{self.height} {abi.PIX_FMT_NAMES[self.pix_fmt]} display without a copy "
                             "of the same size and format")
        back = self.back()
        for dst, src in zip(back.planes, frame.planes, strict=True):
            dst[...] = src
        return self.commit(back)

    def _submit(self, rec: DisplayCommit, buffer: int, release: Callable[[], None] | None) -> Task:
        self._reap()
        while not self._free_records:
            self._inflight[0].task.completion(10.0)
            self._reap()
        block = self._free_records.pop()
        raw = rec.pack()
        mem = self.device.region.mem
        mem[block : block + len(raw)] = raw
        flip_at = block + abi.align(abi.DISPLAY_COMMIT_MAX)
        try:
            task = self.device.submit(Op.DISPLAY_COMMIT, src=(block, len(raw)), dst=(flip_at, abi.DISPLAY_FLIP.size))
        except BaseException:
            self._free_records.append(block)
            raise
        if buffer != BUFFER_EXTERNAL:
            self._held.discard(buffer)
        self._inflight.append(_Commit(task, buffer, release, block))
        return task

    # --- flips ----------------------------------------------------------------------------------
    def _reap(self) -> None:
        """Read the flips of finished commits, oldest first (they complete in commit order)."""
        while self._inflight and self._inflight[0].task.done():
            c = self._inflight.popleft()
            done = c.task.completion(0)
            self._free_records.append(c.record)
            if done.status != Status.DONE:
                self._give_back(c)  # refused (or hostd went away): the guest holds it again
                continue
            at = c.record + abi.align(abi.DISPLAY_COMMIT_MAX)
            flip = DisplayFlip.unpack_from(self.device.region.mem, at)
            if flip.flags & FlipFlag.DROPPED:
                self.dropped += 1
                self._give_back(c)
                continue
            self.presented += 1
            if flip.flags & FlipFlag.RELEASED:
                old = self._front.pop(flip.released_seq, None)
                if old is not None:
                    self._give_back(old)
            self._front[flip.front_seq] = c

    def _give_back(self, c: _Commit) -> None:
        if c.buffer != BUFFER_EXTERNAL:
            self._held.add(c.buffer)
        if c.release is not None:
            c.release()
            c.release = None

    @property
    def held(self) -> frozenset[int]:
        """Indices of the buffers the guest may write now."""
        self._reap()
        return frozenset(self._held)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("the display is closed")

    # --- closing --------------------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> None:
        """Take the output off the screen; every buffer and shown frame is released."""
        if self.closed:
            return
        self.closed = True
        dev = self.device
        try:
            if dev.gone is None:
                dev.submit(Op.DISPLAY_CLOSE, args=(self.output, 0, 0, 0)).wait(timeout)
                for c in self._inflight:
                    c.task.completion(timeout)  # a pending commit ends DROPPED at the close
                self._reap()  # the last flips count in presented/dropped
        finally:
            for c in [*self._inflight, *self._front.values()]:
                self._give_back(c)
            self._inflight.clear()
            self._front.clear()
            self.frames = []
            dev.free(self._records)
            dev.free(self._arena)

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pad3(values: Sequence[int]) -> tuple[int, int, int]:
    v = (*values, 0, 0, 0)
    return v[0], v[1], v[2]


def fill_bgra(frame: Frame, colour: tuple[int, int, int]) -> None:
    """Fill a bgra frame with one (R, G, B) colour (tests and demos)."""
    r, g, b = colour
    frame.planes[0][...] = np.array([b, g, r, 255], np.uint8)
