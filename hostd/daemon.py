"""hostd's life cycle: start the device, the control socket and metrics; stop them in order."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from hostd.config import Config, display_address
from hostd.control import ControlServer
from hostd.device import Device, RunState
from hostd.display.service import DisplayService
from hostd.ivshmem import IvshmemError, IvshmemHost
from hostd.notify import Notifier
from vmediad.errors import EXIT_INTERNAL, StartupError

if TYPE_CHECKING:
    from hostd.display.http import DisplayHttp

log = structlog.get_logger("hostd")


class Hostd:
    """hostd as an object: ``with Hostd(cfg) as h: ...`` runs it in-process (tests, demo)."""

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier("")
        self.device = Device(cfg)
        self.control = ControlServer(cfg, self.device)
        self.ivshmem: IvshmemHost | None = None
        self.display = DisplayService(self.device, self.device.display, refresh_hz=cfg.display_refresh_hz,
                                      max_compose_hz=cfg.display_max_compose_hz,
                                      interpolation=cfg.display_interpolation, workers=cfg.display_threads)
        self.display_http: DisplayHttp | None = None
        self.control.display = self.display
        self._metrics_server: Any = None
        self._status_tick = 0.0
        self._ready = False  # no WATCHDOG/STATUS before READY=1

    @property
    def socket_path(self) -> str:
        return str(self.control.path)

    def start(self) -> None:
        """Start the device, the control socket and metrics.  If one of them fails, what was
        started is stopped again in order (no socket file, thread or worker is left) and the
        error propagates: StartupError for a conflict a restart cannot fix."""
        try:
            # What can conflict with another hostd (the socket, the metrics port) first: a
            # refused start then has no device thread to stop.
            self.control.bind()
            if self.cfg.metrics:
                self._start_metrics()
            self.device.on_loop = self._on_loop
            self.device.start()
            self.display.start()
            if self.cfg.display_http:
                self._start_display_http()
            if self.cfg.ivshmem_dir:
                self._start_ivshmem()
            self.control.start()
        except BaseException:
            self._abort_start()
            raise
        log.info("hostd ready", socket=self.socket_path, channels=self.device.channels_n,
                 policy=self.cfg.policy, epoch=self.device.epoch)
        self.notifier.ready(self._status_line())
        self._status_tick = time.monotonic()
        self._ready = True

    def _start_ivshmem(self) -> None:
        directory = Path(self.cfg.ivshmem_dir)
        if not directory.is_dir():
            raise StartupError(f"the ivshmem directory {directory} does not exist (create it first)")
        try:
            self.ivshmem = IvshmemHost(self.device, directory, self.cfg)
        except IvshmemError as e:
            raise StartupError(f"hostd.ivshmem_dir: {e}") from None
        self.control.ivshmem = self.ivshmem
        self.ivshmem.start()

    def _start_display_http(self) -> None:
        from hostd.display.http import DisplayHttp  # aiohttp is loaded only when the page is served

        host, port = display_address(self.cfg.display_http)
        self.display_http = DisplayHttp(self.display, host, int(port))
        self.display_http.start()  # StartupError if the address is taken
        log.info("display page", url=self.display_http.url)

    def _stop_display(self) -> None:
        if self.display_http is not None:
            self.display_http.stop()
            self.display_http = None
        self.display.stop()

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        from hostd.metrics import registry_for

        host, _, port = self.cfg.metrics.rpartition(":")
        try:
            self._metrics_server, _thread = start_http_server(
                int(port), addr=host.strip("[]"),
                registry=registry_for(self.statistics))
        except OSError as e:
            raise StartupError(f"cannot serve metrics on {self.cfg.metrics}: {e.strerror or e}") from None
        log.info("metrics listening", address=self.cfg.metrics)

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()  # the listening socket: the port is free again
            self._metrics_server = None

    def _close_ivshmem(self) -> None:
        if self.ivshmem is not None:
            self.ivshmem.close()
            self.ivshmem = None
            self.control.ivshmem = None

    def _abort_start(self) -> None:
        self._stop_display()
        self._stop_metrics()
        self.control.close()
        self._close_ivshmem()
        if self.device.thread_id is not None:
            self.device.request_stop()
            self.device.join(self.cfg.shutdown_grace_s + 10)
        self.device.close()

    def statistics(self) -> dict[str, Any]:
        """The device's snapshot plus the shared screen's (what the metrics read)."""
        return {**self.device.statistics(), "display": self.display.display_statistics()}

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else int(self._metrics_server.server_port)

    def _status_line(self) -> str:
        d = self.device
        busy = sum(1 for c in d.channels if not c.idle)
        return f"{len(d.guests)} guests, {busy}/{d.channels_n} channels busy, policy {d.scheduler.policy.name}"

    def _on_loop(self) -> None:
        # Runs on the device thread: a hung scheduler loop stops the watchdog pings.
        if not self._ready:
            return
        self.notifier.watchdog()
        if self.notifier.enabled:
            now = time.monotonic()
            if now - self._status_tick > 5:
                self._status_tick = now
                self.notifier.status(self._status_line())

    def stop(self) -> None:
        self.notifier.stopping()
        self._stop_display()  # before the device: its last deliver() runs on the device thread
        self.device.request_stop()
        self.device.join(self.cfg.shutdown_grace_s + 10)
        self.control.close()
        self._close_ivshmem()
        self._stop_metrics()
        self.device.close()
        log.info("hostd stopped")

    def __enter__(self) -> Hostd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(cfg: Config) -> int:
    """The service entry point; returns the exit code.

    SIGTERM/SIGINT stop cleanly (0).  A start-up conflict (socket served by another hostd,
    metrics port taken, socket directory missing) is one error line and EXIT_CONFIG (78),
    which the unit does not restart; an internal bug is EXIT_INTERNAL (70), which it does."""
    notifier = Notifier()
    try:
        h = Hostd(cfg, notifier)
    except OSError as e:
        log.error(f"cannot create the device: {e.strerror or e}", exit_code=EXIT_INTERNAL)
        return EXIT_INTERNAL
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, possibly inside structlog's write
        # lock (the main thread logs "hostd ready"): logging here would deadlock on it.  Only
        # note the signal; the main loop logs it.
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        h.start()
    except StartupError as e:
        log.error(str(e), exit_code=e.exit_code)
        notifier.status(f"cannot start: {e}")
        return e.exit_code
    except Exception:
        log.exception("internal error during start-up", exit_code=EXIT_INTERNAL)
        return EXIT_INTERNAL
    while not stop.is_set() and not h.device.stopped.is_set() and h.control.crashed is None \
            and h.display.crashed is None:
        stop.wait(0.5)
    for signum in received:
        log.info("signal received", signal=signal.Signals(signum).name)
    crashed = h.device.crashed or h.control.crashed or h.display.crashed
    if h.device.crashed is None and h.device.state == RunState.RUNNING:
        h.stop()  # a crashed control thread still lets the device stop its workers in order
    else:
        h.control.close()
    if crashed is not None:
        log.error("internal error; exiting for a restart", error=repr(crashed))
        return EXIT_INTERNAL
    return 0
