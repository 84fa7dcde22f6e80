"""Pixel tests of the compositor against a reference made by hand with the same swscale call.

Each "guest" is a shared mapping (an anonymous mmap, page-aligned like a region) it draws into
through the offsets and strides of its DISPLAY_OPEN reply; the display core decides what is on
screen, and the compositor reads the pictures in place through ``items_from_scene``.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from hostd.display import compose as comp
from hostd.display import layout as lay
from hostd.display.core import Committed, DisplayCore, FrameRef, Opened, Tick
from hostd.display.core import Plane as core_plane
from hostd.display.layout import Aspect, Kind, LayoutSpec, Rect, RectSpec
from vmediad import abi
from vmediad.abi import DisplayCommit, DisplayOpen, DisplayReply, FlipFlag, PixFmt

W, H = 640, 360
REGION = 8 << 20
HEAP_LO = 8192
NAMES = {PixFmt.BGRA: "bgra", PixFmt.NV12: "nv12", PixFmt.YUV420P: "yuv420p"}
BG = (0, 0, 0, 255)
SOLID_BGRA = (10, 200, 50, 255)
FORMATS = [PixFmt.BGRA, PixFmt.NV12, PixFmt.YUV420P]


class Alloc:
    def __init__(self) -> None:
        self.next: dict[int, int] = {}

    def alloc(self, vm: int, size: int, align: int) -> int | None:
        off = -(-self.next.get(vm, HEAP_LO) // align) * align
        if off + size > REGION:
            return None
        self.next[vm] = off + size
        return off

    def free(self, vm: int, offset: int) -> None:
        pass


@dataclass
class Guest:
    vm: int
    mm: mmap.mmap
    region: NDArray[np.uint8]
    reply: DisplayReply

    def planes(self, index: int) -> list[NDArray[np.uint8]]:
        """The guest's own views of buffer ``index``, from the reply table alone."""
        b = self.reply.buffers[index]
        out = []
        for i, (rows, row_bytes) in enumerate(abi.plane_shapes(PixFmt(self.reply.pix_fmt), self.reply.width,
                                                              self.reply.height)):
            start, stride = b.offset + b.plane_offsets[i], b.strides[i]
            out.append(self.region[start:start + rows * stride].reshape(rows, stride)[:, :row_bytes])
        return out

    def draw(self, index: int, planes: list[NDArray[np.uint8]]) -> None:
        for dst, src in zip(self.planes(index), planes, strict=True):
            dst[:] = src


class Screen:
    def __init__(self, core: DisplayCore, guests: dict[int, Guest], compositor: comp.Compositor | None = None):
        self.core, self.guests = core, guests
        self.compositor = compositor or comp.Compositor()
        self.pixels = np.zeros((H, W, 4), dtype=np.uint8)
        self.now = 0

    def refresh(self) -> tuple[Tick, comp.ComposeStats]:
        self.now += 33_000_000
        t = self.core.tick(self.now)
        items = comp.items_from_scene(t.scene, lambda vm: self.guests[vm].region)
        stats = self.compositor.compose(self.pixels, items)
        return t, stats


def setup(fmt: PixFmt, sizes: list[tuple[int, int]], spec: LayoutSpec, nbuf: int = 2) -> tuple[Screen, list[Guest]]:
    core = DisplayCore(W, H, Alloc(), layout=spec)
    guests = []
    for vm, (w, h) in enumerate(sizes):
        mm = mmap.mmap(-1, REGION)
        core.attach(vm, f"vm{vm}", HEAP_LO, REGION)
        got = core.open_output(vm, DisplayOpen(w, h, fmt, nbuf).pack())
        assert isinstance(got, Opened), got
        guests.append(Guest(vm, mm, np.frombuffer(mm, dtype=np.uint8), DisplayReply.unpack(got.reply.pack())))
    return Screen(core, {g.vm: g for g in guests}), guests


def commit(screen: Screen, g: Guest, index: int) -> Committed:
    got = screen.core.commit(g.vm, DisplayCommit(g.reply.output, index).pack(), screen.now)
    assert isinstance(got, Committed), got
    return got


