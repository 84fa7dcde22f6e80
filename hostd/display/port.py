"""The display's seam into the device thread: display tasks in, flip records and completions out.

The device loop hands every Op.DISPLAY_* task here (it never reaches a worker) and calls
``tick``/``deliver`` for the compositor thread (hostd/display/service.py).  Everything here runs
on the device thread, which owns the ``DisplayCore``; the compositor thread only ever sees a
``Frame`` (the scene plus read-only numpy views of the regions it names).

Who may touch which memory:

* a DISPLAY_OPEN task lends its dst arena: hostd writes the reply table at its start and owns
  the layout of the buffers after it until DISPLAY_CLOSE (the guest frees the arena after that);
* a DISPLAY_COMMIT task stays in flight until its flip: hostd writes the DisplayFlip record at
  its dst, then completes it.  A flip that RELEASES a buffer is written only after the
  composition that last read it has finished (``deliver`` runs after ``compose``), because the
  guest may draw into that buffer as soon as it reads the record;
* a region named by a scene stays mapped until ``deliver`` unpins it: a guest that detaches
  meanwhile has its unmap deferred (``close_region``), so the compositor never reads freed pages;
* a committed picture may be read ahead of the tick (``prescale``, set by the service: the
  compositor scales it as soon as it is committed).  While that read runs the region stays
  pinned and the commit stays pending (``tick`` does not latch it), and a flip that gives the
  buffer back (DROPPED when a newer commit replaces it) and a DISPLAY_CLOSE's completion wait
  for it: a read not yet started is cancelled, a running one ends with ``read_done`` (posted to
  this thread by the job after it dropped its views), which wakes the compositor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import structlog
from numpy.typing import NDArray

from hostd.core.validate import Program
from hostd.display import layout as lay
from hostd.display.core import DisplayCore, FrameRef, SceneItem, Tick
from vmediad import abi
from vmediad.abi import DisplayFlip, ErrorCode, FlipFlag, Op

log = structlog.get_logger("hostd.display")

# complete(vm, slot, op, error, result, result_len): end a display task (the loop's _complete).
Complete = Callable[[int, int, Op, ErrorCode, int, int], None]
ReadKey = tuple[int, int, int]  # (vm, output, seq) of a commit whose picture is being read


class Reading(Protocol):
    """A read of a committed picture under way (``hostd.display.compose.Prescale``)."""

    def cancel(self) -> bool:
        """True if the read had not started and never will (no ``read_done`` follows)."""
        ...


@dataclass(frozen=True, slots=True)
class PrescaleRequest:
    """A commit to read ahead of the tick: ``region`` is its VM's whole region (1-D uint8),
    mapped until ``DisplayPort.read_done(key)`` runs or the returned read is cancelled."""

    key: ReadKey
    frame: FrameRef
    viewport: lay.Viewport
    region: NDArray[np.uint8]


# prescale(request): start the read (None: not started, nothing to wait for).
Prescaler = Callable[[PrescaleRequest], Reading | None]


class _ArenaAllocator:
    """The core's HeapAllocator: the DISPLAY_OPEN being run lent [lo, hi) of its guest's heap."""

    def __init__(self) -> None:
        self.arena: tuple[int, int] | None = None

    def alloc(self, vm: int, size: int, align: int) -> int | None:
        if self.arena is None:
            return None
        lo, hi = self.arena
        start = abi.align(lo, align)
        return start if start + size <= hi else None

    def free(self, vm: int, offset: int) -> None:
        """Nothing to do: the arena is the guest's heap block, which the guest frees."""


@dataclass(slots=True)
class _Waiter:
    """Runs ``then`` once the last of ``left`` reads ended."""

    left: int
    then: Callable[[], None]


@dataclass(slots=True)
class _Read:
    reading: Reading
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass(slots=True)
class _InFlight:
    vm: int
    slot: int
    dst_off: int


@dataclass(frozen=True, slots=True)
class Frame:
    """What one composition reads: the scene and, per VM in it, its region as 1-D uint8."""

    tick: Tick
    regions: dict[int, NDArray[np.uint8]]
    next_ns: int | None = None  # when the scene changes by itself next (a lingering VM leaves)

    def region_of(self, vm: int) -> NDArray[np.uint8]:
        return self.regions[vm]


