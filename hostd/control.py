"""The control socket: attach, detach, status (an edge module; JSON lines, SCM_RIGHTS).

One thread accepts; one thread serves each connection.  A guest connection
that reaches EOF is a dead guest: everything it held is reclaimed.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import structlog

from hostd.config import Config
from hostd.device import AttachRequest, Device
from vmediad import abi, protocol
from vmediad.errors import GuestFault, ProtocolError, VmediadError

log = structlog.get_logger("hostd.control")
_UCRED = struct.Struct("3i")
MAX_FDS_PER_MESSAGE = 4  # more in one message are closed by the kernel (MSG_CTRUNC)


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
        self.refused = 0
        self.accepted = 0
        self.requests = 0
        self.bad_requests = 0

    def statistics(self) -> dict[str, object]:
        with self._lock:
            open_conns = len(self._conns)
        return {"path": str(self.path), "connections": open_conns, "accepted": self.accepted,
                "refused": self.refused, "requests": self.requests, "bad_requests": self.bad_requests}

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()) or uid in self.cfg.allowed_uids:
            return True
        gids = {gid} | supplementary_gids(pid)
        return bool(gids & set(self.cfg.allowed_gids))

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale socket from a previous run
            else:
                probe.close()
                raise VmediadError(f"another hostd is listening on {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 ^ self.cfg.socket_mode)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self.cfg.socket_mode)
        sock.listen(128)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()
        log.info("control socket listening", path=str(self.path), mode=oct(self.cfg.socket_mode))

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
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

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
                    elif req.cmd == "detach":
                        if vm_id is not None:
                            self.device.detach(vm_id, "detach")
                            vm_id = None
                        conn.sendall(protocol.ok())
                    elif req.cmd == "status":
                        conn.sendall(protocol.ok(status={**self.device.statistics(), "control": self.statistics()}))
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
            conn.close()

    def _attach(self, conn: socket.socket, req: protocol.Request, pid: int, uid: int,
                adopt_fd: int | None) -> int:
        cfg = self.cfg
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


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _version() -> str:
    from vmediad import __version__

    return __version__