def pattern(fmt: PixFmt, kind: str, w: int, h: int) -> list[NDArray[np.uint8]]:
    """Known pictures, never black (so a viewport's edge is told from the background)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(w * 1000 + h)
    if fmt == PixFmt.BGRA:
        img = np.empty((h, w, 4), dtype=np.uint8)
        if kind == "solid":
            img[:] = SOLID_BGRA
        elif kind == "hgrad":
            img[..., 0] = xx * 255 // max(w - 1, 1)
            img[..., 1], img[..., 3] = 128, 255
            img[..., 2] = 255 - img[..., 0]
        elif kind == "vgrad":
            img[..., 0], img[..., 2], img[..., 3] = 40, 200, 255
            img[..., 1] = yy * 255 // max(h - 1, 1)
        else:
            img[:] = rng.integers(30, 256, (h, w, 4))  # alpha too: the screen ignores it
        return [img.reshape(h, 4 * w)]
    cw, ch = (w + 1) // 2, (h + 1) // 2
    if kind == "solid":
        y, u, v = np.full((h, w), 150), np.full((ch, cw), 60), np.full((ch, cw), 200)
    elif kind == "hgrad":
        y, u, v = 60 + xx * 150 // max(w - 1, 1), np.full((ch, cw), 128), np.full((ch, cw), 100)
    elif kind == "vgrad":
        cy = np.mgrid[0:ch, 0:cw][0]
        y, u, v = 60 + yy * 150 // max(h - 1, 1), 60 + cy * 120 // max(ch - 1, 1), np.full((ch, cw), 128)
    else:
        y, u, v = rng.integers(60, 236, (h, w)), rng.integers(16, 241, (ch, cw)), rng.integers(16, 241, (ch, cw))
    y8, u8, v8 = (a.astype(np.uint8) for a in (y, u, v))
    if fmt == PixFmt.YUV420P:
        return [y8, u8, v8]
    uv = np.empty((ch, 2 * cw), dtype=np.uint8)
    uv[:, 0::2], uv[:, 1::2] = u8, v8
    return [y8, uv]


def reference_scale(fmt: PixFmt, planes: list[NDArray[np.uint8]], w: int, h: int, crop: Rect,
                    dst: Rect) -> NDArray[np.uint8]:
    """The crop of a picture scaled by the same swscale filter through PyAV, on frames PyAV
    allocated and we filled: a bgra picture one channel at a time (each a gray picture), a
    4:2:0 picture to bgra in one call."""
    if fmt == PixFmt.BGRA:
        img = planes[0].reshape(h, w, 4)[crop.y:crop.bottom, crop.x:crop.right]
        out = np.empty((dst.h, dst.w, 4), np.uint8)
        out[..., 3] = 255
        for c in range(3):
            gray = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[..., c]), "gray")
            out[..., c] = gray.reformat(dst.w, dst.h, "gray", interpolation="BILINEAR", threads=1).to_ndarray()
        return out
    else:
        frame = av.VideoFrame(crop.w, crop.h, NAMES[fmt])
        cy, cx, ch, cw = crop.y // 2, crop.x // 2, (crop.h + 1) // 2, (crop.w + 1) // 2
        cuts = [(crop.y, crop.h, crop.x, crop.w)] + (
            [(cy, ch, 2 * cx, 2 * cw)] if fmt == PixFmt.NV12 else [(cy, ch, cx, cw)] * 2)
        for plane, src, (y0, rows, x0, n) in zip(frame.planes, planes, cuts, strict=True):
            view = np.ndarray((rows, n), np.uint8, buffer=memoryview(plane), strides=(plane.line_size, 1))
            view[:] = src[y0:y0 + rows, x0:x0 + n]
    return np.asarray(frame.reformat(dst.w, dst.h, "bgra", interpolation="BILINEAR", threads=1).to_ndarray(),
                      dtype=np.uint8)


def blit(screen: NDArray[np.uint8], img: NDArray[np.uint8], dst: Rect) -> None:
    screen[dst.y:dst.bottom, dst.x:dst.right] = img
    screen[dst.y:dst.bottom, dst.x:dst.right, 3] = 255


# Four VMs at known viewports: (source size, pattern, rect, aspect, expected dst, expected crop y
# for bgra / for 4:2:0 (whose crop starts on an even row)).
CASES = [
    ((160, 90), "solid", RectSpec(8, 8, 300, 160, aspect=Aspect.FIT), Rect(16, 8, 284, 160), 0, 0),
    ((128, 128), "hgrad", RectSpec(320, 8, 312, 160, aspect=Aspect.FIT), Rect(396, 8, 160, 160), 0, 0),
    ((200, 100), "vgrad", RectSpec(8, 180, 300, 172, aspect=Aspect.STRETCH), Rect(8, 180, 300, 172), 0, 0),
    ((96, 64), "noise", RectSpec(320, 180, 312, 172, aspect=Aspect.FILL), Rect(320, 180, 312, 172), 5, 4),
]
SPEC4 = LayoutSpec(Kind.RECTS, rects={f"vm{i}": c[2] for i, c in enumerate(CASES)})


def _bg(px: NDArray[np.uint8]) -> NDArray[np.bool_]:
    out: NDArray[np.bool_] = np.all(px == np.array(BG, dtype=np.uint8), axis=-1)
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=[NAMES[f] for f in FORMATS])
def test_four_vms_match_the_reference(fmt: PixFmt) -> None:
    screen, guests = setup(fmt, [c[0] for c in CASES], SPEC4)
    expected = np.zeros((H, W, 4), dtype=np.uint8)
    expected[:] = BG
    for g, ((w, h), kind, _, dst, crop_y_bgra, crop_y_420) in zip(guests, CASES, strict=True):
        planes = pattern(fmt, kind, w, h)
        g.draw(1, planes)
        commit(screen, g, 1)
        crop_y = crop_y_bgra if fmt == PixFmt.BGRA else crop_y_420
        crop = Rect(0, crop_y, w, 53) if kind == "noise" else Rect(0, 0, w, h)
        blit(expected, reference_scale(fmt, planes, w, h, crop, dst), dst)
    t, stats = screen.refresh()
    assert [e.flip.flags for e in t.events] == [int(FlipFlag.PRESENTED)] * 4
    assert np.array_equal(screen.pixels, expected)
    # zero copy: bgra always; 4:2:0 unless the height is not a multiple of 4 (vm0) or cropped (vm3)
    assert stats.scaled == 4
    for (_, _, _, dst, _, _) in CASES:
        px = screen.pixels
        ring = np.concatenate([px[dst.y - 1, dst.x - 1:dst.right + 1], px[dst.bottom, dst.x - 1:dst.right + 1],
                               px[dst.y:dst.bottom, dst.x - 1], px[dst.y:dst.bottom, dst.right]])
        assert _bg(ring).all(), dst  # just outside each viewport's picture: background
        edge = np.concatenate([px[dst.y, dst.x:dst.right], px[dst.bottom - 1, dst.x:dst.right],
                               px[dst.y:dst.bottom, dst.x], px[dst.y:dst.bottom, dst.right - 1]])
        assert not _bg(edge).any(), dst  # just inside: the picture
    solid = screen.pixels[8:168, 16:300].reshape(-1, 4).astype(int)
    if fmt == PixFmt.BGRA:
        assert (solid == SOLID_BGRA).all()  # a solid colour stays that colour through the scale
    else:
        assert (solid.max(axis=0) - solid.min(axis=0)).max() <= 1  # yuv->rgb rounding at the edge rows
    # the same pictures scaled two at a time give the same screen
    pooled = comp.Compositor(workers=2)
    again = np.zeros_like(screen.pixels)
    items = comp.items_from_scene(screen.core.scene(), lambda vm: screen.guests[vm].region)
    assert pooled.compose(again, items).scaled == 4
    pooled.close()
    assert np.array_equal(again, expected)
    del items
    # no commit since: nothing is scaled again, the screen is the same
    before = screen.pixels.copy()
    t, stats = screen.refresh()
    assert t.events == () and not t.changed and (stats.scaled, stats.reused) == (0, 4)
    assert np.array_equal(screen.pixels, before)


def _solids(n: int) -> list[tuple[int, int, int, int]]:
    return [(40 + 50 * i, 200 - 40 * i, (90 * i) % 256, 255) for i in range(n)]


def _draw_solid(g: Guest, index: int, colour: tuple[int, int, int, int]) -> None:
    g.planes(index)[0].reshape(g.reply.height, g.reply.width, 4)[:] = colour


def test_z_order_the_higher_z_wins_and_can_change() -> None:
    a, b = RectSpec(0, 0, 200, 200, z=1, aspect=Aspect.STRETCH), RectSpec(100, 100, 200, 200, z=0,
                                                                          aspect=Aspect.STRETCH)
    screen, guests = setup(PixFmt.BGRA, [(32, 32), (32, 32)], LayoutSpec(Kind.RECTS, rects={"vm0": a, "vm1": b}))
    red, blue = (0, 0, 255, 255), (255, 0, 0, 255)
    for g, c in zip(guests, (red, blue), strict=True):
        _draw_solid(g, 0, c)
        commit(screen, g, 0)
    screen.refresh()
    px = screen.pixels
    assert tuple(px[150, 150]) == red and tuple(px[50, 50]) == red and tuple(px[250, 250]) == blue
    swapped = LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 200, 200, z=0, aspect=Aspect.STRETCH),
                                            "vm1": RectSpec(100, 100, 200, 200, z=3, aspect=Aspect.STRETCH)})
    screen.core.set_layout(swapped)
    t, _ = screen.refresh()
    assert t.changed and t.events == ()
    assert tuple(px[150, 150]) == blue and tuple(px[50, 50]) == red and tuple(px[250, 250]) == blue
    assert tuple(px[350, 350]) == BG


def test_layout_change_between_two_composes() -> None:
    colours = _solids(4)
    screen, guests = setup(PixFmt.BGRA, [(160, 90)] * 4, LayoutSpec())
    for g, c in zip(guests, colours, strict=True):
        _draw_solid(g, 0, c)
        commit(screen, g, 0)
    screen.refresh()
    px = screen.pixels
    for (x, y), c in zip([(160, 90), (480, 90), (160, 270), (480, 270)], colours, strict=True):
        assert tuple(px[y, x]) == c  # grid cells 320x180 each
    screen.core.set_layout(lay.parse(["main", "vm3"]))
    t, stats = screen.refresh()
    assert t.changed and stats.scaled == 4  # new sizes: scaled again from the same commits
    # main view (0,0,640,270): 160x90 fits as 480x270 at x=80; thumbs 160x90 at x=80, 240, 400, y=270
    assert tuple(px[100, 79]) == BG and tuple(px[100, 80]) == colours[3] and tuple(px[100, 559]) == colours[3]
    assert tuple(px[100, 560]) == BG
    assert np.array_equal(px[:270, 80:560].reshape(-1, 4), np.tile(colours[3], (270 * 480, 1)))
    for x, c in zip((80, 240, 400), colours[:3], strict=True):
        assert (px[270:360, x:x + 160] == c).all()
    assert _bg(px[270:360, :80]).all() and _bg(px[270:360, 560:]).all()


def test_a_detached_vm_is_cleared_and_labelled() -> None:
    colours = _solids(4)
    screen, guests = setup(PixFmt.BGRA, [(160, 90)] * 4, LayoutSpec())
    for g, c in zip(guests, colours, strict=True):
        _draw_solid(g, 0, c)
        commit(screen, g, 0)
    screen.refresh()
    cell = screen.pixels[180:360, 0:320]  # vm2's grid cell
    assert (cell == colours[2]).all()
    screen.core.detach(2, screen.now, died=True)
    t, stats = screen.refresh()
    assert t.changed and stats.labelled == 1
    assert not (cell == colours[2]).all(axis=-1).any()  # never frozen on its last picture
    border = np.concatenate([cell[:2].reshape(-1, 4), cell[-2:].reshape(-1, 4), cell[:, :2].reshape(-1, 4),
                             cell[:, -2:].reshape(-1, 4)])
    assert (border == comp.BORDER).all()
    mask = comp.text_mask("vm2\ndied")
    assert mask.shape == (16, 23)
    scale = 4  # min(MAX_TEXT_SCALE, 314 // 23, 174 // 16)
    text = (cell == comp.TEXT).all(axis=-1)
    y0, x0 = (180 - 16 * scale) // 2, (320 - 23 * scale) // 2
    assert text.sum() == mask.sum() * scale * scale
    assert np.array_equal(text[y0:y0 + 64, x0:x0 + 92], np.kron(mask, np.ones((scale, scale), dtype=bool)))
    inner = cell[2:-2, 2:-2]
    assert ((inner == comp.CLEARED).all(axis=-1) | (inner == comp.TEXT).all(axis=-1)).all()
    for (x, y), c in zip([(160, 90), (480, 90), (480, 270)], [colours[0], colours[1], colours[3]], strict=True):
        assert tuple(screen.pixels[y, x]) == c  # the others are untouched


def test_text_mask_glyphs() -> None:
    a = comp.text_mask("a")
    assert a.shape == (7, 5)
    assert ["".join("#" if b else "." for b in row) for row in a] == [
        ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"]
    assert np.array_equal(comp.text_mask("~"), comp.text_mask("?"))


CORNER = 16


def _draw_counter(g: Guest, index: int, counter: int, corners: int = 4) -> None:
    img = g.planes(index)[0].reshape(g.reply.height, g.reply.width, 4)
    if corners == 4:
        img[:] = (60, 60, 60, 255)
    c = (counter, 255 - counter, 77, 255)
    for cy, cx in [(0, 0), (0, 1), (1, 0), (1, 1)][:corners]:
        ys = slice(0, CORNER) if cy == 0 else slice(g.reply.height - CORNER, g.reply.height)
        xs = slice(0, CORNER) if cx == 0 else slice(g.reply.width - CORNER, g.reply.width)
        img[ys, xs] = c


def test_no_tearing_while_the_guest_draws_the_next_buffer() -> None:
    """Each commit carries its counter in its four corners.  Before every composition the guest
    has already started the next picture (two corners of counter+1 drawn) in a buffer it holds;
    a composed frame must show one counter in all four corners, the last one presented."""
    screen, (g,) = setup(PixFmt.BGRA, [(128, 128)], LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 64, 64)}),
                         nbuf=3)
    out = g.reply.output
    held = {0, 1, 2}
    seq_counter: dict[int, int] = {}
    shown = []
    counter = 0
    for step in range(30):
        for _ in range(1 + step % 3):  # 1..3 commits per refresh: the mailbox drops the extra ones
            counter += 1
            b = min(held)
            assert screen.core.buffer_states(out)[b] == "guest"  # type: ignore[index]
            held.remove(b)
            _draw_counter(g, b, counter)
            c = commit(screen, g, b)
            seq_counter[c.seq] = counter
            if c.dropped is not None:
                held.add(c.dropped.released_buffer)
        screen.now += 33_000_000
        t = screen.core.tick(screen.now)
        nxt = min(held)  # the guest starts its next picture while the screen is composed
        _draw_counter(g, nxt, counter + 1, corners=4)
        _draw_counter(g, nxt, counter + 2, corners=2)
        items = comp.items_from_scene(t.scene, lambda vm: g.region)
        screen.compositor.compose(screen.pixels, items)
        corners = {int(screen.pixels[y, x, 0]) for y in (4, 59) for x in (4, 59)}
        (ev,) = t.events
        assert corners == {seq_counter[ev.flip.front_seq]} == {counter}, (step, corners)
        shown.append(counter)
        for e in t.events:  # delivered after composing: the released buffer is the guest's again
            if e.flip.flags & FlipFlag.RELEASED:
                held.add(e.flip.released_buffer)
    assert len(shown) == 30 and shown[-1] == counter


def test_default_filter_is_not_nearest() -> None:
    screen, (g,) = setup(PixFmt.BGRA, [(8, 8)], LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 64, 64)}))
    img = g.planes(0)[0].reshape(8, 8, 4)
    img[:] = 255
    img[::2, ::2, :3] = 0  # (swscale treats a 2x2 picture as a special case: use 8x8)
    commit(screen, g, 0)
    t = screen.core.tick(1)
    items = comp.items_from_scene(t.scene, lambda vm: g.region)
    assert comp.Compositor().interpolation == "BILINEAR"
    smooth = np.zeros((H, W, 4), np.uint8)
    comp.Compositor().compose(smooth, items)
    assert len(np.unique(smooth[:64, :64, 0])) > 10
    nearest = np.zeros((H, W, 4), np.uint8)
    comp.Compositor(interpolation="POINT").compose(nearest, items)
    assert set(np.unique(nearest[:64, :64, 0]).tolist()) == {0, 255}


def test_no_view_of_guest_memory_outlives_a_composition() -> None:
    for fmt, size in ((PixFmt.BGRA, (64, 64)), (PixFmt.NV12, (64, 64)), (PixFmt.YUV420P, (63, 31))):
        spec = LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 64, 64, aspect=Aspect.STRETCH)})
        screen, (g,) = setup(fmt, [size], spec)
        g.draw(0, pattern(fmt, "noise", *size))
        commit(screen, g, 0)
        _, stats = screen.refresh()
        assert stats.scaled == 1
        screen.core.detach(0, screen.now)
        screen.refresh()  # the compositor drops what it kept for the viewport
        del g.region
        del screen.guests[0]
        g.mm.close()  # BufferError if any numpy/PyAV view of the mapping were still alive
        assert g.mm.closed


def test_compose_counts_cpu_time() -> None:
    screen, guests = setup(PixFmt.NV12, [(640, 360)] * 4, LayoutSpec())
    for g in guests:
        g.draw(0, pattern(PixFmt.NV12, "noise", 640, 360))
        commit(screen, g, 0)
    _, stats = screen.refresh()
    assert stats.cpu_s > 0 and stats.wall_s > 0 and stats.scaled == 4
    screen.refresh()
    s = screen.compositor.statistics()
    assert (s["frames"], s["scaled"], s["reused"]) == (2, 4, 4)
    assert s["cpu_s"] >= stats.cpu_s and s["max_cpu_ms"] == pytest.approx(max(s["max_cpu_ms"], stats.cpu_s * 1e3))


def test_floor_benchmark_runs() -> None:
    r = comp.compose_floor_vs_core(2, vms=4, width=64, height=36)
    assert set(r) == {"floor_ms", "floor_one_call_ms", "compose_ms", "compose_kept_ms", "ratio"}
    assert all(v > 0 for v in r.values())


# --- scaling ahead of the refresh --------------------------------------------------------------
def _prescale_all(screen: Screen, guests: list[Guest], commits: list[Committed],
                  done: list[tuple[int, int, int]]) -> list[comp.Prescale]:
    """What the service does at each commit: hand the picture to the compositor's workers."""
    out = []
    for g, c in zip(guests, commits, strict=True):
        key = (g.vm, g.reply.output, c.seq)
        vp = screen.core.viewport_of(g.vm)
        assert vp is not None
        ref, region = c.frame, g.region

        def source(ref: FrameRef = ref, region: NDArray[np.uint8] = region,
                   key: tuple[int, int, int] = key) -> comp.Source:
            return comp.Source(ref.fmt, ref.width, ref.height, comp.plane_views(region, ref), key)

        def ended(key: tuple[int, int, int] = key) -> None:
            done.append(key)

        pre = screen.compositor.prescale(g.vm, key, vp.rect, vp.aspect, source, ended)
        assert pre is not None
        out.append(pre)
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=[NAMES[f] for f in FORMATS])
def test_prescaled_pictures_equal_the_pictures_scaled_at_the_refresh(fmt: PixFmt) -> None:
    screen, guests = setup(fmt, [c[0] for c in CASES], SPEC4)
    screen.compositor = comp.Compositor(workers=2)
    commits = []
    for g, ((w, h), kind, *_) in zip(guests, CASES, strict=True):
        g.draw(1, pattern(fmt, kind, w, h))
        commits.append(commit(screen, g, 1))
    done: list[tuple[int, int, int]] = []
    pres = _prescale_all(screen, guests, commits, done)
    cpu = 0.0
    for p in pres:
        got = p.result()
        assert got is not None
        cpu += got[1]
    assert sorted(done) == sorted((g.vm, g.reply.output, 1) for g in guests)  # each job said it ended
    s = screen.compositor.statistics()
    assert (s["prescaled"], s["scaled"], s["frames"]) == (4, 4, 0) and s["cpu_s"] > 0  # counted before any refresh
    t, stats = screen.refresh()
    # The refresh only copied the four images: nothing was scaled at the tick.
    assert (stats.prescaled, stats.scaled, stats.reused) == (4, 0, 0) and len(t.events) == 4
    assert stats.cpu_s >= cpu  # the composition's CPU includes the scaling done ahead of it
    ref = np.zeros_like(screen.pixels)
    comp.Compositor().compose(ref, comp.items_from_scene(t.scene, lambda vm: screen.guests[vm].region))
    assert np.array_equal(screen.pixels, ref)
    screen.compositor.close()


