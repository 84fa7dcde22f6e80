"""The shared screen's live page: an aiohttp server on its own thread and event loop.

Routes: ``GET /`` (the page, ``page.html``), ``GET /ws`` (a WebSocket; the server pushes each new
screen as one binary JPEG message), ``GET /snapshot.png`` (the latest screen, lossless),
``GET /api/state`` (``ScreenSource.display_statistics()`` as JSON) and ``POST /api/layout``
(``{"words": [...]}``, the words of ``vmediad display layout``).

Frames reach the clients through one producer task: it waits (on an executor thread) for a screen
newer than the last one it published, encodes it to JPEG once, keeps it as *the* current frame
and wakes every client, then sleeps out the rest of the refresh period (at most ``refresh_hz``
frames a second).  Each client's sender takes the current frame when it is woken, so a client
that is still writing (a slow reader: its socket is full and ``send_bytes`` waits for it to
drain) simply skips the frames published meanwhile: there is never more than one frame per
client in flight and nothing queues up.  With no client connected the producer idles and
nothing is encoded.

A browser page of any other site may POST to 127.0.0.1 and open WebSockets to it; requests that
carry an ``Origin`` header naming another origin than the server's own are refused (403), so
only this page (or a client that sends no Origin, such as curl) can read the screen or change the
layout.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import ipaddress
import json
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import urlsplit

import av
import numpy as np
import structlog
from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler
from av.video.codeccontext import VideoCodecContext
from numpy.typing import NDArray

from hostd.display.layout import LayoutError
from vmediad.errors import StartupError

log = structlog.get_logger("hostd.display.http")

WAIT_S = 0.25  # longest blocking wait_newer call: how soon the producer notices stop / no clients
START_TIMEOUT_S = 10.0
STOP_JOIN_S = 2.0
CLOSE_S = 0.5  # a client gets this long to answer the close frame before its connection is cut
MAX_HZ = 240.0
DEFAULT_JPEG_QUALITY = 85
MAX_BODY = 64 << 10
MAX_WORDS = 256
ENCODE_SAMPLES = 256


class ScreenSource(Protocol):
    """What the live page reads; every method is thread-safe and may block briefly."""

    @property
    def refresh_hz(self) -> float: ...

    def latest(self) -> tuple[int, NDArray[np.uint8]]:
        """(seq, screen): the last composed screen; the array is never written again (a new
        array per composed frame); seq grows by one per composed frame that changed."""
        ...

    def wait_newer(self, seq: int, timeout: float) -> tuple[int, NDArray[np.uint8]] | None:
        """Block until a screen with a seq > ``seq`` exists (then return it) or timeout (None)."""
        ...

    def display_statistics(self) -> dict[str, object]:
        """JSON-able: {"width", "height", "refresh_hz", "screen_fps", "compose_ms_p50",
        "layout": {...LayoutSpec.to_dict()}, "vms": [{"vm", "name", "state" ("attached",
        "detached", "died"), "viewport": {vm,name,x,y,w,h,z,visible,aspect}, "commit_fps",
        "presented", "dropped", ...}]}"""
        ...

    def set_layout(self, words: Sequence[str]) -> dict[str, object]:
        """Apply `vmediad display layout` words (hostd.display.layout.parse grammar: `grid`,
        `main [VM]`, `rects VM=X,Y,W,H[,Z] ...`, `aspect=...`, `hide=...`); returns
        display_statistics(); raises hostd.display.layout.LayoutError (a ValueError, one-line
        message) if bad."""
        ...


# --- encoding --------------------------------------------------------------------------------
def _check_screen(screen: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if screen.dtype != np.uint8 or screen.ndim != 3 or screen.shape[2] != 4 or 0 in screen.shape:
        raise ValueError(f"a screen is a non-empty (H, W, 4) uint8 BGRA array, got {screen.shape} {screen.dtype}")
    return np.ascontiguousarray(screen)


def _encode(codec: str, pix_fmt: str, screen: NDArray[np.uint8], qscale: int | None = None) -> bytes:
    screen = _check_screen(screen)
    h, w = screen.shape[:2]
    frame = av.VideoFrame.from_ndarray(screen, format="bgra").reformat(format=pix_fmt)
    ctx = cast(VideoCodecContext, av.CodecContext.create(codec, "w"))
    ctx.width, ctx.height, ctx.pix_fmt = w, h, pix_fmt
    if qscale is not None:
        # mjpeg has no rate control of its own here: qmin == qmax pins its quantiser scale.
        ctx.qmin = ctx.qmax = qscale
    packets = ctx.encode(frame) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def encode_png(screen: NDArray[np.uint8]) -> bytes:
    """The BGRA screen as an RGB PNG; lossless (decoding it gives back exactly its R, G, B).

    The BGRA -> rgb24 step is a byte shuffle in swscale, not a colour conversion."""
    return _encode("png", "rgb24", screen)


def jpeg_qscale(quality: int) -> int:
    """JPEG ``quality`` 1 (smallest) .. 100 (best) as mjpeg's quantiser scale 31 .. 2."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} is not within 1..100")
    return 31 - round((quality - 1) * 29 / 99)


