"""QEMU's ivshmem-server protocol: how a VM's ``ivshmem-doorbell`` device gets its region and eventfds.

The spec is QEMU's docs/specs/ivshmem-spec.rst.  The server listens on a Unix stream socket;
QEMU (``-chardev socket,path=...,id=X -device ivshmem-doorbell,chardev=X,vectors=N``) connects
as a client.  The connection is one-way: every message is one little-endian signed 64-bit
number, sent with at most one fd (SCM_RIGHTS).  On connect the server sends, in this order:

1. the protocol version, 0 (no fd);
2. the client's own peer id, 0..65535 (no fd);
3. -1 with the shared-memory fd (BAR2 maps it);
4. for every other peer (here: only the server itself), that peer's id N times, the fd of vector
   0..N-1: the eventfds QEMU writes when the guest rings that peer's Doorbell;
5. the client's own id N times with the fds of its vectors 0..N-1: QEMU turns a write to one of
   them into that MSI-X vector in the guest.

Later, a peer id with an fd announces a new peer's vector, without an fd that the peer is gone.
QEMU refuses more than its ``vectors=N`` fds per peer, so server and device must agree on N.

A server here advertises only itself to each client, never another client: a VM can ring the
host and the host can ring the VM, but no VM can ring another VM.

QEMU sets ``O_NONBLOCK`` on every eventfd it receives.  That flag belongs to the open file
description, which the host shares: the host's copy becomes non-blocking too.  The eventfds are
therefore created non-blocking here from the start and are only read after ``poll``.

The guest side (BAR0 registers, BAR2 memory) is described in docs/vms.md.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmediad import abi
from vmediad.shm import create_memfd

PROTOCOL_VERSION = 0
SHM_MESSAGE = -1  # the value that comes with the shared-memory fd
MAX_PEER_ID = 0xFFFF  # the Doorbell register has 16 bits for the peer id
MAX_VECTORS = 0xFFFF  # ... and 16 for the vector

MESSAGE = struct.Struct("<q")

# The guest's view: PCI ids and BAR0's registers (32-bit, little-endian; see docs/vms.md).
PCI_VENDOR_ID = 0x1AF4
PCI_DEVICE_ID = 0x1110
BAR0_SIZE = 256
REG_INTR_MASK = 0
REG_INTR_STATUS = 4
REG_IV_POSITION = 8  # read-only: the guest's own peer id
REG_DOORBELL = 12  # write-only: (peer id << 16) | vector rings that peer's eventfd for that vector

# ---- vmediad's ivshmem transport: the peers and vectors both sides use ---------------------------
# hostd is peer SERVER_PEER_ID of every VM's device; the VM (QEMU) is always CLIENT_PEER_ID, alone on
# its own socket.  Both sides agree on VECTORS (QEMU's ``vectors=``).
SERVER_PEER_ID = 0
CLIENT_PEER_ID = 1
VECTORS = 2
# Host vectors (the guest rings them through BAR0's Doorbell): KICK wakes hostd's device loop,
# which then reads REG_DOORBELL in the region exactly as for a process guest.
HOST_VECTOR_KICK = 0
# Guest vectors (MSI-X, when a driver such as igb_uio enabled them): vector 0 = a task completed
# for a waiter of this VM.  Vector 1 is reserved.
GUEST_VECTOR_COMPLETION = 0
# REG_CAPS bit of a region served through ivshmem (defined in the ABI).
CAP_IVSHMEM = int(abi.Caps.IVSHMEM)


def encode(value: int) -> bytes:
    """One message's 8 bytes."""
    return MESSAGE.pack(value)


def decode(data: bytes) -> int:
    """The value of one message's 8 bytes."""
    if len(data) != MESSAGE.size:
        raise ValueError(f"an ivshmem message is {MESSAGE.size} bytes, not {len(data)}")
    value: int = MESSAGE.unpack(data)[0]
    return value


def doorbell_value(peer_id: int, vector: int) -> int:
    """The 32-bit word a guest writes to BAR0's Doorbell to ring ``vector`` of ``peer_id``."""
    _check_peer(peer_id)
    if not 0 <= vector <= MAX_VECTORS:
        raise ValueError(f"vector {vector} outside 0..{MAX_VECTORS}")
    return (peer_id << 16) | vector