def test_a_prescale_for_a_changed_layout_is_not_shown() -> None:
    screen, guests = setup(PixFmt.BGRA, [(160, 90)], LayoutSpec())
    (g,) = guests
    _draw_solid(g, 0, (1, 2, 3, 255))
    c = commit(screen, g, 0)
    (pre,) = _prescale_all(screen, guests, [c], [])
    assert pre.result() is not None
    screen.core.set_layout(LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(10, 10, 100, 60, aspect=Aspect.STRETCH)}))
    _, stats = screen.refresh()
    assert (stats.prescaled, stats.scaled) == (0, 1)  # scaled again for the new viewport
    assert (screen.pixels[10:70, 10:110] == (1, 2, 3, 255)).all()
    assert _bg(screen.pixels[:10]).all() and _bg(screen.pixels[70:]).all()


def test_a_cancelled_prescale_never_reads_and_the_refresh_scales_instead() -> None:
    screen, guests = setup(PixFmt.BGRA, [(160, 90)], LayoutSpec())  # one scaling worker
    (g,) = guests
    _draw_solid(g, 0, (9, 8, 7, 255))
    c = commit(screen, g, 0)
    gate = threading.Event()

    def blocked() -> comp.Source:
        gate.wait(10)
        return comp.Source(PixFmt.BGRA, 8, 8, (np.zeros((8, 32), np.uint8),))

    # The worker is busy with another job until the gate opens: the next one cannot start.
    blocker = screen.compositor.prescale(5, "other", Rect(0, 0, 8, 8), Aspect.FIT, blocked, lambda: None)
    read: list[int] = []
    done: list[tuple[int, int, int]] = []
    key = (0, g.reply.output, c.seq)
    vp = screen.core.viewport_of(0)
    assert vp is not None and blocker is not None

    def source() -> comp.Source:
        read.append(1)
        raise AssertionError("a cancelled prescale read the picture")

    pre = screen.compositor.prescale(0, key, vp.rect, vp.aspect, source, lambda: done.append(key))
    assert pre is not None and pre.cancel()
    gate.set()
    assert blocker.result() is not None
    assert pre.result() is None and read == [] and done == []  # never ran, never read, never said done
    _, stats = screen.refresh()
    assert (stats.prescaled, stats.scaled) == (0, 1)  # the refresh scaled it itself
    assert (screen.pixels == (9, 8, 7, 255)).all()  # 160x90 fits the whole 640x360 screen
    screen.compositor.close()


