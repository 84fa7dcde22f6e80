"""sd_notify: one datagram to $NOTIFY_SOCKET (no package needed)."""

from __future__ import annotations

import os
import socket
import threading
import time


class Notifier:
    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        wpid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not wpid or wpid == str(os.getpid())) else 0.0
        self._last_ping = 0.0
        self._lock = threading.Lock()  # the device thread and the main thread both send
        self._sock: socket.socket | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def send(self, *fields: str) -> bool:
        if not self.path:
            return False
        addr = self.path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                self._sock.sendto("\n".join(fields).encode(), addr)
            except OSError:
                return False
            self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        """Ping at half the interval; called from the scheduler loop, so a hung loop stops pinging."""
        if not self.watchdog_s:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def statistics(self) -> dict[str, object]:
        return {"enabled": self.enabled, "watchdog_s": self.watchdog_s, "sent": self.sent}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
