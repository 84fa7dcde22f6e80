"""Where each VM appears on the shared screen: presets, explicit rects and aspect math.

Pure integer arithmetic; nothing here reads a guest word.  A layout is service-side state: the
spec comes from the CLI or the control socket, and every rect is checked to lie inside the
screen, so no scale the compositor is asked for is larger than the screen.

Presets (``n`` = VMs shown, in attach order):

* grid: ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)``; cell edges are integer splits of
  the screen (``i * W // cols``), so cells tile it exactly for any size; a partly filled last
  row is centred.
* main: the main VM gets the top ``H - H // 4`` rows over the full width; the others share the
  bottom strip as thumbnails, ``max(n - 1, 4)`` per row (centred when fewer).
* rects: each VM named in the spec gets its rect; a VM not named is not shown.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_SCREEN = 16384
Z_LIMIT = 1 << 20


class LayoutError(ValueError):
    """A layout spec the user gave is malformed or does not fit the screen (one-line message)."""


class Aspect(enum.StrEnum):
    FIT = "fit"  # whole picture, scaled to the largest size that fits, centred; bars are background
    FILL = "fill"  # the viewport is covered; the picture's excess is cropped equally on both sides
    STRETCH = "stretch"  # scaled to the viewport, aspect ignored


class Kind(enum.StrEnum):
    GRID = "grid"
    MAIN = "main"
    RECTS = "rects"


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    @property
    def empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def intersect(self, other: Rect) -> Rect:
        x, y = max(self.x, other.x), max(self.y, other.y)
        return Rect(x, y, max(0, min(self.right, other.right) - x), max(0, min(self.bottom, other.bottom) - y))


@dataclass(frozen=True, slots=True)
class RectSpec:
    x: int
    y: int
    w: int
    h: int
    z: int = 0
    visible: bool = True
    aspect: Aspect | None = None  # None: the spec's aspect


@dataclass(frozen=True, slots=True)
class LayoutSpec:
    """A layout as the user states it.  VMs are named by name or by decimal id (``"3"``)."""

    kind: Kind = Kind.GRID
    main: str | None = None  # MAIN: the VM in the large view (default: the first)
    rects: Mapping[str, RectSpec] = field(default_factory=dict)  # RECTS
    aspect: Aspect = Aspect.FIT
    hidden: frozenset[str] = frozenset()  # GRID/MAIN: not shown, and given no cell

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value, "main": self.main, "aspect": self.aspect.value, "hidden": sorted(self.hidden),
            "rects": {k: {"x": r.x, "y": r.y, "w": r.w, "h": r.h, "z": r.z, "visible": r.visible,
                          "aspect": None if r.aspect is None else r.aspect.value}
                      for k, r in self.rects.items()},
        }


@dataclass(frozen=True, slots=True)
class Viewport:
    vm: int
    name: str
    rect: Rect
    z: int
    visible: bool
    aspect: Aspect

    def to_dict(self) -> dict[str, object]:
        r = self.rect
        return {"vm": self.vm, "name": self.name, "x": r.x, "y": r.y, "w": r.w, "h": r.h, "z": self.z,
                "visible": self.visible, "aspect": self.aspect.value}


@dataclass(frozen=True, slots=True)
class Placement:
    """What to take from a picture and where it lands: ``crop`` (source pixels) is scaled to
    exactly ``dst`` (screen pixels)."""

    crop: Rect
    dst: Rect


def _split(total: int, parts: int, index: int, used: int) -> tuple[int, int]:
    """Start and width of cell ``index`` of ``used`` cells laid on a ``parts``-cell split of
    ``total``, the ``used`` cells centred (used == parts: the plain integer split)."""
    a = (2 * index + parts - used) * total // (2 * parts)
    b = (2 * index + 2 + parts - used) * total // (2 * parts)
    return a, b - a


def grid_rects(n: int, width: int, height: int) -> list[Rect]:
    if n <= 0:
        return []
    cols = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    rows = -(-n // cols)
    out = []
    for i in range(n):
        row, col = divmod(i, cols)
        in_row = cols if row < rows - 1 else n - cols * (rows - 1)
        x, w = _split(width, cols, col, in_row)
        y, h = _split(height, rows, row, rows)
        out.append(Rect(x, y, w, h))
    return out


def main_rects(n: int, width: int, height: int) -> list[Rect]:
    if n <= 0:
        return []
    if n == 1:
        return [Rect(0, 0, width, height)]
    strip = height // 4
    k = n - 1
    per_row = max(k, 4)
    out = [Rect(0, 0, width, height - strip)]
    for i in range(k):
        x, w = _split(width, per_row, i, k)
        out.append(Rect(x, height - strip, w, strip))
    return out


def check_screen(width: int, height: int) -> None:
    if not (0 < width <= MAX_SCREEN and 0 < height <= MAX_SCREEN):
        raise LayoutError(f"screen size {width}x{height} is not within 1..{MAX_SCREEN}")


def validate(spec: LayoutSpec, width: int, height: int) -> None:
    """Raise LayoutError if ``spec`` cannot be laid on a ``width`` x ``height`` screen."""
    check_screen(width, height)
    if spec.kind is not Kind.RECTS and spec.rects:
        raise LayoutError(f"rects given for a {spec.kind.value} layout")
    for key, r in spec.rects.items():
        if not key:
            raise LayoutError("a rect names no VM")
        if r.w < 1 or r.h < 1 or r.x < 0 or r.y < 0 or r.x + r.w > width or r.y + r.h > height:
            raise LayoutError(f"rect {r.x},{r.y},{r.w},{r.h} for {key} is not inside the {width}x{height} screen")
        if not -Z_LIMIT <= r.z <= Z_LIMIT:
            raise LayoutError(f"z {r.z} for {key} is not within +-{Z_LIMIT}")


def _key_of(vm: int, name: str, keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if name in keys:
        return name
    return str(vm) if str(vm) in keys else None


def compute(spec: LayoutSpec, vms: Sequence[tuple[int, str]], width: int, height: int) -> tuple[Viewport, ...]:
    """Viewports for ``vms`` ((id, name) in layout order), one each, in that order."""
    validate(spec, width, height)
    none = Rect(0, 0, 0, 0)
    if spec.kind is Kind.RECTS:
        out = []
        for vm, name in vms:
            key = _key_of(vm, name, spec.rects)
            if key is None:
                out.append(Viewport(vm, name, none, 0, False, spec.aspect))
            else:
                r = spec.rects[key]
                out.append(Viewport(vm, name, Rect(r.x, r.y, r.w, r.h), r.z, r.visible, r.aspect or spec.aspect))
        return tuple(out)
    shown = [(vm, name) for vm, name in vms if _key_of(vm, name, spec.hidden) is None]
    if spec.kind is Kind.MAIN and spec.main is not None:
        first = [v for v in shown if _key_of(v[0], v[1], (spec.main,)) is not None]
        shown = first + [v for v in shown if v not in first]
    rects = (grid_rects if spec.kind is Kind.GRID else main_rects)(len(shown), width, height)
    where = {vm: r for (vm, _), r in zip(shown, rects, strict=True)}
    return tuple(Viewport(vm, name, where.get(vm, none), 0, vm in where, spec.aspect) for vm, name in vms)


def z_sorted(viewports: Iterable[Viewport]) -> list[Viewport]:
    """Visible viewports bottom to top: by z, ties in layout order (later on top)."""
    indexed = [(v.z, i, v) for i, v in enumerate(viewports) if v.visible and not v.rect.empty]
    return [v for _, _, v in sorted(indexed, key=lambda t: (t[0], t[1]))]


def _round_div(num: int, den: int) -> int:
    return (2 * num + den) // (2 * den)


def place(src_w: int, src_h: int, rect: Rect, aspect: Aspect, *, crop_align: int = 1) -> Placement:
    """Scale and translation of a ``src_w`` x ``src_h`` picture into ``rect``.

    FIT keeps the whole picture (rounded to the nearest pixel, at least 1) and centres it; FILL
    crops the picture's centre to the rect's aspect (the crop's origin rounded down to a
    multiple of ``crop_align``, 2 for 4:2:0 chroma) and scales it to the whole rect; STRETCH
    scales the whole picture to the whole rect."""
    if src_w <= 0 or src_h <= 0 or rect.empty:
        return Placement(Rect(0, 0, max(src_w, 0), max(src_h, 0)), Rect(rect.x, rect.y, 0, 0))
    full = Rect(0, 0, src_w, src_h)
    if aspect is Aspect.STRETCH:
        return Placement(full, rect)
    wide = src_w * rect.h >= rect.w * src_h  # the picture is at least as wide as the rect
    if aspect is Aspect.FIT:
        if wide:
            w, h = rect.w, min(rect.h, max(1, _round_div(src_h * rect.w, src_w)))
        else:
            w, h = min(rect.w, max(1, _round_div(src_w * rect.h, src_h))), rect.h
        return Placement(full, Rect(rect.x + (rect.w - w) // 2, rect.y + (rect.h - h) // 2, w, h))
    if wide:
        cw, ch = min(src_w, max(1, _round_div(src_h * rect.w, rect.h))), src_h
    else:
        cw, ch = src_w, min(src_h, max(1, _round_div(src_w * rect.h, rect.w)))
    cx = (src_w - cw) // 2 // crop_align * crop_align
    cy = (src_h - ch) // 2 // crop_align * crop_align
    return Placement(Rect(cx, cy, cw, ch), rect)


def _int(text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise LayoutError(f"{what} {text!r} is not an integer") from None


def _aspect(text: str) -> Aspect:
    try:
        return Aspect(text)
    except ValueError:
        raise LayoutError(f"aspect {text!r} is not one of fit, fill, stretch") from None


def parse(words: Sequence[str]) -> LayoutSpec:
    """A spec from command words, as ``vmediad display layout`` takes them:

    ``grid`` | ``main [VM]`` | ``rects VM=X,Y,W,H[,Z] ...``, each optionally followed by
    ``aspect=fit|fill|stretch`` and, for grid/main, ``hide=VM[,VM...]``.  A VM is its name or
    its id."""
    if not words:
        raise LayoutError("no layout given (grid, main or rects)")
    try:
        kind = Kind(words[0])
    except ValueError:
        raise LayoutError(f"unknown layout {words[0]!r} (grid, main or rects)") from None
    main: str | None = None
    rects: dict[str, RectSpec] = {}
    aspect = Aspect.FIT
    hidden: set[str] = set()
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            if kind is Kind.MAIN and main is None and word:
                main = word
                continue
            raise LayoutError(f"unexpected {word!r} in a {kind.value} layout")
        if key == "aspect":
            aspect = _aspect(value)
        elif key == "hide" and kind is not Kind.RECTS:
            hidden.update(v for v in value.split(",") if v)
        elif kind is Kind.RECTS and key:
            nums = [_int(v, f"rect field of {key}") for v in value.split(",")]
            if len(nums) not in (4, 5):
                raise LayoutError(f"rect for {key} needs X,Y,W,H[,Z], got {value!r}")
            if key in rects:
                raise LayoutError(f"two rects for {key}")
            rects[key] = RectSpec(nums[0], nums[1], nums[2], nums[3], nums[4] if len(nums) == 5 else 0)
        else:
            raise LayoutError(f"unexpected {word!r} in a {kind.value} layout")
    if kind is Kind.RECTS and not rects:
        raise LayoutError("a rects layout needs at least one VM=X,Y,W,H")
    return LayoutSpec(kind, main, rects, aspect, frozenset(hidden))


def spec_from_dict(d: Mapping[str, object]) -> LayoutSpec:
    """Inverse of ``LayoutSpec.to_dict`` (the control socket's JSON); LayoutError if malformed."""
    try:
        kind = Kind(str(d.get("kind", "grid")))
        main = d.get("main")
        aspect = _aspect(str(d.get("aspect", "fit")))
        hidden_raw = d.get("hidden", [])
        rects_raw = d.get("rects", {})
        if not isinstance(hidden_raw, list) or not isinstance(rects_raw, dict):
            raise LayoutError("hidden must be a list and rects an object")
        rects = {}
        for k, r in rects_raw.items():
            if not isinstance(r, dict):
                raise LayoutError(f"rect for {k} is not an object")
            a = r.get("aspect")
            rects[str(k)] = RectSpec(int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"]), int(r.get("z", 0)),
                                     bool(r.get("visible", True)), None if a is None else _aspect(str(a)))
        return LayoutSpec(kind, None if main is None else str(main), rects, aspect,
                          frozenset(str(h) for h in hidden_raw))
    except LayoutError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"malformed layout: {e}") from None