def test_no_view_of_guest_memory_outlives_a_prescale() -> None:
    for fmt, size in ((PixFmt.BGRA, (64, 64)), (PixFmt.NV12, (64, 64)), (PixFmt.YUV420P, (63, 31))):
        screen, (g,) = setup(fmt, [size], LayoutSpec())
        g.draw(0, pattern(fmt, "noise", *size))
        c = commit(screen, g, 0)
        done: list[tuple[int, int, int]] = []
        (pre,) = _prescale_all(screen, [g], [c], done)
        assert pre.result() is not None and len(done) == 1
        del g.region, c
        del screen.guests[0]
        g.mm.close()  # BufferError if the job or the compositor still held a view of the mapping
        assert g.mm.closed
        screen.compositor.close()


# --- the bgra scaler keeps channels apart ------------------------------------------------------
def test_a_bgra_picture_is_scaled_channel_by_channel() -> None:
    """A red-only noise picture stays red-only (no green or blue appears), and every channel is
    what swscale's bilinear filter gives that channel alone as a gray picture."""
    rng = np.random.default_rng(3)
    pic = np.zeros((97, 130, 4), np.uint8)
    pic[..., 2] = rng.integers(0, 256, (97, 130))
    pic[..., 3] = rng.integers(0, 256, (97, 130))  # guest alpha is not shown
    src = comp.Source(PixFmt.BGRA, 130, 97, (pic.reshape(97, 520),))
    out = comp.Scaler().scale(src, Rect(3, 5, 120, 80), 61, 33, "BILINEAR")
    assert out.shape == (33, 61, 4) and not out[..., :2].any() and (out[..., 3] == 255).all()
    red = av.VideoFrame.from_ndarray(np.ascontiguousarray(pic[5:85, 3:123, 2]), "gray")
    assert np.array_equal(out[..., 2], red.reformat(61, 33, "gray", interpolation="BILINEAR").to_ndarray())


