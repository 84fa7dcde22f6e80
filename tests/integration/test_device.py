"""The core device end to end: real hostd, real guest processes, real regions and futexes."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

import guestlib
from guestlib.device import Device
from hostd.daemon import Hostd
from tests import guests
from tests.integration.test_hostd_gone import all_threads_stopped
from vmediad import abi
from vmediad.abi import Descriptor, Doorbell, ErrorCode, Op, Status


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_nop_copy_crc32_in_process(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="solo") as dev:
        assert dev.nop().wait() is None
        data = os.urandom(300_001)
        src = dev.put(data)
        assert dev.crc32(src).wait() == zlib.crc32(data)
        dst = dev.alloc(len(data))
        assert dev.copy(src, dst).wait() is None
        assert bytes(dst.mem) == data
        # Zero-copy views: a numpy write through Buffer.array lands in the region.
        arr = dst.array("u1", (100, 3000))
        arr[:] = 7
        assert dev.crc32(dst, 300_000).wait() == zlib.crc32(b"\x07" * 300_000)
        st = hostd.device.statistics()["vms"][0]
        assert st["tasks_done"] == 4 and st["tasks_failed"] == 0
        assert st["bytes_moved"] >= 3 * len(data) - 1


def test_copy_and_crc_across_three_guest_processes(hostd: Hostd) -> None:
    out = guests.CTX.Queue()
    procs = [guests.run(guests.copy_crc_guest, hostd.socket_path, f"g{i}", 1000 + i, 40, out) for i in range(3)]
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == [("g0", 40, 0), ("g1", 40, 0), ("g2", 40, 0)]
    wait_until(lambda: hostd.device.statistics()["guests"] == 0, what="guests reclaimed")


def test_eight_threads_each_woken_only_for_its_own_task(hostd: Hostd) -> None:
    """Every waiter sleeps (spins=0, slow tasks) and is woken exactly once: by its own completion."""
    dev = guestlib.attach(hostd.socket_path, name="threads", spins=0, region_size=32 << 20)
    try:
        per_thread = 12
        bufs = [dev.put(os.urandom(2 << 20)) for _ in range(8)]
        crcs = [zlib.crc32(b.mem) for b in bufs]
        wakeups: dict[int, list[int]] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def worker(i: int) -> None:
            try:
                barrier.wait()
                mine = []
                for _ in range(per_thread):
                    t = dev.crc32(bufs[i])
                    assert t.wait() == crcs[i]
                    mine.append(t.wakeups)
                wakeups[i] = mine
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        # No waiter was ever woken for someone else's task ...
        assert dev.spurious_wakeups == 0
        # ... each got at most one wakeup per task, and most really slept.
        assert all(w in (0, 1) for ws in wakeups.values() for w in ws)
        total = sum(sum(ws) for ws in wakeups.values())
        assert total == dev.wakeups
        assert total >= 8 * per_thread // 2
        # hostd issued exactly one targeted wake per sleeping waiter, none extra.
        assert hostd.device.statistics()["loop"]["wakes_sent"] >= total
    finally:
        dev.close()


def _drained(d: Device) -> bool:
    return d.region.load32(abi.REG_SQ_HEAD) == d.region.load32(abi.REG_SQ_TAIL)


def test_fifo_order_across_vms(make_hostd: Callable[..., Hostd]) -> None:
    """Tasks of three guests run in the order their doorbells were drained.

    The interleaving is forced: the first guest's worker is SIGSTOPped while its CRC32 holds
    the only channel, and each NOP is submitted only once hostd has drained the previous
    doorbell (REG_SQ_HEAD caught up with REG_SQ_TAIL), so arrival order is known exactly."""
    h = make_hostd(channels=1, policy="fifo", max_inflight_per_guest=64)
    devs = [guestlib.attach(h.socket_path, name=f"f{i}", region_size=4 << 20) for i in range(3)]
    worker = next(v["worker_pid"] for v in h.device.statistics()["vms"] if v["vm"] == devs[0].vm_id)
    try:
        os.kill(worker, signal.SIGSTOP)
        wait_until(lambda: all_threads_stopped(worker), what="the worker to stop")  # the stop lands later
        try:
            blocker = devs[0].crc32(devs[0].put(bytes(4096)))
            wait_until(lambda: h.device.statistics()["channels"][0]["busy"], what="the blocker on the channel")
            order = []
            for _round in range(4):
                for i, d in enumerate(devs):
                    order.append((i, d.nop()))
                    wait_until(partial(_drained, d), what="hostd drained the doorbell")
        finally:
            os.kill(worker, signal.SIGCONT)
        blocker.wait(timeout=10)
        seqs = [(t.completion(timeout=10).seq, i) for i, t in order]
        assert [i for _, i in sorted(seqs)] == [i for i, _ in order]
    finally:
        for d in devs:
            d.close()


def _raw(dev: Device, **kw: int) -> guestlib.Completion:
    return dev.submit_raw(Descriptor(**kw)).completion(timeout=10)


def test_bad_descriptors_get_specific_errors_and_hostd_lives(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="bad", region_size=1 << 20, ring_entries=16) as dev:
        lay = dev.layout
        heap, end = lay.heap_offset, lay.region_size
        U64 = abi.U64_MAX
        cases = {
            "unknown opcode": (dict(opcode=999), ErrorCode.BAD_OPCODE),
            "offset+length overflow": (dict(opcode=Op.CRC32, src_off=U64 - 10, src_len=100), ErrorCode.OVERFLOW),
            "length u64 max": (dict(opcode=Op.CRC32, src_off=heap, src_len=U64), ErrorCode.OVERFLOW),
            "out of region": (dict(opcode=Op.CRC32, src_off=end - 10, src_len=11), ErrorCode.BAD_RANGE),
            "register page": (dict(opcode=Op.COPY, src_off=heap, src_len=64, dst_off=0, dst_len=64),
                              ErrorCode.BAD_RANGE),
            "descriptor table": (dict(opcode=Op.CRC32, src_off=lay.desc_offset, src_len=8), ErrorCode.BAD_RANGE),
            "overlap": (dict(opcode=Op.COPY, src_off=heap, src_len=100, dst_off=heap + 50, dst_len=100),
                        ErrorCode.OVERLAP),
            "dst too small": (dict(opcode=Op.COPY, src_off=heap, src_len=100, dst_off=heap + 200, dst_len=10),
                              ErrorCode.NO_SPACE),
            "bad flags": (dict(opcode=Op.NOP, flags=0x8000), ErrorCode.BAD_FLAGS),
            "unknown session": (dict(opcode=Op.FLUSH, session=12345, dst_off=heap, dst_len=4096),
                                ErrorCode.BAD_SESSION),
            "short session config": (dict(opcode=Op.SESSION_OPEN, src_off=heap, src_len=8), ErrorCode.BAD_ARG),
        }
        for what, (fields, code) in cases.items():
            c = _raw(dev, **fields)
            assert (c.status, c.error) == (Status.ERROR, code), what
        # The edge that is exactly in range works.
        c = _raw(dev, opcode=Op.CRC32, src_off=end - 10, src_len=10)
        assert c.status == Status.DONE and c.result == zlib.crc32(bytes(dev.region.mem[end - 10 : end]))
        assert dev.nop().wait() is None
        st = hostd.device.statistics()["vms"][0]
        assert st["errors"]["BAD_RANGE"] == 3 and st["errors"]["OVERFLOW"] == 2


def test_ring_index_out_of_range_and_tail_jump(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="ring", ring_entries=16) as dev:
        reg = dev.region
        lay = dev.layout
        # An SQ entry naming slot 16 of a 16-slot ring.
        with dev._lock:
            reg.store32(lay.sq_entry(dev._tail), 16)
            dev._tail += 1
            dev._publish()
        dev._ring()
        wait_until(lambda: reg.load32(abi.REG_RING_ERROR) == ErrorCode.BAD_RING_INDEX, what="BAD_RING_INDEX")
        assert dev.nop().wait() is None  # the ring goes on
        # A tail jump larger than the ring: hostd refuses the ring until RESET.
        count = reg.load32(abi.REG_RING_ERROR_COUNT)
        reg.store32(abi.REG_SQ_TAIL, (dev._tail + 1000) & 0xFFFFFFFF)
        dev._ring()
        wait_until(lambda: reg.load32(abi.REG_RING_ERROR) == ErrorCode.RING_OVERRUN, what="RING_OVERRUN")
        assert reg.load32(abi.REG_RING_ERROR_COUNT) == count + 1
        # RESET resynchronises the head to the tail the guest now publishes.
        with dev._lock:
            dev._publish()
        reg.xchg32(abi.REG_DOORBELL, Doorbell.RESET)
        reg.futex_wake(abi.REG_DOORBELL, 1)
        wait_until(lambda: reg.load32(abi.REG_RING_ERROR) == 0, what="ring reset")
        assert dev.crc32(dev.put(b"abc")).wait() == zlib.crc32(b"abc")
        # Garbage doorbell values are ignored, never acted on.
        reg.xchg32(abi.REG_DOORBELL, 0x1234)
        wait_until(lambda: hostd.device.statistics()["vms"][0]["bad_doorbells"] >= 1, what="bad doorbell")
        assert dev.nop().wait() is None


def test_batch_submission_needs_no_syscall_per_task(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="batch", ring_entries=256) as dev:
        total = 0
        for _ in range(10):
            with dev.batch() as b:
                for _ in range(200):
                    b.nop()
            for t in b.tasks:
                t.wait()
            total += len(b.tasks)
        assert total == 2000
        # At most one futex_wake per doorbell, and one doorbell per batch slice.
        assert dev.syscalls_doorbell <= 20
        assert hostd.device.statistics()["vms"][0]["tasks_done"] == 2000


def test_guest_sigkilled_mid_task_is_reclaimed(hostd: Hostd) -> None:
    ready = guests.CTX.Queue()
    victim = guests.run(guests.victim_guest, hostd.socket_path, "victim", ready)
    vm = ready.get(timeout=60)
    wait_until(lambda: any(v["tasks_done"] > 2 for v in hostd.device.statistics()["vms"]), what="victim busy")
    worker_pid = next(v["worker_pid"] for v in hostd.device.statistics()["vms"] if v["vm"] == vm)
    out = guests.CTX.Queue()
    survivor = guests.run(guests.steady_guest, hostd.socket_path, "survivor", 3.0, out)
    time.sleep(0.5)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    name, ok, bad = out.get(timeout=60)
    survivor.join(10)
    assert (name, bad) == ("survivor", 0) and ok > 10
    wait_until(lambda: hostd.device.statistics()["guests"] == 0, what="victim reclaimed")
    wait_until(lambda: not Path(f"/proc/{worker_pid}").exists() or _zombie(worker_pid), what="worker gone")
    assert all(not c["busy"] for c in hostd.device.statistics()["channels"])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_worker_crash_fails_task_and_respawns(make_hostd: Callable[..., Hostd]) -> None:
    from codec_backend.engine import CRASH_MARKER

    h = make_hostd(fault_injection=True)
    with guestlib.attach(h.socket_path, name="crashy") as dev, guestlib.attach(h.socket_path, name="calm") as other:
        assert dev.nop().wait() is None
        pid0 = next(v["worker_pid"] for v in h.device.statistics()["vms"] if v["name"] == "crashy")
        bomb = dev.put(CRASH_MARKER + bytes(100))
        with pytest.raises(guestlib.DeviceError) as ei:
            dev.crc32(bomb).wait(timeout=30)
        assert ei.value.code == ErrorCode.WORKER_CRASHED
        assert other.crc32(other.put(b"still here")).wait() == zlib.crc32(b"still here")
        assert dev.crc32(dev.put(b"again")).wait(timeout=30) == zlib.crc32(b"again")
        vm = next(v for v in h.device.statistics()["vms"] if v["name"] == "crashy")
        assert vm["worker_pid"] != pid0 and vm["worker_restarts"] == 1
        assert vm["errors"] == {"WORKER_CRASHED": 1}


def test_named_region_opt_in(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(named_regions=True)
    with guestlib.attach(h.socket_path, name="named", named=True) as dev:
        assert dev.shm_name and dev.shm_name.startswith("/vmediad-") and len(dev.shm_name) == 9 + 32
        path = Path("/dev/shm") / dev.shm_name[1:]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert dev.crc32(dev.put(b"named")).wait() == zlib.crc32(b"named")
    wait_until(lambda: not path.exists(), what="named region unlinked")


def test_named_region_refused_unless_enabled(hostd: Hostd) -> None:
    with pytest.raises(guestlib.AttachError) as ei:
        guestlib.attach(hostd.socket_path, name="x", named=True)
    assert ei.value.kind == "limit"


def test_attach_limits_enforced(make_hostd: Callable[..., Hostd]) -> None:
    h = make_hostd(region_max=16 << 20)
    with pytest.raises(guestlib.AttachError, match="region_size"):
        guestlib.attach(h.socket_path, region_size=32 << 20)
    with pytest.raises(guestlib.AttachError, match="ring_entries"):
        guestlib.attach(h.socket_path, ring_entries=100)


def test_memfd_region_is_sealed_and_socket_private(hostd: Hostd) -> None:
    import fcntl

    mode = stat.S_IMODE(os.stat(hostd.socket_path).st_mode)
    assert mode == 0o660
    with guestlib.attach(hostd.socket_path, name="seal") as dev:
        seals = fcntl.fcntl(dev.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(dev.fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(dev.fd, dev.layout.region_size * 2)
        assert dev.nop().wait() is None


def test_peer_outside_allowed_uids_is_refused(make_hostd: Callable[..., Hostd]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as another uid")
    h = make_hostd(socket_mode=0o666)
    os.chmod(Path(h.socket_path).parent, 0o755)
    # SO_PEERCRED records the credentials at connect(): a forked child drops to
    # nobody first, then connects and asks to attach.
    def attach_request() -> bytes:
        import socket as s

        c = s.socket(s.AF_UNIX, s.SOCK_STREAM)
        c.connect(h.socket_path)
        c.sendall(b'{"cmd":"attach","name":"intruder"}\n')
        return c.recv(4096)

    reply = guests.as_nobody(attach_request)
    import json

    answer = json.loads(reply)
    assert answer["ok"] is False and answer["kind"] == "permission"
    assert h.control.refused == 1


def test_register_page_published(hostd: Hostd) -> None:
    with guestlib.attach(hostd.socket_path, name="regs", region_size=2 << 20, ring_entries=64) as dev:
        page = bytes(dev.region.mem[: abi.PAGE_SIZE])
        assert struct.unpack_from("<II", page, 0) == (abi.MAGIC, abi.ABI_VERSION)
        assert abi.layout_from_registers(page) == abi.compute_layout(2 << 20, 64)
        assert struct.unpack_from("<I", page, abi.REG_VM_ID)[0] == dev.vm_id
        assert struct.unpack_from("<Q", page, abi.REG_EPOCH)[0] == hostd.device.epoch
        assert struct.unpack_from("<I", page, abi.REG_DEVICE_STATE)[0] == abi.DeviceState.RUNNING
        irq = dev.region.load64(abi.REG_IRQ_COUNT)
        dev.nop().wait()
        assert dev.region.load64(abi.REG_IRQ_COUNT) == irq + 1
        hb = dev.region.load64(abi.REG_HEARTBEAT)
        wait_until(lambda: dev.region.load64(abi.REG_HEARTBEAT) > hb, what="heartbeat", timeout=3)


def test_sigterm_ends_inflight_tasks_and_guests_see_device_go(short_tmp: Path) -> None:
    sock = short_tmp / "t.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vmediad", "hostd", "--socket", str(sock),
                             "--channels", "1"], stderr=subprocess.PIPE)
    try:
        wait_until(sock.exists, 30, "hostd socket")
        dev = guestlib.attach(str(sock), name="term", auto_reattach=False)
        big = dev.put(bytes(32 << 20))
        done = dev.crc32(big)
        done.wait(timeout=30)
        # Forced: the worker is stopped, so the tasks below are queued or in flight when SIGTERM
        # arrives; hostd must fail them (after its grace) rather than drop them.
        worker = guestlib.hostd_status(str(sock))["vms"][0]["worker_pid"]
        os.kill(worker, signal.SIGSTOP)
        wait_until(lambda: all_threads_stopped(worker), what="the worker to stop")  # the stop lands later
        tasks = [done, *(dev.crc32(big) for _ in range(19))]
        proc.send_signal(signal.SIGTERM)
        outcomes = []
        for t in tasks:
            try:
                outcomes.append(t.wait(timeout=30))
            except guestlib.DeviceGone:
                outcomes.append("gone")
        assert proc.wait(30) == 0
        want = zlib.crc32(bytes(32 << 20))
        assert outcomes == [want] + ["gone"] * 19  # queued work did not silently vanish: it was failed
        assert dev.region.load32(abi.REG_DEVICE_STATE) == abi.DeviceState.GONE
        dev.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
