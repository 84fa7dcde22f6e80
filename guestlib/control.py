"""Control of a running hostd over its control socket: list, kill, the event stream, the screen.

This is the client side of the ``list``, ``kill``, ``events`` and ``display_*`` commands
(vmediad/protocol.py).
Every failure is a :class:`ControlError` whose ``kind`` says why:

* ``unreachable``: nothing answers on the socket (hostd is not running, wrong path, no access);
* ``closed``: hostd closed the connection before it replied;
* ``timeout``: hostd did not reply within ``timeout`` seconds;
* a refusal from hostd: ``not_found`` (no such guest), ``ambiguous`` (a name several guests
  share; use the id), ``permission`` (kill needs root or hostd's own uid), ``bad_request``, ...
"""

from __future__ import annotations

import json
import mmap
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from vmediad import protocol
from vmediad.errors import ClientError


class ControlError(ClientError):
    """A control request failed; ``kind`` is a short machine-readable reason."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


def _socket_path(socket_path: str | None) -> str:
    if socket_path:
        return socket_path
    from guestlib.device import default_socket

    return default_socket()


def _connect(path: str, timeout: float | None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise ControlError(f"cannot reach hostd at {path}: {e.strerror or e}", "unreachable") from None
    return s


class _Lines:
    """JSON lines from a stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def next(self) -> dict[str, Any] | None:
        """The next JSON object, or None at EOF."""
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise ControlError("hostd did not reply in time", "timeout") from None
            except OSError as e:
                raise ControlError(f"control connection failed: {e.strerror or e}", "closed") from None
            if not data:
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError:
            raise ControlError(f"hostd sent a line that is not JSON: {line[:80]!r}", "protocol") from None
        if not isinstance(obj, dict):
            raise ControlError("hostd sent a JSON line that is not an object", "protocol")
        return obj


def _reply(lines: _Lines) -> dict[str, Any]:
    reply = lines.next()
    if reply is None:
        raise ControlError("hostd closed the connection before replying", "closed")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")), str(reply.get("kind", "")))
    return reply


def _request(socket_path: str | None, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    with _connect(_socket_path(socket_path), timeout) as s:
        try:
            s.sendall(protocol.encode(req))
        except OSError as e:
            raise ControlError(f"control connection failed: {e.strerror or e}", "closed") from None
        return _reply(_Lines(s))


def list_vms(socket_path: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The attached guests: one dict each (vm, name, pid, uid, state, tasks_done, tasks_failed,
    sessions, inflight, queue_depth, worker_pid, timeouts, uptime_s), ordered by vm id."""
    vms = _request(socket_path, {"cmd": "list"}, timeout).get("vms")
    if not isinstance(vms, list):
        raise ControlError("hostd's list reply has no vms", "protocol")
    return vms


def kill_vm(vm: str, socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Detach guest ``vm`` (its id as digits, else its name) and reclaim everything it held.

    Returns hostd's reply without ``ok``: ``vm`` (id), ``name`` and ``reclaimed`` (True once its
    worker is gone and its region unmapped; False if that took longer than hostd waits)."""
    reply = _request(socket_path, {"cmd": "kill", "vm": vm}, timeout)
    return {k: v for k, v in reply.items() if k != "ok"}


def display_list(socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The shared screen: size, refresh, layout, and per VM its state, viewport and rates."""
    state = _request(socket_path, {"cmd": "display_list"}, timeout).get("display")
    if not isinstance(state, dict):
        raise ControlError("hostd's display_list reply has no display", "protocol")
    return state


def display_layout(words: list[str], socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Change the screen's layout (``grid``, ``main [VM]``, ``rects VM=X,Y,W,H[,Z] ...``);
    ControlError kind ``layout`` if it is malformed or does not fit.  Returns the new state."""
    state = _request(socket_path, {"cmd": "display_layout", "words": words}, timeout).get("display")
    if not isinstance(state, dict):
        raise ControlError("hostd's display_layout reply has no display", "protocol")
    return state


class ScreenReader:
    """Composed screens from one control connection: ``next(after, wait_s)`` returns the first
    screen newer than ``after`` as ``(seq, (H, W, 4) bgra array)``; the array is a private copy."""

    def __init__(self, socket_path: str | None = None, timeout: float = 10.0) -> None:
        self._sock = _connect(_socket_path(socket_path), timeout)

    def next(self, after: int = 0, wait_s: float = 0.0) -> tuple[int, npt.NDArray[np.uint8]]:
        try:
            self._sock.sendall(protocol.encode({"cmd": "display_snapshot", "after": after, "wait_s": wait_s}))
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 1)
        except TimeoutError:
            raise ControlError("hostd did not reply in time", "timeout") from None
        except OSError as e:
            raise ControlError(f"control connection failed: {e.strerror or e}", "closed") from None
        try:
            lines = _Lines(self._sock)
            lines._buf = data
            reply = _reply(lines) if data else None
            if reply is None:
                raise ControlError("hostd closed the connection before replying", "closed")
            if not fds:
                raise ControlError("hostd's screen came without its memfd", "protocol")
            w, h, size = int(reply["width"]), int(reply["height"]), int(reply["size"])
            if size != w * h * 4:
                raise ControlError(f"screen of {size} bytes is not {w}x{h} bgra", "protocol")
            with mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                screen = np.frombuffer(mm, np.uint8).reshape(h, w, 4).copy()
            return int(reply["seq"]), screen
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ScreenReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def display_snapshot(socket_path: str | None = None, timeout: float = 10.0) -> tuple[int, npt.NDArray[np.uint8]]:
    """The screen hostd composed last, as ``(seq, (H, W, 4) bgra array)``."""
    with ScreenReader(socket_path, timeout) as r:
        return r.next(0, 0.0)


class EventStream(Iterator[dict[str, Any]]):
    """hostd's events as they happen; iteration ends when hostd closes the connection.

    Each event is QMP-style: ``{"event": name, "data": {...}, "timestamp": {"seconds",
    "microseconds"}}``.  ``close()`` (or leaving a ``with`` block) ends the subscription."""

    def __init__(self, sock: socket.socket, lines: _Lines, names: list[str]) -> None:
        self._sock = sock
        self._lines = lines
        self.names = names  # the event names this hostd publishes
        self.closed = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.closed:
            raise StopIteration
        try:
            ev = self._lines.next()
        except ControlError:
            ev = None  # a reset connection ends the stream like EOF
        if ev is None:
            self.close()
            raise StopIteration
        return ev

    def close(self) -> None:
        """End the subscription; a thread blocked in ``next()`` then sees the end of the stream."""
        if not self.closed:
            self.closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def events(socket_path: str | None = None) -> EventStream:
    """Subscribe to hostd's event stream.

    Raises ControlError at once if hostd is unreachable or refuses; once this returns, every
    event hostd publishes is delivered in order.  The returned EventStream blocks in
    ``next()`` until an event arrives and stops when the connection closes."""
    s = _connect(_socket_path(socket_path), 5.0)
    try:
        s.sendall(protocol.encode({"cmd": "events"}))
        lines = _Lines(s)
        ack = _reply(lines)
    except OSError as e:
        s.close()
        raise ControlError(f"control connection failed: {e.strerror or e}", "closed") from None
    except ControlError:
        s.close()
        raise
    s.settimeout(None)
    names = ack.get("events")
    return EventStream(s, lines, [str(n) for n in names] if isinstance(names, list) else [])


__all__ = ["ControlError", "EventStream", "ScreenReader", "display_layout", "display_list", "display_snapshot",
           "events", "kill_vm", "list_vms"]