# --- composing only what changed ---------------------------------------------------------------
SW, SH = 160, 96


def _scene(draw: Callable[[Any], Any], n_items: int) -> list[comp.Item]:
    """Up to ``n_items`` viewports (overlapping or not, some labelled, some off screen), each
    showing one of a few small pictures."""
    items = []
    for slot in range(n_items):
        x, y = draw(st.integers(-20, SW - 8)), draw(st.integers(-20, SH - 8))
        rect = Rect(x, y, draw(st.integers(8, 90)), draw(st.integers(8, 60)))
        if draw(st.booleans()) and draw(st.booleans()):
            items.append(comp.Item(slot, rect, Aspect.FIT, None, f"vm{slot}"))
            continue
        pic = draw(st.integers(0, len(PICS) - 1))
        w, h, planes = PICS[pic]
        items.append(comp.Item(slot, rect, draw(st.sampled_from(list(Aspect))),
                               comp.Source(PixFmt.BGRA, w, h, planes, (slot, pic))))
    return items


def _pics() -> list[tuple[int, int, tuple[NDArray[np.uint8], ...]]]:
    rng = np.random.default_rng(5)
    out: list[tuple[int, int, tuple[NDArray[np.uint8], ...]]] = []
    for w, h in ((24, 16), (24, 16), (24, 16), (30, 22)):
        out.append((w, h, (rng.integers(0, 256, (h, 4 * w), dtype=np.uint8),)))
    return out


