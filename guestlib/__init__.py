"""guestlib: link this into a guest program to use the vmediad device.

>>> import guestlib
>>> with guestlib.attach(name="vm0") as dev:
...     buf = dev.put(b"hello")
...     crc = dev.crc32(buf).wait()
"""

from pathlib import Path
from typing import Any

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
from guestlib.display import Display
from vmediad.abi import ErrorCode, Op


def transcode(dev: Device, input_path: str | Path, output_path: str | Path,
              codec: str = "h264", **options: Any) -> dict[str, Any]:
    """Decode ``input_path`` and re-encode it as ``codec`` into ``output_path``.

    The guest demuxes and muxes with PyAV; every codec step runs on the device
    (see guestlib.media.transcode).  PyAV is imported on first use.
    """
    from guestlib.media import transcode as _transcode

    return _transcode(dev, input_path, output_path, codec, **options)

__all__ = [
    "AttachError", "Batch", "Buffer", "Completion", "Device", "DeviceError", "DeviceGone", "Display", "ErrorCode",
    "Op", "OutOfMemory", "SessionLost", "Task", "attach", "hostd_status", "transcode",
]
