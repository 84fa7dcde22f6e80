"""Composition: each VM's committed picture scaled into its viewport with swscale, in z-order.

``Compositor.compose(screen, items, was)`` draws into a BGRA screen (an ``(H, W, 4)`` uint8
array): the background, then each item bottom to top, either its picture scaled (FFmpeg's
swscale, bilinear by default; ``Scaler``) and translated into its viewport, or, for a viewport
with no picture (its VM detached, died or has not committed yet), a cleared rect with a border
and a label.  The screen is opaque: alpha is 255 everywhere.  ``was`` is what that screen
showed when it was last composed: when only pictures changed (same size, same place), only
their rectangles and what lies over them are drawn again.

Pictures are read where they lie (any plane layout and stride the core validated) by swscale
itself, without the GIL.  The scaled image of a picture is kept per viewport under the item's
key, so a picture that stays on screen is scaled once; with ``workers`` > 1 the pictures of one
composition are scaled in parallel.  It keeps no view of guest memory after ``compose``
returns (a kept image is always its own memory), so a region can be unmapped (``mmap.close``
succeeds) as soon as no composition is running.

``Compositor.prescale`` scales a committed picture as soon as it is committed, on the scaling
workers, into an image of its own: the composition that shows it then only copies it (it waits
for a job still running).  The caller (hostd/display/port.py) keeps the picture's buffer
unreleased and its region mapped until the job's ``done`` callback ran or ``cancel`` succeeded;
the job drops every view of guest memory before it calls ``done``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import structlog
from av.video.reformatter import VideoReformatter
from numpy.typing import NDArray

from hostd.display import swscale as sws
from hostd.display.core import FrameRef, SceneItem
from hostd.display.layout import Aspect, Placement, Rect, place
from vmediad import abi
from vmediad.abi import PixFmt

Screen = NDArray[np.uint8]
Colour = tuple[int, int, int, int]  # B, G, R, A

BACKGROUND: Colour = (0, 0, 0, 255)
CLEARED: Colour = (48, 40, 40, 255)
BORDER: Colour = (128, 128, 128, 255)
TEXT: Colour = (235, 235, 235, 255)
BORDER_PX = 2
MAX_TEXT_SCALE = 4
DEFAULT_INTERPOLATION = "BILINEAR"
_PYAV_NAMES = {PixFmt.BGRA: "bgra", PixFmt.NV12: "nv12", PixFmt.YUV420P: "yuv420p"}
_SWS = {fmt: sws.pix_fmt(name) for fmt, name in _PYAV_NAMES.items()}
_GBRP, _YUV444P = sws.pix_fmt("gbrp"), sws.pix_fmt("yuv444p")
_READY_MAX = 3  # prescaled images kept per viewport, newest last (older ones are superseded)

log = structlog.get_logger("hostd.display")


@dataclass(frozen=True, slots=True)
class Source:
    """A picture: one 2-D uint8 array per plane, ``(rows, row bytes)`` of the picture itself,
    rows possibly strided (views of a region).  ``key``: equal keys mean equal pixels (None: never
    reuse a scaled image)."""

    fmt: PixFmt
    width: int
    height: int
    planes: tuple[NDArray[np.uint8], ...]
    key: Hashable | None = None


@dataclass(frozen=True, slots=True)
class Item:
    slot: int  # stable per viewport (the VM id): what scaled images and scalers are kept under
    rect: Rect
    aspect: Aspect
    source: Source | None
    label: str | None = None  # shown on the cleared viewport when there is no source


@dataclass(frozen=True, slots=True)
class Shown:
    """What a composed screen shows: the screen's rect and, bottom to top, each item's slot,
    viewport, aspect and mark (its picture's key, placement and filter, or its label)."""

    full: Rect
    items: tuple[tuple[int, Rect, Aspect, Hashable], ...]


def _damage(was: Shown, now: Shown,
            plans: Sequence[tuple[Item, Placement, Rect] | None]) -> list[tuple[int, Rect]] | None:
    """The pictures to draw again, as (index in ``now``, their screen rectangle), to turn a
    screen showing ``was`` into one showing ``now``; None when only a whole composition can (the
    layout, a label, or a picture's size or place changed, or a label lies over a new picture)."""
    if was.full != now.full or len(was.items) != len(now.items):
        return None
    out = []
    for i, ((slot0, rect0, asp0, m0), (slot, rect, asp, m), plan) in enumerate(
            zip(was.items, now.items, plans, strict=True)):
        if (slot0, rect0, asp0) != (slot, rect, asp):
            return None
        if m0 == m:
            continue
        if plan is None or not isinstance(m0, tuple) or m0[0] != "picture" or m0[2] != plan[1]:
            return None
        out.append((i, plan[2]))
    for d, area in out:  # what lies over a redrawn picture is drawn again, clipped: a label cannot be
        for (_, rect, _, m), plan in zip(now.items[d + 1:], plans[d + 1:], strict=True):
            if plan is None and m != ("off",) and not rect.intersect(area).empty:
                return None
    return out


def _draw_over(screen: Screen, start: int, area: Rect, plans: Sequence[tuple[Item, Placement, Rect] | None],
               images: Sequence[NDArray[np.uint8] | None]) -> None:
    """Draw picture ``start`` (its whole rectangle ``area``: opaque, nothing under it shows)
    and, clipped to ``area``, every picture over it, bottom to top."""
    for plan, img in zip(plans[start:], images[start:], strict=True):
        if plan is None or img is None:
            continue
        _, p, dst = plan
        _blit(screen, img, p, dst.intersect(area))


def _blit(screen: Screen, img: NDArray[np.uint8], p: Placement, r: Rect) -> None:
    """Copy the part of ``img`` (scaled for ``p.dst``) that lands on screen rect ``r``.  Every
    scaled image is opaque (``Scaler``), so this is a plain copy."""
    if not r.empty:
        sy, sx = r.y - p.dst.y, r.x - p.dst.x
        screen[r.y:r.bottom, r.x:r.right] = img[sy:sy + r.h, sx:sx + r.w]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A composition between ``Compositor.prepare`` and ``Compositor.draw``: per item its plan
    (placement, visible rect) and image; the items keep their views of guest memory."""

    items: tuple[Item, ...]
    plans: tuple[tuple[Item, Placement, Rect] | None, ...]
    images: tuple[NDArray[np.uint8] | None, ...]
    shown: Shown
    cpu_s: float  # prepare's thread CPU and its pooled scaling
    pre_cpu_s: float  # the prescaling of the pictures it showed
    wall_start: float  # perf_counter at prepare's start
    scaled: int
    reused: int
    prescaled: int


@dataclass(frozen=True, slots=True)
class ComposeStats:
    cpu_s: float  # CPU of the composition: its thread, its pooled scaling, the prescaling it showed
    wall_s: float
    scaled: int  # pictures scaled by swscale in this composition
    reused: int  # pictures whose scaled image was kept from an earlier composition
    labelled: int  # cleared, labelled viewports
    prescaled: int = 0  # pictures shown from an image scaled when they were committed
    shown: Shown | None = None  # what the screen shows now (pass it as ``was`` next time)
    drawn_px: int = 0  # screen pixels drawn (all of them unless only some pictures changed)


_Scaled = tuple[NDArray[np.uint8], float]  # image, CPU seconds


class Prescale:
    """A picture being scaled ahead of the refresh that shows it (``Compositor.prescale``).

    ``source`` (which makes the picture's views of guest memory) is taken by the job when it
    starts and by ``cancel``; once either took it this object holds no guest memory."""

    __slots__ = ("_source", "aspect", "future", "interpolation", "key", "rect", "slot")

    def __init__(self, slot: int, key: Hashable, rect: Rect, aspect: Aspect, interpolation: str | int,
                 source: Callable[[], Source]) -> None:
        self.slot, self.key, self.rect, self.aspect = slot, key, rect, aspect
        self.interpolation = interpolation
        self.future: Future[_Scaled | None] | None = None  # set by Compositor.prescale
        self._source: Callable[[], Source] | None = source

    def matches(self, item: Item, interpolation: str | int) -> bool:
        src = item.source
        return (src is not None and src.key is not None and self.key == src.key and self.rect == item.rect
                and self.aspect == item.aspect and self.interpolation == interpolation)

    def take_source(self) -> Callable[[], Source] | None:
        src, self._source = self._source, None
        return src

    def cancel(self) -> bool:
        """True if the job never reads the picture (it had not started, or the workers were shut
        down first): the caller may release the buffer now.  False: it is running or ran, and
        its ``done`` is (or was) called."""
        if self.future is not None and self.future.cancel():
            self._source = None
            return True
        return False

    def result(self) -> _Scaled | None:
        """Wait for the job: its image, or None if it was cancelled or failed."""
        if self.future is None:
            return None
        try:
            return self.future.result()
        except CancelledError:
            return None


class Scaler:
    """One viewport's swscale contexts: the crop of a picture scaled to a new bgra image.

    A bgra picture is scaled channel by channel: unpacked to planar gbrp at its own size, the
    three planes scaled as one yuv444p picture (no colour conversion: each plane on its own,
    by the same filter), and packed again.  swscale's own bgra->bgra and bgra->gbrp scaling go
    through its internal YUV and bleed one channel into another (a red-only picture gains green
    up to 13); this keeps them apart, in about half the time.  NV12 and YUV420P pictures are
    scaled and converted (BT.601, limited range, as PyAV does) in one call.  Every call reads
    the guest's planes where they lie and runs without the GIL (``hostd.display.swscale``)."""

    __slots__ = ("_ctx", "_planar", "_scaled")

    def __init__(self) -> None:
        self._ctx = (sws.Context(), sws.Context(), sws.Context())
        self._planar: tuple[NDArray[np.uint8], ...] | None = None  # the unpacked picture's planes
        self._scaled: tuple[NDArray[np.uint8], ...] | None = None  # ... scaled

    def scale(self, src: Source, crop: Rect, width: int, height: int, interpolation: str | int) -> NDArray[np.uint8]:
        """A new ``(height, width, 4)`` opaque bgra image of ``crop`` of ``src`` (never a view of
        the picture: swscale writes alpha 255 from planar or yuv input)."""
        flags = sws.flags_of(interpolation)
        packed = (sws.padded(height, 4 * width),)
        out = _pixels(packed[0])
        if src.fmt != PixFmt.BGRA:
            planes = _crop_planes(src, crop)
            self._ctx[0].scale(planes, _SWS[src.fmt], crop.w, crop.h, packed, _SWS[PixFmt.BGRA], width, height, flags)
            return out
        view = src.planes[0][crop.y:crop.bottom, 4 * crop.x:4 * crop.right]
        planar = self._planar = _buffer(self._planar, crop.h, crop.w)
        scaled = self._scaled = _buffer(self._scaled, height, width)
        # gbrp's plane order is G, B, R: the same three planes are named Y, U, V for the middle
        # step, which swscale then scales alike and leaves unconverted.
        self._ctx[0].scale((view,), _SWS[PixFmt.BGRA], crop.w, crop.h, planar, _GBRP, crop.w, crop.h, flags)
        self._ctx[1].scale(planar, _YUV444P, crop.w, crop.h, scaled, _YUV444P, width, height, flags)
        self._ctx[2].scale(scaled, _GBRP, width, height, packed, _SWS[PixFmt.BGRA], width, height, flags)
        return out


def _buffer(have: tuple[NDArray[np.uint8], ...] | None, height: int, width: int) -> tuple[NDArray[np.uint8], ...]:
    """Three planes of ``height`` x ``width`` swscale may write (``swscale.padded``)."""
    if have is not None and have[0].shape == (height, width):
        return have
    return tuple(sws.padded(height, width) for _ in range(3))


def _pixels(plane: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A ``(rows, 4 * width)`` plane as ``(rows, width, 4)``, sharing its memory and row stride."""
    rows, nbytes = plane.shape
    out: NDArray[np.uint8] = np.lib.stride_tricks.as_strided(
        plane, shape=(rows, nbytes // 4, 4), strides=(plane.strides[0], 4, 1))
    return out


def _crop_planes(src: Source, crop: Rect) -> tuple[NDArray[np.uint8], ...]:
    """The planes of ``crop`` of a 4:2:0 picture, as views (``crop.x`` and ``crop.y`` are even)."""
    y0, x0 = crop.y // 2, crop.x // 2
    ch, cw = (crop.h + 1) // 2, (crop.w + 1) // 2
    luma = src.planes[0][crop.y:crop.bottom, crop.x:crop.right]
    if src.fmt == PixFmt.NV12:
        return luma, src.planes[1][y0:y0 + ch, 2 * x0:2 * (x0 + cw)]
    return luma, src.planes[1][y0:y0 + ch, x0:x0 + cw], src.planes[2][y0:y0 + ch, x0:x0 + cw]


# --- labels: a 5x7 bitmap font -------------------------------------------------------------
_GLYPHS = {
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...#####.#...##...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "####.#...##...##...##...##...#####.",
    "E": "######....####.#....#....#....#####", "F": "######....####.#....#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...#######...##...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....##..#.##...",
    "K": "#...##..#.###..#.#..#..#.#...##...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##...##...##...##...#", "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#.....####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    " ": "." * 35, "-": "." * 15 + "#####" + "." * 15, "_": "." * 30 + "#####",
    ".": "." * 25 + ".##...##..", ":": ".....##...##........##...##.......",
    "/": "....#....#...#...#...#...#....#....", "(": "...#...#...#....#....#.....#.....#.",
    ")": ".#.....#.....#....#....#...#...#...", "#": ".#.#..#.#.#####.#.#.#####.#.#..#.#.",
    "?": ".###.#...#....#...#...#.......#....",
}
_FONT = {ch: np.array([c == "#" for c in rows.ljust(35, ".")[:35]], dtype=bool).reshape(7, 5)
         for ch, rows in _GLYPHS.items()}


def _fill(view: Screen, colour: Colour) -> None:
    """Fill ``(h, w, 4)`` pixels with one colour, a 32-bit store per pixel (broadcasting a
    4-tuple is about 20 times slower)."""
    view.view(np.uint32)[:] = np.array(colour, dtype=np.uint8).view(np.uint32)[0]


def _tiles(rects: Sequence[Rect], full: Rect) -> bool:
    """Whether ``rects`` (each inside ``full``) cover ``full`` exactly once: no pixel of the
    background would be left showing."""
    rects = [r for r in rects if not r.empty]
    if sum(r.w * r.h for r in rects) != full.w * full.h:
        return False
    return all(a.intersect(b).empty for i, a in enumerate(rects) for b in rects[i + 1:])


def text_mask(text: str) -> NDArray[np.bool_]:
    """The pixels of ``text`` (lines split at ``\\n``, upper-cased, unknown characters as ``?``)
    at scale 1: 5x7 glyphs, 1 column and 2 rows apart, each line centred."""
    lines = text.upper().split("\n")
    width = max(6 * len(line) - 1 for line in lines) if any(lines) else 0
    mask = np.zeros((9 * len(lines) - 2, max(width, 0)), dtype=bool)
    for i, line in enumerate(lines):
        x0 = (width - (6 * len(line) - 1)) // 2
        for j, ch in enumerate(line):
            glyph = _FONT.get(ch, _FONT["?"])
            mask[9 * i:9 * i + 7, x0 + 6 * j:x0 + 6 * j + 5] = glyph
    return mask


def draw_cleared(screen: Screen, rect: Rect, label: str | None) -> None:
    """A viewport with no picture: CLEARED fill, a BORDER_PX border and ``label`` centred in
    TEXT at the largest integer scale (at most MAX_TEXT_SCALE) that fits inside the border."""
    r = rect.intersect(Rect(0, 0, screen.shape[1], screen.shape[0]))
    if r.empty:
        return
    view = screen[rect.y:rect.bottom, rect.x:rect.right] if r == rect else None
    if view is None:  # rect partly off screen: draw on a scratch and copy the visible part
        scratch = np.empty((rect.h, rect.w, 4), dtype=np.uint8)
        draw_cleared(scratch, Rect(0, 0, rect.w, rect.h), label)
        screen[r.y:r.bottom, r.x:r.right] = scratch[r.y - rect.y:r.bottom - rect.y, r.x - rect.x:r.right - rect.x]
        return
    _fill(view, BORDER)
    b = min(BORDER_PX, rect.w // 2, rect.h // 2)
    _fill(view[b:rect.h - b, b:rect.w - b], CLEARED)
    if not label:
        return
    mask = text_mask(label)
    inner_w, inner_h = rect.w - 2 * b - 2, rect.h - 2 * b - 2
    if mask.size == 0 or inner_w <= 0 or inner_h <= 0:
        return
    scale = min(MAX_TEXT_SCALE, inner_w // mask.shape[1], inner_h // mask.shape[0])
    if scale < 1:
        mask = mask[:inner_h, :inner_w]
        scale = 1
    big = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
    y0, x0 = (rect.h - big.shape[0]) // 2, (rect.w - big.shape[1]) // 2
    view[y0:y0 + big.shape[0], x0:x0 + big.shape[1]][big] = TEXT


# --- pictures in regions ---------------------------------------------------------------------
def plane_views(region: NDArray[np.uint8], ref: FrameRef) -> tuple[NDArray[np.uint8], ...]:
    """The planes of ``ref`` as ``(rows, row bytes)`` views of ``region`` (a 1-D uint8 array of the
    whole mapped region; the core validated every plane lies in it).

    swscale's SIMD loads read up to a few dozen bytes past a plane's last byte: a plane that
    ends less than ``swscale.INPUT_SLACK`` bytes before the end of the mapping (a guest may
    place a picture there) is handed over as a padded copy, never as a view, or those loads
    would fault past the mapping and kill hostd."""
    out = []
    for p in ref.planes:
        extent = (p.rows - 1) * p.stride + p.row_bytes
        if p.offset + extent > region.shape[0]:
            raise ValueError(f"plane at {p.offset:#x} (+{extent}) is past the region's {region.shape[0]} bytes")
        base = region[p.offset:p.offset + extent]
        view = np.lib.stride_tricks.as_strided(base, shape=(p.rows, p.row_bytes), strides=(p.stride, 1))
        if p.offset + extent + sws.INPUT_SLACK > region.shape[0]:
            copy = sws.padded(p.rows, p.row_bytes)
            copy[:] = view
            view = copy
        out.append(view)
    return tuple(out)


def items_from_scene(scene: Sequence[SceneItem], region_of: Callable[[int], NDArray[np.uint8]]) -> list[Item]:
    """Compose items for a core's scene; ``region_of(vm)`` is that VM's region as 1-D uint8."""
    items = []
    for s in scene:
        src = None
        if s.frame is not None:
            f = s.frame
            src = Source(f.fmt, f.width, f.height, plane_views(region_of(s.vm), f), s.key)
        items.append(Item(s.vm, s.viewport.rect, s.viewport.aspect, src, s.label))
    return items


def _check_source(src: Source) -> None:
    shapes = abi.plane_shapes(src.fmt, src.width, src.height)
    if src.fmt not in _PYAV_NAMES or len(src.planes) != len(shapes):
        raise ValueError(f"{src.fmt!r} source with {len(src.planes)} planes")
    for p, shape in zip(src.planes, shapes, strict=True):
        if p.dtype != np.uint8 or p.shape != shape or p.strides[1] != 1:
            raise ValueError(f"plane {p.shape} {p.dtype} strides {p.strides} is not a {shape} uint8 plane")


class Compositor:
    def __init__(self, *, interpolation: str | int = DEFAULT_INTERPOLATION, workers: int = 1) -> None:
        """``interpolation``: a swscale algorithm name (BILINEAR, BICUBIC, AREA, LANCZOS...; see
        ``hostd.display.swscale.FLAGS``); ``workers``: pictures scaled at the same time (swscale
        runs without the GIL).  The defaults keep composition on one core, off the codec's."""
        self.interpolation = interpolation
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._scalers: dict[int, Scaler] = {}
        self._images: dict[int, tuple[Hashable, NDArray[np.uint8]]] = {}
        # Scaling of one slot runs under its lock: its scalers and copy frame are used by one
        # thread at a time (a prescale job of a newer commit may overlap a composition).
        self._slot_locks: dict[int, threading.Lock] = {}
        # Guards _ready, _slot_locks, _pool and the counters that prescale jobs add to.
        self._lock = threading.Lock()
        self._ready: dict[int, list[Prescale]] = {}  # slot -> prescales, oldest first
        self._closed = False
        self.frames = 0
        self.cpu_s = 0.0
        self.last_cpu_s = 0.0
        self.max_cpu_s = 0.0
        self.scaled = 0
        self.reused = 0
        self.prescaled = 0  # pictures scaled by prescale jobs (counted in ``scaled`` too)
        self.prescale_shown = 0  # ... whose image a composition showed

    def close(self) -> None:
        """Stop the workers: queued prescale jobs are cancelled, running ones finish first."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            self._ready.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor | None:
        """The scaling workers (None once closed)."""
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="compose")
            return self._pool

    def _take_ready(self, item: Item) -> Prescale | None:
        """The prescale of ``item``'s picture for its viewport, if one was started; the slot's
        older prescales go with it (their commits were superseded or already shown)."""
        with self._lock:
            ready = self._ready.get(item.slot)
            if not ready:
                return None
            for i, pre in enumerate(ready):
                if pre.matches(item, self.interpolation):
                    del ready[:i + 1]
                    return pre
        return None

    def _slot_lock(self, slot: int) -> threading.Lock:
        with self._lock:
            lock = self._slot_locks.get(slot)
            if lock is None:
                lock = self._slot_locks[slot] = threading.Lock()
            return lock

    # --- scaling ahead of the refresh -----------------------------------------------------------
    def prescale(self, slot: int, key: Hashable, rect: Rect, aspect: Aspect, source: Callable[[], Source],
                 done: Callable[[], None]) -> Prescale | None:
        """Scale the picture ``source()`` makes (key ``key``) for viewport ``rect``/``aspect`` of
        ``slot`` on a scaling worker.  A composition whose item has the same key, rect and aspect
        shows that image instead of scaling the picture again.  ``done`` is called on the worker
        once the job no longer reads the picture (never if ``cancel`` succeeds).  None: the
        compositor is closed (nothing runs, ``done`` is not called)."""
        pre = Prescale(slot, key, rect, aspect, self.interpolation, source)
        pool = self._executor()
        try:
            if pool is None:
                raise RuntimeError("closed")
            # A job cancelled before a worker took it never runs (the executor checks first).
            pre.future = pool.submit(self._prescale_job, pre, done)
        except RuntimeError:  # closed (or shut down meanwhile)
            pre.take_source()
            return None
        with self._lock:
            ready = self._ready.setdefault(slot, [])
            ready.append(pre)
            del ready[:-_READY_MAX]
        return pre

    def _prescale_job(self, pre: Prescale, done: Callable[[], None]) -> _Scaled | None:
        try:
            got = self._prescale_one(pre)
        except Exception:  # a bug or a picture swscale refused: the composition scales it itself
            log.exception("prescale failed", slot=pre.slot)
            got = None
        # Here no view of the picture is left: _prescale_one returned (or its traceback is gone).
        done()
        return got

    def _prescale_one(self, pre: Prescale) -> _Scaled | None:
        make = pre.take_source()
        if make is None:
            return None
        t = time.thread_time()
        src = make()
        del make
        _check_source(src)
        p = place(src.width, src.height, pre.rect, pre.aspect, crop_align=1 if src.fmt == PixFmt.BGRA else 2)
        with self._slot_lock(pre.slot):
            img = self._scale(pre.slot, src, p)
        cpu = time.thread_time() - t
        with self._lock:
            self.cpu_s += cpu
            self.scaled += 1
            self.prescaled += 1
        return img, cpu

    def compose(self, screen: Screen, items: Sequence[Item], was: Shown | None = None) -> ComposeStats:
        """Draw ``items`` (bottom to top) over the background into ``screen``; returns the cost
        and what the screen now shows (``ComposeStats.shown``).  Each item's slot must be unique
        (its scalers and kept image are its own).

        ``was``: what ``screen`` showed when it was composed last.  When the scene differs from
        it only in pictures that replace pictures of the same size and place, only those
        pictures' rectangles are drawn again (and what lies over them); else the whole screen."""
        if screen.dtype != np.uint8 or screen.ndim != 3 or screen.shape[2] != 4 or screen.strides[1:] != (4, 1):
            raise ValueError(f"screen must be (H, W, 4) uint8 with whole pixels, got {screen.shape} {screen.dtype}")
        return self.draw(screen, self.prepare(items, screen.shape[1], screen.shape[0]), was)

    def prepare(self, items: Sequence[Item], width: int, height: int) -> Prepared:
        """The first half of ``compose``: every picture of ``items`` scaled for a ``width`` x
        ``height`` screen (or its kept or prescaled image taken).  The result holds the items'
        views of guest memory until it is dropped."""
        t0, w0 = time.thread_time(), time.perf_counter()
        if len({i.slot for i in items}) != len(items):
            raise ValueError("two compose items share a slot")
        full = Rect(0, 0, width, height)
        plans: list[tuple[Item, Placement, Rect] | None] = []
        jobs: dict[int, tuple[Source, Placement]] = {}
        ahead: dict[int, tuple[Prescale, Source, Placement]] = {}
        reused = 0
        for item in items:
            src = item.source
            if src is None:
                self._images.pop(item.slot, None)
                plans.append(None)
                continue
            _check_source(src)
            p = place(src.width, src.height, item.rect, item.aspect, crop_align=1 if src.fmt == PixFmt.BGRA else 2)
            dst = p.dst.intersect(full)
            if dst.empty:
                plans.append(None)
                continue
            plans.append((item, p, dst))
            kept = self._images.get(item.slot)
            if src.key is not None and kept is not None and kept[0] == (src.key, p, self.interpolation):
                reused += 1
            elif (pre := self._take_ready(item)) is not None:
                ahead[item.slot] = (pre, src, p)
            else:
                jobs[item.slot] = (src, p)
        done = self._run(jobs)
        pooled = self.workers > 1 and len(jobs) > 1  # else the jobs ran on this thread, counted below
        job_cpu = sum(cpu for _, cpu in done.values()) if pooled else 0.0
        shown = 0
        pre_cpu = 0.0
        for slot, (pre, src, p) in ahead.items():
            got = pre.result()  # waits for a job still running
            if got is None:  # cancelled or failed: scale it now
                t = time.thread_time()
                with self._slot_lock(slot):
                    late = self._scale(slot, src, p)
                done[slot] = (late, time.thread_time() - t)
            else:
                done[slot] = got
                shown += 1
                pre_cpu += got[1]
        ahead.clear()
        images: list[NDArray[np.uint8] | None] = []
        marks: list[Hashable] = []
        for item, plan in zip(items, plans, strict=True):
            if plan is None:
                images.append(None)
                marks.append(("label", item.label) if item.source is None else ("off",))
                continue
            _, p, _ = plan
            src = item.source
            assert src is not None
            if item.slot in done:
                img = done[item.slot][0]
                if src.key is not None:
                    self._images[item.slot] = ((src.key, p, self.interpolation), img)
                else:
                    self._images.pop(item.slot, None)
            else:
                img = self._images[item.slot][1]
            images.append(img)
            # A picture without a key never equals what a screen showed before (object()).
            marks.append(("picture", src.key if src.key is not None else object(), p, self.interpolation))
        now = Shown(full, tuple((i.slot, i.rect, i.aspect, m) for i, m in zip(items, marks, strict=True)))
        live = {i.slot for i in items}
        with self._lock:
            known = set(self._scalers) | set(self._ready) | set(self._images)
        for gone in [s for s in known if s not in live]:
            self.forget(gone)
        cpu = time.thread_time() - t0 + job_cpu  # the prescale jobs added their own CPU already
        return Prepared(tuple(items), tuple(plans), tuple(images), now, cpu, pre_cpu, w0, len(done) - shown,
                        reused, shown)

    def draw(self, screen: Screen, prep: Prepared, was: Shown | None = None) -> ComposeStats:
        """The second half of ``compose``: copy what ``prep`` holds into ``screen`` (all of it,
        or only what changed since ``was``; see ``compose``).  Nothing is scaled here."""
        t0 = time.thread_time()
        full = prep.shown.full
        if screen.shape != (full.h, full.w, 4):
            raise ValueError(f"a {full.w}x{full.h} composition cannot be drawn on a {screen.shape} screen")
        damage = _damage(was, prep.shown, prep.plans) if was is not None else None
        if damage is None:
            labelled = self._draw_all(screen, prep.items, prep.plans, prep.images, full)
            damaged = full.w * full.h
        else:
            labelled = 0
            damaged = sum(r.w * r.h for _, r in damage)
            for start, area in damage:
                _draw_over(screen, start, area, prep.plans, prep.images)
        cpu = prep.cpu_s + time.thread_time() - t0
        wall = time.perf_counter() - prep.wall_start
        with self._lock:
            self.frames += 1
            self.cpu_s += cpu
            self.last_cpu_s = cpu + prep.pre_cpu_s
            self.max_cpu_s = max(self.max_cpu_s, cpu + prep.pre_cpu_s)
            self.scaled += prep.scaled
            self.reused += prep.reused
            self.prescale_shown += prep.prescaled
        return ComposeStats(cpu + prep.pre_cpu_s, wall, prep.scaled, prep.reused, labelled, prep.prescaled,
                            prep.shown, damaged)

    @staticmethod
    def _draw_all(screen: Screen, items: Sequence[Item], plans: Sequence[tuple[Item, Placement, Rect] | None],
                  images: Sequence[NDArray[np.uint8] | None], full: Rect) -> int:
        """Draw the whole screen; returns the labelled viewports drawn."""
        covered = [plan[2] for plan in plans if plan is not None]
        covered += [i.rect.intersect(full) for i, plan in zip(items, plans, strict=True)
                    if plan is None and i.source is None]
        if not _tiles(covered, full):
            _fill(screen, BACKGROUND)  # only where some pixel would show no picture or label
        labelled = 0
        for item, plan, img in zip(items, plans, images, strict=True):
            if plan is None:
                if item.source is None:
                    draw_cleared(screen, item.rect, item.label)
                    labelled += 1
                continue
            assert img is not None
            _blit(screen, img, plan[1], plan[2])
        return labelled

    def _run(self, jobs: dict[int, tuple[Source, Placement]]) -> dict[int, _Scaled]:
        def one(slot: int) -> _Scaled:
            t = time.thread_time()
            with self._slot_lock(slot):
                img = self._scale(slot, *jobs[slot])
            return img, time.thread_time() - t

        pool = self._executor() if self.workers > 1 and len(jobs) > 1 else None
        if pool is None:
            return {slot: one(slot) for slot in jobs}
        futures = {slot: pool.submit(one, slot) for slot in jobs}
        return {slot: f.result() for slot, f in futures.items()}

    def forget(self, slot: int) -> None:
        """Drop what is kept for a viewport (done by compose for slots no longer in its items).
        A prescale job of the slot still running keeps the scalers it took until it ends."""
        with self._lock:
            self._scalers.pop(slot, None)
            self._images.pop(slot, None)
            self._ready.pop(slot, None)

    def statistics(self) -> dict[str, float | int]:
        return {
            "frames": self.frames, "cpu_s": self.cpu_s, "last_cpu_ms": self.last_cpu_s * 1e3,
            "max_cpu_ms": self.max_cpu_s * 1e3,
            "mean_cpu_ms": self.cpu_s / self.frames * 1e3 if self.frames else 0.0,
            "scaled": self.scaled, "reused": self.reused,
            "prescaled": self.prescaled, "prescale_shown": self.prescale_shown,
        }

    def _scale(self, slot: int, src: Source, p: Placement) -> NDArray[np.uint8]:
        scaler = self._scalers.get(slot)
        if scaler is None:
            scaler = self._scalers[slot] = Scaler()
        return scaler.scale(src, p.crop, p.dst.w, p.dst.h, self.interpolation)


def compose(screen: Screen, items: Sequence[Item], *, interpolation: str | int = DEFAULT_INTERPOLATION) -> ComposeStats:
    """One composition with a fresh compositor (nothing kept between calls)."""
    return Compositor(interpolation=interpolation).compose(screen, items)


def compose_floor_vs_core(frames: int = 30, *, vms: int = 4, width: int = 1920, height: int = 1080,
                          fmt: PixFmt = PixFmt.BGRA, interpolation: str = DEFAULT_INTERPOLATION) -> dict[str, float]:
    """Micro-benchmark: ``vms`` pictures of ``width`` x ``height`` into a screen of that size on a
    grid.  Per screen frame, in ms: the floor (the swscale calls compose() makes, in-process, on
    the same pictures: for bgra, scale to gbrp then pack), the one-call floor (straight to bgra),
    compose() when every picture is new, compose() when none is (kept images); ratio =
    compose / floor."""
    from hostd.display.layout import grid_rects

    rng = np.random.default_rng(1)
    rects = grid_rects(vms, width, height)
    sources = []
    for i in range(vms):
        if fmt == PixFmt.BGRA:
            buf = rng.integers(0, 256, (height, 4 * width), dtype=np.uint8)
            planes: tuple[NDArray[np.uint8], ...] = (buf,)
        else:
            buf = rng.integers(0, 256, (height * 3 // 2, width), dtype=np.uint8)
            if fmt == PixFmt.NV12:
                planes = (buf[:height], buf[height:])
            else:
                q = height // 4
                flat = buf.reshape(-1)
                u = flat[width * height:width * height + q * width].reshape(height // 2, width // 2)
                v = flat[width * height + q * width:].reshape(height // 2, width // 2)
                planes = (buf[:height], u, v)
        sources.append((buf, planes, i))
    screen = np.zeros((height, width, 4), dtype=np.uint8)
    pyav = _PYAV_NAMES[fmt]

    def wrap(buf: NDArray[np.uint8]) -> Any:
        return av.VideoFrame.from_numpy_buffer(buf.reshape(height, width, 4) if fmt == PixFmt.BGRA else buf, pyav)

    places = [place(width, height, r, Aspect.FIT) for r in rects]

    def floor_run(planar: bool) -> float:
        scalers = [(Scaler(), VideoReformatter()) for _ in range(vms)]
        t = time.perf_counter()
        for _ in range(frames):
            for (buf, pl, _), (sc, one), p in zip(sources, scalers, places, strict=True):
                if planar:
                    sc.scale(Source(fmt, width, height, pl), p.crop, p.dst.w, p.dst.h, interpolation)
                else:
                    one.reformat(wrap(buf), p.dst.w, p.dst.h, "bgra", interpolation=interpolation,
                                 threads=1).to_ndarray()
        return (time.perf_counter() - t) / frames

    one_call = floor_run(False)
    floor = floor_run(True)
    comp = Compositor(interpolation=interpolation)
    t = time.perf_counter()
    for n in range(frames):
        comp.compose(screen, [Item(i, r, Aspect.FIT, Source(fmt, width, height, pl, (n, i)))
                              for (_, pl, i), r in zip(sources, rects, strict=True)])
    core = (time.perf_counter() - t) / frames
    same = [Item(i, r, Aspect.FIT, Source(fmt, width, height, pl, (-1, i)))
            for (_, pl, i), r in zip(sources, rects, strict=True)]
    comp.compose(screen, same)
    t = time.perf_counter()
    for _ in range(frames):
        comp.compose(screen, same)
    kept = (time.perf_counter() - t) / frames
    return {"floor_ms": floor * 1e3, "floor_one_call_ms": one_call * 1e3, "compose_ms": core * 1e3,
            "compose_kept_ms": kept * 1e3, "ratio": core / floor if floor else 0.0}