def _check_peer(peer_id: int) -> None:
    if not 0 <= peer_id <= MAX_PEER_ID:
        raise ValueError(f"peer id {peer_id} outside 0..{MAX_PEER_ID}")


@dataclass(frozen=True)
class Message:
    value: int
    fd: int | None = None  # None: the message carries no fd

    def payload(self) -> bytes:
        return encode(self.value)


def setup_messages(client_id: int, shm_fd: int, peers: Sequence[tuple[int, Sequence[int]]],
                   own_fds: Sequence[int]) -> list[Message]:
    """The messages a server sends a client on connect, in the spec's order.

    ``peers``: (peer id, its eventfds by vector) of each other peer; ``own_fds``: the client's
    eventfds by vector."""
    _check_peer(client_id)
    msgs = [Message(PROTOCOL_VERSION), Message(client_id), Message(SHM_MESSAGE, shm_fd)]
    for peer_id, fds in peers:
        _check_peer(peer_id)
        if peer_id == client_id:
            raise ValueError(f"peer id {peer_id} is the client's own id")
        msgs += [Message(peer_id, fd) for fd in fds]
    msgs += [Message(client_id, fd) for fd in own_fds]
    return msgs


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message; its fd (if any) travels in the same ``sendmsg`` as its 8 bytes."""
    if msg.fd is None:
        sock.sendall(msg.payload())
    else:
        sent = socket.send_fds(sock, [msg.payload()], [msg.fd])
        if sent != MESSAGE.size:  # a stream socket may send less; the fd went with the first byte
            sock.sendall(msg.payload()[sent:])


def recv_message(sock: socket.socket) -> Message:
    """Receive one message (the client's side: tests and tools).  EOF raises ConnectionError."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MESSAGE.size, 1, socket.MSG_WAITALL)
    if len(data) != MESSAGE.size:
        for fd in fds:
            os.close(fd)
        raise ConnectionError(f"ivshmem server closed the connection ({len(data)} of {MESSAGE.size} bytes)")
    return Message(decode(data), fds[0] if fds else None)


@dataclass
class ClientSetup:
    """What a client learnt from the setup messages: the client's side of :func:`setup_messages`."""

    version: int
    client_id: int
    shm_fd: int
    peers: dict[int, list[int]] = field(default_factory=dict)  # other peer id -> its eventfds by vector
    own_fds: list[int] = field(default_factory=list)


def parse_setup(msgs: Sequence[Message], vectors: int) -> ClientSetup:
    """Check and gather the setup messages a client received (exactly as QEMU reads them)."""
    if len(msgs) < 3:
        raise ValueError("setup needs at least version, id and shared memory")
    version, ident, shm = msgs[0], msgs[1], msgs[2]
    if version.fd is not None or version.value != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version {version.value}")
    if ident.fd is not None or not 0 <= ident.value <= MAX_PEER_ID:
        raise ValueError(f"malformed peer id message {ident.value}")
    if shm.value != SHM_MESSAGE or shm.fd is None:
        raise ValueError("the third message must be -1 with the shared-memory fd")
    setup = ClientSetup(version.value, ident.value, shm.fd)
    for m in msgs[3:]:
        if m.fd is None or not 0 <= m.value <= MAX_PEER_ID:
            raise ValueError(f"malformed peer message {m.value} (fd {m.fd})")
        fds = setup.own_fds if m.value == ident.value else setup.peers.setdefault(m.value, [])
        if len(fds) >= vectors:
            raise ValueError(f"too many eventfds for peer {m.value}: the device has {vectors} vectors")
        fds.append(m.fd)
    return setup


def create_region(size: int, name: str = "vmediad-ivshmem") -> int:
    """A sealed memfd of ``size`` bytes (a power of two: it becomes a PCI BAR) with no name on disk.

    Sealed against growing and shrinking, so neither side can truncate the other's mapping away."""
    if size < 4096 or size & (size - 1):
        raise ValueError(f"region size {size} must be a power of two of at least 4096")
    return create_memfd(name, size)


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


@dataclass
class Client:
    """A connected client (a QEMU) as the server sees it."""

    id: int
    sock: socket.socket
    eventfds: list[int]  # by vector: writing one interrupts the guest (MSI-X vector)


class IvshmemServer:
    """A small ivshmem server for one region: the server is itself a peer (``server_id``) with
    ``vectors`` eventfds the guests ring; every client gets ``vectors`` eventfds of its own.

    ``start()`` serves in a thread: QEMU blocks in device setup until it has the region, so the
    server must answer while QEMU starts.  Client ids count up from ``server_id + 1``.
    """

    def __init__(self, path: Path, shm_fd: int, vectors: int, *, server_id: int = 0) -> None:
        _check_peer(server_id)
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"vectors {vectors} outside 1..{MAX_VECTORS}")
        self.path = path
        self.shm_fd = shm_fd
        self.vectors = vectors
        self.server_id = server_id
        self.eventfds = _eventfds(vectors)  # by vector: a guest's Doorbell write lands here
        self.clients: dict[int, Client] = {}
        self._next_id = server_id + 1
        self._lock = threading.Lock()
        self._connected = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- serving

    def start(self) -> IvshmemServer:
        self._thread = threading.Thread(target=self._serve, name="ivshmem-server", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            with self._lock:
                socks = {c.sock.fileno(): c for c in self.clients.values()}
            poller = select.poll()
            for fd in (self._wake_r, self._listener.fileno(), *socks):
                poller.register(fd, select.POLLIN)
            readable = {fd for fd, _ in poller.poll()}
            if self._wake_r in readable:
                return
            if self._listener.fileno() in readable:
                conn, _ = self._listener.accept()
                self._admit(conn)
            for fd in readable:
                if fd in socks:
                    # Clients never send: readable means EOF (QEMU gone) or garbage. Drop it.
                    self._drop(socks[fd])

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            client_id = self._next_id
            while client_id in self.clients or client_id == self.server_id:
                client_id = (client_id + 1) % (MAX_PEER_ID + 1)
            self._next_id = (client_id + 1) % (MAX_PEER_ID + 1)
        client = Client(client_id, conn, _eventfds(self.vectors))
        try:
            for msg in setup_messages(client_id, self.shm_fd, [(self.server_id, self.eventfds)], client.eventfds):
                send_message(conn, msg)
        except OSError:
            self._close_client(client)
            return
        with self._lock:
            self.clients[client_id] = client
            self._connected.notify_all()

    def _drop(self, client: Client) -> None:
        with self._lock:
            self.clients.pop(client.id, None)
        self._close_client(client)

    @staticmethod
    def _close_client(client: Client) -> None:
        client.sock.close()
        for fd in client.eventfds:
            os.close(fd)
        client.eventfds = []

    def wait_client(self, timeout: float) -> Client:
        """The first connected client; TimeoutError if none connected within ``timeout``."""
        with self._lock:
            if not self._connected.wait_for(lambda: bool(self.clients), timeout):
                raise TimeoutError(f"no ivshmem client connected within {timeout} s")
            return next(iter(self.clients.values()))

    # -- interrupts

    def wait_doorbell(self, vector: int, timeout: float) -> int:
        """Wait until a guest rings the server's ``vector``; return the count of rings since the
        last read (an eventfd adds them up).  0 on timeout."""
        fd = self.eventfds[vector]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:  # another reader took it between select and read
            return 0

    def interrupt(self, client_id: int, vector: int) -> None:
        """Raise ``vector`` in the guest of ``client_id`` (its MSI-X vector, if a driver enabled it)."""
        with self._lock:
            client = self.clients.get(client_id)
            if client is None or not 0 <= vector < len(client.eventfds):
                raise KeyError(f"no client {client_id} with vector {vector}")
            os.eventfd_write(client.eventfds[vector], 1)

    # -- teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            clients = list(self.clients.values())
            self.clients.clear()
        for c in clients:
            self._close_client(c)
        self._listener.close()
        self.path.unlink(missing_ok=True)
        for fd in (*self.eventfds, self._wake_r, self._wake_w):
            os.close(fd)
        self.eventfds = []

    def __enter__(self) -> IvshmemServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
