"""guestlib inside a QEMU VM: the region is the ivshmem device's BAR2, the doorbell BAR0's.

``guestlib.attach()`` uses this transport by itself when it runs inside a VM that has the
ivshmem device (PCI 1af4:1110) and no control socket is reachable; the public API is that of
``guestlib.device.Device``.  hostd attached this VM when its QEMU connected (hostd/ivshmem.py):
name, region size and ring are hostd's, and what a guest asks for is ignored.

Submitting is the process transport's path up to the doorbell: descriptor, status, SQ entry,
SQ_TAIL (release), REG_DOORBELL = KICK (seq-cst exchange).  Then, instead of a futex wake (which
cannot cross the VM boundary), the guest writes BAR0's Doorbell register, only if hostd
published NEED_WAKEUP: QEMU traps the 4-byte MMIO write and signals hostd's eventfd.  The
exchange orders the KICK store before the NEED_WAKEUP load; hostd stores NEED_WAKEUP, fences and
re-reads REG_DOORBELL before it sleeps, so one side always sees the other.

Waiting polls the slot's status word: spin, then yield, then sleep in growing steps up to
POLL_MAX_SLEEP_S.  hostd's heartbeat is in hostd's clock, not this VM's: liveness is "the
heartbeat word changed within LIVENESS_S of guest time".

One guestlib Device per VM at a time: the region, its ring and its heap are the VM's, not a
process's.  A second attach in the same VM (any process) is refused (AttachError kind "busy")
while the first is open: an exclusive flock on BAR0's resource file.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Any

from guestlib.device import AttachError, Completion, Device, DeviceGone, Task
from guestlib.heap import Heap
from guestlib.tasks import read_completion, sleep_slice
from vmediad import abi, ivshmem
from vmediad.abi import Doorbell, Status
from vmediad.shm import MappedRegion, monotonic_ns

PCI_DEVICES = Path("/sys/bus/pci/devices")
IGB_UIO = "/sys/bus/pci/drivers/igb_uio"
IRQ_POLL_S = 0.25  # the interrupt dispatcher notices close() this often  # loaded with intr_mode=msix by the VM's /init
LIVENESS_S = 3.0
# A VM's waiter spins this many pause-loads on its status word before it yields and then sleeps:
# a vCPU spinning costs only its own VM, and measured under TCG a long spin took the NOP round
# trip's p99 from ~4.6 ms (spin 200, yield, sleep) to ~0.9 ms.
POLL_SPINS = 200_000
POLL_YIELDS = 200  # sched_yield() rounds after the spin, before sleeping
POLL_MAX_SLEEP_S = 0.001
_KICK_VALUE = ivshmem.doorbell_value(ivshmem.SERVER_PEER_ID, ivshmem.HOST_VECTOR_KICK)


def find_device(root: Path = PCI_DEVICES) -> Path | None:
    """The sysfs directory of the first ivshmem device (1af4:1110), else None."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        p = root / name
        try:
            ids = (int((p / "vendor").read_text(), 16), int((p / "device").read_text(), 16))
        except (OSError, ValueError):
            continue
        if ids == (ivshmem.PCI_VENDOR_ID, ivshmem.PCI_DEVICE_ID):
            return p
    return None


