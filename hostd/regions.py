"""Guest regions and the channel register bank: creation and mapping (an edge module)."""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import struct
from dataclasses import dataclass

import posix_ipc

from vmediad import abi
from vmediad.shm import MappedRegion, create_memfd

# An adopted region must have exactly the seals hostd gives its own: no resize (a
# shrunk region would SIGBUS hostd), the seal set frozen, and no write seal (the
# respawned worker could not map it, and would die and be respawned forever).
_SEALS_NEEDED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SEALS_REFUSED = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)


@dataclass
class Region:
    """One guest's region as hostd holds it."""

    fd: int
    mapped: MappedRegion
    layout: abi.Layout
    name: str | None  # posix_ipc name when the guest opted into a named region

    def close(self) -> None:
        try:
            self.mapped.close()
        except BufferError:
            # A view (numpy, memoryview slice) is still alive; the mapping goes with it.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass
            self.name = None


def create_region(vm_id: int, size: int, ring_entries: int, caps: int, epoch: int,
                  named: bool = False) -> Region:
    """A fresh region with its register page written; MAGIC is stored last."""
    layout = abi.compute_layout(size, ring_entries)
    name: str | None = None
    if named:
        # 128 random bits: the name is unguessable; O_EXCL + 0600 keep others out.
        name = "/vmediad-" + secrets.token_hex(16)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        fd = shm.fd
    else:
        fd = create_memfd(f"vmediad-vm{vm_id}", size)
        _private(fd)
    try:
        mapped = MappedRegion(fd, size, populate=True)
    except BaseException:
        os.close(fd)
        if name:
            posix_ipc.unlink_shared_memory(name)
        raise
    init_registers(mapped, layout, vm_id, caps, epoch)
    return Region(fd, mapped, layout, name)


def init_registers(mapped: MappedRegion, layout: abi.Layout, vm_id: int, caps: int, epoch: int) -> None:
    for off, fmt, value in abi.register_page_init(layout, vm_id, caps):
        if off == abi.REG_MAGIC:
            mapped.store64(abi.REG_EPOCH, epoch)
            mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.RUNNING)
            mapped.store32(off, value)
        else:
            struct.pack_into(fmt, mapped.mem, off, value)


def _private(fd: int) -> None:
    """A memfd is created 0777; its fd is the only way in, but /proc/<pid>/fd/N re-opens
    check the inode mode too: nobody but hostd's uid (and root) may open it there."""
    os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)


def adopt_region(fd: int, vm_id: int, caps: int, epoch: int, *, sizes: tuple[int, int],
                 rings: tuple[int, int]) -> Region:
    """Re-adopt a region a guest kept across a hostd restart (it passes the fd back).

    Only a memfd sealed exactly as hostd seals its own is accepted: its size cannot
    change under us.  The layout is recomputed from the guest-supplied registers,
    checked against the fd size and held to the attach limits ``sizes`` and ``rings``
    (inclusive ranges).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("region fd is not a memfd") from None
    if seals & _SEALS_NEEDED != _SEALS_NEEDED or seals & _SEALS_REFUSED:
        raise ValueError(f"region fd seals {seals:#x}: need shrink, grow and seal, and no write seal")
    size = os.fstat(fd).st_size
    if not sizes[0] <= size <= sizes[1]:
        raise ValueError(f"region size {size} outside [{sizes[0]}, {sizes[1]}]")
    mapped = MappedRegion(fd, size)
    try:
        layout = abi.layout_from_registers(bytes(mapped.mem[: abi.PAGE_SIZE]))
        if layout.region_size != size:
            raise ValueError("registered size differs from the fd size")
        if not rings[0] <= layout.ring_entries <= rings[1]:
            raise ValueError(f"ring_entries {layout.ring_entries} outside [{rings[0]}, {rings[1]}]")
    except (abi.LayoutError, ValueError):
        mapped.close()
        raise
    struct.pack_into("<I", mapped.mem, abi.REG_VM_ID, vm_id)
    struct.pack_into("<Q", mapped.mem, abi.REG_CAPS, caps)
    mapped.store64(abi.REG_EPOCH, epoch)
    mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.RUNNING)
    return Region(fd, mapped, layout, None)


def create_bank(channels: int) -> tuple[int, MappedRegion]:
    """hostd's private register bank: K channel register files plus worker mailboxes."""
    size = abi.bank_size(channels)
    fd = create_memfd("vmediad-bank", size)
    _private(fd)
    bank = MappedRegion(fd, size, populate=True)
    # Before any worker exists: a worker refuses a bank of another host-internal version.
    bank.store32(abi.BANK_VERSION, abi.BANK_ABI_VERSION)
    return fd, bank
