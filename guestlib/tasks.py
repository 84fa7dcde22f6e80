"""What a guest holds of the device between calls: buffers, tasks, their completions, errors.

``Device`` (guestlib/device.py) hands these out; they reach the region through it.  A task's
result fields are read only once its status word left SUBMITTED (see ``read_completion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vmediad import abi
from vmediad.abi import ErrorCode, Op, Status
from vmediad.errors import ClientError
from vmediad.shm import monotonic_ns

if TYPE_CHECKING:
    from guestlib.device import Device

SLEEP_SLICE_S = 0.5  # a waiter re-checks whether hostd is gone at least this often


class DeviceError(ClientError):
    """A task ended with an ERROR status (``code``) or the device refused a request."""

    def __init__(self, code: ErrorCode, message: str = "", result_len: int = 0) -> None:
        super().__init__(message or f"device error {code.name}")
        self.code = code
        self.result_len = result_len


class DeviceGone(DeviceError):
    def __init__(self, message: str = "hostd is gone") -> None:
        super().__init__(ErrorCode.DEVICE_GONE, message)


class SessionLost(DeviceError):
    def __init__(self, message: str = "session lost (worker crash or hostd restart)") -> None:
        super().__init__(ErrorCode.SESSION_LOST, message)


class AttachError(ClientError):
    """hostd refused the attach (``kind`` says why: permission, limit, ...)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Completion:
    status: Status
    result: int
    result_len: int
    error: ErrorCode
    channel: int
    device_ns: int
    seq: int


def sleep_slice(deadline: int | None, slot: int) -> float:
    """How long a waiter may sleep next: SLEEP_SLICE_S, or less before ``deadline`` (monotonic
    ns); TimeoutError once it has passed."""
    if deadline is None:
        return SLEEP_SLICE_S
    left = (deadline - monotonic_ns()) / 1e9
    if left <= 0:
        raise TimeoutError(f"task in slot {slot} not done in time")
    return min(SLEEP_SLICE_S, left)


def read_completion(mem: memoryview, at: int, status: int) -> Completion:
    """The result fields of the descriptor at ``at`` (abi.DescResult), read once ``status``
    left SUBMITTED: hostd wrote them before its seq-cst flip of the status word."""
    r = abi.DescResult.unpack_from(mem, at + abi.D_RESULT)
    code = ErrorCode(r.error) if r.error in ErrorCode._value2member_map_ else ErrorCode.BACKEND
    return Completion(Status(status), r.result, r.result_len, code, r.channel, r.device_ns, r.seq)


class Buffer:
    """A block of the region's heap: ``mem`` writes go straight to shared memory."""

    def __init__(self, dev: Device, offset: int, size: int) -> None:
        self.device = dev
        self.offset = offset
        self.size = size
        self.mem: memoryview = dev.region.mem[offset : offset + size]

    def array(self, dtype: npt.DTypeLike = np.uint8, shape: tuple[int, ...] | int | None = None) -> npt.NDArray[Any]:
        """A zero-copy numpy view of the buffer."""
        a = np.frombuffer(self.mem, dtype=dtype)
        return a if shape is None else a[: int(np.prod(shape))].reshape(shape)

    def release(self) -> None:
        self.mem.release()

    def __repr__(self) -> str:
        return f"Buffer(offset={self.offset:#x}, size={self.size})"


class Task:
    """One submitted descriptor.  ``wait()`` returns its result and frees the slot."""

    __slots__ = ("_done", "_value", "device", "op", "slot", "wakeups")

    def __init__(self, dev: Device, slot: int, op: Op) -> None:
        self.device = dev
        self.slot = slot
        self.op = op
        self.wakeups = 0  # futex wakeups this task's waiter received
        self._done: Completion | None = None
        self._value: Any = None

    def completion(self, timeout: float | None = None) -> Completion:
        if self._done is None:
            self._done = self.device._wait(self, timeout)
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        c = self.completion(timeout)
        if c.status != Status.DONE:
            raise _error_for(c)
        if self.op == Op.CRC32:
            return c.result
        if self.op in (Op.NOP, Op.COPY):
            return None
        return c

    def done(self) -> bool:
        if self._done is not None:
            return True
        return self.device.region.load32(self.device._desc(self.slot) + abi.D_STATUS) != Status.SUBMITTED


def _error_for(c: Completion) -> DeviceError:
    if c.error == ErrorCode.SESSION_LOST:
        return SessionLost()
    if c.error == ErrorCode.DEVICE_GONE:
        return DeviceGone("the device went away before the task ran")
    return DeviceError(c.error, f"task failed: {c.error.name}", c.result_len)


def _fields(d: abi.Descriptor) -> tuple[int, ...]:
    return (d.tag, d.opcode, d.flags, d.session, d.src_off, d.src_len, d.dst_off, d.dst_len,
            d.arg0, d.arg1, d.arg2, d.arg3)


class Batch:
    def __init__(self, dev: Device) -> None:
        self.device = dev
        self._pending: list[abi.Descriptor] = []
        self.tasks: list[Task] = []

    def add(self, op: Op, *, flags: int = 0, session: int = 0, src: tuple[int, int] = (0, 0),
            dst: tuple[int, int] = (0, 0), args: tuple[int, int, int, int] = (0, 0, 0, 0)) -> int:
        self._pending.append(abi.Descriptor(0, int(op), flags, session, *src, *dst, *args))
        return len(self._pending) - 1

    def nop(self) -> int:
        return self.add(Op.NOP)

    def copy(self, src: Buffer, dst: Buffer) -> int:
        return self.add(Op.COPY, src=(src.offset, src.size), dst=(dst.offset, dst.size))

    def crc32(self, buf: Buffer) -> int:
        return self.add(Op.CRC32, src=(buf.offset, buf.size))

    def submit(self) -> list[Task]:
        todo, self._pending = self._pending, []
        self.tasks += self.device.submit_many(todo)
        return self.tasks
