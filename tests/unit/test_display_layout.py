"""Layout presets, explicit rects, aspect math and the layout parser: exact rectangles."""

from __future__ import annotations

import itertools

import pytest

from hostd.display import layout as lay
from hostd.display.layout import Aspect, Kind, LayoutError, LayoutSpec, Rect, RectSpec


def _t(rects: list[Rect]) -> list[tuple[int, int, int, int]]:
    return [(r.x, r.y, r.w, r.h) for r in rects]


GRID_1080 = {
    1: [(0, 0, 1920, 1080)],
    2: [(0, 0, 960, 1080), (960, 0, 960, 1080)],
    3: [(0, 0, 960, 540), (960, 0, 960, 540), (480, 540, 960, 540)],
    4: [(0, 0, 960, 540), (960, 0, 960, 540), (0, 540, 960, 540), (960, 540, 960, 540)],
    5: [(0, 0, 640, 540), (640, 0, 640, 540), (1280, 0, 640, 540), (320, 540, 640, 540), (960, 540, 640, 540)],
    6: [(0, 0, 640, 540), (640, 0, 640, 540), (1280, 0, 640, 540),
        (0, 540, 640, 540), (640, 540, 640, 540), (1280, 540, 640, 540)],
    7: [(0, 0, 640, 360), (640, 0, 640, 360), (1280, 0, 640, 360), (0, 360, 640, 360), (640, 360, 640, 360),
        (1280, 360, 640, 360), (640, 720, 640, 360)],
    8: [(0, 0, 640, 360), (640, 0, 640, 360), (1280, 0, 640, 360), (0, 360, 640, 360), (640, 360, 640, 360),
        (1280, 360, 640, 360), (320, 720, 640, 360), (960, 720, 640, 360)],
    9: [(x, y, 640, 360) for y in (0, 360, 720) for x in (0, 640, 1280)],
}

MAIN_1080 = {
    1: [(0, 0, 1920, 1080)],
    2: [(0, 0, 1920, 810), (720, 810, 480, 270)],
    3: [(0, 0, 1920, 810), (480, 810, 480, 270), (960, 810, 480, 270)],
    4: [(0, 0, 1920, 810), (240, 810, 480, 270), (720, 810, 480, 270), (1200, 810, 480, 270)],
    5: [(0, 0, 1920, 810)] + [(x, 810, 480, 270) for x in (0, 480, 960, 1440)],
    6: [(0, 0, 1920, 810)] + [(x, 810, 384, 270) for x in (0, 384, 768, 1152, 1536)],
    7: [(0, 0, 1920, 810)] + [(x, 810, 320, 270) for x in (0, 320, 640, 960, 1280, 1600)],
    8: [(0, 0, 1920, 810), (0, 810, 274, 270), (274, 810, 274, 270), (548, 810, 274, 270), (822, 810, 275, 270),
        (1097, 810, 274, 270), (1371, 810, 274, 270), (1645, 810, 275, 270)],
    9: [(0, 0, 1920, 810)] + [(x, 810, 240, 270) for x in range(0, 1920, 240)],
}


@pytest.mark.parametrize("n", range(1, 10))
def test_grid_1920x1080_exact(n: int) -> None:
    assert _t(lay.grid_rects(n, 1920, 1080)) == GRID_1080[n]


@pytest.mark.parametrize("n", range(1, 10))
def test_main_1920x1080_exact(n: int) -> None:
    assert _t(lay.main_rects(n, 1920, 1080)) == MAIN_1080[n]


def test_grid_odd_screen_exact() -> None:
    assert _t(lay.grid_rects(2, 1001, 777)) == [(0, 0, 500, 777), (500, 0, 501, 777)]
    assert _t(lay.grid_rects(3, 1001, 777)) == [(0, 0, 500, 388), (500, 0, 501, 388), (250, 388, 500, 389)]
    assert _t(lay.grid_rects(5, 1001, 777)) == [(0, 0, 333, 388), (333, 0, 334, 388), (667, 0, 334, 388),
                                                (166, 388, 334, 389), (500, 388, 334, 389)]
    assert _t(lay.grid_rects(7, 1001, 777))[-1] == (333, 518, 334, 259)
    assert _t(lay.main_rects(3, 1001, 777)) == [(0, 0, 1001, 583), (250, 583, 250, 194), (500, 583, 250, 194)]
    assert lay.grid_rects(0, 1920, 1080) == [] and lay.main_rects(0, 1920, 1080) == []


