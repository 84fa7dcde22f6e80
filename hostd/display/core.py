"""The shared screen's state, without I/O: VMs, display outputs, mailbox commits, flips, layout.

The device loop owns one ``DisplayCore`` and feeds it what guests asked (records it copied once
out of guest memory) and the clock; the core answers with records to write back and with the
scene to compose.  Nothing here touches guest memory, sleeps or raises on guest input: every
hostile record gets an ``abi.ErrorCode``.

Per output the core tracks the page-flip state of each buffer (see ``vmediad.abi``):

    held by the guest --commit--> pending --tick--> front --(next commit's tick)--> held
                                     \\--(a newer commit)--> held, flip DROPPED at once

``tick(now, hold)`` latches every pending commit to the front but those in ``hold`` (mailbox:
only the latest commit since the last tick is ever shown) and returns the scene (what each
visible viewport shows) and the flip records.  The loop composes the scene, then delivers the
flips: a RELEASED buffer may be written by its guest as soon as it reads the record, so the
composition that stopped using it must be finished by then.  The region of a VM must stay
mapped while a composition reads it.

Buffers come from the guest's heap through an injected ``HeapAllocator``; the core lays them
out (sizes, strides, plane offsets) and checks what the allocator returned lies in the heap.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hostd.display import layout as lay
from vmediad import abi
from vmediad.abi import (
    BUFFER_EXTERNAL,
    BUFFER_NONE,
    DISPLAY_FORMATS,
    DISPLAY_MAX_BUFFERS,
    DISPLAY_MIN_BUFFERS,
    DamageRect,
    DisplayBuffer,
    DisplayCommit,
    DisplayFlip,
    DisplayOpen,
    DisplayReply,
    ErrorCode,
    ExternalBuffer,
    FlipFlag,
    PixFmt,
)

NS = 1_000_000_000
BUFFER_ALIGN = abi.PAGE_SIZE
RATE_WINDOW_NS = NS
LATENCY_SAMPLES = 1024


class HeapAllocator(Protocol):
    """Allocates in a guest's heap on hostd's behalf (the device loop provides it)."""

    def alloc(self, vm: int, size: int, align: int) -> int | None:
        """Offset from the region start of ``size`` bytes aligned to ``align``, or None if full."""
        ...

    def free(self, vm: int, offset: int) -> None: ...


class VmState(enum.StrEnum):
    ATTACHED = "attached"
    DETACHED = "detached"
    DIED = "died"


@dataclass(frozen=True, slots=True)
class Plane:
    offset: int  # from the region start
    stride: int
    rows: int
    row_bytes: int


@dataclass(frozen=True, slots=True)
class FrameRef:
    """A picture in a VM's region, as validated by the core (all planes inside its heap)."""

    vm: int
    fmt: PixFmt
    width: int
    height: int
    planes: tuple[Plane, ...]


@dataclass(frozen=True, slots=True)
class Opened:
    output: int
    reply: DisplayReply  # reply.pack() is what goes to the guest
    allocation: int  # the allocator offset, freed at close


@dataclass(frozen=True, slots=True)
class Committed:
    seq: int
    dropped: DisplayFlip | None  # the flip of the commit this one replaced, to deliver now
    frame: FrameRef  # the committed picture (read ahead of the tick by the compositor)


@dataclass(frozen=True, slots=True)
class FlipEvent:
    vm: int
    flip: DisplayFlip


@dataclass(frozen=True, slots=True)
class SceneItem:
    vm: int
    name: str
    viewport: lay.Viewport
    frame: FrameRef | None  # None: the viewport is cleared and shows ``label``
    label: str | None
    key: tuple[int, int, int] | None  # (vm, output, seq): same key, same pixels


@dataclass(frozen=True, slots=True)
class Tick:
    now_ns: int
    scene: tuple[SceneItem, ...]  # visible viewports, bottom to top
    events: tuple[FlipEvent, ...]  # deliver after composing the scene
    changed: bool  # the scene differs from the last tick's


@dataclass(slots=True)
class _Commit:
    seq: int
    buffer: int
    frame: FrameRef
    damage: tuple[DamageRect, ...]
    committed_ns: int


@dataclass(slots=True)
class _Output:
    id: int
    vm: int
    width: int
    height: int
    fmt: PixFmt
    allocation: int
    buffers: tuple[FrameRef, ...]
    next_seq: int = 1
    front: _Commit | None = None
    pending: _Commit | None = None


