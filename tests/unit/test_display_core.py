"""The display core without I/O: records (golden bytes), buffers, mailbox commits, flips, detach,
hostile records -> exact error codes."""

from __future__ import annotations

import pytest

from hostd.display import layout as lay
from hostd.display.core import Committed, DisplayCore, Opened, Tick, buffer_layout
from vmediad import abi
from vmediad.abi import (
    BUFFER_EXTERNAL,
    BUFFER_NONE,
    DISPLAY_COMMIT_MAX,
    DISPLAY_FLIP,
    DISPLAY_MAX_DAMAGE,
    DISPLAY_REPLY_MAX,
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

OPEN_GOLDEN = "800700003804000002000000030000000000000000000000"
REPLY_GOLDEN = ("070000008007000038040000020000000100000002000000000001000000000000003000000000000000000000e01f00"
                "00000000800700008007000000000000")
COMMIT_GOLDEN = ("07000000010000000000000002000000" + "00" * 48
                 + "0100000002000000030000000400000000000000000000008007000038040000")
EXTERNAL_GOLDEN = ("07000000feffffff00000000000000008967452301000000800200006801000001000000030000000000000000000400"
                   "00000500c00200006001000060010000")
FLIP_GOLDEN = "07000000030000000200000000000000050000000000000004000000000000008877665544332211"

HEAP = (8192, 64 << 20)
PRESENTED, RELEASED, DROPPED = int(FlipFlag.PRESENTED), int(FlipFlag.RELEASED), int(FlipFlag.DROPPED)


def test_records_golden_bytes() -> None:
    o = DisplayOpen(1920, 1080, PixFmt.NV12, 3)
    assert o.pack().hex() == OPEN_GOLDEN and DisplayOpen.unpack(o.pack()) == o
    buf = DisplayBuffer(0x10000, 0x300000, (0, 0x1FE000, 0), (1920, 1920, 0))
    r = DisplayReply(7, 1920, 1080, PixFmt.NV12, 2, (buf,))
    assert r.pack().hex() == REPLY_GOLDEN and r.size == 64 and DisplayReply.unpack(r.pack()) == r
    c = DisplayCommit(7, 1, (DamageRect(1, 2, 3, 4), DamageRect(0, 0, 1920, 1080)))
    assert c.pack().hex() == COMMIT_GOLDEN and DisplayCommit.unpack(c.pack()) == c
    e = DisplayCommit(7, BUFFER_EXTERNAL, (), ExternalBuffer(0x123456789, 640, 360, PixFmt.YUV420P, 3,
                                                             (0, 0x40000, 0x50000), (704, 352, 352)))
    assert e.pack().hex() == EXTERNAL_GOLDEN and DisplayCommit.unpack(e.pack()) == e
    f = DisplayFlip(7, PRESENTED | RELEASED, 2, 0, 5, 4, 0x1122334455667788)
    assert f.pack().hex() == FLIP_GOLDEN and DisplayFlip.unpack(f.pack()) == f
    assert (DISPLAY_REPLY_MAX, DISPLAY_COMMIT_MAX, DISPLAY_FLIP.size) == (144, 320, 40)
    page = bytearray(72)
    f.pack_into(page, 8)
    o.pack_into(page, 48)
    assert DisplayFlip.unpack_from(page, 8) == f and DisplayOpen.unpack_from(page, 48) == o
    assert bytes(page).hex() == "00" * 8 + FLIP_GOLDEN + OPEN_GOLDEN
    assert (DisplayOpen.SIZE, DisplayFlip.SIZE, DisplayBuffer.SIZE, DamageRect.SIZE) == (24, 40, 40, 16)


def test_record_parsers_reject_bad_lengths() -> None:
    with pytest.raises(ValueError, match="DISPLAY_OPEN is 24 bytes, got 23"):
        DisplayOpen.unpack(bytes(23))
    raw = DisplayCommit(1, 0, (DamageRect(0, 0, 1, 1),)).pack()
    for bad in (raw[:-1], raw + b"\0", raw[:63]):
        with pytest.raises(ValueError):
            DisplayCommit.unpack(bad)
    with pytest.raises(ValueError, match="display reply with 4 buffers"):
        DisplayReply.unpack(bytes.fromhex("00" * 16 + "04000000" + "00" * 4))


class BumpAllocator:
    """Hands out aligned offsets from a heap; a pure stand-in for the loop's allocator."""

    def __init__(self, lo: int, hi: int) -> None:
        self.next, self.hi = lo, hi
        self.live: dict[tuple[int, int], int] = {}
        self.freed: list[tuple[int, int]] = []
        self.answer: int | None = None  # force an answer (a broken allocator)

    def alloc(self, vm: int, size: int, align: int) -> int | None:
        if self.answer is not None:
            return self.answer
        off = -(-self.next // align) * align
        if off + size > self.hi:
            return None
        self.next = off + size
        self.live[(vm, off)] = size
        return off

    def free(self, vm: int, offset: int) -> None:
        self.freed.append((vm, offset))
        self.live.pop((vm, offset), None)


def make(n_vms: int = 1, **kw: object) -> tuple[DisplayCore, BumpAllocator]:
    alloc = BumpAllocator(*HEAP)
    core = DisplayCore(1920, 1080, alloc, **kw)  # type: ignore[arg-type]
    for i in range(n_vms):
        core.attach(i, f"vm{i}", *HEAP)
    return core, alloc


def open_(core: DisplayCore, vm: int = 0, w: int = 1920, h: int = 1080, fmt: int = PixFmt.BGRA,
          n: int = 3) -> Opened:
    got = core.open_output(vm, DisplayOpen(w, h, fmt, n).pack())
    assert isinstance(got, Opened), got
    return got


def commit(core: DisplayCore, output: int, buffer: int, vm: int = 0, now: int = 0,
           damage: tuple[DamageRect, ...] = (), external: ExternalBuffer | None = None) -> Committed | ErrorCode:
    return core.commit(vm, DisplayCommit(output, buffer, damage, external).pack(), now)


def seq(got: Committed | ErrorCode) -> int:
    assert isinstance(got, Committed), got
    return got.seq


def test_open_lays_out_buffers_in_the_guest_heap() -> None:
    core, alloc = make()
    got = open_(core, n=2)
    r = DisplayReply.unpack(got.reply.pack())
    assert (r.output, r.width, r.height, r.pix_fmt, r.nplanes) == (got.output, 1920, 1080, PixFmt.BGRA, 1)
    assert r.buffers == (DisplayBuffer(8192, 8294400, (0, 0, 0), (7680, 0, 0)),
                         DisplayBuffer(8192 + 8294400, 8294400, (0, 0, 0), (7680, 0, 0)))
    assert alloc.live == {(0, 8192): 2 * 8294400}
    assert core.buffer_states(got.output) == {0: "guest", 1: "guest"}


def test_buffer_layout_strides_and_sizes() -> None:
    assert buffer_layout(PixFmt.YUV420P, 1001, 777) == ((0, 795648, 994816), (1024, 512, 512), 1196032)
    assert buffer_layout(PixFmt.NV12, 640, 360) == ((0, 230400), (640, 640), 348160)
    assert buffer_layout(PixFmt.BGRA, 3, 1) == ((0,), (64,), 4096)
    core, _ = make(2)
    a = open_(core, 0, 640, 360, PixFmt.NV12, 2)
    b = open_(core, 1, 1001, 777, PixFmt.YUV420P, 2)
    commit(core, a.output, 0)
    commit(core, b.output, 1, vm=1)
    frames = {s.vm: s.frame for s in core.tick(1).scene}
    assert frames[0] is not None and frames[1] is not None
    assert [(p.offset - b.allocation, p.stride, p.rows, p.row_bytes) for p in frames[1].planes] == [
        (1196032, 1024, 777, 1001), (1196032 + 795648, 512, 389, 501), (1196032 + 994816, 512, 389, 501)]


@pytest.mark.parametrize(("rec", "err"), [
    (DisplayOpen(640, 360, PixFmt.BGRA, 2, flags=1), ErrorCode.BAD_FLAGS),
    (DisplayOpen(640, 360, PixFmt.BGRA, 2, reserved=1), ErrorCode.BAD_ARG),
    (DisplayOpen(640, 360, PixFmt.RGB24, 2), ErrorCode.BAD_ARG),
    (DisplayOpen(640, 360, 99, 2), ErrorCode.BAD_ARG),
    (DisplayOpen(640, 360, PixFmt.BGRA, 1), ErrorCode.BAD_ARG),
    (DisplayOpen(640, 360, PixFmt.BGRA, 4), ErrorCode.BAD_ARG),
    (DisplayOpen(0, 360, PixFmt.BGRA, 2), ErrorCode.BAD_ARG),
    (DisplayOpen(8193, 16, PixFmt.BGRA, 2), ErrorCode.TOO_LARGE),
    (DisplayOpen(8000, 8000, PixFmt.NV12, 2), ErrorCode.TOO_LARGE),  # past max_pixels
    (DisplayOpen(0xFFFFFFFF, 0xFFFFFFFF, PixFmt.BGRA, 3), ErrorCode.TOO_LARGE),
    (DisplayOpen(4096, 4096, PixFmt.BGRA, 3), ErrorCode.TOO_LARGE),  # 192 MiB > max_output_bytes
])
def test_hostile_open_records(rec: DisplayOpen, err: ErrorCode) -> None:
    core, alloc = make(max_output_bytes=128 << 20)
    assert core.open_output(0, rec.pack()) is err
    assert alloc.live == {}
    assert core.statistics(0)["vms"][0]["rejected"] == 1  # type: ignore[index]


def test_open_refusals_that_depend_on_state() -> None:
    core, alloc = make()
    assert core.open_output(0, bytes(23)) is ErrorCode.BAD_ARG
    assert core.open_output(5, DisplayOpen(64, 64, PixFmt.BGRA, 2).pack()) is ErrorCode.DEVICE_GONE
    small = DisplayCore(64, 64, BumpAllocator(8192, 8192 + 4096))
    small.attach(0, "vm0", 8192, 8192 + 4096)
    assert small.open_output(0, DisplayOpen(64, 64, PixFmt.BGRA, 2).pack()) is ErrorCode.NO_SPACE
    alloc.answer = 4096  # an allocator answer inside the register page: never used
    assert core.open_output(0, DisplayOpen(64, 64, PixFmt.BGRA, 2).pack()) is ErrorCode.BACKEND
    assert alloc.freed == [(0, 4096)]
    alloc.answer = None
    open_(core, w=64, h=64)
    assert core.open_output(0, DisplayOpen(64, 64, PixFmt.BGRA, 2).pack()) is ErrorCode.BUSY


def test_mailbox_every_transition() -> None:
    core, _ = make()
    out = open_(core).output
    t0 = core.tick(0)
    assert t0.events == () and [s.label for s in t0.scene] == ["vm0\nno picture"]
    # commit -> pending; the screen does not change until a tick
    c1 = commit(core, out, 0, now=100)
    assert isinstance(c1, Committed) and (c1.seq, c1.dropped) == (1, None)
    assert core.buffer_states(out) == {0: "pending", 1: "guest", 2: "guest"}
    assert core.scene()[0].frame is None
    # tick -> front, flip PRESENTED without a release
    t1 = core.tick(1000)
    assert [(e.vm, e.flip) for e in t1.events] == [(0, DisplayFlip(out, PRESENTED, 0, BUFFER_NONE, 1, 0, 1000))]
    assert t1.changed and t1.scene[0].key == (0, out, 1) and t1.scene[0].frame is not None
    assert core.buffer_states(out) == {0: "front", 1: "guest", 2: "guest"}
    # the buffer on screen and the pending one are not the guest's
    assert commit(core, out, 0) is ErrorCode.SLOT_BUSY
    assert seq(commit(core, out, 1, now=2000)) == 2
    assert commit(core, out, 1) is ErrorCode.SLOT_BUSY
    # a newer commit replaces the pending one, which is released at once (DROPPED)
    c3 = commit(core, out, 2, now=3000)
    assert isinstance(c3, Committed) and c3.seq == 3
    assert c3.dropped == DisplayFlip(out, DROPPED | RELEASED, BUFFER_NONE, 1, 0, 2, 0)
    assert core.buffer_states(out) == {0: "front", 1: "guest", 2: "pending"}
    # tick: 2 goes on screen, 0 is released with it
    t2 = core.tick(5000)
    assert [e.flip for e in t2.events] == [DisplayFlip(out, PRESENTED | RELEASED, 2, 0, 3, 1, 5000)]
    assert core.buffer_states(out) == {0: "guest", 1: "guest", 2: "front"}
    # nothing new: no flips, scene unchanged
    t3 = core.tick(6000)
    assert t3.events == () and not t3.changed and t3.scene == t2.scene
    stats = core.statistics(6000)["vms"][0]  # type: ignore[index]
    assert (stats["commits"], stats["presented"], stats["dropped"], stats["rejected"]) == (3, 2, 1, 2)
    assert stats["latency_p50_ms"] == pytest.approx(0.002)  # 3000 -> 5000 ns


def test_a_held_commit_stays_pending_and_others_are_latched() -> None:
    core, _ = make(2)
    out0, out1 = open_(core, vm=0).output, open_(core, vm=1).output
    core.tick(0)
    commit(core, out0, 0, vm=0, now=100)
    commit(core, out1, 0, vm=1, now=100)
    t = core.tick(1000, hold={(0, out0, 1)})  # vm0's picture is still being scaled
    assert [(e.vm, e.flip.front_seq) for e in t.events] == [(1, 1)] and t.changed
    assert core.buffer_states(out0) == {0: "pending", 1: "guest", 2: "guest"}
    # a newer commit still replaces the held one (mailbox), and is itself held or latched
    c = commit(core, out0, 1, vm=0, now=2000)
    assert isinstance(c, Committed) and c.dropped is not None and c.dropped.released_seq == 1
    t = core.tick(3000, hold={(0, out0, 1)})  # a stale key holds nothing
    assert [(e.vm, e.flip.front_seq, e.flip.composed_ns) for e in t.events] == [(0, 2, 3000)]
    stats = {v["name"]: v for v in core.statistics(3000)["vms"]}  # type: ignore[attr-defined]
    assert stats["vm0"]["latency_p50_ms"] == pytest.approx(0.001)  # 2000 -> 3000 ns


def test_two_buffers_the_guest_waits_for_its_flip() -> None:
    core, _ = make()
    out = open_(core, n=2).output
    commit(core, out, 0)
    core.tick(1)
    commit(core, out, 1)
    assert commit(core, out, 0) is ErrorCode.SLOT_BUSY and commit(core, out, 1) is ErrorCode.SLOT_BUSY
    (ev,) = core.tick(2).events
    assert (ev.flip.front_buffer, ev.flip.released_buffer) == (1, 0)
    assert seq(commit(core, out, 0)) == 3


def test_a_flood_of_commits_never_queues() -> None:
    core, _ = make()
    out = open_(core).output
    dropped = []
    for i in range(1000):
        got = commit(core, out, 1 + i % 2, now=i)
        assert isinstance(got, Committed) and got.seq == i + 1
        dropped.append(got.dropped)
    assert dropped[0] is None and all(d is not None and d.flags == DROPPED | RELEASED for d in dropped[1:])
    assert [d.released_seq for d in dropped[1:4] if d] == [1, 2, 3]
    (ev,) = core.tick(5000).events
    assert (ev.flip.front_seq, ev.flip.front_buffer) == (1000, 2)


@pytest.mark.parametrize(("buffer", "damage", "err"), [
    (3, (), ErrorCode.BAD_ARG),
    (BUFFER_NONE, (), ErrorCode.BAD_ARG),
    (0, (DamageRect(0, 0, 0, 5),), ErrorCode.BAD_ARG),
    (0, (DamageRect(1900, 0, 21, 5),), ErrorCode.BAD_RANGE),
    (0, (DamageRect(0, 1079, 1, 2),), ErrorCode.BAD_RANGE),
    (0, (DamageRect(0xFFFFFFFF, 0, 2, 2),), ErrorCode.BAD_RANGE),
])
def test_hostile_commits(buffer: int, damage: tuple[DamageRect, ...], err: ErrorCode) -> None:
    core, _ = make()
    out = open_(core).output
    assert commit(core, out, buffer, damage=damage) is err
    assert core.buffer_states(out) == {0: "guest", 1: "guest", 2: "guest"}


def test_hostile_commit_records() -> None:
    core, _ = make(2)
    a = open_(core, 0).output
    b = open_(core, 1).output
    ok = DisplayCommit(a, 0, tuple(DamageRect(i, i, 1, 1) for i in range(DISPLAY_MAX_DAMAGE))).pack()
    assert core.commit(0, ok[:-1], 0) is ErrorCode.BAD_ARG  # length does not match the count
    assert core.commit(0, ok[:40], 0) is ErrorCode.BAD_ARG
    too_many = DisplayCommit(a, 0, tuple(DamageRect(0, 0, 1, 1) for _ in range(DISPLAY_MAX_DAMAGE + 1))).pack()
    assert core.commit(0, too_many, 0) is ErrorCode.BAD_ARG
    stray = bytearray(DisplayCommit(a, 0).pack())
    stray[20] = 1  # external block set on an allocated buffer
    assert core.commit(0, bytes(stray), 0) is ErrorCode.BAD_ARG
    assert core.commit(0, DisplayCommit(a, 0, flags=1).pack(), 0) is ErrorCode.BAD_FLAGS
    assert commit(core, b, 0, vm=0) is ErrorCode.BAD_SESSION  # another guest's output
    assert commit(core, 99, 0) is ErrorCode.BAD_SESSION
    assert commit(core, a, 0, vm=7) is ErrorCode.DEVICE_GONE
    assert seq(core.commit(0, ok, 0)) == 1  # 16 rects are fine


def ext(offset: int = 1 << 20, w: int = 640, h: int = 360, fmt: int = PixFmt.YUV420P, nplanes: int = 3,
        planes: tuple[int, int, int] = (0, 0x40000, 0x50000), strides: tuple[int, int, int] = (704, 352, 352)
        ) -> ExternalBuffer:
    return ExternalBuffer(offset, w, h, fmt, nplanes, planes, strides)


def test_external_picture_zero_copy_commit() -> None:
    core, _ = make()
    out = open_(core).output
    c = commit(core, out, BUFFER_EXTERNAL, external=ext(), damage=(DamageRect(0, 0, 640, 360),))
    assert seq(c) == 1
    (ev,) = core.tick(1).events
    assert ev.flip.front_buffer == BUFFER_EXTERNAL
    frame = core.scene()[0].frame
    assert frame is not None  # a decoder's padded planes, read where they lie
    assert [(p.offset, p.stride, p.rows, p.row_bytes) for p in frame.planes] == [
        (1 << 20, 704, 360, 640), ((1 << 20) + 0x40000, 352, 180, 320), ((1 << 20) + 0x50000, 352, 180, 320)]
    packed = ext(planes=(0, 704 * 360, 704 * 360 + 352 * 180))
    commit(core, out, BUFFER_EXTERNAL, external=packed)
    (ev,) = core.tick(2).events
    assert (ev.flip.released_buffer, ev.flip.released_seq) == (BUFFER_EXTERNAL, 1)
    f2 = core.scene()[0].frame
    assert f2 is not None and [p.offset for p in f2.planes] == [1 << 20, (1 << 20) + 704 * 360,
                                                               (1 << 20) + 704 * 360 + 352 * 180]
    commit(core, out, 0)  # back to an allocated buffer: the external one is released at the next tick
    (ev,) = core.tick(3).events
    assert (ev.flip.front_buffer, ev.flip.released_buffer) == (0, BUFFER_EXTERNAL)


@pytest.mark.parametrize(("e", "err"), [
    (ext(fmt=PixFmt.RGB24, nplanes=1), ErrorCode.BAD_ARG),
    (ext(nplanes=2), ErrorCode.BAD_ARG),
    (ext(w=0), ErrorCode.BAD_ARG),
    (ext(w=9000), ErrorCode.TOO_LARGE),
    (ext(strides=(600, 352, 352)), ErrorCode.BAD_ARG),  # stride shorter than a row
    (ext(fmt=PixFmt.BGRA, nplanes=1, planes=(0, 0, 64), strides=(2560, 0, 0)), ErrorCode.BAD_ARG),
    (ext(offset=4096), ErrorCode.BAD_RANGE),  # the register page is not the heap
    (ext(offset=HEAP[1] - 0x50000), ErrorCode.BAD_RANGE),  # runs past the heap's end
    (ext(offset=abi.U64_MAX - 0x100), ErrorCode.OVERFLOW),
    (ext(offset=abi.U64_MAX - 0x40000, planes=(0x50000, 0, 0x8000)), ErrorCode.OVERFLOW),  # offset + plane offset
])
def test_hostile_external_pictures(e: ExternalBuffer, err: ErrorCode) -> None:
    core, _ = make()
    out = open_(core).output
    assert commit(core, out, BUFFER_EXTERNAL, external=e) is err
    assert core.tick(1).events == ()


def test_external_picture_at_the_heap_end_is_exact() -> None:
    core, _ = make()
    out = open_(core).output
    e = ext(fmt=PixFmt.BGRA, nplanes=1, planes=(0, 0, 0), strides=(4096, 0, 0), w=1000, h=2)
    last = HEAP[1] - (4096 + 4000)  # the last row ends exactly at the heap's end
    assert seq(commit(core, out, BUFFER_EXTERNAL, external=ExternalBuffer(last, *_rest(e)))) == 1
    assert commit(core, out, BUFFER_EXTERNAL, external=ExternalBuffer(last + 1, *_rest(e))) is ErrorCode.BAD_RANGE


def _rest(e: ExternalBuffer) -> tuple[int, int, int, int, tuple[int, int, int], tuple[int, int, int]]:
    return e.width, e.height, e.pix_fmt, e.nplanes, e.plane_offsets, e.strides


def test_detach_clears_and_labels_then_leaves_after_linger() -> None:
    core, alloc = make(2, linger_ns=10_000)
    out = open_(core, 0).output
    open_(core, 1)
    commit(core, out, 0)
    assert core.tick(1).scene[0].frame is not None
    core.detach(0, now_ns=100, died=True)
    t = core.tick(200)
    assert t.changed and t.events == ()
    assert [(s.vm, s.frame, s.label) for s in t.scene] == [(0, None, "vm0\ndied"), (1, None, "vm1\nno picture")]
    assert t.scene[0].viewport.rect == lay.Rect(0, 0, 960, 1080)  # keeps its place while labelled
    assert commit(core, out, 1) is ErrorCode.DEVICE_GONE
    assert alloc.freed == []  # the region is gone with the guest: nothing to give back
    assert [s.vm for s in core.tick(10_099).scene] == [0, 1]
    t = core.tick(10_100)
    assert t.changed and [(s.vm, s.viewport.rect) for s in t.scene] == [(1, lay.Rect(0, 0, 1920, 1080))]
    core.detach(1, now_ns=0)
    assert core.scene()[0].label == "vm1\ndetached"


def test_close_frees_and_a_stale_handle_is_refused() -> None:
    core, alloc = make()
    first = open_(core)
    commit(core, first.output, 0)
    core.tick(1)
    assert core.close_output(0, first.output) is ErrorCode.OK
    assert alloc.freed == [(0, first.allocation)]
    t = core.tick(2)
    assert t.changed and t.scene[0].frame is None and t.scene[0].label == "vm0\nno picture"
    second = open_(core)
    assert second.output != first.output
    assert commit(core, first.output, 0) is ErrorCode.BAD_SESSION
    assert core.close_output(0, first.output) is ErrorCode.BAD_SESSION


def test_layout_changes_at_run_time() -> None:
    core, _ = make(3)
    for vm in range(3):
        open_(core, vm, 64, 64)
    vps = core.set_layout(lay.LayoutSpec(lay.Kind.MAIN, main="vm2"))
    assert [(v.vm, v.rect) for v in vps] == [(0, lay.Rect(480, 810, 480, 270)), (1, lay.Rect(960, 810, 480, 270)),
                                            (2, lay.Rect(0, 0, 1920, 810))]
    assert core.tick(0).changed
    spec = lay.LayoutSpec(lay.Kind.RECTS, rects={"vm0": lay.RectSpec(0, 0, 100, 100, z=5),
                                                 "vm1": lay.RectSpec(50, 50, 100, 100, z=1)})
    core.set_layout(spec)
    t = core.tick(1)
    assert t.changed and [s.vm for s in t.scene] == [1, 0]  # bottom to top; vm2 is not named: hidden
    with pytest.raises(lay.LayoutError):
        core.set_layout(lay.LayoutSpec(lay.Kind.RECTS, rects={"vm0": lay.RectSpec(0, 0, 1921, 10)}))
    assert core.layout_spec == spec and not core.tick(2).changed


def test_a_vm_is_on_the_screen_from_its_first_display_task() -> None:
    """A guest that only uses the codec (or records the screen) takes no place on it; its first
    display task, even a refused one, gives it a viewport; leaving without one leaves nothing."""
    core, _ = make(3)
    assert core.tick(0).scene == () and core.statistics(0)["vms"] == [] and core.viewports() == ()
    assert core.open_output(1, DisplayOpen(0, 0, PixFmt.BGRA, 2).pack()) is ErrorCode.BAD_ARG
    t = core.tick(1)
    assert t.changed and [(s.vm, s.viewport.rect, s.label) for s in t.scene] == [
        (1, lay.Rect(0, 0, 1920, 1080), "vm1\nno picture")]
    vms = core.statistics(1)["vms"]
    assert isinstance(vms, list) and [(v["name"], v["rejected"]) for v in vms] == [("vm1", 1)]
    core.detach(2, now_ns=2)  # never shown: nothing to clear, and its place is not kept
    assert not core.tick(3).changed and core.next_expiry() is None
    open_(core, 0)
    assert [s.vm for s in core.tick(4).scene] == [0, 1]


def test_statistics_commit_rate() -> None:
    core, _ = make()
    out = open_(core).output
    for i in range(30):  # 30 commits in the last second, at 33 ms
        commit(core, out, 1 + i % 2, now=10**9 + i * 33_000_000)
        core.tick(10**9 + i * 33_000_000 + 1_000_000)
    s = core.statistics(10**9 + 990_000_000)["vms"][0]  # type: ignore[index]
    assert s["commit_fps"] == 30.0 and s["presented"] == 30
    assert s["latency_p99_ms"] == pytest.approx(1.0)
    assert core.statistics(3 * 10**9)["vms"][0]["commit_fps"] == 0.0  # type: ignore[index]


def test_tick_type() -> None:
    core, _ = make(0)
    t = core.tick(0)
    assert isinstance(t, Tick) and t.scene == () and t.changed  # the first tick always composes
