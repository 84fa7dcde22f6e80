"""A first-fit allocator for the guest's heap (pure: it hands out offsets, touches no memory)."""

from __future__ import annotations

import bisect

from vmediad import abi
from vmediad.abi import HEAP_ALIGN
from vmediad.errors import ClientError


class OutOfMemory(ClientError, MemoryError):
    """The guest's heap has no free block that large."""


class Heap:
    def __init__(self, offset: int, size: int, align: int = HEAP_ALIGN) -> None:
        self.offset = offset
        self.size = size
        self.align = align
        self._free: list[tuple[int, int]] = [(offset, size)]  # sorted (off, size), coalesced
        self._used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise ValueError("allocation size must be positive")
        need = abi.align(nbytes, self.align)
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    self._free.pop(i)
                else:
                    self._free[i] = (off + need, size - need)
                self._used[off] = need
                return off
        raise OutOfMemory(f"no {nbytes}-byte block free in the heap ({self.available()} bytes free)")

    def free(self, off: int) -> None:
        size = self._used.pop(off, None)
        if size is None:
            raise ValueError(f"offset {off:#x} is not an allocated block")
        i = bisect.bisect_left(self._free, (off, 0))
        self._free.insert(i, (off, size))
        if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:
            self._free[i] = (off, size + self._free[i + 1][1])
            self._free.pop(i + 1)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
            prev = self._free[i - 1]
            self._free[i - 1] = (prev[0], prev[1] + self._free[i][1])
            self._free.pop(i)

    def available(self) -> int:
        return sum(s for _, s in self._free)

    def allocated(self) -> int:
        return sum(self._used.values())
