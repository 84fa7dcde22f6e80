"""Mapped shared memory and the atomic/futex operations on its words (an edge module).

Every word the other side watches goes through these methods, never through
``struct.pack_into``: the C core gives acquire loads, release stores and
sequentially consistent read-modify-writes, and its futex waits release the GIL.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence

from vmediad._native._core import ffi, lib

EAGAIN = -errno.EAGAIN
ETIMEDOUT = -errno.ETIMEDOUT
EINTR = -errno.EINTR


def monotonic_ns() -> int:
    return int(lib.vm_monotonic_ns())


class MappedRegion:
    """An ``mmap`` of a shared fd plus the raw address of its first byte."""

    def __init__(self, fd: int, size: int, *, populate: bool = False) -> None:
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self.size = size
        self.mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self.mm)
        self._cbuf = ffi.from_buffer(self.mm)
        self.base = int(ffi.cast("uintptr_t", self._cbuf))

    def close(self) -> None:
        if self.mm.closed:
            return
        self.mem.release()
        ffi.release(self._cbuf)
        self.mm.close()

    @property
    def closed(self) -> bool:
        return self.mm.closed

    def _addr(self, off: int, width: int) -> int:
        # A wild offset here would be a segfault, not an exception: check it.
        if off < 0 or off + width > self.size or off % width:
            raise IndexError(f"word offset {off:#x} (width {width}) outside region of {self.size}")
        return self.base + off

    def load32(self, off: int) -> int:
        return int(lib.vm_load32(self._addr(off, 4)))

    def load64(self, off: int) -> int:
        return int(lib.vm_load64(self._addr(off, 8)))

    def store32(self, off: int, value: int) -> None:
        lib.vm_store32(self._addr(off, 4), value)

    def store64(self, off: int, value: int) -> None:
        lib.vm_store64(self._addr(off, 8), value)

    def xchg32(self, off: int, value: int) -> int:
        return int(lib.vm_xchg32(self._addr(off, 4), value))

    def cas32(self, off: int, expected: int, desired: int) -> int:
        return int(lib.vm_cas32(self._addr(off, 4), expected, desired))

    def fadd32(self, off: int, delta: int) -> int:
        return int(lib.vm_fadd32(self._addr(off, 4), delta & 0xFFFFFFFF))

    def fadd64(self, off: int, delta: int) -> int:
        return int(lib.vm_fadd64(self._addr(off, 8), delta))

    def spin32(self, off: int, unexpected: int, spins: int) -> int:
        return int(lib.vm_spin_wait32(self._addr(off, 4), unexpected, spins))

    def futex_wait(self, off: int, expected: int, timeout: float | None = None) -> int:
        """0 when woken, EAGAIN if the word already differs, ETIMEDOUT, EINTR."""
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        return int(lib.vm_futex_wait(self._addr(off, 4), expected, ns))

    def futex_wake(self, off: int, count: int = 0x7FFFFFFF) -> int:
        return int(lib.vm_futex_wake(self._addr(off, 4), count))

    def address(self, off: int) -> int:
        return self._addr(off, 4)

    # The NEED_WAKEUP handshake, used for every sleeper woken through a counter word:
    # the kicker bumps the word (seq-cst) and then loads the sleeper's flag; the sleeper
    # stores its flag, fences, and re-reads the word before it sleeps.  One of the two
    # sees the other's store, so a kick is never missed and costs no syscall while the
    # sleeper is awake.
    def kick(self, word: int, need_wakeup: int) -> None:
        """Bump ``word`` and futex-wake one sleeper on it only if it published ``need_wakeup``."""
        self.fadd32(word, 1)
        if self.load32(need_wakeup):
            self.futex_wake(word, 1)

    def sleep_on(self, word: int, need_wakeup: int, seen: int, timeout: float) -> None:
        """Sleep until ``word`` differs from ``seen`` (or ``timeout``), publishing ``need_wakeup``."""
        self.store32(need_wakeup, 1)
        fence()
        if self.load32(word) == seen:
            self.futex_wait(word, seen, timeout)
        self.store32(need_wakeup, 0)


def fence() -> None:
    lib.vm_fence()


def futex_waitv(words: Sequence[tuple[int, int]], timeout: float | None) -> int:
    """Sleep until one of ``(address, expected)`` words changes; see vm_futex_waitv."""
    n = len(words)
    addrs = ffi.new("uintptr_t[]", [a for a, _ in words])
    vals = ffi.new("uint32_t[]", [v for _, v in words])
    ns = -1 if timeout is None else max(0, int(timeout * 1e9))
    return int(lib.vm_futex_waitv(addrs, vals, n, ns))


def prefault(region: MappedRegion) -> None:
    """Touch every page so the first real write does not pay the page fault."""
    mm = region.mm
    page = mmap.PAGESIZE
    for off in range(0, region.size, page):
        mm[off] = 0


def create_memfd(name: str, size: int) -> int:
    """An anonymous region sealed against shrink and grow, so no peer can SIGBUS us."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def memfd_sealed(fd: int) -> bool:
    import fcntl

    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    need = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    return seals & need == need
