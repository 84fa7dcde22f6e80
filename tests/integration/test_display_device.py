"""The shared screen end to end: guests open displays on a real hostd, draw in place, commit,
and the composed screen (read back over the control socket) is checked pixel by pixel."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import guestlib
from guestlib.control import ControlError, ScreenReader, display_layout, display_list
from guestlib.device import DeviceError
from hostd.daemon import Hostd
from hostd.display import compose as comp
from hostd.display.layout import Aspect, Rect
from vmediad import abi
from vmediad.abi import DisplayCommit, ErrorCode, ExternalBuffer, Op, PixFmt

W, H = 640, 360
CLEARED = comp.CLEARED


@pytest.fixture(autouse=True)
def _unmap_guest_regions() -> Iterator[None]:
    """Frames are views of a guest's region: collect them (and the cycles holding them) so no
    mapping of an in-process guest outlives its test."""
    yield
    gc.collect()


def _hostd(make_hostd: Callable[..., Hostd], layout: str = "grid") -> Hostd:
    return make_hostd(display_width=W, display_height=H, display_layout=layout, region_default=16 << 20)


def _screen_after(h: Hostd, seq: int, timeout: float = 3.0) -> tuple[int, NDArray[np.uint8]]:
    with ScreenReader(h.socket_path) as r:
        return r.next(seq, timeout)


def _settled(h: Hostd) -> tuple[int, NDArray[np.uint8]]:
    """The screen once every change so far is composed: no change is waiting for the
    compositor and no new screen was published for a while."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seq = h.display.latest()[0]
        time.sleep(0.15)
        if h.display.latest()[0] == seq and not h.device.display.changed.is_set():
            break
    return _screen_after(h, 0, 0)


def _gradient(w: int, h: int, seed: int) -> NDArray[np.uint8]:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 4), np.uint8)
    img[..., 0] = (xx * 3 + seed) % 256
    img[..., 1] = (yy * 5 + 2 * seed) % 256
    img[..., 2] = (xx + yy + 3 * seed) % 256
    img[..., 3] = 255
    return img


def _reference(items: list[tuple[int, Rect, PixFmt, tuple[NDArray[np.uint8], ...], int, int]]) -> NDArray[np.uint8]:
    """The same composition in-process: same swscale filter, same rects, bottom to top."""
    screen = np.zeros((H, W, 4), np.uint8)
    srcs = [comp.Item(slot, rect, Aspect.FIT, comp.Source(fmt, w, h, planes, None))
            for slot, rect, fmt, planes, w, h in items]
    comp.Compositor().compose(screen, srcs)
    return screen


