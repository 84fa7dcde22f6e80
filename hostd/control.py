"""The control socket: attach, detach, status, list, kill, events, vm_socket and the display
commands (JSON lines, SCM_RIGHTS).

One thread accepts; one thread serves each connection.  A guest connection
that reaches EOF is a dead guest: everything it held is reclaimed.  An
``events`` connection stays open as a one-way stream of the device's events.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog
from numpy.typing import NDArray

from hostd.config import Config, StartupError, default_socket_path
from hostd.core.lifecycle import Life
from hostd.device import AttachRequest, Device
from hostd.display.layout import LayoutError
from hostd.display.service import DisplayService
from hostd.events import EVENTS, EventBus
from hostd.ivshmem import IvshmemError, IvshmemHost
from vmediad import abi, protocol
from vmediad.errors import GuestFault, ProtocolError

log = structlog.get_logger("hostd.control")
_UCRED = struct.Struct("3i")
MAX_FDS_PER_MESSAGE = 4  # more in one message are closed by the kernel (MSG_CTRUNC)
KILL_RECLAIM_WAIT_S = 3.0  # a kill replies once the guest is reclaimed, or after this long
KILLED_REMEMBERED = 4096  # regions of killed guests that may not be re-adopted (oldest forgotten)
STREAM_POLL_S = 0.5  # an event stream notices a closed client or a closing hostd this often
T = TypeVar("T")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), never from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def supplementary_gids(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(x) for x in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    def __init__(self, cfg: Config, device: Device) -> None:
        self.cfg = cfg
        self.device = device
        self.path = Path(cfg.socket)
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._guest_conns: dict[int, socket.socket] = {}  # vm id -> the connection that attached it
        # (st_dev, st_ino) of killed guests' regions: their re-adopt attaches are refused, or a
        # guest with auto_reattach would come straight back with the region it was killed from.
        self._killed: deque[tuple[int, int]] = deque(maxlen=KILLED_REMEMBERED)
        self._kill_pending: set[int] = set()  # killed between attach and their connection's registration
        self.crashed: BaseException | None = None  # a bug in a control thread: hostd exits 70
        self.display: DisplayService | None = None  # set by hostd.daemon
        self.crashed_event = threading.Event()
        self.refused = 0
        self.accepted = 0
        self.requests = 0
        self.bad_requests = 0
        self.kills = 0
        self.streams = 0  # event streams open now
        self.ivshmem: IvshmemHost | None = None  # set by the daemon with hostd.ivshmem_dir

    @property
    def events(self) -> EventBus | None:
        bus = getattr(self.device, "events", None)
        return bus if isinstance(bus, EventBus) else None

    def statistics(self) -> dict[str, object]:
        with self._lock:
            open_conns = len(self._conns)
        bus = self.events
        return {"path": str(self.path), "connections": open_conns, "accepted": self.accepted,
                "refused": self.refused, "requests": self.requests, "bad_requests": self.bad_requests,
                "kills": self.kills, "event_streams": self.streams,
                "events": bus.statistics() if bus is not None else {"subscribers": 0, "published": 0}}

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()) or uid in self.cfg.allowed_uids:
            return True
        gids = {gid} | supplementary_gids(pid)
        return bool(gids & set(self.cfg.allowed_gids))

    def start(self) -> None:
        """Listen (bind() first if not yet done) and serve connections."""
        if self._sock is None:
            self.bind()
        threading.Thread(target=self._guarded, args=(self._accept_loop,), name="control-accept",
                         daemon=True).start()
        log.info("control socket listening", path=str(self.path), mode=oct(self.cfg.socket_mode))

    def bind(self) -> None:
        """Create and bind the socket (connections wait in the backlog until start()).

        StartupError (one line for the user) if the socket cannot be ours."""
        parent = self.path.parent
        if not parent.is_dir():
            # Only hostd's own default runtime directory is created: a mistyped --socket must
            # not leave directories behind (as root, anywhere in the file system).
            if parent.exists():
                raise StartupError(f"cannot create the control socket {self.path}: {parent} is not a directory")
            if self.path != default_socket_path():
                raise StartupError(f"cannot create the control socket {self.path}: directory {parent} does not "
                                   "exist (create it first, or leave --socket out to use hostd's default)")
            try:
                parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            except OSError as e:
                raise StartupError(f"cannot create the runtime directory {parent}: {e.strerror or e}") from None
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise StartupError(f"{self.path} exists and is not a socket; hostd will not replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except ConnectionRefusedError:
                # Nobody accepts on it: a stale socket from a run that died.  (Never unlink
                # a socket a live hostd answers on: its guests would lose their way back.)
                try:
                    self.path.unlink()
                except OSError as e:
                    raise StartupError(f"cannot replace the stale socket {self.path}: {e.strerror or e}") from None
            except OSError as e:
                raise StartupError(f"cannot tell whether a hostd serves {self.path}: {e.strerror or e}") from None
            else:
                raise StartupError(f"another hostd is already serving {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 ^ self.cfg.socket_mode)
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise StartupError(f"cannot bind the control socket {self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        os.chmod(self.path, self.cfg.socket_mode)
        sock.listen(128)
        self._sock = sock

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # Only the socket file this server bound: after a failed start (another hostd serves
        # the path) or if the file was replaced since, it belongs to someone else.
        bound, self._bound = self._bound, None
        if bound is None:
            return
        try:
            st = os.lstat(self.path)
            if bound == (st.st_dev, st.st_ino):
                self.path.unlink()
        except OSError:
            pass  # gone already, or no longer reachable: nothing of ours to remove

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._guarded, args=(self._serve, conn), name="control-conn",
                             daemon=True).start()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """A control thread's boundary.  Errors a request may cause are handled inside ``fn``;
        anything that reaches here is a bug in hostd: it is logged and hostd exits 70."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("internal error in a control thread", thread=threading.current_thread().name)
            self.crashed = e
            self.crashed_event.set()

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        clog = log.bind(peer_pid=pid, peer_uid=uid)
        if not self.allowed(pid, uid, gid):
            self.refused += 1
            clog.warning("peer refused", gid=gid)
            try:
                conn.sendall(protocol.refuse(f"uid {uid} / gid {gid} is not allowed", "permission"))
            finally:
                conn.close()
            return
        self.accepted += 1
        with self._lock:
            self._conns.add(conn)
        vm_id: int | None = None
        buf = b""
        # Descriptors the peer sent (SCM_RIGHTS).  Only an adopting attach takes one; the
        # rest are closed after every request, so a peer cannot make hostd hoard fds.
        fds: list[int] = []
        try:
            while True:
                while b"\n" not in buf:
                    data, new_fds, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS_PER_MESSAGE)
                    fds.extend(new_fds)
                    _close_all(fds[MAX_FDS_PER_MESSAGE:])
                    del fds[MAX_FDS_PER_MESSAGE:]
                    if not data:
                        return
                    buf += data
                    if len(buf) > protocol.MAX_LINE:
                        conn.sendall(protocol.refuse("request too long"))
                        return
                line, _, buf = buf.partition(b"\n")
                self.requests += 1
                try:
                    req = protocol.parse_request(line)
                    if req.cmd == "attach":
                        if vm_id is not None:
                            raise ProtocolError("this connection already attached a guest")
                        adopt_fd = fds.pop(0) if req.adopt and fds else None
                        if req.adopt and adopt_fd is None:
                            raise ProtocolError("adopt needs the region fd (SCM_RIGHTS)")
                        vm_id = self._attach(conn, req, pid, uid, adopt_fd)
                        with self._lock:
                            self._guest_conns[vm_id] = conn
                            killed = vm_id in self._kill_pending  # killed before it got here
                        if killed:
                            conn.shutdown(socket.SHUT_RDWR)
                    elif req.cmd == "detach":
                        if vm_id is not None:
                            self.device.detach(vm_id, "detach")
                            with self._lock:
                                self._guest_conns.pop(vm_id, None)
                            vm_id = None
                        conn.sendall(protocol.ok())
                    elif req.cmd == "status":
                        status = {**self.device.statistics(), "control": self.statistics()}
                        if self.ivshmem is not None:
                            status["ivshmem"] = self.ivshmem.statistics()
                        if self.display is not None:
                            status["display"] = self.display.display_statistics()
                        conn.sendall(protocol.ok(status=status))
                    elif req.cmd == "list":
                        conn.sendall(protocol.ok(vms=self.list_vms()))
                    elif req.cmd == "kill":
                        conn.sendall(protocol.ok(**self._kill(req.vm, pid, uid)))
                    elif req.cmd == "vm_socket":
                        conn.sendall(protocol.ok(**self._vm_socket(req.name, uid)))
                    elif req.cmd.startswith("display_"):
                        self._display(conn, req)
                    elif req.cmd == "events":
                        if vm_id is not None:
                            raise ProtocolError("a guest's connection cannot become an event stream")
                        self._stream_events(conn, clog)
                        return
                    else:
                        conn.sendall(protocol.ok(version=_version(), abi=abi.ABI_VERSION))
                except ProtocolError as e:
                    self.bad_requests += 1
                    conn.sendall(protocol.refuse(str(e), e.kind))
                except GuestFault as e:
                    conn.sendall(protocol.refuse(str(e), e.code.name.lower()))
                finally:
                    _close_all(fds)
                    fds.clear()
        except OSError:
            pass
        finally:
            _close_all(fds)
            if vm_id is not None:
                self.device.detach(vm_id, "eof")  # the guest is gone: reclaim all it held
            with self._lock:
                self._conns.discard(conn)
                if vm_id is not None and self._guest_conns.get(vm_id) is conn:
                    del self._guest_conns[vm_id]
                if vm_id is not None:
                    self._kill_pending.discard(vm_id)
            conn.close()

    # -- list / kill / events ---------------------------------------------------------------
    def _on_device(self, fn: Callable[[], T], timeout: float = 3.0) -> T:
        """Run ``fn`` on the device thread (it owns the guests) and return its result.

        ``timeout`` stays under guestlib.control's default (5 s): a wedged device thread is
        then a "busy" refusal, not a client time-out."""
        dev = self.device
        if dev.thread_id is None or dev.stopped.is_set():
            return fn()  # no device thread: nothing changes under us
        box: list[T] = []
        err: list[Exception] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(fn())
            except Exception as e:  # never let a control request kill the device loop
                err.append(e)
            finally:
                done.set()

        dev.post(run)
        if not done.wait(timeout):
            raise ProtocolError("the device thread did not answer in time", "busy")
        if err:
            raise err[0]
        return box[0]

    def list_vms(self) -> list[dict[str, Any]]:
        """One entry per attached guest: identity, state and the counters of its snapshot."""

        def collect() -> list[dict[str, Any]]:
            snap = {v["vm"]: v for v in self.device.statistics()["vms"]}
            out = []
            for g in sorted(self.device.guests.values(), key=lambda g: g.vm_id):
                v = snap.get(g.vm_id, {})
                state = _LIST_STATE[g.life.state]
                out.append({"vm": g.vm_id, "name": g.name, "pid": g.pid, "uid": g.uid, "state": state,
                            "kind": g.kind, "transport": g.transport,
                            "worker_pid": v.get("worker_pid"), "tasks_done": v.get("tasks_done", 0),
                            "tasks_failed": v.get("tasks_failed", 0), "sessions": v.get("sessions", 0),
                            "inflight": v.get("inflight", 0), "queue_depth": v.get("queue_depth", 0),
                            "timeouts": v.get("timeouts", 0), "worker_restarts": v.get("worker_restarts", 0),
                            "uptime_s": v.get("uptime_s", 0.0)})
            return out

        return self._on_device(collect)

    def _resolve(self, ref: str) -> tuple[int, str]:
        """(vm id, name) of the guest ``ref`` names: an id (digits) first, else a unique name."""
        guests = self._on_device(lambda: [(g.vm_id, g.name) for g in self.device.guests.values()])
        if ref.isdigit():
            for vm_id, name in guests:
                if vm_id == int(ref):
                    return vm_id, name
        named = [(vm_id, name) for vm_id, name in guests if name == ref]
        if len(named) > 1:
            ids = ", ".join(str(v) for v, _ in sorted(named))
            raise ProtocolError(f"{len(named)} guests are named {ref!r} (vm {ids}); kill one by its id",
                                "ambiguous")
        if not named:
            raise ProtocolError(f"no guest {ref!r} is attached", "not_found")
        return named[0]

    def _kill(self, ref: str, pid: int, uid: int) -> dict[str, Any]:
        if uid not in (0, os.getuid()):
            raise ProtocolError(f"uid {uid} may not kill guests (only root or hostd's uid {os.getuid()})",
                                "permission")
        vm_id, name = self._resolve(ref)

        def mark_gone() -> tuple[int, int] | None:
            # On the device thread, before the detach it posts next (the queue is FIFO):
            # GONE tells the guest's library that no hostd serves this region any more.
            g = self.device.guests.get(vm_id)
            if g is None:
                return None
            st = os.fstat(g.region.fd)
            g.region.mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.GONE)
            return st.st_dev, st.st_ino

        region = self._on_device(mark_gone)
        if region is None:
            raise ProtocolError(f"no guest {ref!r} is attached", "not_found")
        with self._lock:
            self._killed.append(region)
            conn = self._guest_conns.pop(vm_id, None)
            if conn is None:
                self._kill_pending.add(vm_id)  # its connection thread closes it once registered
            self.kills += 1
        log.info("guest killed", vm=vm_id, name=name, by_pid=pid, by_uid=uid)
        self.device.detach(vm_id, "killed")
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # its serving thread sees EOF and closes it
            except OSError:
                pass
        # The worker is SIGKILLed; its reaper reclaims the guest on the device thread.
        deadline = time.monotonic() + KILL_RECLAIM_WAIT_S
        while vm_id in self.device.guests and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"vm": vm_id, "name": name, "reclaimed": vm_id not in self.device.guests}

    def _vm_socket(self, name: str, uid: int) -> dict[str, Any]:
        """``{"cmd": "vm_socket", "name": N}``: hostd listens for the QEMU of VM N and replies
        the ivshmem socket's path (hostd.ivshmem_dir/N.sock)."""
        if uid not in (0, os.getuid()):
            raise ProtocolError(f"uid {uid} may not create VM sockets (only root or hostd's uid {os.getuid()})",
                                "permission")
        if self.ivshmem is None:
            raise ProtocolError("this hostd serves no VMs (start it with --ivshmem-dir)", "unsupported")
        try:
            path = self.ivshmem.listen(name)
        except IvshmemError as e:
            raise ProtocolError(str(e), "vm_socket") from None
        return {"name": name, "path": str(path), "region_size": self.ivshmem.size}

    def _display(self, conn: socket.socket, req: protocol.Request) -> None:
        """The shared screen's commands (vmediad/protocol.py)."""
        disp = self.display
        if disp is None:
            raise ProtocolError("this hostd has no display", "unsupported")
        if req.cmd == "display_list":
            conn.sendall(protocol.ok(display=disp.display_statistics()))
        elif req.cmd == "display_layout":
            try:
                state = disp.set_layout(req.words)
            except LayoutError as e:
                raise ProtocolError(str(e), "layout") from None
            conn.sendall(protocol.ok(display=state))
        else:
            got = disp.wait_newer(req.after, req.wait_s) if req.wait_s else None
            seq, screen = got if got is not None else disp.latest()
            if seq <= req.after:
                raise ProtocolError(f"no screen newer than {req.after} within {req.wait_s:g} s", "timeout")
            fd = screen_memfd(screen)
            try:
                h, w = screen.shape[:2]
                socket.send_fds(conn, [protocol.ok(seq=seq, width=w, height=h, format="bgra", size=screen.nbytes)],
                                [fd])
            finally:
                os.close(fd)

    def _stream_events(self, conn: socket.socket, clog: Any) -> None:
        """The connection becomes a one-way stream of events until the client closes it."""
        bus = self.events
        if bus is None:
            raise ProtocolError("this hostd publishes no events", "unsupported")
        sub = bus.subscribe()  # before the reply: every event after it reaches the client
        with self._lock:
            self.streams += 1
        clog.info("event stream opened")
        try:
            conn.sendall(protocol.ok(events=list(EVENTS)))
            poller = select.poll()
            poller.register(conn, select.POLLIN | select.POLLRDHUP)
            reported = 0
            while not self._closing:
                ev = sub.get(STREAM_POLL_S)
                if sub.dropped != reported:
                    reported = sub.dropped
                    now = time.time()
                    conn.sendall(protocol.encode({
                        "event": "events_dropped", "data": {"dropped": reported},
                        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}))
                if ev is not None:
                    conn.sendall(protocol.encode(ev))
                if poller.poll(0) and not _drain(conn):
                    return  # the client closed its end
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                clog.warning("event stream failed", error=str(e))
        finally:
            bus.unsubscribe(sub)
            with self._lock:
                self.streams -= 1
            clog.info("event stream closed")

    def _attach(self, conn: socket.socket, req: protocol.Request, pid: int, uid: int,
                adopt_fd: int | None) -> int:
        cfg = self.cfg
        if adopt_fd is not None:
            st = os.fstat(adopt_fd)
            with self._lock:
                killed = (st.st_dev, st.st_ino) in self._killed
            if killed:
                os.close(adopt_fd)
                raise ProtocolError("this region's guest was killed; it may not be re-adopted", "killed")
        lim = protocol.AttachLimits(cfg.region_min, cfg.region_max, cfg.region_default, cfg.ring_min,
                                    cfg.ring_max, cfg.ring_default, cfg.named_regions)
        size, ring = (0, 0) if adopt_fd is not None else protocol.resolve_attach(req, lim)
        areq = AttachRequest(req.name or f"pid{pid}", pid, uid, size, ring, req.named, adopt_fd)
        try:
            g = self.device.attach(areq)
        except (ValueError, OSError, GuestFault) as e:
            # Refused by the device thread: the adopted fd is still ours.  (Not on a timeout:
            # the device thread may yet take it.)
            if adopt_fd is not None:
                os.close(adopt_fd)
            if isinstance(e, GuestFault):
                raise
            raise ProtocolError(f"cannot attach: {e}", "attach") from None
        reply = protocol.ok(vm=g.vm_id, name=g.name, epoch=self.device.epoch, caps=self.device.caps,
                            layout=g.region.layout.as_dict(), shm_name=g.region.name,
                            channels=self.device.channels_n)
        socket.send_fds(conn, [reply], [g.region.fd])
        return g.vm_id


# What `vmediad vm list` shows for each lifecycle state.
_LIST_STATE = {Life.NO_WORKER: "restarting", Life.SERVING: "running", Life.RECYCLING: "restarting",
               Life.TIMING_OUT: "restarting", Life.BACKING_OFF: "restarting", Life.DYING: "detaching",
               Life.GONE: "detaching"}


def screen_memfd(screen: NDArray[np.uint8]) -> int:
    """A sealed memfd holding ``screen``'s bytes: the reader can map it, nobody can change it."""
    fd = os.memfd_create("vmediad-screen", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        data = np.ascontiguousarray(screen).data.cast("B")
        os.ftruncate(fd, data.nbytes)
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                    | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _drain(conn: socket.socket) -> bool:
    """Read and drop what the client sent on an event stream; False once it closed its end."""
    try:
        return bool(conn.recv(4096, socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _version() -> str:
    from vmediad import __version__

    return __version__
