"""Hostile guests against a real hostd: TOCTOU, region tampering, corrupt streams,
guests SIGKILLed mid-protocol, isolation between guests, and descriptor floods.

Every guest here is real (a separate process or a Device in this process), every
region is a real sealed memfd, every codec task runs on PyAV in a real worker.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import guestlib
from guestlib.device import Device, DeviceError, SessionLost
from hostd.daemon import Hostd
from tests import hostile_guests as hg
from tests.guests import as_nobody
from vmediad import abi
from vmediad.abi import ErrorCode, Op, Status
from vmediad.shm import MappedRegion
from vmediad.tools.soak import HostdProcess, corrupt, encode_packets, frame_md5, reference_decode, shm_entries

U64 = abi.U64_MAX
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to run a peer as another uid")


@pytest.fixture
def hostd_proc(short_tmp: Path) -> Iterator[Callable[..., HostdProcess]]:
    started: list[HostdProcess] = []

    def make(**kw: object) -> HostdProcess:
        h = HostdProcess(short_tmp / f"p{len(started)}.sock", **kw)  # type: ignore[arg-type]
        h.start()
        started.append(h)
        return h

    yield make
    for h in started:
        if h.alive():
            assert h.stop() == 0, h.log_text()
        assert "device loop crashed" not in h.log_text(), h.log_text()


# --- 2. TOCTOU ------------------------------------------------------------------------------------
def test_toctou_descriptor_rewritten_while_hostd_copies_it(hostd_proc: Callable[..., HostdProcess]) -> None:
    """A second process flips opcode, src_off and dst_off of every slot with atomic stores
    while hostd copies and runs the descriptors.  Each outcome must be that of one snapshot:
    CRC32 of A or of B, a COPY of all of A or all of B into D, NOP, or the exact error of
    the invalid variant; nothing outside the heap is ever touched."""
    h = hostd_proc(channels=2)
    ring = 16
    dev = guestlib.attach(h.socket, name="toctou", region_size=4 << 20, ring_entries=ring)
    try:
        lay = dev.layout
        n = 64 << 10
        a, b = os.urandom(n), os.urandom(n)
        A, B, D = dev.put(a), dev.put(b), dev.alloc(n)
        canary = dev.put(b"\xa5" * 4096)
        page0 = bytes(dev.region.mem[: abi.REG_DOORBELL])
        crc = {zlib.crc32(a): "A", zlib.crc32(b): "B"}
        end = lay.region_size
        ops = {Op.CRC32: "crc", Op.COPY: "copy", Op.NOP: "nop", 999: "bad_opcode"}
        srcs = {A.offset: "A", B.offset: "B", end - 100: "bad_range", U64 - 16: "overflow"}
        dsts = {D.offset: "D", 0: "register page", lay.desc_offset: "descriptors", A.offset + 8: "overlap"}
        variants = {
            abi.D_INPUT + 8: [4, [int(op) for op in ops]],  # opcode u16 + flags u16 (flags 0)
            abi.D_INPUT + 16: [8, list(srcs)],  # src_off
            abi.D_INPUT + 32: [8, list(dsts)],  # dst_off
        }
        flipper = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.hostile_guests import flipper_main; "
             "flipper_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])",
             str(dev.fd), str(lay.region_size), str(ring), json.dumps(variants)],
            pass_fds=(dev.fd,), cwd=Path(__file__).resolve().parents[2])
        outcomes: Counter[str] = Counter()
        try:
            time.sleep(0.3)  # the flipper is running
            # Which snapshot a task sees is up to the scheduler; every outcome is checked for
            # consistency as it comes.  The loop runs until each kind has been seen at least
            # once (a loaded two-core box needs far more tasks for the rarest kind than an idle
            # one), bounded by a cap well above what any run has needed.
            cap = time.monotonic() + float(os.environ.get("VMEDIAD_TOCTOU_CAP_S", "90"))
            kinds = ("crc A", "crc B", "copy A", "copy B", "nop", "BAD_OPCODE", "BAD_RANGE", "OVERFLOW")
            while time.monotonic() < cap and not all(outcomes[k] for k in kinds):
                D.mem[:16] = b"\0" * 16
                # guestlib writes a whole valid CRC32 descriptor; the flipper rewrites it at once.
                c = dev.submit(Op.CRC32, src=(A.offset, n), dst=(D.offset, n)).completion(timeout=5)
                if c.status == Status.DONE and c.result_len == n and c.result in crc:
                    outcomes["crc " + crc[c.result]] += 1
                elif c.status == Status.DONE and c.result == 0 and c.result_len == 0:
                    outcomes["nop"] += 1
                elif c.status == Status.DONE and c.result_len == n and c.result == 0:
                    got = bytes(D.mem)
                    assert got in (a, b), "COPY result is neither all of A nor all of B"
                    outcomes["copy " + ("A" if got == a else "B")] += 1
                else:
                    assert c.status == Status.ERROR, c
                    assert c.error in (ErrorCode.BAD_OPCODE, ErrorCode.BAD_RANGE, ErrorCode.OVERFLOW,
                                       ErrorCode.OVERLAP), c
                    outcomes[c.error.name] += 1
        finally:
            flipper.kill()
            flipper.wait()
        print(f"\ntoctou: {sum(outcomes.values())} tasks {dict(outcomes)}")
        # Each kind of snapshot was seen, and nothing outside the buffers moved.
        for kind in kinds:
            assert outcomes[kind] > 0, (kind, outcomes)
        assert bytes(dev.region.mem[: abi.REG_DOORBELL]) == page0
        assert bytes(canary.mem) == b"\xa5" * 4096
        assert bytes(A.mem) == a and bytes(B.mem) == b
        assert h.alive()
        assert dev.crc32(A).wait(timeout=5) == zlib.crc32(a)
    finally:
        dev.close()


# --- 3. region tampering -------------------------------------------------------------------------
def test_region_resize_and_reseal_refused_remap_harmless(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="tamper", region_size=2 << 20) as dev:
        size = dev.layout.region_size
        for new in (0, 4096, size - 4096, size + 4096, size * 4):
            with pytest.raises(PermissionError):
                os.ftruncate(dev.fd, new)
        with pytest.raises(OSError):
            os.posix_fallocate(dev.fd, size, 1 << 20)  # grow by allocation
        for seal in (fcntl.F_SEAL_WRITE, getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)):
            with pytest.raises(PermissionError):  # F_SEAL_SEAL: the seal set is frozen
                fcntl.fcntl(dev.fd, fcntl.F_ADD_SEALS, seal)
        assert os.fstat(dev.fd).st_size == size
        # A second mapping (a guest re-mapping its region) only ever concerns the guest.
        again = MappedRegion(dev.fd, size)
        assert again.load32(abi.REG_MAGIC) == abi.MAGIC
        data = os.urandom(100_000)
        buf = dev.alloc(len(data))
        again.mem[buf.offset : buf.offset + len(data)] = data  # written through the other mapping
        assert dev.crc32(buf).wait(timeout=5) == zlib.crc32(data)
        again.close()
    assert hostd.device.crashed is None and hostd.device.state.value == "running"


def test_hostd_owned_words_are_never_trusted(hostd: Hostd) -> None:
    ring = 16
    with guestlib.attach(hostd.socket_path, name="scribbler", region_size=8 << 20, ring_entries=ring) as dev:
        reg = dev.region
        big = dev.put(os.urandom(6 << 20))
        want_big = zlib.crc32(big.mem)
        slow = [dev.crc32(big) for _ in range(3)]
        # Scribble over every word hostd owns while those tasks run.
        for off in (abi.REG_SQ_HEAD, abi.REG_NEED_WAKEUP, abi.REG_RING_ERROR, abi.REG_RING_ERROR_COUNT,
                    abi.REG_DEVICE_STATE, abi.REG_MAGIC, abi.REG_RING_ENTRIES, abi.REG_DESC_SIZE):
            reg.store32(off, 0xDEAD0000 | off)
        for off in (abi.REG_EPOCH, abi.REG_HEARTBEAT, abi.REG_IRQ_COUNT, abi.REG_TASKS_DONE, abi.REG_TASKS_FAILED,
                    abi.REG_REGION_SIZE, abi.REG_SQ_OFFSET, abi.REG_DESC_OFFSET, abi.REG_HEAP_OFFSET,
                    abi.REG_HEAP_SIZE, abi.REG_CAPS):
            reg.store64(off, U64 - off)
        # ... and over the status words of the running tasks (a guest may only flip FREE->SUBMITTED
        # and DONE/ERROR->FREE; anything else is ignored: hostd never reads the word back).
        for t, v in zip(slow, (Status.DONE, Status.FREE, 0x12345678), strict=True):
            reg.store32(dev._desc(t.slot) + abi.D_STATUS, v)
        # The tasks still end exactly once with their real results: hostd writes the result
        # fields and the sequence word before its own status flip, so wait on the sequence.
        for t in slow:
            at = dev._desc(t.slot)
            hg.wait_until(lambda at=at: reg.load64(at + abi.D_SEQ) != 0, 10, "tampered task done")
            res = abi.DESC_RESULT.unpack_from(reg.mem, at + abi.D_RESULT)
            assert (res[0], res[2]) == (want_big, ErrorCode.OK)
        time.sleep(0.05)
        for t in slow:  # hand the slots back to guestlib
            reg.store32(dev._desc(t.slot) + abi.D_STATUS, Status.DONE)
            t.completion()
        # hostd kept its private head: three more laps of the ring all run, each exactly once.
        data = os.urandom(4096)
        buf = dev.put(data)
        for _ in range(3):
            with dev.batch() as b:
                for _ in range(ring - 1):
                    b.crc32(buf)
            assert [t.wait(timeout=5) for t in b.tasks] == [zlib.crc32(data)] * (ring - 1)
        assert reg.load32(abi.REG_SQ_HEAD) == dev._tail  # hostd's copy, rewritten from its own head
        vm = hostd.device.statistics()["vms"][0]
        assert vm["tasks_done"] == 3 + 3 * (ring - 1) + 0 and vm["ring_errors"] == {}
        assert hostd.device.guests[dev.vm_id].ring.head == dev._tail
    assert hostd.device.crashed is None


def test_control_socket_fd_flood_is_bounded(hostd: Hostd) -> None:
    """A peer sending file descriptors with every request must not make hostd hoard them."""
    me = Path(f"/proc/{os.getpid()}/fd")
    base = len(os.listdir(me))
    junk = os.open("/dev/null", os.O_RDONLY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(hostd.socket_path)
            f = s.makefile("rb")
            for _ in range(200):
                socket.send_fds(s, [b'{"cmd":"ping"}\n'], [junk] * 4)
                assert json.loads(f.readline())["ok"] is True
            # hostd holds none of the 800 descriptors it was sent.
            assert len(os.listdir(me)) <= base + 8
            f.close()
    finally:
        os.close(junk)


def _forged_region(size: int, ring: int, seals: int) -> int:
    """A memfd laid out like a region, with the seals asked for."""
    fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    m = MappedRegion(fd, size)
    lay = abi.compute_layout(size, ring)
    for off, fmt, value in abi.register_page_init(lay, 1, 0):
        struct.pack_into(fmt, m.mem, off, value)
    m.close()
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _adopt(sock: str, fd: int) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        socket.send_fds(s, [b'{"cmd":"attach","name":"forger","adopt":true}\n'], [fd])
        msg, fds, _f, _a = socket.recv_fds(s, 65536, 2)
        for extra in fds:
            os.close(extra)
        reply: dict[str, object] = json.loads(msg.partition(b"\n")[0])
        return reply


def test_forged_adopt_regions_are_refused(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(region_max=16 << 20, ring_max=1024)
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    future_write = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
    cases = {
        "too large": _forged_region(64 << 20, 256, seals),
        "ring too large": _forged_region(16 << 20, 1 << 15, seals),
        "not sealed": _forged_region(2 << 20, 64, 0),
        "seals not frozen": _forged_region(2 << 20, 64, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
        "write-sealed": _forged_region(2 << 20, 64, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | future_write),
    }
    try:
        for what, fd in cases.items():
            t0 = time.monotonic()
            reply = _adopt(h.socket_path, fd)
            assert reply["ok"] is False, what
            assert time.monotonic() - t0 < 2.0, what  # refused up front, not after walking a huge ring
        stats = h.device.statistics()
        assert stats["guests"] == 0 and all(not c["busy"] for c in stats["channels"])  # nothing half-adopted
        ok = _forged_region(2 << 20, 64, seals)  # within limits, sealed and frozen: a valid region
        reply = _adopt(h.socket_path, ok)
        assert reply["ok"] is True
        os.close(ok)
    finally:
        for fd in cases.values():
            os.close(fd)
    hg.wait_until(lambda: h.device.statistics()["guests"] == 0, what="forger reclaimed")
    with guestlib.attach(h.socket_path, name="honest") as dev:
        assert dev.nop().wait(timeout=5) is None
    assert h.device.crashed is None


# --- 4. corrupt streams --------------------------------------------------------------------------
CORRUPT_N = int(os.environ.get("VMEDIAD_CORRUPT_N", "25"))
# TOO_LARGE: a flipped header bit can announce a picture beyond the geometry caps (1024 here).
DECODE_OK = {ErrorCode.OK, ErrorCode.INVALID_DATA, ErrorCode.TOO_LARGE, ErrorCode.WORKER_CRASHED}


def _worker_pid(h: Hostd, vm: int) -> int:
    return int(next(v["worker_pid"] for v in h.device.statistics()["vms"] if v["vm"] == vm))


def decode_corrupt_streams(h: Hostd, dev: Device, codec: str, n: int, seed: int) -> dict[str, object]:
    """Decode ``n`` corrupt variants of a valid stream; every 8th carries the crash marker."""
    from codec_backend.engine import CRASH_MARKER

    rng = random.Random(seed)
    valid = encode_packets(codec, 64, 64, 12, seed)
    want = reference_decode(codec, valid)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    respawn_s: list[float] = []
    slowest = 0.0
    # The valid stream decodes to the reference frames first: the harness is sound.
    assert decode_md5s(dev, codec, valid) == want
    for i in range(n):
        kind, packets = corrupt(valid, rng)
        if i % 8 == 7:
            at = rng.randrange(len(packets))
            packets[at] = CRASH_MARKER + packets[at]
            kind = "crash"
        kinds[kind] += 1
        # Every other stream is decoded into a frame pool (the picture size given): corrupt
        # headers then change the geometry under slots that are in use or lent.
        dec = dev.decoder(codec, parse=False, **({"width": 64, "height": 64} if i % 2 else {}))
        pid = _worker_pid(h, dev.vm_id)
        crashed = False
        for p in packets:
            t0 = time.monotonic()
            try:
                dec.decode(p)
                code = ErrorCode.OK
            except SessionLost:
                code = ErrorCode.SESSION_LOST
            except DeviceError as e:
                code = e.code
            took = time.monotonic() - t0
            slowest = max(slowest, took)
            assert took < 5.0, f"{codec} {kind}: a DECODE took {took:.2f}s"
            outcomes[code.name] += 1
            assert code in DECODE_OK, f"{codec} {kind}: DECODE ended {code.name}"
            if p.startswith(CRASH_MARKER):  # a real SIGSEGV in the thread running the task
                assert code == ErrorCode.WORKER_CRASHED, f"{codec}: the crash marker ended {code.name}"
            if code == ErrorCode.WORKER_CRASHED:
                crashed = True
                # Respawn: the worker pid changes and the new worker runs a task, within 1 s.
                hg.wait_until(lambda pid=pid: _worker_pid(h, dev.vm_id) != pid, 1.0, "worker respawned", 0.002)
                assert dev.nop().wait(timeout=1.0) is None
                respawn_s.append(time.monotonic() - t0 - took)
                break
        assert crashed == (kind == "crash"), f"{codec} {kind}: crash {crashed}"
        if crashed:
            # The session died with its worker: every later op on it says SESSION_LOST.
            with pytest.raises(SessionLost):
                dec.decode(valid[0])
        else:
            assert _worker_pid(h, dev.vm_id) == pid
            try:
                dec.flush()
                outcomes["flush OK"] += 1
            except DeviceError as e:
                assert e.code in (ErrorCode.INVALID_DATA, ErrorCode.TOO_LARGE), e.code
                outcomes["flush " + e.code.name] += 1
        dec.close()
    # The device still decodes the valid stream exactly, with and without a frame pool.
    assert decode_md5s(dev, codec, valid) == want
    assert decode_md5s(dev, codec, valid, pool=True) == want
    return {"outcomes": outcomes, "kinds": kinds, "respawn_s": respawn_s, "slowest_s": slowest}


def decode_md5s(dev: Device, codec: str, packets: list[bytes], pool: bool = False) -> list[str]:
    """md5 of each frame the device decodes (taken at once: planes are views into the
    decoder's output buffer or its frame pool, valid until its next call)."""
    out: list[str] = []
    with dev.decoder(codec, parse=False, **({"width": 64, "height": 64} if pool else {})) as dec:
        assert bool(dec.pool_size) == (pool and codec != "av1")  # libdav1d cannot take a pool
        for p in [*packets, None]:
            frames = dec.flush() if p is None else dec.decode(p)
            out += [frame_md5(f.to_ndarray().tobytes()) for f in frames]
    return out


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9", "av1"])
def test_corrupt_streams_end_ok_invalid_or_crashed(make_hostd: Callable[..., Hostd], codec: str) -> None:
    h = make_hostd(fault_injection=True, max_width=1024, max_height=1024)
    with guestlib.attach(h.socket_path, name=f"corrupt-{codec}", region_size=32 << 20) as dev:
        r = decode_corrupt_streams(h, dev, codec, CORRUPT_N, seed=zlib.crc32(codec.encode()) & 0xFFFF)
        respawn = r["respawn_s"]
        assert isinstance(respawn, list) and len(respawn) == CORRUPT_N // 8
        assert max(respawn, default=0) < 1.0
        vm = next(v for v in h.device.statistics()["vms"] if v["vm"] == dev.vm_id)
        assert vm["worker_restarts"] == CORRUPT_N // 8
    assert h.device.crashed is None and h.device.state.value == "running"


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9", "av1"])
def test_corrupt_streams_slow(make_hostd: Callable[..., Hostd], codec: str) -> None:
    n = int(os.environ.get("VMEDIAD_CORRUPT_SLOW", "200"))
    h = make_hostd(fault_injection=True, max_width=1024, max_height=1024)
    with guestlib.attach(h.socket_path, name=f"corrupt-{codec}", region_size=32 << 20) as dev:
        r = decode_corrupt_streams(h, dev, codec, n, seed=1000 + (zlib.crc32(codec.encode()) & 0xFFFF))
        respawn = r["respawn_s"]
        assert isinstance(respawn, list) and max(respawn, default=0) < 1.0
        print(f"\ncorrupt {codec}: {n} streams {dict(r['kinds'])} -> {dict(r['outcomes'])}; "  # type: ignore[call-overload]
              f"respawn max {max(respawn) * 1e3:.0f} ms median {sorted(respawn)[len(respawn) // 2] * 1e3:.0f} ms; "
              f"slowest DECODE {r['slowest_s']:.3f}s")
    assert h.device.crashed is None


def test_worker_recycling_loses_no_task(make_hostd: Callable[..., Hostd]) -> None:
    """Workers recycled by task count while the guest keeps its queue full: no task of it
    may end WORKER_CRASHED (the queue is held while the worker is replaced)."""
    h = make_hostd(worker_recycle_tasks=20)
    with guestlib.attach(h.socket_path, name="recycled", ring_entries=64) as dev:
        data = os.urandom(32 << 10)
        buf = dev.put(data)
        want = zlib.crc32(data)
        pids = set()
        for _ in range(int(os.environ.get("VMEDIAD_RECYCLE_ROUNDS", "30"))):
            with dev.batch() as b:
                for _ in range(48):
                    b.crc32(buf)
            assert [t.completion(timeout=30).error for t in b.tasks] == [ErrorCode.OK] * 48
            assert all(t.wait() == want for t in b.tasks)
            pids.add(_worker_pid(h, dev.vm_id))
        vm = h.device.statistics()["vms"][0]
        assert vm["worker_recycles"] >= 20 and vm["worker_restarts"] == 0 and len(pids) > 10
        assert vm["errors"] == {}


def test_worker_recycled_by_rss_loses_no_task(make_hostd: Callable[..., Hostd]) -> None:
    """A 1 MB RSS limit is below any worker's RSS, so the worker is replaced after each task
    (between tasks, with no session open); every task still ends OK with the right result."""
    h = make_hostd(worker_recycle_rss_mb=1)
    with guestlib.attach(h.socket_path, name="rss") as dev:
        data = os.urandom(16 << 10)
        buf = dev.put(data)
        pids = set()
        for _ in range(6):
            assert dev.crc32(buf).wait(timeout=30) == zlib.crc32(data)
            pids.add(_worker_pid(h, dev.vm_id))
        vm = h.device.statistics()["vms"][0]
        assert vm["worker_recycles"] >= 5 and len(pids) >= 3, (vm["worker_recycles"], pids)
        assert vm["worker_restarts"] == 0 and vm["errors"] == {}


def test_worker_dying_before_any_task_is_respawned_with_backoff(make_hostd: Callable[..., Hostd]) -> None:
    """A worker that keeps dying before it runs anything is respawned with a growing delay,
    and tasks handed to it in the meantime are queued again, not failed."""
    h = make_hostd()
    with guestlib.attach(h.socket_path, name="fragile") as dev:
        assert dev.nop().wait(timeout=10) is None
        gaps = []
        for _ in range(4):
            pid = _worker_pid(h, dev.vm_id)
            t0 = time.monotonic()
            os.kill(pid, 9)
            hg.wait_until(lambda pid=pid: _worker_pid(h, dev.vm_id) != pid, 10, "respawn", 0.002)
            gaps.append(time.monotonic() - t0)
        # 1st death followed a task: at once; then 1 early death: at once; then 0.1 s, 0.2 s.
        assert gaps[2] >= 0.1 and gaps[3] >= 0.2, gaps
        pid = _worker_pid(h, dev.vm_id)
        os.kill(pid, 9)  # fifth death: 0.4 s without a worker; tasks wait for the next one
        data = os.urandom(4096)
        tasks = [dev.crc32(dev.put(data)) for _ in range(4)]
        assert [t.wait(timeout=10) for t in tasks] == [zlib.crc32(data)] * 4
        vm = h.device.statistics()["vms"][0]
        assert vm["errors"] == {} and vm["worker_restarts"] == 5
    assert h.device.crashed is None


def test_tasks_fail_when_no_worker_can_start(make_hostd: Callable[..., Hostd],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot even start (here its Python has no standard library) is respawned
    with the backoff; after EARLY_DEATHS_FAIL such deaths in a row the guest's waiting task
    ends WORKER_CRASHED instead of waiting for ever, and so does a later one."""
    from hostd import workers
    from hostd.core.lifecycle import EARLY_DEATHS_FAIL

    env = workers._worker_env
    monkeypatch.setattr(workers, "_worker_env", lambda: {**env(), "PYTHONHOME": "/nonexistent"})
    h = make_hostd()
    with guestlib.attach(h.socket_path, name="doomed") as dev:
        buf = dev.put(b"x" * 4096)
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as first:
            dev.crc32(buf).wait(timeout=60)
        waited = time.monotonic() - t0
        with pytest.raises(DeviceError) as later:
            dev.crc32(buf).wait(timeout=30)
        vm = h.device.statistics()["vms"][0]
    assert first.value.code == later.value.code == ErrorCode.WORKER_CRASHED
    assert vm["errors"] == {"WORKER_CRASHED": 2} and vm["worker_restarts"] >= EARLY_DEATHS_FAIL
    assert waited < 30, waited  # about 10 s of backoff, then the failure
    assert h.device.crashed is None


def test_events_posted_after_close_are_dropped(short_tmp: Path) -> None:
    """Worker reapers and control connections may post after hostd closed its device; the
    bank is unmapped by then, so a post must be dropped, not stored (a SIGSEGV).  Run in a
    child process: the failure mode is the death of the interpreter."""
    code = f"""
from pathlib import Path
from hostd.config import Config
from hostd.daemon import Hostd
from vmediad import logs
import guestlib
logs.configure("error")
h = Hostd(Config(socket=Path({str(short_tmp / "c.sock")!r}), channels=1, region_default=1 << 20))
h.start()
dev = guestlib.attach(h.socket_path, name="late")
dev.nop().wait(timeout=10)
h.stop()
for _ in range(1000):
    h.device.post(lambda: None)
h.device.detach(dev.vm_id, "late")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == ["ok"], (r.returncode, r.stderr[-2000:])


# --- 5. guests SIGKILLed at random points ---------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sixteen_guests_half_sigkilled_everything_reclaimed(hostd_proc: Callable[..., HostdProcess]) -> None:
    h = hostd_proc(channels=2, config={"limits": {"named_regions": True}})
    shm_before = shm_entries()
    # Warm-up attach/detach, then the baseline: hostd's fds with no guest attached.
    with guestlib.attach(h.socket, name="warm", region_size=2 << 20) as dev:
        dev.nop().wait(timeout=10)
    hg.wait_until(lambda: h.status()["guests"] == 0, what="warm-up guest reclaimed")
    time.sleep(0.3)  # hostd closes the status connections it just served
    fd_base = h.fd_count()
    rounds = int(os.environ.get("VMEDIAD_KILL_ROUNDS", "60"))
    out, ready = hg.CTX.Queue(), hg.CTX.Queue()
    modes = ["waiter", "doorbell", "writer", "session", "named", "waiter", "doorbell", "writer"]
    survivors = [hg.run(hg.survivor, h.socket, f"s{i}", 100 + i, rounds, out) for i in range(8)]
    victims = {f"v{i}-{m}": hg.run(hg.victim, h.socket, f"v{i}-{m}", m, 200 + i, ready)
               for i, m in enumerate(modes)}
    rng = random.Random(5)
    reported = [ready.get(timeout=120) for _ in victims]
    vms = {name: vm for name, _pid, vm in reported}
    st = h.status()
    workers = {v["name"]: v["worker_pid"] for v in st["vms"] if v["name"] in vms}
    assert len(workers) == len(victims)
    assert len(shm_entries() - shm_before) == 1  # the "named" victim's region
    for _name, proc in rng.sample(sorted(victims.items()), len(victims)):
        time.sleep(rng.uniform(0.0, 0.15))  # mid-doorbell, mid-write, asleep: wherever it is
        assert proc.pid is not None
        os.kill(proc.pid, 9)
    for proc in victims.values():
        proc.join(10)
        assert proc.exitcode == -9
    results = sorted(out.get(timeout=180) for _ in survivors)
    for p in survivors:
        p.join(30)
        assert p.exitcode == 0
    assert results == [(f"s{i}", rounds, 0) for i in range(8)]
    # Everything the dead held is reclaimed: guests, workers, sessions, regions, fds.
    hg.wait_until(lambda: h.status()["guests"] == 0, 20, "all guests reclaimed")
    for name, pid in workers.items():
        hg.wait_until(lambda pid=pid: not _alive(pid), 10, f"worker of {name} gone")
    st = h.status()
    assert all(not c["busy"] and c["bound_sessions"] == 0 for c in st["channels"])
    hg.wait_until(lambda: h.fd_count() == fd_base, 10, f"hostd fds back to {fd_base}")
    assert shm_entries() == shm_before
    assert h.alive()


# --- 7. isolation ---------------------------------------------------------------------------------


@needs_root
def test_other_uid_cannot_open_regions_through_proc(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="target") as dev:
        dev.region.mem[dev.layout.heap_offset : dev.layout.heap_offset + 8] = b"SECRET!!"
        hostd_pid = os.getpid()  # in-process hostd
        worker = hostd.device.statistics()["vms"][0]["worker_pid"]
        fds = [f"/proc/{p}/fd/{n}" for p in (hostd_pid, worker) for n in os.listdir(f"/proc/{p}/fd")]
        targets = [*fds, f"/proc/{hostd_pid}/mem", f"/proc/{worker}/mem", f"/proc/{worker}/map_files"]

        def probe() -> bytes:
            opened = []
            for path in targets:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                opened.append(path)
                os.close(fd)
            return json.dumps(opened).encode()

        assert json.loads(as_nobody(probe)) == []


@needs_root
def test_peer_gid_allow_list_and_refusal_for_every_command(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(socket_mode=0o666, allowed_gids=(65534,))
    os.chmod(Path(h.socket_path).parent, 0o755)

    def ask(path: str, requests: list[bytes]) -> Callable[[], bytes]:
        def go() -> bytes:
            replies = []
            for r in requests:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                    c.connect(path)
                    c.sendall(r)
                    replies.append(json.loads(c.makefile("rb").readline()))
            return json.dumps(replies).encode()
        return go

    # gid 65534 is allowed: status works for uid nobody.
    replies = json.loads(as_nobody(ask(h.socket_path, [b'{"cmd":"status"}\n'])))
    assert replies[0]["ok"] is True
    # Not allowed: every command is refused at the door, adopt included.
    h2 = make_hostd(socket_mode=0o666)
    os.chmod(Path(h2.socket_path).parent, 0o755)
    replies = json.loads(as_nobody(ask(h2.socket_path, [b'{"cmd":"status"}\n', b'{"cmd":"ping"}\n',
                                                         b'{"cmd":"attach","name":"x","adopt":true}\n'])))
    assert [r["kind"] for r in replies] == ["permission"] * 3
    assert h2.control.refused == 3


def test_offsets_outside_own_heap_are_bad_range(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd()
    with guestlib.attach(h.socket_path, name="A", region_size=2 << 20) as a, \
            guestlib.attach(h.socket_path, name="B", region_size=4 << 20) as b:
        lay = a.layout
        # Every page below A's heap, every page past A's end up to B's (larger) region end.
        offs = list(range(0, lay.heap_offset, 4096)) + list(range(lay.region_size, b.layout.region_size + 1, 4096))
        codes: Counter[ErrorCode] = Counter()
        for i in range(0, len(offs), 64):  # 192 descriptors per batch: within the ring
            with a.batch() as bt:
                for off in offs[i : i + 64]:
                    bt.add(Op.CRC32, src=(off, 1))
                    bt.add(Op.COPY, src=(lay.heap_offset, 1), dst=(off, 1))
                    bt.add(Op.CAPS, dst=(off, 64))
            codes.update(t.completion(timeout=10).error for t in bt.tasks)
        assert codes == {ErrorCode.BAD_RANGE: 3 * len(offs)}
        assert a.nop().wait(timeout=5) is None


def test_canary_of_one_guest_never_reaches_another(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd()
    canary = b"\xc4\x4a\x52\x59-B-" * 512
    with guestlib.attach(h.socket_path, name="B", region_size=2 << 20) as b, \
            guestlib.attach(h.socket_path, name="A", region_size=16 << 20) as a:
        lay = b.layout
        b.region.mem[lay.heap_offset : lay.region_size] = (canary * (lay.heap_size // len(canary) + 1))[: lay.heap_size]
        want_b = zlib.crc32(b.region.mem[lay.heap_offset : lay.region_size])
        bufs = [a.alloc(64 << 10) for _ in range(8)]
        with a.batch() as bt:
            for i, buf in enumerate(bufs[:-1]):
                bt.copy(buf, bufs[i + 1])
                bt.crc32(buf)
        for t in bt.tasks:
            t.wait(timeout=10)
        # A's biggest legal reads and writes, and a decode whose output lands in A's heap.
        big = a.alloc(256 << 10)
        assert a.crc32(big).wait(timeout=10) == zlib.crc32(big.mem)
        packets = encode_packets("h264", 64, 64, 6, 1)
        assert len(decode_md5s(a, "h264", packets)) == 6
        a.caps()
        region_a = bytes(a.region.mem)
        assert canary[:8] not in region_a and b"-B-" + canary[:4] not in region_a
        assert zlib.crc32(b.region.mem[lay.heap_offset : lay.region_size]) == want_b  # B untouched by A


def test_no_region_or_socket_is_world_accessible(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(named_regions=True)
    sock = Path(h.socket_path)
    assert stat.S_IMODE(sock.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE(sock.parent.stat().st_mode) & 0o002 == 0
    with guestlib.attach(h.socket_path, name="m") as dev, guestlib.attach(h.socket_path, name="n", named=True) as nd:
        assert stat.S_IMODE(os.fstat(dev.fd).st_mode) & 0o077 == 0
        assert stat.S_IMODE(os.fstat(nd.fd).st_mode) & 0o077 == 0
        assert nd.shm_name is not None
        assert stat.S_IMODE((Path("/dev/shm") / nd.shm_name[1:]).stat().st_mode) == 0o600
        # Every memfd hostd holds (regions and its channel register bank) is 0600.
        me = Path(f"/proc/{os.getpid()}/fd")
        modes = {}
        for n in os.listdir(me):
            try:
                if os.readlink(me / n).startswith("/memfd:vmediad"):
                    modes[n] = stat.S_IMODE(os.stat(me / n).st_mode)
            except FileNotFoundError:
                pass  # the fd listdir itself used
        assert len(modes) >= 3
        assert all(m & 0o077 == 0 for m in modes.values()), modes
        # Another guest's status view names no region it could open.
        for v in guestlib.hostd_status(h.socket_path)["vms"]:
            assert not isinstance(v.get("named_region"), str)


# --- 8. flood ------------------------------------------------------------------------------------
def test_flooder_held_to_its_cap_others_complete(hostd_proc: Callable[..., HostdProcess]) -> None:
    cap = 1
    h = hostd_proc(channels=2, config={"scheduler": {"policy": "round-robin"},
                                        "limits": {"max_inflight_per_guest": cap}})
    ready, out, stop, go = hg.CTX.Queue(), hg.CTX.Queue(), hg.CTX.Event(), hg.CTX.Event()
    fl = hg.run(hg.flooder, h.socket, "flooder", ready, stop, out)
    _name, _pid, flood_vm = ready.get(timeout=60)
    probes = [hg.run(hg.latency_probe, h.socket, f"probe{i}", 300, ready, go, out) for i in range(2)]
    for _ in probes:
        ready.get(timeout=60)
    go.set()
    samples = 0
    max_inflight = max_busy = max_queued = 0
    results: list[tuple[str, Any, int]] = []
    end = time.monotonic() + 60
    while len(results) < len(probes) and time.monotonic() < end:
        st = h.status()
        vm = next(v for v in st["vms"] if v["vm"] == flood_vm)
        max_inflight = max(max_inflight, vm["inflight"])
        max_queued = max(max_queued, vm["queue_depth"])
        max_busy = max(max_busy, sum(1 for c in st["channels"] if c["vm"] == flood_vm))
        samples += 1
        try:
            results.append(out.get(timeout=0.01))
        except Exception:
            pass
    stop.set()
    results.append(out.get(timeout=60))
    fl.join(30)
    for p in probes:
        p.join(30)
    by_name = {r[0]: r for r in results}
    assert samples >= 10
    assert max_inflight <= cap and max_busy <= cap  # the flooder never holds more than its cap ...
    assert max_queued > 10  # ... although it really had far more queued
    for i in range(2):
        _name, lat, bad = by_name[f"probe{i}"]
        assert bad == 0 and len(lat) == 300  # ... and every probe task completed correctly
    assert by_name["flooder"][2] == 0 and by_name["flooder"][1] > 0


def _p99(lat: list[float]) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


@pytest.mark.slow
@pytest.mark.parametrize("cap", [1, 8])
@pytest.mark.parametrize("flood_bytes", [64 << 10, 1 << 20])
def test_flood_p99_within_2x_of_solo(hostd_proc: Callable[..., HostdProcess], flood_bytes: int, cap: int) -> None:
    """Round-robin: the probes' p99 with a flooder at its cap vs the same probes alone.

    Tasks are not preemptible, so what keeps the probes' tail short is hostd's fair share:
    staged tasks start in pick order, a staged task revokes other guests' shadow loads,
    and while another guest is active the flooder gets at most channels - 1 channels and
    no shadow loads for its stateless tasks (docs/reliability.md has the figures)."""
    h = hostd_proc(channels=2, config={"scheduler": {"policy": "round-robin"},
                                        "limits": {"max_inflight_per_guest": cap}})
    n = int(os.environ.get("VMEDIAD_FLOOD_N", "1000"))

    def probe_round(flood: bool) -> list[float]:
        ready, out, stop, go = hg.CTX.Queue(), hg.CTX.Queue(), hg.CTX.Event(), hg.CTX.Event()
        fl = None
        if flood:
            fl = hg.run(hg.flooder, h.socket, "flooder", ready, stop, out, flood_bytes)
            ready.get(timeout=60)
        probes = [hg.run(hg.latency_probe, h.socket, f"probe{i}", n, ready, go, out) for i in range(2)]
        for _ in probes:
            ready.get(timeout=60)
        time.sleep(0.5)
        go.set()
        lat: list[float] = []
        for _ in probes:
            name, got, bad = out.get(timeout=300)
            assert name.startswith("probe") and bad == 0
            lat += got
        stop.set()
        if fl is not None:
            assert out.get(timeout=60)[2] == 0
            fl.join(30)
        for p in probes:
            p.join(30)
        hg.wait_until(lambda: h.status()["guests"] == 0, 20, "guests gone")
        return lat

    solo = probe_round(False)
    flooded = probe_round(True)
    ratio = _p99(flooded) / _p99(solo)
    p50 = sorted(solo)[len(solo) // 2]
    print(f"\nflood cap {cap}, {flood_bytes >> 10} KiB tasks: probe p50 solo {p50 * 1e6:.0f} us, "
          f"flooded {sorted(flooded)[len(flooded) // 2] * 1e6:.0f} us; p99 solo {_p99(solo) * 1e6:.0f} us, "
          f"flooded {_p99(flooded) * 1e6:.0f} us; ratio {ratio:.2f}")
    assert sorted(flooded)[len(flooded) // 2] <= 2 * p50
    assert ratio <= 2.0
