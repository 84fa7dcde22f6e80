"""The compositor thread: as soon as a new picture is ready (or the scene changed otherwise),
latch it and compose the shared screen; at most ``max_compose_hz`` compositions a second.

A commit's picture is scaled as soon as it arrives (``DisplayPort.prescale`` is set to
``_prescale``: the device thread hands the commit to the compositor's scaling workers).  The
port keeps the commit pending until that read ended; the read's end wakes this thread, whose
composition then only copies the scaled image into the screen (only the rectangles that
changed since that screen array was last composed).

Each composition: ``tick`` on the device thread (``DisplayPort.tick``: the pending commits whose
pictures are scaled become the front ones, their regions are pinned), compose the scene here
(off the codec's path), publish the screen array, then ``deliver`` on the device thread (the
flips complete, the regions are unpinned).  The flips that release buffers are therefore written
only after the composition that read them: no guest draws into a buffer being composed, and a
commit's completion means its picture is on the screen.

The screen is *shown* at ``refresh_hz`` (the live page and the recorder sample it); composition
does not wait for that rate, so a commit is composed within its scaling time, not a refresh.
Compositions keep a phase under a flood (``core.compose_slot``): slot n+1 is slot n plus one
``1 / max_compose_hz`` period.

Readers (the live page, the control socket's snapshot and record commands) get read-only screen
arrays: a published screen is composed into again only once no reader references it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypedDict

import numpy as np
import structlog
from numpy.typing import NDArray

from hostd.display import layout as lay
from hostd.display.compose import Compositor, Shown, Source, items_from_scene, plane_views
from hostd.display.core import compose_slot
from hostd.display.port import DisplayPort, Frame, PrescaleRequest, Reading
from vmediad.shm import monotonic_ns

log = structlog.get_logger("hostd.display")

Screen = NDArray[np.uint8]
_SAMPLES = 512
_IDLE_POLL_S = 0.5  # how often an idle compositor looks at stop()


class DeviceThread(Protocol):
    """What the service needs of the device loop (hostd.loop.Loop)."""

    def call(self, fn: Callable[[], Any], timeout: float) -> Any: ...

    def post(self, fn: Callable[[], None]) -> None: ...


class DisplayStats(TypedDict):
    width: int
    height: int
    refresh_hz: float  # the rate the screen is shown at (live page, recorder)
    max_compose_hz: float
    interpolation: str
    screen_seq: int
    compositions: int
    skipped: int  # ticks that found nothing to compose (e.g. a rejected commit)
    late: int  # ticks that started more than a 1/max_compose_hz period late (CPU starved)
    screen_fps: float  # compositions over the last second (the screen's content changed)
    compose_ms_p50: float
    compose_ms_p99: float
    tick_lag_ms_p50: float  # from a composition's slot to its latch on the device thread
    tick_lag_ms_p99: float
    compose_cpu_s: float  # CPU time of the compositions and of the scaling done ahead of them, in total
    scaled: int  # pictures scaled (when committed, or by a composition)
    reused: int
    prescaled: int  # ... of them scaled when they were committed
    prescale_shown: int  # ... that a composition showed (the others were superseded first)


class DisplayService:
    """The compositor thread and the published screen (a ``hostd.display.http.ScreenSource``)."""

    def __init__(self, device: DeviceThread, port: DisplayPort, *, refresh_hz: float = 30.0,
                 max_compose_hz: float = 1000.0, interpolation: str = "bilinear", workers: int = 1) -> None:
        self._device = device
        self._port = port
        self._hz = refresh_hz
        self._max_hz = max_compose_hz
        self._interp = interpolation.upper()
        self.compositor = Compositor(interpolation=self._interp, workers=workers)
        core = port.core
        self.width, self.height = core.width, core.height
        # Published screens are never written again.  A screen that only this object still
        # references (no reader holds it: its refcount says so) is composed into again instead
        # of allocating and faulting in a new one each frame.
        self._cond = threading.Condition()
        self._seq = 0
        # Two screens, their pages written now: hostd's memory does not grow when compositions
        # start (the soak run holds hostd's RSS flat after warm-up).
        self._latest: Screen = _touched(self.height, self.width)
        self._latest.flags.writeable = False
        # What each screen shows (None: unknown), so that composing into it again draws only
        # what changed since (Compositor.compose's ``was``).
        self._latest_shown: Shown | None = None
        self._retired: list[tuple[Screen, Shown | None]] = [(_touched(self.height, self.width), None)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self._times: deque[int] = deque(maxlen=_SAMPLES)  # monotonic ns of compositions
        self._costs: deque[float] = deque(maxlen=_SAMPLES)  # wall seconds per composition
        self._lags: deque[int] = deque(maxlen=_SAMPLES)  # ns from the wanted start to the latch
        self._skipped = 0
        self._late = 0

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._port.prescale = self._prescale
        self._thread = threading.Thread(target=self._main, name="compositor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        # Queued prescale jobs are cancelled, running ones finish; reads they leave in the port
        # end with its release_all() (the device thread may be gone before their read_done).
        self.compositor.close()
        with self._cond:
            self._cond.notify_all()

    def _prescale(self, req: PrescaleRequest) -> Reading | None:
        """On the device thread: scale a commit's picture on the scaling workers now."""
        key, ref, region = req.key, req.frame, req.region
        post, port = self._device.post, self._port

        def source() -> Source:
            return Source(ref.fmt, ref.width, ref.height, plane_views(region, ref), key)

        def done() -> None:  # on the worker, after the job dropped its views
            post(lambda: port.read_done(key))

        vp = req.viewport
        return self.compositor.prescale(key[0], key, vp.rect, vp.aspect, source, done)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as e:  # an internal bug: hostd exits non-zero (daemon.py)
            self.crashed = e
            log.exception("compositor crashed")

    def _run(self) -> None:
        """Compose when the scene may have changed, at most ``max_compose_hz`` times a second.
        A change after a quiet spell is composed at once; under a flood compositions fall on
        slots one period apart (``compose_slot``) and each latches the newest scaled commit of
        every VM."""
        period = round(1e9 / self._max_hz)
        changed = self._port.changed
        anchor: int | None = None  # the slot of the last composition
        next_ns: int | None = None
        while not self._stop.is_set():
            wait = _IDLE_POLL_S if next_ns is None else max(0.0, min(_IDLE_POLL_S, (next_ns - monotonic_ns()) / 1e9))
            if not changed.wait(wait) and (next_ns is None or monotonic_ns() < next_ns):
                continue  # nothing changed (the wait is bounded only to notice stop())
            seen = monotonic_ns()
            slot = compose_slot(anchor, seen, period)
            if seen < slot:
                self._stop.wait((slot - seen) / 1e9)  # the cap: commits meanwhile replace each other
            if monotonic_ns() - max(seen, slot) > period:
                self._late += 1  # this thread got the CPU more than a period after it was due
            changed.clear()  # before the tick: a change the tick misses sets it again
            frame: Frame | None = self._device.call(lambda: self._port.tick(monotonic_ns()), timeout=5.0)
            if frame is None:
                changed.set()
                continue  # the device thread was busy for 5 s (or stopping): try again
            self._lags.append(frame.tick.now_ns - max(seen, slot))
            next_ns = frame.next_ns
            try:
                if frame.tick.changed:
                    anchor = slot  # only a composition takes a slot
                    self._compose(frame)
                else:
                    self._skipped += 1
            finally:
                self._device.post(lambda f=frame: self._port.deliver(f))  # type: ignore[misc]
                del frame

    def _compose(self, frame: Frame) -> None:
        items = items_from_scene(frame.tick.scene, frame.region_of)
        t0 = time.perf_counter()
        prep = self.compositor.prepare(items, self.width, self.height)
        del items
        with self._cond:
            # The published screen itself, when no reader holds it: readers take it only under
            # this lock, so none sees it half drawn, and only what changed is copied (one
            # picture's rectangle per commit, not that and the one before as into a retired
            # screen).  Held by self._latest, ``latest`` and getrefcount's argument only.
            latest = self._latest
            if self._latest_shown is not None and sys.getrefcount(latest) <= 3:
                latest.flags.writeable = True
                self._latest_shown = self.compositor.draw(latest, prep, self._latest_shown).shown
                latest.flags.writeable = False
                self._published(t0)
                return
            del latest
        screen, was = self._free_screen()
        shown = self.compositor.draw(screen, prep, was).shown
        del prep  # the views of guest regions: deliver() unmaps departed ones
        screen.flags.writeable = False
        with self._cond:
            self._retired.append((self._latest, self._latest_shown))
            self._latest, self._latest_shown = screen, shown
            self._published(t0)

    def _published(self, t0: float) -> None:
        """A new screen is out (the caller holds ``_cond``)."""
        self._costs.append(time.perf_counter() - t0)
        self._seq += 1
        self._times.append(monotonic_ns())
        self._cond.notify_all()

    def _free_screen(self) -> tuple[Screen, Shown | None]:
        """A screen array no reader holds (reused) and what it shows, else a new one."""
        with self._cond:
            retired, self._retired = self._retired, []
        free: tuple[Screen, Shown | None] | None = None
        while retired:
            old = retired.pop()
            # Held by ``old`` and by getrefcount's argument only: nobody reads it any more.
            if free is None and sys.getrefcount(old[0]) <= 2:
                free = old
            del old
        if free is None:
            return np.empty((self.height, self.width, 4), np.uint8), None
        free[0].flags.writeable = True
        return free

    # --- readers (any thread) -----------------------------------------------------------------
    @property
    def refresh_hz(self) -> float:
        return self._hz

    def latest(self) -> tuple[int, Screen]:
        with self._cond:
            return self._seq, self._latest

    def wait_newer(self, seq: int, timeout: float) -> tuple[int, Screen] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._seq <= seq:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)
            return self._seq, self._latest

    def set_layout(self, words: Sequence[str]) -> dict[str, object]:
        spec = lay.parse(list(words))
        self.set_layout_spec(spec)
        return self.display_statistics()

    def set_layout_spec(self, spec: lay.LayoutSpec) -> None:
        """Apply ``spec`` on the device thread; LayoutError (state unchanged) if it does not fit."""
        box: list[BaseException] = []

        def apply() -> None:
            try:
                self._port.set_layout(spec)
            except lay.LayoutError as e:
                box.append(e)

        self._device.call(apply, timeout=5.0)
        if box:
            raise box[0]
        log.info("display layout changed", layout=spec.to_dict())

    def display_statistics(self) -> dict[str, object]:
        core = self._device.call(lambda: self._port.core.statistics(monotonic_ns()), timeout=5.0)
        out: dict[str, object] = dict(core) if isinstance(core, dict) else {"vms": []}
        out.update(self.statistics())
        return out

    def statistics(self) -> DisplayStats:
        now = monotonic_ns()
        costs = sorted(self._costs)
        lags = sorted(self._lags)
        c = self.compositor
        with self._cond:
            recent = sum(1 for t in self._times if now - t < 1_000_000_000)
            seq = self._seq
        return DisplayStats(
            width=self.width, height=self.height, refresh_hz=self._hz, max_compose_hz=self._max_hz,
            interpolation=self._interp.lower(),
            screen_seq=seq, compositions=c.frames, skipped=self._skipped, late=self._late,
            screen_fps=float(recent), compose_ms_p50=_pct(costs, 0.5) * 1e3, compose_ms_p99=_pct(costs, 0.99) * 1e3,
            tick_lag_ms_p50=_pct(lags, 0.5) / 1e6, tick_lag_ms_p99=_pct(lags, 0.99) / 1e6,
            compose_cpu_s=round(c.cpu_s, 6), scaled=c.scaled, reused=c.reused,
            prescaled=c.prescaled, prescale_shown=c.prescale_shown)


def _touched(height: int, width: int) -> Screen:
    """A black screen whose pages are resident (np.zeros would map them lazily)."""
    screen = np.empty((height, width, 4), np.uint8)
    screen.fill(0)
    return screen


def _pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0
