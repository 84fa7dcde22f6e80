"""The ivshmem transport: hostd is the ivshmem server of a QEMU VM, guestlib runs inside it.

Host-only tests play QEMU's side of the ivshmem-server protocol against an in-process hostd
(fast, no VM).  The VM tests share one TCG boot (module fixture): guestlib in the guest picks
the ivshmem transport by itself, runs NOP, CRC32 and a bit-exact decode of a conformance
stream; then, with the VM's worker SIGSTOPped so its next task is certainly in flight, the
guest submits one more task and QEMU is SIGKILLed.  hostd must reclaim the VM's region and
worker while a host-process guest attached all along keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import guestlib
from hostd.config import Config
from hostd.daemon import Hostd
from tests.conformance_util import conformance_dir, read_md5s
from tests.integration.test_hostd_gone import all_threads_stopped
from vmediad import abi, ivshmem
from vmediad.tools import vmimage
from vmediad.tools.qemu import Guest, write_run_script

STREAM = conformance_dir() / "64x64-I-P-B-P-high.h264"
READY_MARK = "vmediad-guest: python up"
PHASE1_MARK = "vmediad-guest: phase1 done"
SUBMITTED_MARK = "vmediad-guest: submitted"
HELD_MARK = "vmediad-guest: held"
BOOT_TIMEOUT = 60.0
VM_REGION = 32 << 20
REPO = Path(__file__).resolve().parents[2]
FUZZ_N = 300
CRC_DATA = bytes((i * 131 + 7) & 0xFF for i in range(1 << 16))


def _vm_skip_reason() -> str | None:
    if vmimage.qemu_binary() is None:
        return "qemu-system-x86_64 not installed (run scripts/setup-vm.sh as root)"
    if vmimage.find_kernel() is None:
        return "no /boot/vmlinuz-* with modules (run scripts/setup-vm.sh as root)"
    try:
        vmimage.find_busybox()
    except vmimage.VmImageError as e:
        return str(e)
    if not STREAM.is_file():
        return f"conformance stream {STREAM} missing"
    return None


needs_vm = pytest.mark.skipif(_vm_skip_reason() is not None, reason=_vm_skip_reason() or "")


def _hostd(d: Path, region: int = 8 << 20) -> Hostd:
    cfg = Config(socket=d / "h.sock", channels=2, region_default=region, spin_us=50, ivshmem_dir=str(d))
    h = Hostd(cfg)
    h.start()
    return h


def _request(path: str, req: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            assert data, "hostd closed the control connection"
            buf += data
    reply: dict[str, Any] = json.loads(buf.partition(b"\n")[0])
    return reply


def _vms(h: Hostd) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in h.device.statistics()["vms"]}


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _status_row(h: Hostd, name: str) -> list[str]:
    """The row `vmediad status` prints for guest ``name``."""
    from vmediad.tools.cli import status_tables

    vms = status_tables(h.device.statistics())[1]
    cells = [[str(c) for c in col.cells] for col in vms.columns]
    rows = [list(r) for r in zip(*cells, strict=True)]
    return next(r for r in rows if r[1] == name)


# --- host-only: a fake QEMU speaks the client side of the protocol --------------------------
@dataclass
class FakeQemu:
    sock: socket.socket
    setup: ivshmem.ClientSetup
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


def _fake_qemu(path: Path) -> FakeQemu:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    msgs = [ivshmem.recv_message(s) for _ in range(3 + 2 * ivshmem.VECTORS)]
    setup = ivshmem.parse_setup(msgs, ivshmem.VECTORS)
    fds = [setup.shm_fd, *setup.own_fds, *(fd for v in setup.peers.values() for fd in v)]
    return FakeQemu(s, setup, fds)


@pytest.fixture
def vm_hostd() -> Iterator[Hostd]:
    d = Path(tempfile.mkdtemp(prefix="vmd-iv-"))
    h = _hostd(d)
    try:
        yield h
    finally:
        h.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_vm_socket_request_creates_the_socket_and_refuses_bad_names(vm_hostd: Hostd) -> None:
    r = _request(vm_hostd.socket_path, {"cmd": "vm_socket", "name": "vm-a"})
    assert r["ok"] is True and r["path"] == vm_hostd.cfg.ivshmem_dir + "/vm-a.sock"
    assert r["region_size"] == 8 << 20
    assert Path(r["path"]).is_socket() and Path(r["path"]).stat().st_mode & 0o777 == 0o600
    again = _request(vm_hostd.socket_path, {"cmd": "vm_socket", "name": "vm-a"})
    assert again["path"] == r["path"]
    bad = _request(vm_hostd.socket_path, {"cmd": "vm_socket", "name": "../x"})
    assert bad["ok"] is False and bad["kind"] == "bad_request" and "name must be" in bad["error"]
    assert _request(vm_hostd.socket_path, {"cmd": "vm_socket"})["ok"] is False


def test_vm_socket_refused_without_ivshmem_dir(short_tmp: Path) -> None:
    with Hostd(Config(socket=short_tmp / "h.sock", channels=1, region_default=8 << 20)) as h:
        r = _request(h.socket_path, {"cmd": "vm_socket", "name": "vm-a"})
    assert r["ok"] is False and r["kind"] == "unsupported"


def test_fake_qemu_gets_a_sealed_region_with_hostd_identity_and_eof_reclaims(vm_hostd: Hostd) -> None:
    assert vm_hostd.ivshmem is not None
    path = vm_hostd.ivshmem.listen("vm-b")
    q = _fake_qemu(path)
    try:
        assert q.setup.version == 0 and q.setup.client_id == ivshmem.CLIENT_PEER_ID
        assert list(q.setup.peers) == [ivshmem.SERVER_PEER_ID]  # only hostd: no other VM to ring
        assert len(q.setup.own_fds) == ivshmem.VECTORS
        import fcntl
        import mmap

        seals = fcntl.fcntl(q.setup.shm_fd, fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK) == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        assert os.fstat(q.setup.shm_fd).st_size == 8 << 20
        region = mmap.mmap(q.setup.shm_fd, 8 << 20)
        page = bytes(region[: abi.PAGE_SIZE])
        region.close()
        assert int.from_bytes(page[abi.REG_MAGIC:abi.REG_MAGIC + 4], "little") == abi.MAGIC
        caps = int.from_bytes(page[abi.REG_CAPS:abi.REG_CAPS + 8], "little")
        assert caps & ivshmem.CAP_IVSHMEM and not caps & abi.Caps.FUTEX
        v = _vms(vm_hostd)["vm-b"]
        assert (v["kind"], v["transport"], v["pid"]) == ("qemu", "ivshmem", os.getpid())
        assert int.from_bytes(page[abi.REG_VM_ID:abi.REG_VM_ID + 4], "little") == v["vm"]
        worker = v["worker_pid"]
        assert worker and Path(f"/proc/{worker}").exists()
        assert _status_row(vm_hostd, "vm-b")[2:4] == ["qemu", "ivshmem"]  # `vmediad status`'s table
        # A second QEMU on the same socket is closed at once: one VM, one region.
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s2.settimeout(5)
        s2.connect(str(path))
        assert s2.recv(8) == b""
        s2.close()
        assert vm_hostd.ivshmem.refused == 1
    finally:
        q.close()
    # QEMU's socket closing is the VM's death: region, worker and slot reclaimed.
    _wait_for(lambda: "vm-b" not in _vms(vm_hostd), 5, "the VM's reclaim")
    _wait_for(lambda: not Path(f"/proc/{worker}").exists(), 5, "the worker's exit")
    assert [d["name"] for d in vm_hostd.device.statistics()["departed"]] == ["vm-b"]
    # The socket stays: a restarted QEMU attaches afresh.
    q = _fake_qemu(path)
    q.close()
    # Counted by hostd's ivshmem thread once the setup is sent, which may be after we read it.
    _wait_for(lambda: vm_hostd.ivshmem.statistics()["vms"][0]["connects"] == 2, 5, "the second connect")


def test_eventfd_doorbell_wakes_a_sleeping_hostd(vm_hostd: Hostd, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KICK stored in REG_DOORBELL wakes no sleeping hostd by itself (no futex crosses into a
    VM); the Doorbell write (here: the host eventfd QEMU signals for it) does, at once."""
    assert vm_hostd.ivshmem is not None
    # hostd's idle sleep is bounded by HEARTBEAT_PERIOD_S / 2: lengthen it so that only a wake
    # can end it within this test (the in-process device thread reads it at every sleep).
    monkeypatch.setattr(abi, "HEARTBEAT_PERIOD_S", 20.0)
    q = _fake_qemu(vm_hostd.ivshmem.listen("vm-c"))
    try:
        from vmediad.shm import MappedRegion

        reg = MappedRegion(q.setup.shm_fd, 8 << 20)
        layout = abi.layout_from_registers(bytes(reg.mem[: abi.PAGE_SIZE]))
        buf = layout.heap_offset
        reg.mem[buf:buf + len(CRC_DATA)] = CRC_DATA
        time.sleep(0.6)  # a sleep begun with the old bound (0.25 s) ends; the next uses 10 s
        _wait_for(lambda: reg.load32(abi.REG_NEED_WAKEUP) == 1, 5, "hostd asleep")
        slot = 0
        at = layout.desc(slot)
        abi.DESC_INPUT.pack_into(reg.mem, at + abi.D_INPUT, 7, int(abi.Op.CRC32), 0, 0, buf, len(CRC_DATA),
                                 0, 0, 0, 0, 0, 0)
        reg.store32(at + abi.D_STATUS, abi.Status.SUBMITTED)
        reg.store32(layout.sq_entry(0), slot)
        reg.store32(abi.REG_SQ_TAIL, 1)
        reg.xchg32(abi.REG_DOORBELL, abi.Doorbell.KICK)
        time.sleep(0.3)
        assert reg.load32(at + abi.D_STATUS) == abi.Status.SUBMITTED  # hostd still asleep
        assert reg.load32(abi.REG_NEED_WAKEUP) == 1
        t0 = time.monotonic()
        os.eventfd_write(q.setup.peers[ivshmem.SERVER_PEER_ID][ivshmem.HOST_VECTOR_KICK], 1)
        _wait_for(lambda: reg.load32(at + abi.D_STATUS) != abi.Status.SUBMITTED, 5, "the completion")
        assert time.monotonic() - t0 < 2.0  # the wake, not the 10 s sleep timeout
        res = abi.DESC_RESULT.unpack_from(reg.mem, at + abi.D_RESULT)
        assert reg.load32(at + abi.D_STATUS) == abi.Status.DONE
        assert res[0] == zlib.crc32(CRC_DATA)
        assert vm_hostd.ivshmem.statistics()["vms"][0]["doorbells"] == 1
        reg.close()
    finally:
        q.close()