def test_two_vms_bgra_and_yuv_compose_bit_exact_with_layout_change(make_hostd: Callable[..., Hostd]) -> None:
    h = _hostd(make_hostd, "rects a=0,0,320,180 b=200,100,400,240,1")
    with guestlib.attach(h.socket_path, name="a") as da, guestlib.attach(h.socket_path, name="b") as db:
        pa = _gradient(300, 170, 1)
        disp_a = da.display(300, 170, "bgra", 2)
        fa = disp_a.back()
        fa.planes[0][...] = pa  # drawn in place, in the region
        flip_a = disp_a.commit(fa).wait(3)
        disp_b = db.display(256, 144, "yuv420p", 3)
        fb = disp_b.back()
        rng = np.random.default_rng(7)
        yuv = tuple(rng.integers(0, 256, p.shape, dtype=np.uint8) for p in fb.planes)
        for p, v in zip(fb.planes, yuv, strict=True):
            p[...] = v
        disp_b.commit(fb).wait(3)
        assert flip_a.result == 1 and flip_a.result_len == abi.DISPLAY_FLIP.size
        _, screen = _settled(h)
        want = _reference([(1, Rect(0, 0, 320, 180), PixFmt.BGRA, (pa.reshape(170, -1),), 300, 170),
                           (2, Rect(200, 100, 400, 240), PixFmt.YUV420P, yuv, 256, 144)])
        assert np.array_equal(screen, want)
        # b (z=1) covers a where they overlap; a's corner far from b is a's picture.
        assert (screen[150, 250] == want[150, 250]).all() and not np.array_equal(screen[0:100, 0:200], 0)

        # The layout changes at run time through the control socket: grid puts a left, b right.
        state = display_layout(["grid", "aspect=stretch"], h.socket_path)
        assert [v["viewport"]["x"] for v in state["vms"]] == [0, 320]
        _, screen = _settled(h)
        srcs = [comp.Item(1, Rect(0, 90, 320, 180), Aspect.STRETCH,
                          comp.Source(PixFmt.BGRA, 300, 170, (pa.reshape(170, -1),))),
                comp.Item(2, Rect(320, 90, 320, 180), Aspect.STRETCH, comp.Source(PixFmt.YUV420P, 256, 144, yuv))]
        want2 = np.zeros((H, W, 4), np.uint8)
        comp.Compositor().compose(want2, srcs)
        cells = [v["viewport"] for v in display_list(h.socket_path)["vms"]]
        assert [(c["w"], c["h"]) for c in cells] == [(320, 360), (320, 360)]
        # grid cells are 320x360; stretch fills them whole.
        srcs = [comp.Item(1, Rect(0, 0, 320, 360), Aspect.STRETCH,
                          comp.Source(PixFmt.BGRA, 300, 170, (pa.reshape(170, -1),))),
                comp.Item(2, Rect(320, 0, 320, 360), Aspect.STRETCH, comp.Source(PixFmt.YUV420P, 256, 144, yuv))]
        want2 = np.zeros((H, W, 4), np.uint8)
        comp.Compositor().compose(want2, srcs)
        assert np.array_equal(screen, want2)
        with pytest.raises(ControlError) as e:
            display_layout(["rects", "a=0,0,9999,10"], h.socket_path)
        assert e.value.kind == "layout" and "9999" in str(e.value)
        disp_a.close()
        disp_b.close()


