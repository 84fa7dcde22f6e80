"""guestlib: link this into a guest program to use the vmediad device.

>>> import guestlib
>>> with guestlib.attach(name="vm0") as dev:
...     buf = dev.put(b"hello")
...     crc = dev.crc32(buf).wait()
"""

from guestlib.device import (
    AttachError,
    Batch,
    Buffer,
    Completion,
    Device,
    DeviceError,
    DeviceGone,
    OutOfMemory,
    SessionLost,
    Task,
    attach,
    hostd_status,
)
from vmediad.abi import ErrorCode, Op

__all__ = [
    "AttachError", "Batch", "Buffer", "Completion", "Device", "DeviceError", "DeviceGone", "ErrorCode",
    "Op", "OutOfMemory", "SessionLost", "Task", "attach", "hostd_status",
]