# --- a real VM -------------------------------------------------------------------------------
GUEST_SCRIPT = f'''
import sys
print("{READY_MARK}", flush=True)
import hashlib, json, os, time, zlib
import numpy as np
import guestlib
from guestlib.ivshmem import IvshmemDevice

share, stream = sys.argv[1], sys.argv[2]
res = {{}}
t0 = time.monotonic()
dev = guestlib.attach()
res["attach_s"] = time.monotonic() - t0
res["class"] = type(dev).__name__
res["vm"] = dev.vm_id
res["iv_position"] = dev.iv_position
res["uio"] = dev.uio
dev.nop().wait()
try:
    guestlib.attach()
    res["second_attach"] = "attached"
except guestlib.AttachError as e:
    res["second_attach"] = e.kind
data = bytes((i * 131 + 7) & 0xFF for i in range({len(CRC_DATA)}))
buf = dev.put(data)

def nops(n):
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        dev.nop().wait()
        lat.append(time.perf_counter_ns() - t)
    lat.sort()
    return [lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000]

dev.interrupts = False
res["poll_nop_us"] = nops(200)
res["poll_crcs"] = [dev.crc32(buf).wait() for _ in range(3)]
if dev.uio is not None:
    dev.interrupts, spins, dev.spins = True, dev.spins, 0  # every wait blocks on the vector
    w0 = dev.wakeups
    res["irq_nop_us"] = nops(200)
    res["irq_crcs"] = [dev.crc32(buf).wait() for _ in range(3)]
    res["irq_wakeups"] = dev.wakeups - w0
    # Waits that must block: the test holds the VM's worker (SIGSTOP) until both slots'
    # D_WAITERS are up, so only completion interrupts can end them, one per waiter.
    import threading
    open(share + "/hold", "w").close()
    while not os.path.exists(share + "/held"):
        time.sleep(0.01)
    held = [dev.crc32(buf), dev.crc32(buf)]
    print("{HELD_MARK}", *[t.slot for t in held], flush=True)
    crcs = [0, 0]
    def wait_held(i):
        crcs[i] = held[i].wait(30)
    th = [threading.Thread(target=wait_held, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    res["irq_held"] = {{"crcs": crcs, "wakeups": [t.wakeups for t in held]}}
    # Two threads wait at once, each for its own NOPs: the one vector's interrupts are
    # dispatched, so a waiter is woken only by its own task's completion.
    per_task = []
    def worker():
        for _ in range(150):
            t = dev.nop()
            t.wait()
            per_task.append(t.wakeups)
    th = [threading.Thread(target=worker) for _ in range(2)]
    i0, h0 = dev._irq.interrupts, dev._irq.handoffs
    for t in th:
        t.start()
    for t in th:
        t.join()
    res["irq_two_waiters"] = {{"tasks": len(per_task), "max_wakeups": max(per_task),
                              "woken": sum(per_task), "interrupts": dev._irq.interrupts - i0,
                              "handoffs": dev._irq.handoffs - h0}}
    dev.spins = spins
res["crc"] = dev.crc32(buf).wait()
res["crc_local"] = zlib.crc32(data)
md5s = []
raw = open(stream, "rb").read()
with dev.decoder("h264", parse=True) as dec:
    chunks = [raw[i:i + 4096] for i in range(0, len(raw), 4096)]
    for chunk in [*chunks, b""]:
        for f in (dec.decode(chunk) if chunk else dec.flush()):
            h = hashlib.md5()
            for p in f.planes:
                h.update(np.ascontiguousarray(p).tobytes())
            md5s.append(h.hexdigest())
res["md5s"] = md5s
res["doorbell_writes"] = dev.syscalls_doorbell
# The fuzzing suite's random descriptors and oracle, through this transport (last: they may
# write anywhere in the heap).
sys.path.insert(0, {str(REPO)!r})
import random
from tests.integration import test_fuzz as F
res["fuzz"] = F.fuzz_device(dev, random.Random(7), {FUZZ_N})
with open(share + "/result.json", "w") as f:
    json.dump(res, f)
print("{PHASE1_MARK}", flush=True)
go = share + "/go"
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
task = dev.crc32(buf)
print("{SUBMITTED_MARK}", task.slot, flush=True)
task.wait(60)
print("vmediad-guest: not killed", flush=True)
'''


