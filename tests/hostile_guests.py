"""Hostile and victim guest programs for the reliability tests (multiprocessing 'spawn').

Each runs as a real, separate process attached to a real hostd.  Victims report
``ready`` and then work forever in one phase of the protocol (waiting, ringing
the doorbell, rewriting descriptors) until the test SIGKILLs them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import zlib
from typing import Any

import guestlib
from vmediad import abi
from vmediad.abi import Doorbell, Op, Status

CTX = mp.get_context("spawn")


def run(target: Any, *args: Any) -> mp.process.BaseProcess:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def victim(sock: str, name: str, mode: str, seed: int, ready: Any) -> None:
    """Attach, report (name, pid, vm), then work in one phase until SIGKILLed.

    modes: ``waiter`` (asleep on a slot's futex most of the time), ``doorbell``
    (publishing tails and ringing KICK in a tight loop), ``writer`` (rewriting
    descriptor slots and SQ entries it may or may not publish), ``session`` (a
    decoder session open, decoding), ``named`` (a named posix region).
    """
    rng = random.Random(seed)
    size = (16 if mode == "session" else 2) << 20  # a decoder keeps an 8 MiB output buffer
    dev = guestlib.attach(sock, name=name, region_size=size, ring_entries=32, named=(mode == "named"))
    data = rng.randbytes(256 << 10)
    buf = dev.put(data)
    want = zlib.crc32(data)
    assert dev.crc32(buf).wait(timeout=30) == want
    dec = None
    stream = b""
    if mode == "session":
        from vmediad.tools.soak import encode_packets

        stream = b"".join(encode_packets("h264", 64, 64, 24, seed))
        dec = dev.decoder("h264")
        dec.decode(stream[: len(stream) // 2])
    ready.put((name, os.getpid(), dev.vm_id))
    reg = dev.region
    lay = dev.layout
    while True:
        if mode in ("waiter", "named"):
            tasks = [dev.crc32(buf) for _ in range(4)]
            for t in tasks:
                assert t.wait(timeout=30) == want
        elif mode == "doorbell":
            with dev.batch() as b:
                for _ in range(8):
                    b.nop()
            for _ in range(50):
                reg.xchg32(abi.REG_DOORBELL, Doorbell.KICK)
                if reg.load32(abi.REG_NEED_WAKEUP):
                    reg.futex_wake(abi.REG_DOORBELL, 1)
            for t in b.tasks:
                t.wait(timeout=30)
        elif mode == "writer":
            # Scribble over every descriptor slot (hostd may be reading some of them) and
            # over SQ entries past the tail, then submit a real task now and then.
            with dev._lock:
                for slot in dev._free_slots:
                    at = lay.desc(slot) + abi.D_INPUT
                    reg.mem[at : at + abi.DESC_INPUT.size] = rng.randbytes(abi.DESC_INPUT.size)
                for i in range(lay.ring_entries):
                    reg.store32(lay.sq_entry(dev._tail + i), rng.getrandbits(32))
            if rng.random() < 0.3:
                dev.crc32(buf).wait(timeout=30)
        elif mode == "session":
            assert dec is not None
            dec.decode(stream)
            dec.flush()
        else:
            raise ValueError(mode)


def survivor(sock: str, name: str, seed: int, rounds: int, out: Any) -> None:
    """Verified COPY + CRC32 work; reports (name, ok, bad)."""
    rng = random.Random(seed)
    ok = bad = 0
    with guestlib.attach(sock, name=name, region_size=2 << 20, ring_entries=32) as dev:
        for _ in range(rounds):
            n = rng.randint(1, 64 << 10)
            data = rng.randbytes(n)
            src = dev.put(data)
            dst = dev.alloc(n)
            with dev.batch() as b:
                b.crc32(src)
                b.copy(src, dst)
                b.nop()
            crc = b.tasks[0].wait(timeout=30)
            b.tasks[1].wait(timeout=30)
            b.tasks[2].wait(timeout=30)
            if crc == zlib.crc32(data) and bytes(dst.mem) == data:
                ok += 1
            else:
                bad += 1
            dev.free(src)
            dev.free(dst)
    out.put((name, ok, bad))


def flooder(sock: str, name: str, ready: Any, stop: Any, out: Any, task_bytes: int = 1 << 20) -> None:
    """Keeps its whole ring full of CRC32 tasks (far more than the per-guest cap)."""
    dev = guestlib.attach(sock, name=name, region_size=8 << 20, ring_entries=64)
    buf = dev.put(os.urandom(task_bytes))
    want = zlib.crc32(buf.mem)
    ready.put((name, os.getpid(), dev.vm_id))
    done = bad = 0
    pending: list[guestlib.Task] = []
    while not stop.is_set():
        while len(pending) < 64:
            pending.append(dev.crc32(buf))
        t = pending.pop(0)
        if t.wait(timeout=30) == want:
            done += 1
        else:
            bad += 1
    for t in pending:
        t.wait(timeout=30)
    dev.close()
    out.put((name, done, bad))


def latency_probe(sock: str, name: str, count: int, ready: Any, go: Any, out: Any) -> None:
    """One CRC32 of 64 KiB at a time; reports every round-trip latency (seconds)."""
    dev = guestlib.attach(sock, name=name, region_size=2 << 20, ring_entries=16)
    data = os.urandom(64 << 10)
    buf = dev.put(data)
    want = zlib.crc32(data)
    for _ in range(20):
        dev.crc32(buf).wait(timeout=30)
    ready.put((name, os.getpid(), dev.vm_id))
    go.wait(60)
    lat: list[float] = []
    bad = 0
    for _ in range(count):
        t0 = time.perf_counter()
        if dev.crc32(buf).wait(timeout=30) != want:
            bad += 1
        lat.append(time.perf_counter() - t0)
        time.sleep(0.001)
    dev.close()
    out.put((name, lat, bad))


def status_of(sock: str) -> dict[str, Any]:
    return guestlib.hostd_status(sock)


def wait_until(pred: Any, timeout: float = 10.0, what: str = "condition", step: float = 0.01) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def flipper_main(fd: int, size: int, slots: int, variants: str) -> None:
    """TOCTOU flipper (a separate process): rewrites descriptor fields with single atomic
    stores, as fast as it can, until killed.  ``variants`` is JSON: field offset (inside
    the descriptor) -> [width, [values...]]."""
    import json

    from vmediad.shm import MappedRegion

    lay = abi.compute_layout(size, slots)
    reg = MappedRegion(fd, size)
    table = [(int(k), w, vals) for k, (w, vals) in json.loads(variants).items()]
    rng = random.Random(os.getpid())
    while True:
        for slot in range(slots):
            at = lay.desc(slot)
            for off, width, vals in table:
                v = vals[rng.randrange(len(vals))]
                if width == 8:
                    reg.store64(at + off, v)
                else:
                    reg.store32(at + off, v)


__all__ = ["CTX", "Op", "Status", "flipper_main", "flooder", "latency_probe", "run", "status_of", "survivor",
           "victim", "wait_until"]
