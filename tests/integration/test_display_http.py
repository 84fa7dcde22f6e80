"""The shared screen's live page: a real DisplayHttp on 127.0.0.1, a real compositor behind it,
and (when chromium is installed) a real headless browser in front of it.

``ComposedSource`` is a ScreenSource made of the real compositor: four VMs, each a solid-colour
BGRA picture in a grid (one quadrant each on a 2x2 grid), and a small square in the middle of the
screen whose colour changes with every composed frame, so every screen differs from the last
while the quadrant centres stay one known colour.  A thread composes at ``hz``; ``paused()``
holds that thread so a test can name the exact screen the server must serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, cast

import aiohttp
import av
import numpy as np
import pytest
from av.video.codeccontext import VideoCodecContext
from numpy.typing import NDArray

from hostd.display import compose as comp
from hostd.display import layout as lay
from hostd.display.http import DisplayHttp, HttpStatistics, ScreenSource, encode_jpeg, encode_png
from tests.cdp import Browser, chromium_path
from vmediad.abi import PixFmt
from vmediad.errors import StartupError

W, H = 320, 240
NAMES = ["vm0", "vm1", "vm2", "vm3"]
COLOURS = [(40, 40, 220, 255), (40, 200, 40, 255), (220, 60, 40, 255), (40, 220, 220, 255)]  # B, G, R, A
CENTRES = [(W // 4, H // 4), (3 * W // 4, H // 4), (W // 4, 3 * H // 4), (3 * W // 4, 3 * H // 4)]  # x, y
JPEG_TOL = 12
COUNTER_SLOT = 100


def solid(colour: tuple[int, int, int, int], w: int = 64, h: int = 48) -> NDArray[np.uint8]:
    pic = np.empty((h, w, 4), dtype=np.uint8)
    pic[:] = colour
    return pic


class ComposedSource:
    def __init__(self, hz: float = 30.0, *, width: int = W, height: int = H, noisy: bool = False) -> None:
        self.hz = hz
        self.refresh_hz = hz
        self.width, self.height = width, height
        self.noisy = noisy  # every picture is new noise every frame (large JPEGs)
        self.spec = lay.LayoutSpec()
        self.layouts: list[list[str]] = []
        self.stats_returned: list[dict[str, object]] = []
        self._pictures = [solid(c) for c in COLOURS]
        self._rng = np.random.default_rng(7)
        self._compositor = comp.Compositor()
        self._cond = threading.Condition()
        self._seq = 0
        self._screen = np.zeros((height, width, 4), dtype=np.uint8)
        self._times: deque[float] = deque(maxlen=256)
        self._compose_ms: deque[float] = deque(maxlen=256)
        self._hold = threading.Lock()  # held by the composing thread for each frame, or by paused()
        self._stop = threading.Event()
        self._compose()
        self._thread = threading.Thread(target=self._run, name="test-source", daemon=True)
        self._thread.start()

    # --- composition --------------------------------------------------------------------------
    def _viewports(self) -> tuple[lay.Viewport, ...]:
        return lay.compute(self.spec, list(enumerate(NAMES)), self.width, self.height)

    def _compose(self) -> None:
        n = self._seq + 1
        items = []
        for vp in lay.z_sorted(self._viewports()):
            pic = self._pictures[vp.vm]
            key: object = ("solid", vp.vm)
            if self.noisy:
                pic = self._rng.integers(0, 256, (240, 320, 4), dtype=np.uint8)
                key = ("noise", n)
            h, w = pic.shape[:2]
            src = comp.Source(PixFmt.BGRA, w, h, (pic.reshape(h, w * 4),), key)
            items.append(comp.Item(vp.vm, vp.rect, vp.aspect, src))
        counter = solid(((n * 37) % 256, (n * 91) % 256, (n * 53) % 256, 255), 8, 8)
        items.append(comp.Item(COUNTER_SLOT, lay.Rect(self.width // 2 - 10, self.height // 2 - 10, 20, 20),
                               lay.Aspect.STRETCH, comp.Source(PixFmt.BGRA, 8, 8, (counter.reshape(8, 32),), n)))
        screen = np.empty((self.height, self.width, 4), dtype=np.uint8)  # a new array per frame
        st = self._compositor.compose(screen, items)
        with self._cond:
            self._seq = n
            self._screen = screen
            self._times.append(time.monotonic())
            self._compose_ms.append(st.wall_s * 1e3)
            self._cond.notify_all()

    def _run(self) -> None:
        period = 1.0 / self.hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += period
            with self._hold:
                self._compose()
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No screen is composed while inside (the composing thread waits for the lock)."""
        with self._hold:
            yield

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._compositor.close()

    # --- ScreenSource -------------------------------------------------------------------------
    def latest(self) -> tuple[int, NDArray[np.uint8]]:
        with self._cond:
            return self._seq, self._screen

    def wait_newer(self, seq: int, timeout: float) -> tuple[int, NDArray[np.uint8]] | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._seq > seq, timeout):
                return None
            return self._seq, self._screen

    def display_statistics(self) -> dict[str, object]:
        with self._cond:
            times = list(self._times)
            ms = sorted(self._compose_ms)
        recent = [t for t in times if t > times[-1] - 1.0]
        vms: list[dict[str, object]] = [
            {"vm": vp.vm, "name": vp.name, "state": "attached", "viewport": vp.to_dict(),
             "commit_fps": 0.0, "presented": 0, "dropped": 0} for vp in self._viewports()]
        stats: dict[str, object] = {
            "width": self.width, "height": self.height, "refresh_hz": self.refresh_hz,
            "screen_fps": float(len(recent)), "compose_ms_p50": ms[len(ms) // 2] if ms else 0.0,
            "layout": self.spec.to_dict(), "vms": vms}
        self.stats_returned.append(stats)
        return stats

    def set_layout(self, words: Sequence[str]) -> dict[str, object]:
        spec = lay.parse(words)
        lay.compute(spec, list(enumerate(NAMES)), self.width, self.height)
        self.layouts.append(list(words))
        self.spec = spec
        return self.display_statistics()


@pytest.fixture
def source() -> Iterator[ComposedSource]:
    s = ComposedSource()
    yield s
    s.close()


@pytest.fixture
def server(source: ComposedSource) -> Iterator[DisplayHttp]:
    d = DisplayHttp(source, "127.0.0.1", 0)
    d.start()
    yield d
    d.stop()


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: bytes, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def decode_rgb(codec: str, data: bytes) -> NDArray[np.uint8]:
    frames = cast(VideoCodecContext, av.CodecContext.create(codec, "r")).decode(av.Packet(data))
    assert len(frames) == 1
    return np.asarray(frames[0].to_ndarray(format="rgb24"), dtype=np.uint8)


def expected_rgb(screen: NDArray[np.uint8], x: int, y: int) -> NDArray[np.int32]:
    return screen[y, x, 2::-1].astype(np.int32)


def assert_quadrants(rgb: NDArray[np.uint8], screen: NDArray[np.uint8], sx: float = 0.0, sy: float = 0.0,
                     scale_x: float = 1.0, scale_y: float = 1.0) -> None:
    """Each quadrant centre of ``rgb`` (the screen placed at (sx, sy) and scaled) within JPEG_TOL
    of the screen's colour there."""
    for i, (x, y) in enumerate(CENTRES):
        want = expected_rgb(screen, x, y)
        assert tuple(want) == (COLOURS[i][2], COLOURS[i][1], COLOURS[i][0])
        got = rgb[round(sy + (y + 0.5) * scale_y), round(sx + (x + 0.5) * scale_x)].astype(np.int32)
        assert np.abs(got - want).max() <= JPEG_TOL, f"quadrant {i}: {got} vs {want}"


# --- 1. the snapshot is lossless --------------------------------------------------------------
def test_snapshot_png_is_bit_exact(server: DisplayHttp, source: ComposedSource) -> None:
    with source.paused():
        seq, screen = source.latest()
        status, headers, body = _get(server.url + "snapshot.png")
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Screen-Seq"] == str(seq)
    rgb = decode_rgb("png", body)
    assert rgb.shape == (H, W, 3)
    assert np.array_equal(rgb, screen[..., 2::-1])
    # Every byte value in every channel, odd sizes: the encoder itself loses nothing.
    noise = np.random.default_rng(3).integers(0, 256, (241, 317, 4), dtype=np.uint8)
    assert np.array_equal(decode_rgb("png", encode_png(noise)), noise[..., 2::-1])


# --- 2. state and layout ----------------------------------------------------------------------
def test_state_and_layout(server: DisplayHttp, source: ComposedSource) -> None:
    status, headers, body = _get(server.url + "api/state")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == source.stats_returned[-1]
    assert json.loads(body)["layout"]["kind"] == "grid"

    status, state = _post(server.url + "api/layout", json.dumps({"words": ["main", "vm2", "aspect=fill"]}).encode())
    assert status == 200
    assert source.layouts == [["main", "vm2", "aspect=fill"]]
    assert state == source.stats_returned[-1]
    assert state["layout"]["kind"] == "main" and state["layout"]["main"] == "vm2"
    big = next(v["viewport"] for v in state["vms"] if v["name"] == "vm2")
    assert (big["x"], big["y"], big["w"], big["h"], big["aspect"]) == (0, 0, W, H - H // 4, "fill")

    status, err = _post(server.url + "api/layout", json.dumps({"words": ["spiral"]}).encode())
    assert status == 400
    assert err == {"error": "unknown layout 'spiral' (grid, main or rects)"}
    status, err = _post(server.url + "api/layout", json.dumps({"words": ["rects", "vm0=0,0,999,10"]}).encode())
    assert status == 400
    assert err == {"error": f"rect 0,0,999,10 for vm0 is not inside the {W}x{H} screen"}
    assert source.layouts == [["main", "vm2", "aspect=fill"]]  # refused layouts never applied

    assert _post(server.url + "api/layout", b"{not json")[0] == 400
    assert _post(server.url + "api/layout", b'{"words": "grid"}') == (
        400, {"error": 'the body must be {"words": ["grid", ...]} (a list of strings)'})
    assert _post(server.url + "api/layout", b"words=grid", "application/x-www-form-urlencoded")[0] == 415
    # Another site's page must not change the layout through the user's browser.
    status, err = _post(server.url + "api/layout", b'{"words": ["grid"]}', headers={"Origin": "http://evil.example"})
    assert (status, err) == (403, {"error": "cross-origin request refused"})
    assert source.layouts == [["main", "vm2", "aspect=fill"]]
    # Nor may a site an attacker points at 127.0.0.1 (DNS rebinding) read anything.
    req = urllib.request.Request(server.url + "api/state", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=5)
    assert ei.value.code == 403
    assert json.loads(ei.value.read()) == {
        "error": "host 'evil.example' refused: the display page is served on loopback only"}
    page_status, page_headers, page = _get(server.url)
    assert page_status == 200 and page_headers["Content-Type"].startswith("text/html")
    assert b'id="frames"' in page and b"/ws" in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere


# --- 3. the WebSocket stream ------------------------------------------------------------------
async def _receive(url: str, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                break
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            got.append(msg.data)
    return got


def test_websocket_pushes_each_new_screen_as_jpeg(server: DisplayHttp, source: ComposedSource) -> None:
    ws_url = server.url.replace("http://", "ws://") + "ws"
    frames = asyncio.run(_receive(ws_url, 1.0))
    assert len(frames) >= 15, f"{len(frames)} frames in 1 s from a 30 Hz source"
    assert len(set(frames)) == len(frames)  # only changed screens are pushed, never one twice
    _, screen = source.latest()
    for data in frames:
        assert data[:2] == b"\xff\xd8"
        rgb = decode_rgb("mjpeg", data)
        assert rgb.shape == (H, W, 3)
        assert_quadrants(rgb, screen)
    st = server.statistics()
    assert st.frames_sent >= len(frames) and st.bytes_sent >= sum(map(len, frames))
    assert st.encode_ms_p50 > 0.0

    # At most refresh_hz frames a second, even from a source composing faster.
    source.refresh_hz = 10.0
    time.sleep(0.2)
    frames = asyncio.run(_receive(ws_url, 1.0))
    assert 5 <= len(frames) <= 12, len(frames)

    # An unchanged screen is not pushed again: each client gets the current screen once, also
    # when a newcomer makes the server publish it again, then silence.
    async def two_clients() -> tuple[list[bytes], list[bytes]]:
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url) as a:
            got_a = [(await a.receive(timeout=2)).data]
            async with s.ws_connect(ws_url) as b:
                got_b = [(await b.receive(timeout=2)).data]
                for ws, got in ((a, got_a), (b, got_b)):
                    with contextlib.suppress(TimeoutError):
                        got.append((await ws.receive(timeout=0.4)).data)
        return got_a, got_b

    with source.paused():
        _, screen = source.latest()
        got_a, got_b = asyncio.run(two_clients())
        assert len(got_a) == 1 and len(got_b) == 1
        assert got_a == got_b  # the current screen, encoded once more for the newcomer
        counter = decode_rgb("mjpeg", got_a[0])[H // 2, W // 2].astype(np.int32)
        assert np.abs(counter - expected_rgb(screen, W // 2, H // 2)).max() <= JPEG_TOL
    deadline = time.monotonic() + 2
    while server.statistics().clients and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.statistics().clients == 0


def test_slow_client_skips_frames_instead_of_queueing() -> None:
    source = ComposedSource(hz=30.0, width=640, height=480, noisy=True)
    server = DisplayHttp(source, "127.0.0.1", 0)
    server.start()

    def small_socket(addr: Any) -> socket.socket:
        s = socket.socket(addr[0], addr[1], addr[2])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # no receive-window autotuning
        return s

    async def scenario() -> tuple[HttpStatistics, int]:
        conn = aiohttp.TCPConnector(socket_factory=small_socket)
        async with aiohttp.ClientSession(connector=conn) as s, s.ws_connect(
                server.url.replace("http://", "ws://") + "ws") as ws:
            first = await ws.receive(timeout=5)
            assert first.type == aiohttp.WSMsgType.BINARY
            # Read nothing until the producer is more than 15 frames ahead of this client's
            # sender (on a loaded box that takes longer than 0.4 s at 30 Hz): the client's
            # buffer and both sockets fill, the server's send waits, and the frames published
            # meanwhile are never queued for this client.
            deadline = time.monotonic() + 30
            while True:
                stalled = server.statistics()
                if stalled.frames_encoded - stalled.frames_sent > 15 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            # Read again until the sender has skipped what it never queued and 5 frames came.
            got = 0
            deadline = time.monotonic() + 10
            while (got < 5 or server.statistics().frames_dropped <= 10) and (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ws.receive(timeout=left)
                except TimeoutError:
                    break
                assert msg.type == aiohttp.WSMsgType.BINARY
                got += 1
            return stalled, got

    try:
        stalled, later = asyncio.run(scenario())
        st = server.statistics()
    finally:
        server.stop()
        source.close()
    # The producer kept encoding at 30 Hz while the client's sender was stuck in one send.
    assert stalled.frames_encoded - stalled.frames_sent > 10, stalled
    assert st.frames_dropped > 10, st  # those frames were skipped, not sent late
    assert later >= 5  # the client, reading again, gets frames again
    # Every encoded frame was sent or skipped; only the newest may not be accounted yet.
    assert st.frames_encoded - 2 <= st.frames_sent + st.frames_dropped <= st.frames_encoded, st


# --- 4. a real browser -------------------------------------------------------------------------
async def _browser_scenario(server: DisplayHttp, source: ComposedSource) -> None:
    async with await Browser.launch() as browser:
        page = await browser.new_page()
        await page.navigate(server.url)
        await page.wait_for("Number(document.getElementById('frames').textContent) > 0", timeout=10)
        n0 = int(await page.evaluate("document.getElementById('frames').textContent"))
        await asyncio.sleep(1.0)
        n1 = int(await page.evaluate("document.getElementById('frames').textContent"))
        assert n1 - n0 >= 10, f"the page drew {n1 - n0} frames in 1 s"

        rect = await page.evaluate("(() => { const r = document.getElementById('screen').getBoundingClientRect();"
                                   " return [r.x, r.y, r.width, r.height]; })()")
        assert rect[2] == W and rect[3] == H
        png = await page.screenshot()
        shot = decode_rgb("png", png)
        _, screen = source.latest()
        assert_quadrants(shot, screen, rect[0], rect[1], rect[2] / W, rect[3] / H)

        # The VM table and the main chooser fill from /api/state.
        await page.wait_for("document.querySelectorAll('#vms tbody tr').length === 4", timeout=5)
        assert await page.evaluate("Array.from(document.querySelectorAll('#main-vm option')).map(o => o.value)") == \
            ["", *NAMES]
        await page.evaluate("document.getElementById('layout-grid').click()")
        await _until(lambda: source.layouts == [["grid"]])
        await page.evaluate("document.getElementById('main-vm').value = 'vm1';"
                            " document.getElementById('layout-main').click()")
        await _until(lambda: source.layouts == [["grid"], ["main", "vm1"]])
        await page.evaluate("document.getElementById('layout-words').value = 'rects vm0=0,0,5'; "
                            "document.getElementById('layout-apply').click()")
        text = await page.wait_for("document.getElementById('layout-error').textContent", timeout=5)
        assert text == "rect for vm0 needs X,Y,W,H[,Z], got '0,0,5'"
        assert source.layouts == [["grid"], ["main", "vm1"]]
        await page.close()


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_shows_the_live_screen_and_sets_layouts(server: DisplayHttp, source: ComposedSource) -> None:
    asyncio.run(_browser_scenario(server, source))


# --- 5. startup errors -----------------------------------------------------------------------
def test_port_in_use_is_a_one_line_startup_error(source: ComposedSource) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        d = DisplayHttp(source, "127.0.0.1", port)
        with pytest.raises(StartupError) as ei:
            d.start()
    finally:
        taken.close()
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg == f"cannot serve the display page on 127.0.0.1:{port}: Address already in use"
    d.stop()
    assert not any(t.name == "display-http" for t in threading.enumerate())


def test_stop_closes_clients_and_joins_quickly(source: ComposedSource) -> None:
    d = DisplayHttp(source, "127.0.0.1", 0)
    d.start()
    url = d.url
    closed: list[aiohttp.WSMsgType] = []

    async def client() -> None:
        async with aiohttp.ClientSession() as s, s.ws_connect(url.replace("http://", "ws://") + "ws") as ws:
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.BINARY
            t = threading.Thread(target=d.stop)
            t0 = time.monotonic()
            t.start()
            while True:
                msg = await ws.receive(timeout=5)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    closed.append(msg.type)
                    break
            await asyncio.get_running_loop().run_in_executor(None, t.join)
            assert time.monotonic() - t0 < 2.5

    asyncio.run(client())
    assert closed and closed[0] in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/"))), timeout=1).close()
    assert not any(t.name.startswith("display-http") for t in threading.enumerate())


def test_source_protocol_and_encoders() -> None:
    src: ScreenSource = ComposedSource(hz=5.0)  # the test source is a ScreenSource (mypy checks this line)
    try:
        seq, screen = src.latest()
        assert src.wait_newer(seq + 1000, 0.05) is None
        jpeg = encode_jpeg(screen, 100)
        small = encode_jpeg(screen, 1)
        assert len(small) < len(jpeg)
        assert_quadrants(decode_rgb("mjpeg", jpeg), screen)
        with pytest.raises(ValueError, match=r"JPEG quality 0 is not within 1\.\.100"):
            encode_jpeg(screen, 0)
        with pytest.raises(ValueError, match="non-empty"):
            encode_png(np.zeros((4, 4, 3), dtype=np.uint8))
    finally:
        assert isinstance(src, ComposedSource)
        src.close()