def _hold_until_asleep(h: Hostd, share: Path, guest: Guest, stopped: list[int]) -> None:
    """Stop the VM's worker, let the guest submit two tasks, and resume the worker only once
    both slots' D_WAITERS are up: the guest's waits then end by interrupt, not by a re-check."""
    worker = int(_vms(h)["qvm"]["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    stopped.append(worker)
    _wait_for(lambda: all_threads_stopped(worker), 10, "the VM's worker to stop")
    (share / "held").touch()
    slots = [int(x) for x in guest.wait_line(HELD_MARK, 30).text.split()[-2:]]
    g = next(g for g in h.device.guests.values() if g.name == "qvm")
    reg, lay = g.region.mapped, g.region.layout
    _wait_for(lambda: all(reg.load32(lay.desc(s) + abi.D_WAITERS) > 0 for s in slots), 30,
              "both waiters to raise D_WAITERS")
    # Raised just before the guest's last status check: give it that check before resuming.
    time.sleep(0.2)
    assert all(reg.load32(lay.desc(s) + abi.D_STATUS) == abi.Status.SUBMITTED for s in slots)
    os.kill(worker, signal.SIGCONT)
    stopped.remove(worker)


@dataclass
class TransportRun:
    accel: str
    igb_uio: bool
    boot_s: float
    result: dict[str, Any]
    vm_entry: dict[str, Any]  # hostd's statistics entry for the VM while it ran
    qemu_pid: int
    worker_pid: int
    inflight_at_kill: int
    reclaimed_s: float
    worker_gone: bool
    vm_after_kill: bool
    departed: list[str]
    host_crc_after: int
    host_tasks_during: int
    console: str


@pytest.fixture(scope="module")
def vm_transport() -> Iterator[TransportRun]:
    d = Path(tempfile.mkdtemp(prefix="vmd-qt-"))
    share = d / "share"
    share.mkdir()
    h = _hostd(d, VM_REGION)  # a decoder takes 8 MiB of output space plus its input
    stopped: list[int] = []
    try:
        reply = _request(h.socket_path, {"cmd": "vm_socket", "name": "qvm"})
        assert reply["ok"], reply
        image = vmimage.build_image()
        accel = vmimage.detect_accel()
        (share / "guest.py").write_text(GUEST_SCRIPT)
        write_run_script(share, [sys.executable, str(share / "guest.py"), str(share), str(STREAM)],
                         cwd=Path.cwd())
        argv = vmimage.qemu_command(image, share, accel=accel, ivshmem_socket=Path(reply["path"]),
                                    vectors=ivshmem.VECTORS)
        with guestlib.attach(h.socket_path, name="hostproc") as host_dev, Guest(argv) as guest:
            try:
                boot = guest.wait_line(READY_MARK, BOOT_TIMEOUT)
                hbuf = host_dev.put(CRC_DATA)
                during = 0
                phase1 = None
                held = False
                while phase1 is None:  # the host guest works while the VM runs its tasks
                    assert host_dev.crc32(hbuf).wait(10) == zlib.crc32(CRC_DATA)
                    during += 1
                    if not held and (share / "hold").exists():
                        _hold_until_asleep(h, share, guest, stopped)
                        held = True
                    try:
                        phase1 = guest.wait_line(PHASE1_MARK, 0.05)
                    except TimeoutError:
                        pass
                result = json.loads((share / "result.json").read_text())
                vm = _vms(h)["qvm"]
                worker = int(vm["worker_pid"])
                # Force the interleaving: the VM's worker cannot claim or finish the next task.
                os.kill(worker, signal.SIGSTOP)
                stopped.append(worker)
                _wait_for(lambda: all_threads_stopped(worker), 10, "the VM's worker to stop")
                (share / "go").touch()
                guest.wait_line(SUBMITTED_MARK, 30)

                def in_flight() -> int:
                    v = _vms(h).get("qvm", {})
                    return int(v.get("inflight", 0)) + int(v.get("queue_depth", 0))

                _wait_for(lambda: in_flight() > 0, 10, "the VM's last task to reach hostd")
                inflight = in_flight()
                guest.kill()
                t_kill = time.monotonic()
                _wait_for(lambda: "qvm" not in _vms(h), 10, "the killed VM's reclaim")
                reclaimed = time.monotonic() - t_kill
                _wait_for(lambda: not Path(f"/proc/{worker}").exists(), 10, "the VM's worker exit")
                stats = h.device.statistics()
                host_crc = host_dev.crc32(hbuf).wait(10)
            except (TimeoutError, OSError) as e:
                pytest.fail(f"{e}\n{guest.describe()}")
            igb = any(Path(m).name.startswith("igb_uio.ko") for m in image.modules)
            run = TransportRun(accel.name, igb, boot.t, result, vm, guest.pid, worker, inflight, reclaimed,
                               not Path(f"/proc/{worker}").exists(), any(v["name"] == "qvm" for v in stats["vms"]),
                               [x["name"] for x in stats["departed"]], host_crc, during,
                               "\n".join(ln.text for ln in guest.lines))
        irq = result.get("irq_nop_us") or [0.0, 0.0]
        print(f"\nVM ({accel.name}): boot {run.boot_s:.2f} s; guestlib attach {result['attach_s'] * 1000:.1f} ms; "
              f"NOP round trip poll p50/p99 {result['poll_nop_us'][0]:.0f}/{result['poll_nop_us'][1]:.0f} us, "
              f"interrupt {irq[0]:.0f}/{irq[1]:.0f} us ({accel.name.upper()}); "
              f"reclaim after SIGKILL {reclaimed * 1000:.0f} ms")
        yield run
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        h.stop()
        shutil.rmtree(d, ignore_errors=True)


@needs_vm
def test_guestlib_in_a_vm_picks_ivshmem_and_runs_nop_crc_decode(vm_transport: TransportRun) -> None:
    r = vm_transport.result
    assert r["class"] == "IvshmemDevice", vm_transport.console
    assert r["iv_position"] == ivshmem.CLIENT_PEER_ID
    assert r["vm"] == vm_transport.vm_entry["vm"]
    assert r["crc"] == r["crc_local"] == zlib.crc32(CRC_DATA)  # checked on the host side too
    assert r["md5s"] == read_md5s(STREAM.with_name(STREAM.name + ".md5"))
    assert r["poll_crcs"] == [zlib.crc32(CRC_DATA)] * 3
    assert r["poll_nop_us"][0] > 0


@needs_vm
def test_completions_interrupt_the_vm_through_msix_where_igb_uio_is_bound(vm_transport: TransportRun) -> None:
    r = vm_transport.result
    if not vm_transport.igb_uio:
        assert r["uio"] is None and "irq_nop_us" not in r  # no driver: guests poll
        pytest.skip("igb_uio not built for the guest kernel (dpdk-kmods-dkms): poll mode only")
    assert r["uio"] is not None and r["uio"].startswith("uio")
    assert r["irq_crcs"] == [zlib.crc32(CRC_DATA)] * 3
    # 203 waits that never spun: each ended by the completion vector's interrupt, or found its
    # slot done at the re-check after raising D_WAITERS (how many of each depends on timing).
    assert 0 <= r["irq_wakeups"] <= 203
    # Forced: two threads asleep while the worker was held; each woken once, by interrupt.
    assert r["irq_held"] == {"crcs": [zlib.crc32(CRC_DATA)] * 2, "wakeups": [1, 1]}
    # Two threads waiting at once on the one vector: none woken more than once per task.
    two = r["irq_two_waiters"]
    assert two["tasks"] == 300 and two["max_wakeups"] <= 1
    # A wake comes from an interrupt: the leader's own, or handed on by it (one interrupt may
    # cover several completions, so there is no ratio to expect).
    assert two["woken"] == 0 or two["interrupts"] > 0


@needs_vm
def test_fuzzing_through_the_ivshmem_transport_gets_only_allowed_outcomes(vm_transport: TransportRun) -> None:
    f = vm_transport.result["fuzz"]
    assert f["nbad"] == 0, f["bad"]
    assert sum(f["outcomes"].values()) == FUZZ_N
    assert f["outcomes"].get("OK", 0) > 0 and len(f["outcomes"]) >= 4  # successes and several errors
    assert vm_transport.host_crc_after == zlib.crc32(CRC_DATA)  # hostd serves guests afterwards


@needs_vm
def test_vm_identity_and_limits_come_from_hostd(vm_transport: TransportRun) -> None:
    assert vm_transport.result["second_attach"] == "busy"  # one Device per VM
    v = vm_transport.vm_entry
    assert (v["name"], v["kind"], v["transport"]) == ("qvm", "qemu", "ivshmem")
    assert v["pid"] == vm_transport.qemu_pid  # SO_PEERCRED of QEMU's connection
    assert v["region_size"] == VM_REGION and v["ring_entries"] == 256
    assert v["tasks_done"] >= 203  # NOP x201, CRC32, and the decode's tasks


@needs_vm
def test_qemu_sigkilled_mid_task_is_reclaimed_and_others_go_on(vm_transport: TransportRun) -> None:
    run = vm_transport
    assert run.inflight_at_kill >= 1
    assert "vmediad-guest: not killed" not in run.console
    assert not run.vm_after_kill and "qvm" in run.departed
    assert run.worker_gone
    assert run.reclaimed_s < 5
    assert run.host_tasks_during >= 1 and run.host_crc_after == zlib.crc32(CRC_DATA)


@needs_vm
def test_vm_spawn_kind_qemu_encodes_inside_a_vm(short_tmp: Path) -> None:
    """`vmediad vm spawn --kind qemu` boots a VM that encodes through guestlib's ivshmem transport;
    the output lands in the host's output folder and stock ffprobe accepts it."""
    out = short_tmp / "out"
    h = _hostd(short_tmp, 32 << 20)
    try:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vmediad", "vm", "spawn", "--kind", "qemu", "--count", "1",
                            "--workload", "encode", "--size", "64x64", "--frames", "10", "--output", str(out),
                            "--socket", h.socket_path, "--json"],
                           capture_output=True, text=True, timeout=120, cwd=Path.cwd())
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)
        assert (r["name"], r["state"], r["frames"], r["kind"], r["errors"]) == ("vm0", "done", 10, "qemu", 0)
        assert "booting 1 QEMU VM(s) with " in p.stderr
        assert Path(r["output"]) == (out / "vm0.mp4").resolve()
        assert sorted(x.name for x in out.iterdir()) == ["vm0.mp4"]  # the VM's share is gone
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                                "-show_entries", "stream=codec_name,width,height,nb_read_frames", "-of", "csv=p=0",
                                str(out / "vm0.mp4")], capture_output=True, text=True, timeout=30)
        assert probe.stdout.strip() == "h264,64,64,10", probe.stderr
        assert h.device.statistics()["departed"][0]["kind"] == "qemu"
        print(f"\nvm spawn --kind qemu (1 VM, 10 frames 64x64): {took:.1f} s")
    finally:
        h.stop()


