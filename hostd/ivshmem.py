"""hostd as the ivshmem server of its QEMU VMs: one Unix socket per VM (an edge module).

``IvshmemHost.listen(name)`` makes hostd listen on ``<dir>/<name>.sock``; a QEMU started with
``-chardev socket,path=<that>,id=X -device ivshmem-doorbell,chardev=X,vectors=2`` connects as
the VM ``name``.  On connect hostd attaches a guest exactly as a process attach does (a fresh
sealed memfd with its register page written, a worker), and hands QEMU that memfd (BAR2) and
the eventfds through QEMU's ivshmem-server protocol (vmediad/ivshmem.py).  The VM's identity
(name, QEMU's pid and uid from SO_PEERCRED) and limits (region size, ring) are hostd's: nothing
the guest writes chooses them.

Who writes what:
  * the guest stores KICK into the region's REG_DOORBELL, exactly as a process guest does, and
    then, only if hostd published NEED_WAKEUP, writes BAR0's Doorbell register (host vector
    HOST_VECTOR_KICK).  QEMU traps that write and signals the VM's host eventfd;
  * the thread here reads the eventfd and wakes the device thread (``Loop.wake``: a bump of
    BANK_HOST_EVENT).  It never touches the region: the device loop's normal doorbell path
    (exchange of REG_DOORBELL) does the work, so a guest that rings without storing KICK only
    costs a wasted pass.
  * completions: the guest polls its slot's status word (no futex crosses the VM boundary).

QEMU's socket closing is the VM's death: the guest is detached and its region, worker and
sessions reclaimed.  One QEMU per socket: a second connection while one is served is closed at
once (a VM sees only its own region).  The socket stays, so a restarted QEMU attaches afresh.
"""

from __future__ import annotations

import os
import re
import select
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from hostd.config import Config
from hostd.device import AttachRequest, Device
from vmediad import ivshmem
from vmediad.errors import GuestFault

log = structlog.get_logger("hostd.ivshmem")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_UCRED_SIZE = 12


class IvshmemError(ValueError):
    """A VM socket that cannot be created (bad name, directory missing, path in use)."""


def region_size(cfg: Config) -> int:
    """The region of a VM: hostd's default size rounded up to a power of two (it becomes a PCI
    BAR), within the configured limits."""
    size = 1 << max(12, (cfg.region_default - 1).bit_length())
    if size > cfg.region_max:
        size = 1 << (cfg.region_max.bit_length() - 1)
    if size < cfg.region_min:
        raise IvshmemError(f"no power-of-two region size between {cfg.region_min} and {cfg.region_max}")
    return size


@dataclass
class VmLink:
    """One VM socket and, while a QEMU is connected, its connection and eventfds."""

    name: str
    path: Path
    listener: socket.socket
    conn: socket.socket | None = None
    vm_id: int | None = None
    qemu_pid: int = 0
    host_fds: list[int] = field(default_factory=list)  # by host vector: the guest's Doorbell rings these
    guest_fds: list[int] = field(default_factory=list)  # by guest vector: writing one raises its MSI-X vector
    connects: int = 0
    doorbells: int = 0