@pytest.mark.parametrize(("w", "h"), [(1920, 1080), (1001, 777), (641, 359), (7, 5)])
@pytest.mark.parametrize("n", range(1, 10))
def test_presets_stay_inside_and_never_overlap(n: int, w: int, h: int) -> None:
    for rects in (lay.grid_rects(n, w, h), lay.main_rects(n, w, h)):
        assert len(rects) == n
        for r in rects:
            assert 0 <= r.x and 0 <= r.y and r.right <= w and r.bottom <= h
        for a, b in itertools.combinations(rects, 2):
            assert a.intersect(b).empty, (a, b)
    if n in (1, 2, 4, 6, 9):
        assert sum(r.w * r.h for r in lay.grid_rects(n, w, h)) == w * h  # full grids tile the screen


def test_place_fit_letterbox_and_pillarbox() -> None:
    assert lay.place(1920, 1080, Rect(0, 0, 960, 1080), Aspect.FIT) == lay.Placement(
        Rect(0, 0, 1920, 1080), Rect(0, 270, 960, 540))
    assert lay.place(1080, 1920, Rect(0, 0, 960, 540), Aspect.FIT).dst == Rect(328, 0, 304, 540)
    assert lay.place(640, 480, Rect(100, 50, 1920, 1080), Aspect.FIT).dst == Rect(340, 50, 1440, 1080)
    assert lay.place(1001, 777, Rect(0, 0, 100, 100), Aspect.FIT).dst == Rect(0, 11, 100, 78)  # 77.6 -> 78
    assert lay.place(8192, 1, Rect(0, 0, 100, 100), Aspect.FIT).dst == Rect(0, 49, 100, 1)  # never 0 rows
    assert lay.place(1920, 1080, Rect(5, 6, 960, 540), Aspect.FIT).dst == Rect(5, 6, 960, 540)  # same aspect


def test_place_fill_crops_the_centre() -> None:
    assert lay.place(1920, 1080, Rect(0, 0, 960, 1080), Aspect.FILL) == lay.Placement(
        Rect(480, 0, 960, 1080), Rect(0, 0, 960, 1080))
    assert lay.place(1080, 1920, Rect(0, 0, 960, 540), Aspect.FILL).crop == Rect(0, 656, 1080, 608)
    assert lay.place(1003, 777, Rect(0, 0, 100, 100), Aspect.FILL).crop == Rect(113, 0, 777, 777)
    assert lay.place(1003, 777, Rect(0, 0, 100, 100), Aspect.FILL, crop_align=2).crop == Rect(112, 0, 777, 777)
    assert lay.place(96, 64, Rect(320, 180, 312, 172), Aspect.FILL).crop == Rect(0, 5, 96, 53)


def test_place_stretch_and_empty() -> None:
    want = lay.Placement(Rect(0, 0, 7, 3), Rect(1, 2, 300, 400))
    assert lay.place(7, 3, Rect(1, 2, 300, 400), Aspect.STRETCH) == want
    assert lay.place(7, 3, Rect(1, 2, 0, 400), Aspect.FIT).dst.empty


def _vms(n: int) -> list[tuple[int, str]]:
    return [(i + 10, f"vm{i}") for i in range(n)]


def test_compute_grid_hidden_and_main_choice() -> None:
    vps = lay.compute(LayoutSpec(hidden=frozenset({"vm1"})), _vms(3), 1920, 1080)
    assert [(v.vm, v.visible, (v.rect.x, v.rect.y, v.rect.w, v.rect.h)) for v in vps] == [
        (10, True, (0, 0, 960, 1080)), (11, False, (0, 0, 0, 0)), (12, True, (960, 0, 960, 1080))]
    vps = lay.compute(LayoutSpec(Kind.MAIN, main="12"), _vms(3), 1920, 1080)  # by id
    assert [v.rect for v in vps] == [Rect(480, 810, 480, 270), Rect(960, 810, 480, 270), Rect(0, 0, 1920, 810)]
    vps = lay.compute(LayoutSpec(Kind.MAIN, main="vm1", aspect=Aspect.FILL), _vms(2), 1920, 1080)
    assert vps[1].rect == Rect(0, 0, 1920, 810) and {v.aspect for v in vps} == {Aspect.FILL}