def test_vm_spawn_kind_qemu_needs_an_ivshmem_hostd(short_tmp: Path) -> None:
    with Hostd(Config(socket=short_tmp / "h.sock", channels=1, region_default=8 << 20)) as h:
        p = subprocess.run([sys.executable, "-m", "vmediad", "vm", "spawn", "--kind", "qemu", "--socket",
                            h.socket_path, "--output", str(short_tmp / "o")],
                           capture_output=True, text=True, timeout=60)
    if vmimage.qemu_binary() is None:
        assert p.returncode == 1 and "qemu-system-x86_64 is not installed" in p.stderr
        return
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == ("Error: hostd refused the VM socket: this hostd serves no VMs "
                                                 "(start it with --ivshmem-dir)")


@needs_vm
def test_bench_transport_qemu_measures_floors_and_both_completion_modes() -> None:
    from vmediad.tools.qemu import bench_transport

    res = bench_transport(100)
    assert res["n"] == 100 and res["accel"] == vmimage.detect_accel().name
    keys = ["floor_spin", "floor_doorbell", "nop_poll"]
    image = vmimage.build_image()
    if any(Path(m).name.startswith("igb_uio.ko") for m in image.modules):
        keys.append("nop_interrupt")
    assert [k for k in res if k.startswith(("floor_", "nop_"))] == keys
    for k in keys:
        assert 0 < res[k]["p50_us"] <= res[k]["p99_us"], (k, res[k])
    assert res["poll_vs_floor"] == round(res["nop_poll"]["p50_us"] / res["floor_doorbell"]["p50_us"], 2)
