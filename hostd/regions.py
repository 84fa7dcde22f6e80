"""Guest regions and the channel register bank: creation and mapping (an edge module)."""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass

import posix_ipc

from vmediad import abi
from vmediad.shm import MappedRegion, create_memfd, memfd_sealed


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


def adopt_region(fd: int, vm_id: int, caps: int, epoch: int) -> Region:
    """Re-adopt a region a guest kept across a hostd restart (it passes the fd back).

    Only a sealed memfd is accepted: its size cannot change under us.  The
    layout is recomputed from the guest-supplied registers and checked.
    """
    if not memfd_sealed(fd):
        raise ValueError("region fd is not a sealed memfd")
    size = os.fstat(fd).st_size
    mapped = MappedRegion(fd, size)
    try:
        layout = abi.layout_from_registers(bytes(mapped.mem[: abi.PAGE_SIZE]))
        if layout.region_size != size:
            raise ValueError("registered size differs from the fd size")
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
    return fd, MappedRegion(fd, size, populate=True)