class IvshmemDevice(Device):
    """An attached VM guest: BAR2 is the region, BAR0's Doorbell register rings hostd."""

    def __init__(self, pci: Path, name: str | None = None, *, spins: int = POLL_SPINS, interrupts: bool | None = None,
                 **_ignored: Any) -> None:
        # Device.__init__ is not called: it attaches over the control socket.  Every attribute
        # the shared submit/wait/heap code reads is set here.
        self.pci = pci
        self.socket_path = ""
        self.poll_only = True
        self.auto_reattach = False
        self.reattach_window_s = 0.0
        self._gone: str | None = None
        self.spins = spins
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._in_wait = 0
        self._closed = False
        self.wakeups = 0
        self.spurious_wakeups = 0
        self.syscalls_doorbell = 0  # here: Doorbell register writes (VM exits)
        self.reattaches = 0
        self.shm_name = None
        self.channels = 0
        try:
            (pci / "enable").write_text("1")  # memory decoding on, with no driver bound
        except OSError:
            pass  # already enabled by a driver
        try:
            self._bar0_fd = os.open(pci / "resource0", os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError as e:
            raise AttachError(f"cannot open the ivshmem device's BAR0 ({pci}/resource0): {e.strerror}",
                              "permission") from None
        try:
            # One Device per VM: the region's ring, slots and heap are the VM's, and two users of
            # them would corrupt each other.  The lock goes with the open file (close or exit).
            fcntl.flock(self._bar0_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._bar0_fd)
            raise AttachError(f"another guestlib Device of this VM uses the ivshmem device ({pci}); one per VM",
                              "busy") from None
        self._bar0 = mmap.mmap(self._bar0_fd, ivshmem.BAR0_SIZE)
        # 32-bit accesses only: QEMU's registers take 4-byte writes (a narrower one rings wrong).
        self._regs = memoryview(self._bar0).cast("I")
        self.fd = os.open(pci / "resource2", os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        self.region = MappedRegion(self.fd, size)
        try:
            if self.region.load32(abi.REG_MAGIC) != abi.MAGIC:
                raise AttachError("the ivshmem region holds no vmediad register page (is hostd the server?)")
            if not self.region.load64(abi.REG_CAPS) & ivshmem.CAP_IVSHMEM:
                raise AttachError("the region is not served as an ivshmem region")
            self.layout = abi.layout_from_registers(bytes(self.region.mem[: abi.PAGE_SIZE]))
            if self.layout.region_size != size:
                raise AttachError(f"region registers say {self.layout.region_size} bytes, BAR2 has {size}")
        except (AttachError, abi.LayoutError) as e:
            self._unmap()
            raise AttachError(str(e)) from None
        self.vm_id = self.region.load32(abi.REG_VM_ID)
        self.epoch = self.region.load64(abi.REG_EPOCH)
        self.name = name or f"vm{self.vm_id}"
        self.iv_position = self._regs[ivshmem.REG_IV_POSITION // 4]
        self.heap = Heap(self.layout.heap_offset, self.layout.heap_size)
        self._free_slots = list(range(self.layout.ring_entries))[::-1]
        self._tail = self.region.load32(abi.REG_SQ_TAIL)
        self._hb_seen = self.region.load64(abi.REG_HEARTBEAT)
        self._hb_changed_ns = monotonic_ns()
        # Interrupt mode: after the BARs are mapped (a bound driver claims them, and a strict
        # /dev/mem kernel then refuses sysfs mappings; the ones made already stay valid).
        self.uio: str | None = None
        self._irq: _IrqDispatcher | None = None
        if interrupts or (interrupts is None and Path(IGB_UIO).is_dir()):
            self.uio = _bind_igb_uio(pci)
            if self.uio is None and interrupts:
                self._unmap()
                raise AttachError("interrupts asked for, but igb_uio cannot drive the ivshmem device", "no_irq")
        if self.uio is not None:
            self._irq = _IrqDispatcher(self.uio, self.region, self._desc)
        # Completion mode: True waits for MSI-X (needs self.uio), False polls; may be switched
        # between tasks.
        self.interrupts = self.uio is not None

    # -- the doorbell ----------------------------------------------------------------------------
    def _ring(self) -> None:
        # Exchange is seq-cst: the NEED_WAKEUP load cannot pass the doorbell store.
        self.region.xchg32(abi.REG_DOORBELL, Doorbell.KICK)
        if self.region.load32(abi.REG_NEED_WAKEUP):
            self.syscalls_doorbell += 1
            self._regs[ivshmem.REG_DOORBELL // 4] = _KICK_VALUE  # one 4-byte MMIO store: a VM exit

    # -- completion ---------------------------------------------------------------------------
    def _wait_irq(self, reg: MappedRegion, at: int, task: Task, deadline: int | None) -> int:
        """Interrupt mode: register, D_WAITERS += 1 (seq-cst), re-check, then wait: as the
        leader on the completion vector, or as a follower on this slot's own event.

        hostd flips the status (seq-cst exchange), then reads D_WAITERS and, if set, raises
        the VM's completion vector: one side always sees the other.  A waiter registers before
        it raises D_WAITERS, so the interrupt its completion raises finds it registered."""
        irq = self._irq
        assert irq is not None
        st_off = at + abi.D_STATUS
        woken = irq.register(task.slot)
        reg.fadd32(at + abi.D_WAITERS, 1)
        try:
            while (status := reg.load32(st_off)) == Status.SUBMITTED:
                self._raise_if_gone()
                slice_s = sleep_slice(deadline, task.slot)
                if irq.lead(task.slot, slice_s):  # read the vector until this slot completed
                    if reg.load32(st_off) != Status.SUBMITTED:
                        task.wakeups += 1
                        self.wakeups += 1
                    continue
                if woken.wait(slice_s):
                    woken.clear()
                else:
                    self._liveness()
                    continue
                if reg.load32(st_off) != Status.SUBMITTED:
                    task.wakeups += 1
                    self.wakeups += 1
        finally:
            reg.fadd32(at + abi.D_WAITERS, -1)
            irq.unregister(task.slot)
        return status

    def _wait_mapped(self, task: Task, timeout: float | None) -> Completion:
        reg = self.region
        at = self._desc(task.slot)
        st_off = at + abi.D_STATUS
        deadline = None if timeout is None else monotonic_ns() + int(timeout * 1e9)
        status = reg.spin32(st_off, Status.SUBMITTED, self.spins) if self.spins else reg.load32(st_off)
        if status == Status.SUBMITTED and self.interrupts:
            status = self._wait_irq(reg, at, task, deadline)
        rounds = 0
        pause = 20e-6
        while status == Status.SUBMITTED:
            rounds += 1
            if rounds < POLL_YIELDS:
                os.sched_yield()
            else:
                time.sleep(pause)
                pause = min(pause * 2, POLL_MAX_SLEEP_S)
                self._raise_if_gone()
                self._liveness()
                if deadline is not None and monotonic_ns() >= deadline:
                    raise TimeoutError(f"task in slot {task.slot} not done within {timeout}s")
            status = reg.load32(st_off)
        c = read_completion(reg.mem, at, status)
        reg.store32(st_off, Status.FREE)
        return c

    def _liveness(self) -> None:
        if self.region.load32(abi.REG_DEVICE_STATE) == abi.DeviceState.GONE:
            raise DeviceGone("hostd detached this VM")
        hb = self.region.load64(abi.REG_HEARTBEAT)
        now = monotonic_ns()
        if hb != self._hb_seen:
            self._hb_seen, self._hb_changed_ns = hb, now
        elif now - self._hb_changed_ns > LIVENESS_S * 1e9:
            raise DeviceGone("hostd heartbeat stopped")

    def _wake_waiters(self) -> None:
        pass  # waiters poll and re-check _gone/_closed themselves

    # -- control plane: none inside a VM ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"transport": "ivshmem", "completions": "interrupt" if self.interrupts else "poll",
                "vm": self.vm_id, "name": self.name, "pci": str(self.pci),
                "iv_position": self.iv_position, "region_size": self.layout.region_size,
                "ring_entries": self.layout.ring_entries}

    def statistics(self) -> dict[str, Any]:
        return {**super().statistics(), "transport": "ivshmem"}

    def close(self) -> None:
        """Stop using the region (hostd keeps the VM attached until QEMU exits)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._in_wait:
                self._slot_free.wait_for(lambda: not self._in_wait, 2.0)
            unmap = not self._in_wait
            self._slot_free.notify_all()
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        irq = getattr(self, "_irq", None)
        if irq is not None:
            irq.close()
        try:
            self.region.close()
        except BufferError:
            pass  # views handed to the caller keep the mapping alive until collected
        self._regs.release()
        self._bar0.close()
        os.close(self._bar0_fd)
        os.close(self.fd)


class _IrqDispatcher:
    """The VM's completion vector, read by one waiter at a time that wakes only the others
    whose task completed (leader/followers).

    igb_uio gives user space one MSI-X vector per device (``/dev/uioN``), so every completion
    hostd signals to this VM arrives there.  One waiting thread, the leader, blocks on it; on
    each interrupt it sets the event of every registered slot whose status left SUBMITTED, so
    a thread waiting for another task sleeps on.  A lone waiter is always the leader: it
    blocks on the vector itself, with no thread in between.  A leader whose own task ended
    hands the lead to one waiter still waiting (the one wake that is not a completion:
    counted in ``handoffs``)."""

    def __init__(self, uio: str, region: MappedRegion, desc: Any) -> None:
        self._fd = os.open(f"/dev/{uio}", os.O_RDWR | os.O_CLOEXEC)
        self._region = region
        self._desc = desc
        self._lock = threading.Lock()
        self._lead = threading.Lock()
        self._waiters: dict[int, threading.Event] = {}
        self.interrupts = 0
        self.handoffs = 0

    def register(self, slot: int) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._waiters[slot] = ev
        return ev

    def unregister(self, slot: int) -> None:
        with self._lock:
            self._waiters.pop(slot, None)

    def _done(self, slot: int) -> bool:
        return self._region.load32(self._desc(slot) + abi.D_STATUS) != Status.SUBMITTED

    def lead(self, slot: int, slice_s: float) -> bool:
        """Become the leader and read the vector until ``slot`` completed or ``slice_s``
        passed; False if another thread leads (wait on your event then)."""
        if not self._lead.acquire(blocking=False):
            return False
        try:
            deadline = time.monotonic() + slice_s
            while not self._done(slot):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                    break
                os.read(self._fd, 4)  # the interrupt count; reading it re-arms the wait
                self.interrupts += 1
                with self._lock:
                    others = [(s, ev) for s, ev in self._waiters.items() if s != slot]
                for s, ev in others:
                    if self._done(s):
                        ev.set()
        finally:
            self._lead.release()
            with self._lock:
                waiting = [ev for s, ev in self._waiters.items() if s != slot and not self._done(s)]
            if waiting:
                self.handoffs += 1
                waiting[0].set()  # someone must read the vector now: it becomes the leader
        return True

    def close(self) -> None:
        os.close(self._fd)


def _bind_igb_uio(pci: Path) -> str | None:
    """Bind igb_uio (MSI-X mode) to the device and unmask its vector; the uio name, else None."""
    drv = Path(IGB_UIO)
    try:
        if not (pci / "driver").exists():
            try:
                (drv / "new_id").write_text(f"{ivshmem.PCI_VENDOR_ID:04x} {ivshmem.PCI_DEVICE_ID:04x}")
            except FileExistsError:
                (drv / "bind").write_text(pci.name)  # the id is known already: bind this device
        elif (pci / "driver").resolve().name != "igb_uio":
            return None
        uio = sorted(os.listdir(pci / "uio"))[0]
        fd = os.open(f"/dev/{uio}", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.write(fd, struct.pack("<I", 1))  # unmask (and enable) the MSI-X vector
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return None
    return uio


def attach(name: str | None = None, **kw: Any) -> IvshmemDevice:
    """Attach through the VM's ivshmem device; AttachError when there is none."""
    pci = find_device()
    if pci is None:
        raise AttachError("no ivshmem device (1af4:1110) in this VM", "no_device")
    return IvshmemDevice(pci, name, **kw)