@dataclass(slots=True)
class _Vm:
    id: int
    name: str
    heap_lo: int
    heap_hi: int
    state: VmState = VmState.ATTACHED
    gone_ns: int = 0
    output: _Output | None = None
    shown: bool = False  # it sent a display task: it has a viewport from then on
    commits: int = 0
    presented: int = 0
    dropped: int = 0
    rejected: int = 0
    commit_times: deque[int] = field(default_factory=lambda: deque(maxlen=512))
    latencies: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


def _pad3(values: tuple[int, ...]) -> tuple[int, int, int]:
    v = (*values, 0, 0, 0)
    return v[0], v[1], v[2]


buffer_layout = abi.display_buffer_layout  # the ABI's rule: the guest sizes its arena by it


class DisplayCore:
    def __init__(self, width: int, height: int, allocator: HeapAllocator, *,
                 limits: abi.GeometryLimits | None = None,
                 layout: lay.LayoutSpec | None = None,
                 max_output_bytes: int = 256 << 20,
                 linger_ns: int | None = 30 * NS) -> None:
        """``linger_ns``: how long a detached VM's cleared, labelled viewport stays before the
        VM leaves the layout (None: until ``forget``)."""
        spec = layout or lay.LayoutSpec()
        lay.validate(spec, width, height)
        self.width, self.height = width, height
        self.limits = limits or abi.GeometryLimits()
        self.max_output_bytes = max_output_bytes
        self.linger_ns = linger_ns
        self._alloc = allocator
        self._spec = spec
        self._vms: dict[int, _Vm] = {}
        self._outputs: dict[int, _Output] = {}
        self._next_output = 1
        self._viewports: dict[int, lay.Viewport] = {}
        self._dirty = True

    # --- VMs ------------------------------------------------------------------------------
    def attach(self, vm: int, name: str, heap_lo: int, heap_hi: int) -> None:
        """A guest attached; its heap is [heap_lo, heap_hi) of its region.  ValueError if the
        id is already known (a caller bug, not guest input)."""
        if vm in self._vms:
            raise ValueError(f"vm {vm} is already known to the display")
        if not 0 <= heap_lo <= heap_hi:
            raise ValueError(f"bad heap [{heap_lo}, {heap_hi}) for vm {vm}")
        self._vms[vm] = _Vm(vm, name, heap_lo, heap_hi)  # on the screen once it opens an output

    def detach(self, vm: int, now_ns: int, *, died: bool = False) -> None:
        """The guest detached or died: its output is gone (its region with it: nothing is freed)
        and from the next tick its viewport is cleared and labelled, never its last picture."""
        v = self._vms.get(vm)
        if v is None or v.state is not VmState.ATTACHED:
            return
        if not v.shown:  # never on the screen: nothing to clear
            del self._vms[vm]
            return
        v.state = VmState.DIED if died else VmState.DETACHED
        v.gone_ns = now_ns
        if v.output is not None:
            del self._outputs[v.output.id]
            v.output = None
        self._dirty = True

    def forget(self, vm: int) -> None:
        """Drop a VM from the display (its viewport leaves the layout)."""
        v = self._vms.pop(vm, None)
        if v is not None and v.output is not None:
            self._close(v.output, free=v.state is VmState.ATTACHED)
        if v is not None:
            self._relayout()

    def _user(self, vm: int) -> _Vm | None:
        """The attached VM sending a display task (None: gone).  Its first one puts it on the
        screen: a guest that only uses the codec, or records the screen, takes no place on it."""
        v = self._vms.get(vm)
        if v is None or v.state is not VmState.ATTACHED:
            return None
        if not v.shown:
            v.shown = True
            self._relayout()
        return v

    # --- outputs ----------------------------------------------------------------------------
    def open_output(self, vm: int, raw: bytes | bytearray | memoryview) -> Opened | ErrorCode:
        """DISPLAY_OPEN with the record copied from the guest.  One output per VM (BUSY while
        one is open)."""
        v = self._user(vm)
        if v is None:
            return ErrorCode.DEVICE_GONE
        try:
            req = DisplayOpen.unpack(raw)
        except ValueError:
            return self._reject(v, ErrorCode.BAD_ARG)
        err = self._check_open(req)
        if err is not ErrorCode.OK:
            return self._reject(v, err)
        if v.output is not None:
            return self._reject(v, ErrorCode.BUSY)
        fmt = PixFmt(req.pix_fmt)
        offsets, strides, size = buffer_layout(fmt, req.width, req.height)
        total = size * req.buffers
        if total > self.max_output_bytes:
            return self._reject(v, ErrorCode.TOO_LARGE)
        base = self._alloc.alloc(vm, total, BUFFER_ALIGN)
        if base is None:
            return self._reject(v, ErrorCode.NO_SPACE)
        if abi.range_ok(base, total, v.heap_lo, v.heap_hi) is not ErrorCode.OK:
            # The allocator is ours: an answer outside the heap is a hostd bug, not the guest's.
            self._alloc.free(vm, base)
            return ErrorCode.BACKEND
        shapes = abi.plane_shapes(fmt, req.width, req.height)
        frames = []
        for i in range(req.buffers):
            start = base + i * size
            planes = tuple(Plane(start + o, s, rows, rb) for o, s, (rows, rb) in zip(offsets, strides, shapes,
                                                                                      strict=True))
            frames.append(FrameRef(vm, fmt, req.width, req.height, planes))
        out = _Output(self._next_output, vm, req.width, req.height, fmt, base, tuple(frames))
        self._next_output += 1
        self._outputs[out.id] = out
        v.output = out
        bufs = tuple(DisplayBuffer(base + i * size, size, _pad3(offsets), _pad3(strides))
                     for i in range(req.buffers))
        return Opened(out.id, DisplayReply(out.id, req.width, req.height, fmt, len(offsets), bufs), base)

    def _check_open(self, req: DisplayOpen) -> ErrorCode:
        if req.flags:
            return ErrorCode.BAD_FLAGS
        if req.reserved or req.pix_fmt not in DISPLAY_FORMATS:
            return ErrorCode.BAD_ARG
        if not DISPLAY_MIN_BUFFERS <= req.buffers <= DISPLAY_MAX_BUFFERS:
            return ErrorCode.BAD_ARG
        if req.width == 0 or req.height == 0:
            return ErrorCode.BAD_ARG
        if not self.limits.allows(req.width, req.height):
            return ErrorCode.TOO_LARGE
        return ErrorCode.OK

    def close_output(self, vm: int, output: int) -> ErrorCode:
        """DISPLAY_CLOSE: the buffers go back to the allocator; the viewport is cleared from the
        next tick.  Every buffer is the guest's again (no flip records follow)."""
        v = self._user(vm)
        if v is None:
            return ErrorCode.DEVICE_GONE
        out = self._outputs.get(output)
        if out is None or out.vm != vm:
            return self._reject(v, ErrorCode.BAD_SESSION)
        if out.pending is not None:
            v.dropped += 1  # never shown: its commit ends DROPPED (the device loop writes that flip)
        self._close(out, free=True)
        return ErrorCode.OK

    def _close(self, out: _Output, *, free: bool) -> None:
        self._outputs.pop(out.id, None)
        v = self._vms.get(out.vm)
        if v is not None and v.output is out:
            v.output = None
        if free:
            self._alloc.free(out.vm, out.allocation)
        self._dirty = True

    # --- commits ----------------------------------------------------------------------------
    def commit(self, vm: int, raw: bytes | bytearray | memoryview, now_ns: int) -> Committed | ErrorCode:
        """DISPLAY_COMMIT with the record copied from the guest.  Never waits: the commit
        becomes the pending one; a pending commit it replaces is released at once (its DROPPED
        flip is in the result)."""
        v = self._user(vm)
        if v is None:
            return ErrorCode.DEVICE_GONE
        try:
            req = DisplayCommit.unpack(raw)
        except ValueError:
            return self._reject(v, ErrorCode.BAD_ARG)
        if req.flags:
            return self._reject(v, ErrorCode.BAD_FLAGS)
        out = self._outputs.get(req.output)
        if out is None or out.vm != vm:
            return self._reject(v, ErrorCode.BAD_SESSION)
        if req.external is not None:
            got = self._check_external(v, req.external)
            if isinstance(got, ErrorCode):
                return self._reject(v, got)
            frame = got
        elif req.buffer < len(out.buffers):
            if any(c is not None and c.buffer == req.buffer for c in (out.front, out.pending)):
                # The buffer is on screen or already committed: the guest does not hold it.
                return self._reject(v, ErrorCode.SLOT_BUSY)
            frame = out.buffers[req.buffer]
        else:
            return self._reject(v, ErrorCode.BAD_ARG)
        for r in req.damage:
            if r.width == 0 or r.height == 0:
                return self._reject(v, ErrorCode.BAD_ARG)
            if r.x + r.width > frame.width or r.y + r.height > frame.height:
                return self._reject(v, ErrorCode.BAD_RANGE)
        c = _Commit(out.next_seq, req.buffer, frame, req.damage, now_ns)
        out.next_seq += 1
        v.commits += 1
        v.commit_times.append(now_ns)
        dropped = None
        if out.pending is not None:
            p = out.pending
            v.dropped += 1
            flags = FlipFlag.DROPPED | FlipFlag.RELEASED
            dropped = DisplayFlip(out.id, int(flags), BUFFER_NONE, p.buffer, 0, p.seq, 0)
        out.pending = c
        return Committed(c.seq, dropped, frame)

    def _check_external(self, v: _Vm, e: ExternalBuffer) -> FrameRef | ErrorCode:
        if e.pix_fmt not in DISPLAY_FORMATS:
            return ErrorCode.BAD_ARG
        fmt = PixFmt(e.pix_fmt)
        shapes = abi.plane_shapes(fmt, e.width, e.height) if e.width and e.height else []
        if not shapes or e.nplanes != len(shapes):
            return ErrorCode.BAD_ARG
        if not self.limits.allows(e.width, e.height):
            return ErrorCode.TOO_LARGE
        if any(e.plane_offsets[len(shapes):]) or any(e.strides[len(shapes):]):
            return ErrorCode.BAD_ARG
        planes = []
        for (rows, row_bytes), poff, stride in zip(shapes, e.plane_offsets, e.strides, strict=False):
            if stride < row_bytes:
                return ErrorCode.BAD_ARG
            if e.offset > abi.U64_MAX - poff:
                return ErrorCode.OVERFLOW
            start = e.offset + poff
            err = abi.range_ok(start, (rows - 1) * stride + row_bytes, v.heap_lo, v.heap_hi)
            if err is not ErrorCode.OK:
                return err
            planes.append(Plane(start, stride, rows, row_bytes))
        pt = tuple(planes)
        return FrameRef(v.id, fmt, e.width, e.height, pt)

    def _reject(self, v: _Vm, err: ErrorCode) -> ErrorCode:
        v.rejected += 1
        return err

    # --- the compositor's clock ---------------------------------------------------------------
    def tick(self, now_ns: int, hold: Container[tuple[int, int, int]] = ()) -> Tick:
        """Latch each output's pending commit to the front and return the scene and the flips.
        A pending commit whose key ``(vm, output, seq)`` is in ``hold`` stays pending."""
        events = []
        for out in self._outputs.values():
            p = out.pending
            if p is None or (out.vm, out.id, p.seq) in hold:
                continue
            old = out.front
            flags = FlipFlag.PRESENTED | (FlipFlag.RELEASED if old is not None else 0)
            events.append(FlipEvent(out.vm, DisplayFlip(
                out.id, int(flags), p.buffer, old.buffer if old is not None else BUFFER_NONE, p.seq,
                old.seq if old is not None else 0, now_ns)))
            out.front, out.pending = p, None
            v = self._vms[out.vm]
            v.presented += 1
            v.latencies.append(now_ns - p.committed_ns)
        if self.linger_ns is not None:
            stale = [v.id for v in self._vms.values()
                     if v.state is not VmState.ATTACHED and now_ns - v.gone_ns >= self.linger_ns]
            for vm in stale:
                self.forget(vm)
        changed = self._dirty or bool(events)
        self._dirty = False
        return Tick(now_ns, self.scene(), tuple(events), changed)

    def next_expiry(self) -> int | None:
        """When the first lingering (detached or dead) VM leaves the layout, in ns (None: none
        lingers): the one change of the scene that no guest or user request brings."""
        if self.linger_ns is None:
            return None
        gone = [v.gone_ns + self.linger_ns for v in self._vms.values() if v.state is not VmState.ATTACHED]
        return min(gone, default=None)

    def viewport_of(self, vm: int) -> lay.Viewport | None:
        """``vm``'s viewport if the scene shows it (visible, not empty), else None."""
        vp = self._viewports.get(vm)
        return vp if vp is not None and vp.visible and not vp.rect.empty else None

    def scene(self) -> tuple[SceneItem, ...]:
        items = []
        for vp in lay.z_sorted(self._viewports.values()):
            v = self._vms[vp.vm]
            out = v.output
            front = out.front if out is not None else None
            if front is not None and out is not None:
                items.append(SceneItem(v.id, v.name, vp, front.frame, None, (v.id, out.id, front.seq)))
            else:
                items.append(SceneItem(v.id, v.name, vp, None, self._label(v), None))
        return tuple(items)

    @staticmethod
    def _label(v: _Vm) -> str:
        if v.state is VmState.ATTACHED:
            return f"{v.name}\nno picture"
        return f"{v.name}\n{v.state.value}"

    # --- layout -----------------------------------------------------------------------------
    def set_layout(self, spec: lay.LayoutSpec) -> tuple[lay.Viewport, ...]:
        """Change the layout at run time (LayoutError, state unchanged, if it does not fit)."""
        lay.validate(spec, self.width, self.height)
        self._spec = spec
        self._relayout()
        return self.viewports()

    @property
    def layout_spec(self) -> lay.LayoutSpec:
        return self._spec

    def viewports(self) -> tuple[lay.Viewport, ...]:
        return tuple(self._viewports.values())

    def _relayout(self) -> None:
        """Viewports for the VMs that sent a display task (``_user``)."""
        shown = [(v.id, v.name) for v in self._vms.values() if v.shown]
        vps = lay.compute(self._spec, shown, self.width, self.height)
        self._viewports = {vp.vm: vp for vp in vps}
        self._dirty = True

    # --- introspection ----------------------------------------------------------------------
    def buffer_states(self, output: int) -> Mapping[int, str] | None:
        """Who holds each allocated buffer of ``output``: "guest", "pending" or "front"."""
        out = self._outputs.get(output)
        if out is None:
            return None
        states = {i: "guest" for i in range(len(out.buffers))}
        for c, name in ((out.front, "front"), (out.pending, "pending")):
            if c is not None and c.buffer != BUFFER_EXTERNAL:
                states[c.buffer] = name
        return states

    def statistics(self, now_ns: int) -> dict[str, object]:
        vms = []
        for v in self._vms.values():
            if not v.shown:
                continue
            recent = sum(1 for t in v.commit_times if now_ns - t < RATE_WINDOW_NS)
            lat = sorted(v.latencies)
            out = v.output
            vms.append({
                "vm": v.id, "name": v.name, "state": v.state.value,
                "output": None if out is None else {"id": out.id, "width": out.width, "height": out.height,
                                                    "format": abi.PIX_FMT_NAMES[out.fmt]},
                "viewport": self._viewports[v.id].to_dict(),
                "commits": v.commits, "presented": v.presented, "dropped": v.dropped, "rejected": v.rejected,
                "commit_fps": recent * NS / RATE_WINDOW_NS,
                "latency_p50_ms": _percentile(lat, 0.50) / 1e6, "latency_p99_ms": _percentile(lat, 0.99) / 1e6,
            })
        return {"width": self.width, "height": self.height, "layout": self._spec.to_dict(), "vms": vms}


def compose_slot(anchor_ns: int | None, now_ns: int, period_ns: int) -> int:
    """The slot a composition wanted at ``now_ns`` belongs to (it composes at the later of the
    two), given ``anchor_ns``, the slot of the previous composition; ``period_ns`` is the
    shortest time between compositions (``1 / max_compose_hz``).

    While on schedule the slot is ``anchor_ns + period_ns``: slots keep their phase, and a
    composition that starts late does not push the next one back, so under a flood of commits
    there are exactly ``1e9 / period_ns`` compositions a second on average.  The phase is
    re-anchored at ``now_ns`` only when a whole period or more was missed (a starved thread or an
    idle spell: a commit after a quiet spell is composed at once, and missed slots are not made
    up in a burst)."""
    if anchor_ns is None:
        return now_ns
    slot = anchor_ns + period_ns
    return now_ns if now_ns - slot >= period_ns else slot


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])