def test_a_screen_a_reader_holds_is_never_drawn_into(make_hostd: Callable[..., Hostd]) -> None:
    """Compositions draw into the published screen itself only while no reader holds it."""
    h = _hostd(make_hostd)
    with guestlib.attach(h.socket_path, name="r") as dev:
        disp = dev.display(64, 64, "bgra", 2)

        def show(colour: int) -> None:
            f = disp.back()
            f.planes[0][...] = (colour, colour, colour, 255)
            assert disp.commit(f).completion(3).status == abi.Status.DONE

        show(10)
        seq, held = h.display.latest()  # this test is now a reader of that screen
        before = held.copy()
        show(20)
        seq2, now = h.display.latest()
        assert seq2 > seq and now is not held and not held.flags.writeable
        assert np.array_equal(held, before)  # not one pixel of the held screen changed
        assert (now[H // 2, W // 2, :3] == 20).all()
        ident = id(now)
        del held, now  # no reader left: the next picture is drawn into the published screen
        show(30)
        seq3, again = h.display.latest()
        assert seq3 > seq2 and id(again) == ident and (again[H // 2, W // 2, :3] == 30).all()
        disp.close()


def test_flips_release_buffers_in_order_and_mailbox_drops(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(display_width=W, display_height=H, display_max_compose_hz=1.0)
    with guestlib.attach(h.socket_path, name="m") as dev:
        disp = dev.display(64, 64, "bgra", 3)
        assert disp.held == {0, 1, 2}
        # A commit after a quiet spell is composed at once; the next composition may start only
        # 1 s later (max_compose_hz).  Three commits inside that second (forced by the cap): the
        # first two never reach the screen (DROPPED), each giving its buffer back at once; nothing
        # waits.
        f = disp.back()
        f.planes[0][...] = (5, 5, 5, 255)
        _settled(h)  # what the attach and open changed is composed ...
        time.sleep(1.1)  # ... more than a period ago: a quiet spell
        t0 = time.monotonic()
        assert disp.commit(f).completion(0.5).status == abi.Status.DONE  # composed at once
        assert time.monotonic() - t0 < 0.5 and disp.presented == 0
        assert disp.held == {1, 2} and disp.presented == 1
        tasks = []
        for colour in (10, 20, 30):
            f = disp.back()
            f.planes[0][...] = (colour, colour, colour, 255)
            tasks.append(disp.commit(f))
        first_two = [t.completion(0.5) for t in tasks[:2]]  # they end long before the next composition
        last = tasks[2]
        # One buffer on screen, one pending, one the guest's.
        assert not last.done() and len(disp.held) == 1 and (disp.dropped, disp.presented) == (2, 1)
        assert all(c.status == abi.Status.DONE for c in first_two)
        assert last.completion(3).status == abi.Status.DONE
        assert len(disp.held) == 2 and (disp.dropped, disp.presented) == (2, 2)
        _, screen = _settled(h)
        assert (screen[H // 2, W // 2, :3] == 30).all()  # the last commit is what shows
        # The buffer on screen is hostd's: committing it again is refused, nothing changes.
        front = next(i for i in range(3) if i not in disp.held)
        with pytest.raises(ValueError, match="not the guest's"):
            disp.commit(disp.frames[front])
        disp.close()
        assert disp.closed


def test_a_newer_commit_while_the_older_is_prescaled(make_hostd: Callable[..., Hostd]) -> None:
    """A commit's picture is scaled as soon as it arrives.  Commit B's scaling is held inside
    its job (it is reading B's buffer) when commit C replaces B: B's DROPPED flip, which gives
    its buffer back, must wait until that read ended; C is what the screen shows."""
    h = make_hostd(display_width=W, display_height=H, display_max_compose_hz=1.0, display_threads=2)
    gate, reading = threading.Event(), threading.Event()
    real = h.display.compositor.prescale

    def held_for_b(slot: int, key: Any, rect: Rect, aspect: Aspect, source: Callable[[], comp.Source],
                   done: Callable[[], None]) -> comp.Prescale | None:
        def slow() -> comp.Source:
            reading.set()
            gate.wait(10)
            return source()

        return real(slot, key, rect, aspect, slow if key[2] == 2 else source, done)

    h.display.compositor.prescale = held_for_b  # type: ignore[method-assign]
    try:
        with guestlib.attach(h.socket_path, name="m") as dev:
            disp = dev.display(64, 64, "bgra", 3)
            _settled(h)
            time.sleep(1.1)  # a quiet spell: the next commit is composed at once
            tasks = []
            for colour in (10, 20, 30):  # A, B, C
                f = disp.back()
                f.planes[0][...] = (colour, colour, colour, 255)
                tasks.append(disp.commit(f))
                if colour == 10:
                    assert tasks[0].completion(0.5).status == abi.Status.DONE  # A: on screen at once
                if colour == 20:
                    assert reading.wait(5)  # B's job is reading B's buffer
            _, b, c = tasks
            deadline = time.monotonic() + 5
            while display_list(h.socket_path)["vms"][0]["dropped"] < 1:  # hostd took C (B replaced)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)
            assert not b.done()  # B's buffer is still read: not given back
            gate.set()
            assert b.completion(3).status == abi.Status.DONE and not c.done()  # long before the next composition
            assert c.completion(3).status == abi.Status.DONE
            assert len(disp.held) == 2 and (disp.presented, disp.dropped) == (2, 1)  # held reaps the flips
            _, screen = _settled(h)
            assert (screen[H // 2, W // 2, :3] == 30).all()  # C is what shows
            st = h.display.statistics()
            assert st["prescaled"] >= 3 and st["prescale_shown"] >= 2  # A and C came from their prescale
            disp.close()
    finally:
        gate.set()
    assert not h.device.crashed and not h.display.crashed


def _raw_commit(dev: Any, rec: bytes) -> Any:
    src = dev.put(rec + bytes(-len(rec) % 64))
    dst = dev.alloc(64)
    return dev.submit(Op.DISPLAY_COMMIT, src=(src.offset, len(rec)), dst=(dst.offset, dst.size)).completion(3)


def test_hostile_display_tasks_get_errors_and_hostd_keeps_serving(make_hostd: Callable[..., Hostd]) -> None:
    h = _hostd(make_hostd)
    with guestlib.attach(h.socket_path, name="evil") as dev, guestlib.attach(h.socket_path, name="good") as good:
        disp = dev.display(64, 64, "bgra", 2)
        out = disp.output
        region = 16 << 20
        cases = [
            (DisplayCommit(out, 7).pack(), ErrorCode.BAD_ARG),  # no such buffer
            (DisplayCommit(out + 99, 0).pack(), ErrorCode.BAD_SESSION),  # not its output
            (DisplayCommit(out, 0, flags=1).pack(), ErrorCode.BAD_FLAGS),
            (DisplayCommit(out, 0).pack()[:-4], ErrorCode.BAD_ARG),  # truncated record
            (DisplayCommit(out, abi.BUFFER_EXTERNAL, external=ExternalBuffer(
                region - 4096, 64, 64, PixFmt.BGRA, 1, (0, 0, 0), (256, 0, 0))).pack(), ErrorCode.BAD_RANGE),
            (DisplayCommit(out, abi.BUFFER_EXTERNAL, external=ExternalBuffer(
                0, 64, 64, PixFmt.BGRA, 1, (0, 0, 0), (256, 0, 0))).pack(), ErrorCode.BAD_RANGE),  # the registers
            (DisplayCommit(out, abi.BUFFER_EXTERNAL, external=ExternalBuffer(
                disp.frames[0].offset, 9000, 64, PixFmt.BGRA, 1, (0, 0, 0), (36000, 0, 0))).pack(),
             ErrorCode.TOO_LARGE),
        ]
        for rec, err in cases:
            c = _raw_commit(dev, rec)
            assert (c.status, c.error) == (abi.Status.ERROR, err), rec.hex()
        # Another guest's output id is not this guest's to commit.
        other = good.display(32, 32, "bgra", 2)
        c = _raw_commit(dev, DisplayCommit(other.output, 0).pack())
        assert c.error == ErrorCode.BAD_SESSION
        # A second open while one is open is BUSY; bad sizes and formats are refused.
        for args, err in [((64, 64, "bgra", 2), ErrorCode.BUSY)]:
            with pytest.raises(DeviceError) as e:
                dev.display(*args)
            assert e.value.code == err
        with pytest.raises(ValueError, match="not rgb24"):
            good.display(32, 32, "rgb24")
        big = dev.put(abi.DisplayOpen(9000, 9000, PixFmt.BGRA, 2).pack())
        arena = dev.alloc(1 << 20)
        c = dev.submit(Op.DISPLAY_OPEN, src=(big.offset, abi.DISPLAY_OPEN.size),
                       dst=(arena.offset, arena.size)).completion(3)
        assert c.error == ErrorCode.TOO_LARGE
        st = display_list(h.socket_path)
        assert next(v for v in st["vms"] if v["name"] == "evil")["rejected"] >= len(cases) + 2
        # hostd is fine: the good guest's commit is shown.
        f = other.back()
        f.planes[0][...] = (1, 2, 3, 255)
        assert other.commit(f).wait(3).result == 1
        disp.close()
        other.close()


def _committer(sock: str, ready: Any) -> None:
    """A guest process that commits a solid red picture forever (until killed)."""
    with guestlib.attach(sock, name="doomed") as dev:
        disp = dev.display(160, 90, "bgra", 2)
        n = 0
        while True:
            f = disp.back()
            f.planes[0][...] = (0, 0, 255, 255)
            disp.commit(f)
            n += 1
            if n == 5:
                ready.set()
            time.sleep(0.005)


def test_vm_killed_during_commits_is_cleared_and_labelled(make_hostd: Callable[..., Hostd]) -> None:
    h = _hostd(make_hostd)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_committer, args=(h.socket_path, ready))
    p.start()
    try:
        assert ready.wait(20)
        _, screen = _settled(h)
        assert (screen[H // 2, W // 2] == (0, 0, 255, 255)).all()
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)  # in the middle of its commit loop
        p.join(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            vms = display_list(h.socket_path)["vms"]
            if vms and vms[0]["state"] == "died":
                break
            time.sleep(0.05)
        assert vms[0]["state"] == "died" and vms[0]["output"] is None
        _, screen = _settled(h)
        red = np.all(screen == (0, 0, 255, 255), axis=-1)
        assert not red.any()  # never frozen on its last picture
        cleared = np.all(screen == CLEARED, axis=-1)
        assert cleared.mean() > 0.5  # its viewport is cleared (the rest is border and label)
        text = np.all(screen == comp.TEXT, axis=-1)
        assert text.any()  # and labelled
        assert not h.device.crashed and not h.display.crashed
    finally:
        if p.is_alive():
            p.kill()


def test_no_tearing_while_the_guest_draws_during_composition(make_hostd: Callable[..., Hostd]) -> None:
    """Each commit's picture holds its counter in all four corners.  The guest writes the first
    corner of the next buffer, then waits until hostd composed a screen (forced: the screen seq
    moved), then writes the rest: every buffer is half-drawn while a composition runs.  No
    composed screen may show two counters."""
    h = _hostd(make_hostd, "rects t=0,0,128,128")
    seen: list[NDArray[np.uint8]] = []
    with guestlib.attach(h.socket_path, name="t") as dev:
        disp = dev.display(128, 128, "bgra", 2)
        corners = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(120, 128)), (slice(120, 128), slice(0, 8)),
                   (slice(120, 128), slice(120, 128))]
        tasks: list[guestlib.Task] = []
        for n in range(1, 16):
            f = disp.back()
            img = f.planes[0]
            v = (n * 16) % 256
            img[corners[0]] = (v, v, v, 255)
            # The previous commit is composed while this buffer is half-drawn: its flip comes
            # only after the composition that put it on screen.
            if tasks:
                tasks[-1].completion(3)
            for c in corners[1:]:
                img[c] = (v, v, v, 255)
            tasks.append(disp.commit(f))
            s = h.display.latest()[1]
            seen.append(s[[4, 4, 124, 124], [4, 124, 4, 124], 0].copy())
        for t in tasks:
            t.completion(3)
        s = _settled(h)[1]
        seen.append(s[[4, 4, 124, 124], [4, 124, 4, 124], 0].copy())
        disp.close()
    shown = [tuple(int(x) for x in s) for s in seen if s.any()]
    assert shown, "no committed picture was ever on screen"
    assert all(len(set(s)) == 1 for s in shown), shown
    assert shown[-1] == (240,) * 4  # the last commit (15 * 16)


def test_present_shows_pooled_decoder_frames_without_a_copy(make_hostd: Callable[..., Hostd]) -> None:
    h = _hostd(make_hostd, "rects p=0,0,320,180")
    with guestlib.attach(h.socket_path, name="p", region_size=64 << 20) as dev:
        with dev.encoder("h264", 320, 180, 30) as enc:
            rng = np.random.default_rng(3)
            packets = []
            for i in range(6):
                f = enc.new_frame()
                for p in f.planes:
                    p[...] = rng.integers(0, 256, p.shape, dtype=np.uint8) // 2 + i * 10
                packets += enc.encode(f, pts=i)
            packets += enc.flush()
        disp = dev.display(320, 180, "yuv420p", 2)
        with dev.decoder("h264", parse=False, width=320, height=180) as dec:
            shown, n = None, 0
            for pkt in packets:
                for fr in dec.decode(pkt.data, pts=pkt.pts):
                    assert fr.pooled
                    disp.present(fr).wait(3)
                    shown, n = fr, n + 1
            assert shown is not None
            planes = tuple(p.copy() for p in shown.planes)
            pool = dec._pool
            assert pool is not None

            def lent() -> int:
                return sum(dev.region.load32(pool.offset + abi.pool_lent_word(i)) for i in range(abi.POOL_MAX_SLOTS))

            # The decoder gives back its own lends; the frame on screen stays lent to the display.
            dec._release_lent()
            assert disp.held == {0, 1}  # reads the flips: only the last frame is still on screen
            assert lent() == 1
            _, screen = _settled(h)
            st = h.display.statistics()
            assert disp.held == {0, 1}
            want = _reference([(1, Rect(0, 0, 320, 180), PixFmt.YUV420P, planes, 320, 180)])
            assert np.array_equal(screen, want)
            # hostd read the picture in the decoder's pool: the display's own buffers were never
            # committed (the guest copied no pixel), and every decoded frame was presented.
            assert disp.held == {0, 1} and n >= 4 and disp.presented + disp.dropped == n and st["scaled"] >= 1
            disp.close()
            assert lent() == 0


def test_vm_spawn_play_presents_every_frame_on_the_screen(make_hostd: Callable[..., Hostd], tmp_path: Any) -> None:
    import subprocess
    import sys

    h = _hostd(make_hostd)
    r = subprocess.run([sys.executable, "-m", "vmediad", "vm", "spawn", "--socket", h.socket_path, "--count", "2",
                        "--workload", "play", "--size", "160x96", "--frames", "15", "--output", str(tmp_path),
                        "--json"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    reports = json.loads(r.stdout)
    assert [(x["name"], x["workload"], x["state"], x["frames"]) for x in reports] == [
        ("vm0", "play", "done", 15), ("vm1", "play", "done", 15)]
    for x in reports:
        assert x["extra"]["presented"] + x["extra"]["dropped"] == 15 and x["extra"]["presented"] >= 1
    vms = {v["name"]: v for v in display_list(h.socket_path)["vms"]}
    assert {n: (v["state"], v["presented"] + v["dropped"]) for n, v in vms.items()} == {
        "vm0": ("detached", 15), "vm1": ("detached", 15)}


def test_display_statistics_reach_status_and_metrics(make_hostd: Callable[..., Hostd]) -> None:
    import re
    import urllib.request

    from guestlib.device import hostd_status

    h = make_hostd(display_width=W, display_height=H, metrics="127.0.0.1:0")
    with guestlib.attach(h.socket_path, name="shown") as dev, guestlib.attach(h.socket_path, name="codec"):
        disp = dev.display(64, 64, "bgra", 2)
        for _ in range(3):
            disp.commit(disp.back()).wait(3)
        status = hostd_status(h.socket_path)["display"]
        assert (status["width"], status["height"]) == (W, H) and status["compositions"] >= 3
        assert {v["name"]: v["presented"] for v in status["vms"]} == {"shown": 3}  # no display task: not shown
        with urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r'(?m)^vmediad_display_commits_total\{result="presented",vm="shown"\} 3\.0$', text)
        assert 'vm="codec"' not in "".join(ln for ln in text.splitlines() if ln.startswith("vmediad_display"))
        m = re.search(r"(?m)^vmediad_display_compositions_total (\S+)$", text)
        assert m is not None and float(m.group(1)) >= 3
        m = re.search(r"(?m)^vmediad_display_compose_cpu_seconds_total (\S+)$", text)
        assert m is not None and float(m.group(1)) > 0
        disp.close()


def test_display_http_is_loopback_unless_a_host_is_named(make_hostd: Callable[..., Hostd]) -> None:
    import urllib.request

    from hostd.config import Config as HostdConfig
    from hostd.config import ConfigError, display_address, validate

    assert display_address("8080") == ("127.0.0.1", "8080")
    assert display_address(":8080") == ("127.0.0.1", "8080")
    assert display_address("[::1]:8080") == ("::1", "8080")
    with pytest.raises(ConfigError, match=r"display\.http"):
        validate(HostdConfig(display_http="localhost:http"))
    h = make_hostd(display_width=W, display_height=H, display_http="0")
    assert h.display_http is not None and h.display_http.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(h.display_http.url + "snapshot.png", timeout=5) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
