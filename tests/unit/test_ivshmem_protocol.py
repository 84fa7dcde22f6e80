"""QEMU's ivshmem-server protocol (vmediad.ivshmem): golden bytes of each message, the setup
sequence over a real Unix socket with real fds, and the small server against a Python client."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmediad import ivshmem
from vmediad.ivshmem import Message


def test_message_golden_bytes() -> None:
    assert ivshmem.encode(ivshmem.PROTOCOL_VERSION) == bytes.fromhex("0000000000000000")
    assert ivshmem.encode(1) == bytes.fromhex("0100000000000000")  # a peer id
    assert ivshmem.encode(0x1234) == bytes.fromhex("3412000000000000")  # little-endian
    assert ivshmem.encode(ivshmem.MAX_PEER_ID) == bytes.fromhex("ffff000000000000")
    assert ivshmem.encode(ivshmem.SHM_MESSAGE) == bytes.fromhex("ffffffffffffffff")  # -1, signed
    assert ivshmem.decode(bytes.fromhex("feffffffffffffff")) == -2
    assert ivshmem.decode(bytes.fromhex("0200000000000000")) == 2
    with pytest.raises(ValueError, match="8 bytes, not 7"):
        ivshmem.decode(b"\0" * 7)


def test_setup_sequence_golden() -> None:
    msgs = ivshmem.setup_messages(client_id=1, shm_fd=10, peers=[(0, [20, 21])], own_fds=[30, 31])
    assert msgs == [
        Message(0),  # protocol version
        Message(1),  # the client's id
        Message(-1, 10),  # shared memory
        Message(0, 20), Message(0, 21),  # peer 0 (the server): vectors 0 and 1
        Message(1, 30), Message(1, 31),  # the client's own vectors 0 and 1
    ]
    assert b"".join(m.payload() for m in msgs) == bytes.fromhex(
        "0000000000000000" "0100000000000000" "ffffffffffffffff"
        "0000000000000000" "0000000000000000" "0100000000000000" "0100000000000000")
    with pytest.raises(ValueError, match="client's own id"):
        ivshmem.setup_messages(1, 10, [(1, [20])], [30])
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        ivshmem.setup_messages(65536, 10, [], [])


def test_doorbell_register_value() -> None:
    assert ivshmem.doorbell_value(0, 1) == 0x0000_0001
    assert ivshmem.doorbell_value(3, 2) == 0x0003_0002
    assert ivshmem.doorbell_value(0xFFFF, 0xFFFF) == 0xFFFF_FFFF
    assert (ivshmem.REG_INTR_MASK, ivshmem.REG_INTR_STATUS, ivshmem.REG_IV_POSITION, ivshmem.REG_DOORBELL) == (
        0, 4, 8, 12)
    with pytest.raises(ValueError, match="vector 65536"):
        ivshmem.doorbell_value(0, 0x10000)
    with pytest.raises(ValueError, match="peer id -1"):
        ivshmem.doorbell_value(-1, 0)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_setup_travels_with_its_fds_over_a_unix_socket() -> None:
    shm = ivshmem.create_region(1 << 16)
    server_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    own_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[Message] = []
    try:
        for m in ivshmem.setup_messages(7, shm, [(0, server_fds)], own_fds):
            ivshmem.send_message(a, m)
        received = [ivshmem.recv_message(b) for _ in range(7)]
        setup = ivshmem.parse_setup(received, vectors=2)
        assert (setup.version, setup.client_id) == (0, 7)
        assert _same_file(setup.shm_fd, shm)
        assert list(setup.peers) == [0] and len(setup.own_fds) == 2
        # Ringing the received copy of the server's vector 1 is seen on the server's own fd.
        os.eventfd_write(setup.peers[0][1], 1)
        assert os.eventfd_read(server_fds[1]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(server_fds[0])
        a.close()
        with pytest.raises(ConnectionError, match="closed the connection"):
            ivshmem.recv_message(b)
    finally:
        for m in received:
            if m.fd is not None:
                os.close(m.fd)
        for fd in (shm, *server_fds, *own_fds):
            os.close(fd)
        a.close()
        b.close()


def test_parse_setup_refuses_what_qemu_refuses() -> None:
    good = [Message(0), Message(1), Message(-1, 3)]
    with pytest.raises(ValueError, match="unsupported protocol version 1"):
        ivshmem.parse_setup([Message(1), *good[1:]], 1)
    with pytest.raises(ValueError, match="malformed peer id"):
        ivshmem.parse_setup([good[0], Message(70000), good[2]], 1)
    with pytest.raises(ValueError, match="-1 with the shared-memory fd"):
        ivshmem.parse_setup([*good[:2], Message(-1)], 1)
    with pytest.raises(ValueError, match="too many eventfds for peer 0: the device has 1 vectors"):
        ivshmem.parse_setup([*good, Message(0, 4), Message(0, 5)], 1)
    with pytest.raises(ValueError, match="malformed peer message 0"):
        ivshmem.parse_setup([*good, Message(0)], 1)


def test_region_is_sealed_against_resizing() -> None:
    fd = ivshmem.create_region(1 << 20)
    try:
        assert os.fstat(fd).st_size == 1 << 20
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1 << 21)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="power of two"):
        ivshmem.create_region(3 << 20)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmd-iv-") as d:
        yield Path(d) / "ivshmem.sock"


def test_server_serves_a_client_and_rings_both_ways(sock_path: Path) -> None:
    shm = ivshmem.create_region(1 << 16)
    region = mmap.mmap(shm, 1 << 16)
    region[:4] = b"host"
    with ivshmem.IvshmemServer(sock_path, shm, vectors=2) as server:
        # The server's eventfds are non-blocking from the start (QEMU would set it on them anyway).
        assert all(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK for fd in server.eventfds)
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock_path))
        msgs = [ivshmem.recv_message(c) for _ in range(3 + 2 * 2)]
        setup = ivshmem.parse_setup(msgs, vectors=2)
        try:
            assert setup.client_id == 1 and list(setup.peers) == [0]  # only the server, never another client
            client = server.wait_client(5)
            assert client.id == 1
            with mmap.mmap(setup.shm_fd, 1 << 16) as view:
                assert view[:4] == b"host"
                view[8:12] = b"gues"
            assert region[8:12] == b"gues"
            # Guest -> host: the client's copy of the server's vector 1.
            assert server.wait_doorbell(1, 0) == 0
            os.eventfd_write(setup.peers[0][1], 1)
            os.eventfd_write(setup.peers[0][1], 1)
            assert server.wait_doorbell(1, 5) == 2  # rings add up until read
            assert server.wait_doorbell(0, 0) == 0
            # Host -> guest: the client's own vector 0 (QEMU's MSI-X vector 0).
            server.interrupt(1, 0)
            assert select.select([setup.own_fds[0]], [], [], 5)[0] == [setup.own_fds[0]]
            assert select.select([setup.own_fds[1]], [], [], 0)[0] == []
            with pytest.raises(KeyError):
                server.interrupt(2, 0)
            # The client goes away (QEMU exits): the server drops it and closes its eventfds.
            c.close()
            deadline = time.monotonic() + 5
            while server.clients and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.clients == {}
            assert client.eventfds == []
        finally:
            for m in msgs:
                if m.fd is not None:
                    os.close(m.fd)
            c.close()
        # A second client gets the next id.
        c2 = socket.socket(socket.AF_UNIX)
        c2.connect(str(sock_path))
        msgs = [ivshmem.recv_message(c2) for _ in range(7)]
        assert ivshmem.parse_setup(msgs, vectors=2).client_id == 2
        for m in msgs:
            if m.fd is not None:
                os.close(m.fd)
        c2.close()
    assert not sock_path.exists()
    region.close()
    os.close(shm)


def test_wait_client_times_out(sock_path: Path) -> None:
    shm = ivshmem.create_region(1 << 16)
    try:
        with ivshmem.IvshmemServer(sock_path, shm, vectors=1) as server, \
                pytest.raises(TimeoutError, match=r"no ivshmem client connected within 0\.05 s"):
            server.wait_client(0.05)
    finally:
        os.close(shm)
