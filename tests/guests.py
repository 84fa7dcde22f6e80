"""Guest programs the tests run as real, separate processes (multiprocessing 'spawn')."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import guestlib

CTX = mp.get_context("spawn")


def copy_crc_guest(sock: str, name: str, seed: int, rounds: int, out: Any) -> None:
    """Random COPY and CRC32 tasks; reports (name, ok_count, mismatches)."""
    rng = random.Random(seed)
    ok = bad = 0
    with guestlib.attach(sock, name=name) as dev:
        for _ in range(rounds):
            n = rng.randint(1, 256 * 1024)
            data = rng.randbytes(n)
            src = dev.put(data)
            dst = dev.alloc(n)
            crc = dev.crc32(src).wait()
            dev.copy(src, dst).wait()
            if crc == zlib.crc32(data) and bytes(dst.mem) == data:
                ok += 1
            else:
                bad += 1
            dev.free(src)
            dev.free(dst)
    out.put((name, ok, bad))


def victim_guest(sock: str, name: str, ready: Any) -> None:
    """Keeps the device busy with big CRC32 tasks until it is SIGKILLed."""
    dev = guestlib.attach(sock, name=name)
    buf = dev.put(bytes(6 << 20))
    ready.put(dev.vm_id)
    while True:
        tasks = [dev.crc32(buf) for _ in range(4)]
        for t in tasks:
            t.wait()


def steady_guest(sock: str, name: str, seconds: float, out: Any) -> None:
    ok = bad = 0
    with guestlib.attach(sock, name=name) as dev:
        data = os.urandom(4096)
        buf = dev.put(data)
        want = zlib.crc32(data)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if dev.crc32(buf).wait() == want:
                ok += 1
            else:
                bad += 1
    out.put((name, ok, bad))


def as_nobody(fn: Callable[[], bytes]) -> bytes:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534; returns what it wrote."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(wfd, fn())
        except BaseException as e:
            os.write(wfd, f"child error {e!r}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    return data


def run(target: Any, *args: Any) -> mp.process.BaseProcess:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p