PICS = _pics()


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_composing_only_what_changed_equals_composing_everything(data: st.DataObject) -> None:
    """Two screens composed alternately (as the service does: each is two compositions behind)
    with ``was`` equal, pixel for pixel, a fresh whole composition of every scene, whatever
    changed between scenes: pictures, labels, viewports, their order."""
    n = data.draw(st.integers(1, 4))
    c = comp.Compositor()
    screens = [np.zeros((SH, SW, 4), np.uint8) for _ in range(2)]
    shown: list[comp.Shown | None] = [None, None]
    scene = _scene(data.draw, n)
    for step in range(6):
        if step:
            # the next scene: mostly one picture replaced in place, sometimes anything
            scene = list(scene)
            if data.draw(st.booleans()) or data.draw(st.booleans()):
                i = data.draw(st.integers(0, n - 1))
                if scene[i].source is not None:
                    pic = data.draw(st.integers(0, len(PICS) - 1 if data.draw(st.booleans()) else 2))
                    w, h, planes = PICS[pic]
                    scene[i] = comp.Item(scene[i].slot, scene[i].rect, scene[i].aspect,
                                         comp.Source(PixFmt.BGRA, w, h, planes, (scene[i].slot, pic, step)))
            else:
                scene = _scene(data.draw, n)
        k = step % 2
        stats = c.compose(screens[k], scene, shown[k])
        shown[k] = stats.shown
        fresh = np.zeros((SH, SW, 4), np.uint8)
        comp.Compositor().compose(fresh, scene)
        assert np.array_equal(screens[k], fresh), (step, scene)