class IvshmemHost:
    """The ivshmem server side of hostd: sockets, QEMU connections, doorbell eventfds (one thread)."""

    def __init__(self, device: Device, directory: Path, cfg: Config) -> None:
        self.device = device
        self.dir = directory
        self.cfg = cfg
        self.size = region_size(cfg)
        self.links: dict[str, VmLink] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._closing = False
        self.refused = 0

    # -- sockets ------------------------------------------------------------------------------
    def listen(self, name: str) -> Path:
        """Listen for the QEMU of VM ``name`` (idempotent); the socket's path."""
        if not NAME_RE.fullmatch(name):
            raise IvshmemError(f"VM name {name!r}: 1-63 letters, digits, '_', '.' or '-', not starting "
                               "with a punctuation mark")
        with self._lock:
            if self._closing:
                raise IvshmemError("hostd is stopping")
            link = self.links.get(name)
            if link is not None:
                return link.path
            path = self.dir / f"{name}.sock"
            if len(os.fsencode(path)) >= 108:
                raise IvshmemError(f"socket path {path} is too long for a Unix socket")
            if not self.dir.is_dir():
                raise IvshmemError(f"ivshmem directory {self.dir} does not exist")
            if path.exists() or path.is_symlink():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    path.unlink()  # stale: nobody accepts on it
                except OSError as e:
                    raise IvshmemError(f"{path} exists and is not a free socket: {e.strerror or e}") from None
                else:
                    raise IvshmemError(f"{path} is served by another process")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)  # only hostd's uid (and root) may connect a QEMU
            try:
                sock.bind(str(path))
            except OSError as e:
                sock.close()
                raise IvshmemError(f"cannot bind {path}: {e.strerror or e}") from None
            finally:
                os.umask(old)
            sock.listen(4)
            self.links[name] = VmLink(name, path, sock)
        self._poke()
        log.info("ivshmem socket listening", name=name, path=str(path))
        return path

    # -- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="ivshmem", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already pending

    def _serve(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                links = list(self.links.values())
            targets: dict[int, tuple[str, VmLink]] = {}
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for link in links:
                targets[link.listener.fileno()] = ("accept", link)
                if link.conn is not None:
                    targets[link.conn.fileno()] = ("conn", link)
                    targets[link.host_fds[ivshmem.HOST_VECTOR_KICK]] = ("kick", link)
            for fd in targets:
                poller.register(fd, select.POLLIN)
            for fd, _ev in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                what, link = targets[fd]
                if what == "kick":
                    self._kicked(link)
                elif what == "accept":
                    self._accept(link)
                elif link.conn is not None and fd == link.conn.fileno():
                    self._disconnected(link)  # QEMU never sends: readable is EOF (or garbage)

    def _kicked(self, link: VmLink) -> None:
        try:
            n = os.eventfd_read(link.host_fds[ivshmem.HOST_VECTOR_KICK])
        except BlockingIOError:
            return
        link.doorbells += n
        self.device.wake()

    def _accept(self, link: VmLink) -> None:
        try:
            conn, _ = link.listener.accept()
        except OSError:
            return
        conn.setblocking(True)
        if link.conn is not None:
            # One QEMU per VM socket: a second would map the first one's region.
            self.refused += 1
            log.warning("second QEMU refused: the VM is already connected", name=link.name, vm=link.vm_id)
            conn.close()
            return
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED_SIZE)
        pid, uid = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
        host_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(ivshmem.VECTORS)]
        guest_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(ivshmem.VECTORS)]
        # The device thread gets its own copy of the completion vector's eventfd: it writes it
        # after this thread may have closed guest_fds (QEMU gone, reclaim still pending).
        req = AttachRequest(link.name, pid, uid, self.size, self.cfg.ring_default, False, transport="ivshmem",
                            irq_fd=os.dup(guest_fds[ivshmem.GUEST_VECTOR_COMPLETION]))
        try:
            g = self.device.attach(req)
        except (GuestFault, ValueError, OSError) as e:
            self.refused += 1
            log.warning("QEMU refused: cannot attach its VM", name=link.name, qemu_pid=pid, error=str(e))
            conn.close()
            for fd in host_fds + guest_fds + ([req.irq_fd] if req.irq_fd >= 0 else []):
                os.close(fd)
            return
        assert req.region_fd is not None
        region_fd = req.region_fd  # our own dup: the device thread may reclaim g.region meanwhile
        try:
            for msg in ivshmem.setup_messages(ivshmem.CLIENT_PEER_ID, region_fd,
                                              [(ivshmem.SERVER_PEER_ID, host_fds)], guest_fds):
                ivshmem.send_message(conn, msg)
        except OSError as e:
            os.close(region_fd)
            log.warning("QEMU left during the ivshmem setup", name=link.name, vm=g.vm_id, error=str(e))
            conn.close()
            for fd in host_fds + guest_fds:
                os.close(fd)
            self.device.detach(g.vm_id, "qemu gone during setup")
            return
        os.close(region_fd)  # QEMU has its own copy now
        link.conn, link.vm_id, link.qemu_pid = conn, g.vm_id, pid
        link.host_fds, link.guest_fds = host_fds, guest_fds
        link.connects += 1
        log.info("QEMU connected", name=link.name, vm=g.vm_id, qemu_pid=pid, region_size=self.size)

    def _disconnected(self, link: VmLink) -> None:
        vm_id = link.vm_id
        self._drop_conn(link)
        if vm_id is not None:
            log.info("QEMU disconnected: the VM is gone", name=link.name, vm=vm_id)
            self.device.detach(vm_id, "qemu exited")

    @staticmethod
    def _drop_conn(link: VmLink) -> None:
        if link.conn is not None:
            link.conn.close()
        for fd in link.host_fds + link.guest_fds:
            os.close(fd)
        link.conn, link.vm_id, link.qemu_pid = None, None, 0
        link.host_fds, link.guest_fds = [], []

    # -- status and teardown --------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        with self._lock:
            links = list(self.links.values())
        return {"dir": str(self.dir), "region_size": self.size, "refused": self.refused,
                "vms": [{"name": ln.name, "socket": str(ln.path), "vm": ln.vm_id, "qemu_pid": ln.qemu_pid or None,
                         "connects": ln.connects, "doorbells": ln.doorbells} for ln in links]}

    def close(self) -> None:
        """Stop serving: QEMU connections closed, sockets removed (call once the device stopped,
        or before: every VM still attached is then detached)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._poke()
        if self._thread is not None:
            self._thread.join(15)  # at most one attach (10 s) in progress
        for link in self.links.values():
            if link.vm_id is not None:
                self.device.detach(link.vm_id, "hostd stopping")
            self._drop_conn(link)
            link.listener.close()
            link.path.unlink(missing_ok=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