def encode_jpeg(screen: NDArray[np.uint8], quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """The BGRA screen as a baseline JPEG (FFmpeg's mjpeg, full-range 4:2:0)."""
    return _encode("mjpeg", "yuvj420p", screen, jpeg_qscale(quality))


# --- statistics ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpStatistics:
    clients: int  # WebSocket clients connected now
    frames_encoded: int  # JPEGs made by the producer (one per published frame, for all clients)
    frames_sent: int  # WebSocket messages sent, summed over clients
    frames_dropped: int  # published frames a client skipped because it was still writing an older one
    bytes_sent: int
    encode_ms_p50: float  # median JPEG encode time (the last ENCODE_SAMPLES frames)

    def to_dict(self) -> dict[str, int | float]:
        return {"clients": self.clients, "frames_encoded": self.frames_encoded, "frames_sent": self.frames_sent,
                "frames_dropped": self.frames_dropped, "bytes_sent": self.bytes_sent,
                "encode_ms_p50": self.encode_ms_p50}


@dataclass(frozen=True, slots=True)
class _Frame:
    index: int  # publication number, 1, 2, ...: consecutive, unlike the source's seq
    seq: int
    jpeg: bytes


@dataclass(eq=False, slots=True)
class _Client:
    ws: web.WebSocketResponse
    request: web.Request
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_index: int | None = None  # publication last sent (None: nothing yet)
    sent_seq: int | None = None  # the screen last sent
    task: asyncio.Task[None] | None = None


def _origin_ok(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


class DisplayHttp:
    def __init__(self, source: ScreenSource, host: str = "127.0.0.1", port: int = 0, *,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> None:
        jpeg_qscale(jpeg_quality)  # ValueError now rather than in the producer
        self.source = source
        self.host, self.port = host, port
        self.jpeg_quality = jpeg_quality
        self._loopback = _is_loopback(host)
        self._page = importlib.resources.files("hostd.display").joinpath("page.html").read_bytes()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._have_clients: asyncio.Event | None = None
        self._start_error: str | None = None
        self._bound: int | None = None
        # The blocking wait_newer and the encoding run here, never on the loop's thread.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="display-http-frames")
        # Touched on the loop thread only.
        self._clients: set[_Client] = set()
        self._frame: _Frame | None = None
        self._published = 0
        self._fresh_wanted = False  # a client arrived: publish the current screen even if unchanged
        # Counters written on the loop thread, read by statistics() from any thread.
        self._frames_sent = 0
        self._frames_dropped = 0
        self._bytes_sent = 0
        self._encode_lock = threading.Lock()
        self._encode_ms: deque[float] = deque(maxlen=ENCODE_SAMPLES)

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._bound is None:
            raise RuntimeError("the display page is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound}/"

    def start(self) -> None:
        """Listen and serve on a daemon thread; returns once listening.  StartupError (one line)
        if the address cannot be bound."""
        if self._thread is not None or self._bound is not None:
            raise RuntimeError("a DisplayHttp is started once")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="display-http", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise StartupError(f"the display page on {self.host}:{self.port} did not start in {START_TIMEOUT_S:g} s")
        if self._start_error is not None:
            self._thread.join(STOP_JOIN_S)
            self._pool.shutdown(wait=False)
            raise StartupError(self._start_error)
        log.info("display page listening", url=self.url)

    def stop(self) -> None:
        """Close every client and the listener; the thread is joined (about 2 s at most)."""
        loop, ev, thread = self._loop, self._stop_event, self._thread
        if thread is None:
            return
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(STOP_JOIN_S)
        if thread.is_alive():
            log.warning("display page thread did not stop", timeout_s=STOP_JOIN_S)
        # The producer's wait_newer returns within WAIT_S; its thread is not left behind.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._thread = None

    def statistics(self) -> HttpStatistics:
        with self._encode_lock:
            samples = list(self._encode_ms)
        return HttpStatistics(
            clients=len(self._clients), frames_encoded=self._published, frames_sent=self._frames_sent,
            frames_dropped=self._frames_dropped, bytes_sent=self._bytes_sent,
            encode_ms_p50=statistics.median(samples) if samples else 0.0)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except Exception:
            log.exception("display page thread failed")
            if not ready.is_set():
                self._start_error = f"the display page on {self.host}:{self.port} failed to start"
                ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._have_clients = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._check_host])
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/snapshot.png", self._snapshot)
        app.router.add_get("/api/state", self._state)
        app.router.add_post("/api/layout", self._layout)
        app.on_shutdown.append(self._close_clients)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=CLOSE_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as e:
            # asyncio's message repeats the address; the errno's own text is the one line.
            reason = os.strerror(e.errno) if e.errno else str(e)
            self._start_error = f"cannot serve the display page on {self.host}:{self.port}: {reason}"
            await runner.cleanup()
            ready.set()
            return
        self._bound = int(runner.addresses[0][1])
        producer = asyncio.create_task(self._produce(), name="display-http-producer")
        ready.set()
        await self._stop_event.wait()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        await runner.cleanup()
        log.info("display page stopped", url=f"http://{self.host}:{self._bound}/")

    async def _close_clients(self, app: web.Application) -> None:
        async def close(c: _Client) -> None:
            if c.task is not None:
                c.task.cancel()
            try:
                await asyncio.wait_for(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping"), CLOSE_S)
            except (TimeoutError, ConnectionError):
                # A client that reads nothing cannot take the close frame: cut its connection.
                if c.request.transport is not None:
                    c.request.transport.abort()

        await asyncio.gather(*(close(c) for c in list(self._clients)))

    # --- frames ------------------------------------------------------------------------------
    def _next_jpeg(self, seq: int) -> tuple[int, bytes] | None:
        """On the pool thread: the next screen after ``seq``, encoded (None on timeout)."""
        got = self.source.wait_newer(seq, WAIT_S)
        if got is None:
            return None
        t = time.perf_counter()
        jpeg = encode_jpeg(got[1], self.jpeg_quality)
        with self._encode_lock:
            self._encode_ms.append((time.perf_counter() - t) * 1e3)
        return got[0], jpeg

    async def _produce(self) -> None:
        assert self._have_clients is not None
        loop = asyncio.get_running_loop()
        seq = -1  # wait_newer(-1) hands back the current screen at once
        while True:
            if not self._clients:
                # Idle: forget the frame, so a client arriving later starts from the screen as
                # it is then, even if it never changes again.
                self._have_clients.clear()
                self._frame, seq = None, -1
                await self._have_clients.wait()
                continue
            started = loop.time()
            # A client that just arrived needs the screen as it is now: the kept frame may be
            # older (the producer may have been idle, or waiting for a change that never came).
            after = -1 if self._fresh_wanted else seq
            self._fresh_wanted = False
            try:
                got = await loop.run_in_executor(self._pool, self._next_jpeg, after)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("display page: reading or encoding the screen failed")
                await asyncio.sleep(1.0)
                continue
            if got is None:
                continue
            seq = got[0]
            self._published += 1
            self._frame = _Frame(self._published, seq, got[1])
            for c in self._clients:
                c.wake.set()
            hz = min(max(float(self.source.refresh_hz), 1.0), MAX_HZ)
            await asyncio.sleep(max(0.0, started + 1.0 / hz - loop.time()))

    async def _send_loop(self, c: _Client) -> None:
        while True:
            await c.wake.wait()
            c.wake.clear()
            frame = self._frame
            if frame is None or frame.index == c.sent_index:
                continue
            if c.sent_index is not None:
                self._frames_dropped += frame.index - c.sent_index - 1
            c.sent_index = frame.index
            if frame.seq == c.sent_seq:
                continue  # republished for a newcomer; this client has it already
            c.sent_seq = frame.seq
            try:
                # Waits while the client's socket is full; frames published meanwhile are
                # skipped, not queued (this client gets whichever is current when it is done).
                await c.ws.send_bytes(frame.jpeg)
            except ConnectionError:
                return
            self._frames_sent += 1
            self._bytes_sent += len(frame.jpeg)

    # --- routes ------------------------------------------------------------------------------
    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Served on loopback, the page answers only to a loopback Host: a site whose name an
        # attacker re-points at 127.0.0.1 (DNS rebinding) is same-origin with itself, and
        # would otherwise pass the Origin checks.
        if self._loopback and not _is_loopback(request.url.host or ""):
            return _error(403, f"host {request.host!r} refused: the display page is served on loopback only")
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if not _origin_ok(request):
            return _error(403, "cross-origin request refused")
        assert self._have_clients is not None
        ws = web.WebSocketResponse(timeout=CLOSE_S, compress=False, max_msg_size=MAX_BODY)
        await ws.prepare(request)
        c = _Client(ws, request)
        c.task = asyncio.create_task(self._send_loop(c), name="display-http-client")
        self._clients.add(c)
        self._fresh_wanted = True
        self._have_clients.set()
        log.debug("display page client connected", peer=request.remote, clients=len(self._clients))
        try:
            async for _ in ws:  # the page sends nothing; this ends when the connection closes
                pass
        finally:
            self._clients.discard(c)
            c.task.cancel()
            await asyncio.gather(c.task, return_exceptions=True)
            log.debug("display page client gone", peer=request.remote, clients=len(self._clients))
        return ws

    async def _snapshot(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        seq, screen = await loop.run_in_executor(None, self.source.latest)
        png = await loop.run_in_executor(None, encode_png, screen)
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "no-store", "X-Screen-Seq": str(seq)})

    async def _state(self, request: web.Request) -> web.Response:
        state = await asyncio.get_running_loop().run_in_executor(None, self.source.display_statistics)
        return web.json_response(state, headers={"Cache-Control": "no-store"})

    async def _layout(self, request: web.Request) -> web.Response:
        if not _origin_ok(request):
            return _error(403, "cross-origin request refused")
        if request.content_type != "application/json":
            return _error(415, f"the body must be application/json, not {request.content_type or 'nothing'}")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not JSON: {e}")
        words = body.get("words") if isinstance(body, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            return _error(400, 'the body must be {"words": ["grid", ...]} (a list of strings)')
        if len(words) > MAX_WORDS:
            return _error(400, f"too many layout words ({len(words)} > {MAX_WORDS})")
        try:
            state = await asyncio.get_running_loop().run_in_executor(None, self.source.set_layout, words)
        except LayoutError as e:
            return _error(400, str(e).splitlines()[0] if str(e) else "bad layout")
        log.info("display layout set from the page", words=" ".join(words))
        return web.json_response(state)