def test_a_new_picture_redraws_only_its_viewport() -> None:
    rects = lay.grid_rects(4, SW, SH)
    w, h, planes = PICS[0]
    c = comp.Compositor()
    screen = np.zeros((SH, SW, 4), np.uint8)

    def scene(n: int) -> list[comp.Item]:
        return [comp.Item(i, r, Aspect.STRETCH, comp.Source(PixFmt.BGRA, w, h, planes, (i, n if i == 2 else 0)))
                for i, r in enumerate(rects)]

    first = c.compose(screen, scene(0))
    assert first.drawn_px == SW * SH and first.scaled == 4
    again = c.compose(screen, scene(1), first.shown)
    assert (again.drawn_px, again.scaled, again.reused) == (rects[2].w * rects[2].h, 1, 3)
    fresh = np.zeros_like(screen)
    comp.Compositor().compose(fresh, scene(1))
    assert np.array_equal(screen, fresh)
    # a layout change (here: one viewport moved) draws the whole screen again
    moved = [comp.Item(0, Rect(1, 1, 30, 20), Aspect.STRETCH, scene(1)[0].source), *scene(1)[1:]]
    assert c.compose(screen, moved, again.shown).drawn_px == SW * SH


# --- pictures flush with the end of a region ---------------------------------------------------
def _flush_scan(out: Any) -> None:
    """In a child: pictures whose last plane ends exactly where the mapping ends (an unmapped
    page follows) are scaled as the compositor does; each image must equal the same picture's
    scaled away from the end.  A load past the mapping kills this process (SIGSEGV)."""
    import ctypes

    libc = ctypes.CDLL(None)
    page = mmap.PAGESIZE
    rng = np.random.default_rng(9)
    n = 0
    for w, h in ((2, 2), (3, 3), (6, 2), (17, 11), (130, 97), (641, 359)):
        for fmt in FORMATS:
            cw, ch = (w + 1) // 2, (h + 1) // 2
            size = 4 * w * h if fmt == PixFmt.BGRA else w * h + 2 * cw * ch
            pages = -(-size // page) + 1
            mm = mmap.mmap(-1, pages * page)
            at = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            assert libc.mprotect(ctypes.c_void_p(at + (pages - 1) * page), page, 0) == 0
            region = np.frombuffer(mm, np.uint8, count=(pages - 1) * page)
            start = region.shape[0] - size
            region[start:] = rng.integers(0, 256, size, dtype=np.uint8)
            planes = [(start, 4 * w, h, 4 * w)] if fmt == PixFmt.BGRA else [(start, w, h, w)] + (
                [(start + w * h, 2 * cw, ch, 2 * cw)] if fmt == PixFmt.NV12 else
                [(start + w * h, cw, ch, cw), (start + w * h + cw * ch, cw, ch, cw)])
            ref = FrameRef(0, fmt, w, h, tuple(core_plane(*p) for p in planes))
            views = comp.plane_views(region, ref)
            inner = tuple(np.array(v) for v in views)  # the same pixels, far from any end
            for dw, dh in ((1, 1), (2 * w + 1, 2 * h + 3), (max(1, w // 3), max(1, h // 3))):
                for interp in ("BILINEAR", "BICUBIC", "LANCZOS", "POINT"):
                    got = comp.Scaler().scale(comp.Source(fmt, w, h, views), Rect(0, 0, w, h), dw, dh, interp)
                    want = comp.Scaler().scale(comp.Source(fmt, w, h, inner), Rect(0, 0, w, h), dw, dh, interp)
                    assert np.array_equal(got, want), (w, h, fmt, dw, dh, interp)
                    n += 1
            del views, region
    out.put(n)


def test_pictures_flush_with_the_region_end_are_scaled_without_a_fault() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_flush_scan, args=(q,))
    p.start()
    p.join(120)
    assert p.exitcode == 0, f"the scan died with {p.exitcode} (-11: a load past the mapping)"
    assert q.get(timeout=5) == 6 * 3 * 3 * 4