class DisplayPort:
    def __init__(self, core: DisplayCore, allocator: _ArenaAllocator, complete: Complete) -> None:
        """``allocator`` must be the one ``core`` was made with (``create`` does both)."""
        self.core = core
        self._alloc = allocator
        self._complete = complete
        self._mem: dict[int, memoryview] = {}  # attached VMs' region memory
        self._commits: dict[tuple[int, int, int], _InFlight] = {}  # (vm, output, seq) -> its task
        self._pins: dict[int, int] = {}  # vm -> compositions reading its region
        self._deferred: dict[int, Callable[[], None]] = {}  # vm -> its region's unmap
        self._reads: dict[ReadKey, _Read] = {}  # commits whose picture is read ahead of the tick
        self.prescale: Prescaler | None = None  # set by the compositor service
        self.tasks = 0
        self.flips = 0
        # Set (any thread may read it) whenever the scene may have changed: a commit, an open or
        # close, a guest coming or going, a layout.  The compositor clears it before it posts
        # tick(), so a change made after that tick sets it again: none is missed, and an idle
        # screen costs the device thread no wake-up at all.
        self.changed = threading.Event()
        self.changed.set()

    @classmethod
    def create(cls, width: int, height: int, spec: lay.LayoutSpec, limits: abi.GeometryLimits,
               complete: Complete) -> DisplayPort:
        alloc = _ArenaAllocator()
        return cls(DisplayCore(width, height, alloc, limits=limits, layout=spec), alloc, complete)

    # --- guests -----------------------------------------------------------------------------
    def attach(self, vm: int, name: str, mem: memoryview, heap_lo: int, heap_hi: int) -> None:
        self._mem[vm] = mem
        self.core.attach(vm, name, heap_lo, heap_hi)
        self.changed.set()

    def detach(self, vm: int, now_ns: int, *, died: bool) -> None:
        """The guest left: its viewport is cleared and labelled from the next composition.  Its
        commits in flight need no completion (their region goes away with the guest)."""
        self.core.detach(vm, now_ns, died=died)
        self._mem.pop(vm, None)
        self.changed.set()
        for key in [k for k in self._commits if k[0] == vm]:
            del self._commits[key]

    def close_region(self, vm: int, close: Callable[[], None]) -> None:
        """Unmap a departed guest's region now, or once no composition reads it."""
        if self._pins.get(vm):
            self._deferred[vm] = close
        else:
            close()

    def release_all(self) -> None:
        """The compositor has stopped (hostd is closing): unmap every deferred region now."""
        for r in self._reads.values():
            r.reading.cancel()  # a job the shut-down workers never ran drops its views here
        self._reads.clear()
        self._pins.clear()
        deferred, self._deferred = self._deferred, {}
        for close in deferred.values():
            close()

    def fail_all(self, error: ErrorCode) -> None:
        """hostd is stopping: every commit in flight ends with ``error``."""
        commits, self._commits = self._commits, {}
        for c in commits.values():
            self._complete(c.vm, c.slot, Op.DISPLAY_COMMIT, error, 0, 0)

    # --- tasks ------------------------------------------------------------------------------
    def run(self, vm: int, slot: int, prog: Program, now_ns: int) -> None:
        """Run a validated display task of guest ``vm`` (its buffers lie in its heap)."""
        self.tasks += 1
        if prog.opcode != Op.DISPLAY_COMMIT:
            self.changed.set()  # a commit sets it when its picture is ready (_start_read, read_done)
        mem = self._mem.get(vm)
        if mem is None:
            self._complete(vm, slot, prog.opcode, ErrorCode.DEVICE_GONE, 0, 0)
            return
        src = bytes(mem[prog.src_off : prog.src_off + prog.src_len])  # copied once, then parsed
        if prog.opcode == Op.DISPLAY_OPEN:
            self._alloc.arena = (prog.dst_off + abi.align(abi.DISPLAY_REPLY_MAX, abi.PAGE_SIZE),
                                 prog.dst_off + prog.dst_len)
            try:
                opened = self.core.open_output(vm, src)
            finally:
                self._alloc.arena = None
            if isinstance(opened, ErrorCode):
                self._complete(vm, slot, prog.opcode, opened, 0, 0)
                return
            reply = opened.reply.pack()
            mem[prog.dst_off : prog.dst_off + len(reply)] = reply
            self._complete(vm, slot, prog.opcode, ErrorCode.OK, opened.output, len(reply))
            log.info("display opened", vm=vm, task=slot, output=opened.output, width=opened.reply.width,
                     height=opened.reply.height, format=abi.PIX_FMT_NAMES[abi.PixFmt(opened.reply.pix_fmt)],
                     buffers=len(opened.reply.buffers))
        elif prog.opcode == Op.DISPLAY_COMMIT:
            got = self.core.commit(vm, src, now_ns)
            if isinstance(got, ErrorCode):
                self._complete(vm, slot, prog.opcode, got, 0, 0)
                return
            output = abi.DisplayCommit.unpack(src).output
            self._commits[(vm, output, got.seq)] = _InFlight(vm, slot, prog.dst_off)
            if got.dropped is not None:
                d = got.dropped
                self._after_reads([(vm, output, d.released_seq)], partial(self._flip, vm, d, d.released_seq))
            self._start_read(vm, (vm, output, got.seq), got.frame)
        else:  # DISPLAY_CLOSE
            output = prog.arg0
            err = self.core.close_output(vm, output)
            if err is not ErrorCode.OK:
                self._complete(vm, slot, prog.opcode, err, 0, 0)
                return

            def closed() -> None:
                # Its pending commit (if any) was never shown: it ends DROPPED|RELEASED.
                for key in sorted(k for k in self._commits if k[:2] == (vm, output)):
                    flags = FlipFlag.DROPPED | FlipFlag.RELEASED
                    self._flip(vm, DisplayFlip(output, int(flags), abi.BUFFER_NONE, abi.BUFFER_NONE, 0, key[2], 0),
                               key[2])
                self._complete(vm, slot, Op.DISPLAY_CLOSE, ErrorCode.OK, 0, 0)

            # Every buffer is the guest's again when the close completes: no read may remain.
            self._after_reads([k for k in self._reads if k[:2] == (vm, output)], closed)

    # --- reads ahead of the tick ---------------------------------------------------------------
    def _start_read(self, vm: int, key: ReadKey, frame: FrameRef) -> None:
        """Hand a new commit's picture to the prescaler; if none reads it, the commit is ready
        for the next tick now (else when its read_done comes)."""
        mem = self._mem.get(vm)
        viewport = self.core.viewport_of(vm)
        reading = None
        if self.prescale is not None and mem is not None and viewport is not None:
            reading = self.prescale(PrescaleRequest(key, frame, viewport, np.frombuffer(mem, np.uint8)))
        if reading is None:
            self.changed.set()
            return
        self._reads[key] = _Read(reading)
        self._pin(vm)

    def read_done(self, key: ReadKey) -> None:
        """The read of ``key``'s picture ended and dropped its views (posted by its job)."""
        r = self._reads.pop(key, None)
        if r is None:
            return
        self.changed.set()  # a pending commit held for this read may be latched now
        self._unpin(key[0])
        for w in r.waiters:
            w.left -= 1
            if w.left == 0:
                w.then()

    def _after_reads(self, keys: Iterable[ReadKey], then: Callable[[], None]) -> None:
        """Run ``then`` once no read of these commits' pictures runs: now if none runs (a read
        not started yet is cancelled), else when the last ``read_done`` comes."""
        busy = []
        for key in keys:
            r = self._reads.get(key)
            if r is None:
                continue
            if r.reading.cancel():
                del self._reads[key]
                self._unpin(key[0])
            else:
                busy.append(r)
        if not busy:
            then()
            return
        w = _Waiter(len(busy), then)
        for r in busy:
            r.waiters.append(w)

    def _pin(self, vm: int) -> None:
        self._pins[vm] = self._pins.get(vm, 0) + 1

    def _unpin(self, vm: int) -> None:
        """One reader of ``vm``'s region less; the last one unmaps it if its guest left."""
        n = self._pins.get(vm, 0) - 1
        if n > 0:
            self._pins[vm] = n
            return
        self._pins.pop(vm, None)
        close = self._deferred.pop(vm, None)
        if close is not None:
            close()

    def _flip(self, vm: int, flip: DisplayFlip, seq: int) -> None:
        """Write ``flip`` into the commit ``seq``'s dst and complete that commit's task."""
        c = self._commits.pop((vm, flip.output, seq), None)
        mem = self._mem.get(vm)
        if c is None or mem is None:
            return
        flip.pack_into(mem, c.dst_off)
        self.flips += 1
        self._complete(vm, c.slot, Op.DISPLAY_COMMIT, ErrorCode.OK, seq, abi.DISPLAY_FLIP.size)

    # --- the compositor's half --------------------------------------------------------------
    def tick(self, now_ns: int) -> Frame:
        """Latch the pending commits whose pictures are not being read ahead; pin the regions the
        scene reads until ``deliver``."""
        # A commit whose picture is still being scaled ahead stays pending: the composition
        # would wait for that job, and every picture it latches with it.  Its read_done sets
        # ``changed`` and the next tick takes it.
        t = self.core.tick(now_ns, self._reads)
        regions: dict[int, NDArray[np.uint8]] = {}
        for item in t.scene:
            if item.frame is not None and item.vm in self._mem:
                regions[item.vm] = np.frombuffer(self._mem[item.vm], np.uint8)
                self._pin(item.vm)
        return Frame(t, regions, self.core.next_expiry())

    def deliver(self, frame: Frame) -> None:
        """The composition of ``frame`` is finished (and dropped its views): complete its flips
        and unmap regions whose guests left meanwhile.  The caller holds no other view of them."""
        vms = list(frame.regions)
        frame.regions.clear()  # the last views: an mmap with views exported cannot be closed
        for ev in frame.tick.events:
            # No read of either picture runs: tick() latched only commits whose read had ended,
            # and a read starts only at its commit.  The released buffer is the guest's now.
            self._flip(ev.vm, ev.flip, ev.flip.front_seq)
        for vm in vms:
            self._unpin(vm)

    def set_layout(self, spec: lay.LayoutSpec) -> None:
        """LayoutError (nothing changed) if ``spec`` does not fit the screen."""
        self.core.set_layout(spec)
        self.changed.set()

    def scene(self) -> tuple[SceneItem, ...]:
        return self.core.scene()