def test_compute_rects_z_visibility_and_unnamed_vms() -> None:
    spec = LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 200, 200, z=2),
                                         "11": RectSpec(100, 100, 200, 200, z=1, aspect=Aspect.STRETCH),
                                         "vm3": RectSpec(0, 0, 10, 10, visible=False)})
    vps = lay.compute(spec, _vms(4), 640, 360)
    assert [(v.rect, v.z, v.visible, v.aspect) for v in vps] == [
        (Rect(0, 0, 200, 200), 2, True, Aspect.FIT), (Rect(100, 100, 200, 200), 1, True, Aspect.STRETCH),
        (Rect(0, 0, 0, 0), 0, False, Aspect.FIT), (Rect(0, 0, 10, 10), 0, False, Aspect.FIT)]
    assert [v.vm for v in lay.z_sorted(vps)] == [11, 10]  # bottom to top; hidden/unnamed left out
    same_z = lay.compute(LayoutSpec(Kind.RECTS, rects={"vm0": RectSpec(0, 0, 9, 9), "vm1": RectSpec(0, 0, 9, 9)}),
                         _vms(2), 640, 360)
    assert [v.vm for v in lay.z_sorted(same_z)] == [10, 11]  # a tie: later in the layout is on top


@pytest.mark.parametrize(("rect", "msg"), [
    (RectSpec(0, 0, 641, 10), "rect 0,0,641,10 for vm0 is not inside the 640x360 screen"),
    (RectSpec(-1, 0, 10, 10), "rect -1,0,10,10 for vm0 is not inside the 640x360 screen"),
    (RectSpec(0, 0, 0, 10), "rect 0,0,0,10 for vm0 is not inside the 640x360 screen"),
    (RectSpec(0, 0, 10, 10, z=1 << 30), "z 1073741824 for vm0 is not within +-1048576"),
])
def test_validate_rejects_rects_outside_the_screen(rect: RectSpec, msg: str) -> None:
    with pytest.raises(LayoutError) as e:
        lay.validate(LayoutSpec(Kind.RECTS, rects={"vm0": rect}), 640, 360)
    assert str(e.value) == msg
    with pytest.raises(LayoutError, match="screen size 0x10"):
        lay.validate(LayoutSpec(), 0, 10)


def test_parse_words() -> None:
    assert lay.parse(["grid"]) == LayoutSpec()
    assert lay.parse(["main", "vm2", "aspect=fill"]) == LayoutSpec(Kind.MAIN, main="vm2", aspect=Aspect.FILL)
    assert lay.parse(["grid", "hide=vm1,3"]).hidden == frozenset({"vm1", "3"})
    spec = lay.parse(["rects", "a=0,0,10,10", "b=5,5,10,10,3", "aspect=stretch"])
    assert spec == LayoutSpec(Kind.RECTS, rects={"a": RectSpec(0, 0, 10, 10), "b": RectSpec(5, 5, 10, 10, 3)},
                              aspect=Aspect.STRETCH)
    assert lay.spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("words", "msg"), [
    ([], "no layout given (grid, main or rects)"),
    (["diagonal"], "unknown layout 'diagonal' (grid, main or rects)"),
    (["rects"], "a rects layout needs at least one VM=X,Y,W,H"),
    (["rects", "a=1,2,3"], "rect for a needs X,Y,W,H[,Z], got '1,2,3'"),
    (["rects", "a=x,0,1,1"], "rect field of a 'x' is not an integer"),
    (["rects", "a=0,0,1,1", "a=0,0,2,2"], "two rects for a"),
    (["grid", "vm1"], "unexpected 'vm1' in a grid layout"),
    (["main", "vm1", "vm2"], "unexpected 'vm2' in a main layout"),
    (["grid", "aspect=zoom"], "aspect 'zoom' is not one of fit, fill, stretch"),
])
def test_parse_errors_are_one_line(words: list[str], msg: str) -> None:
    with pytest.raises(LayoutError) as e:
        lay.parse(words)
    assert str(e.value) == msg


def test_spec_from_dict_rejects_malformed() -> None:
    with pytest.raises(LayoutError, match="malformed layout"):
        lay.spec_from_dict({"kind": "rects", "rects": {"a": {"x": 1}}})
    with pytest.raises(LayoutError, match="hidden must be a list"):
        lay.spec_from_dict({"kind": "grid", "hidden": "a"})
