"""Frames, packets and the codec/pixel-format tables shared by ``guestlib.encoder`` and ``guestlib.decoder``.

A ``Frame``'s planes are numpy views of region memory (design D2, docs/architecture.md);
``Packet`` is one encoded chunk.  ``guestlib.codec`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vmediad import abi
from vmediad.abi import PixFmt

if TYPE_CHECKING:
    from guestlib.device import Buffer

CODECS = {name: c for c, name in abi.CODEC_NAMES.items()}
CODECS.update({"h265": abi.Codec.HEVC, "avc": abi.Codec.H264, "libx264": abi.Codec.H264,
               "libx265": abi.Codec.HEVC, "libvpx-vp9": abi.Codec.VP9, "libdav1d": abi.Codec.AV1,
               "libaom-av1": abi.Codec.AV1, "libsvtav1": abi.Codec.AV1, "libvpx": abi.Codec.VP8,
               "libvpx-vp8": abi.Codec.VP8})
PIX_FMTS = {name: f for f, name in abi.PIX_FMT_NAMES.items()}
DEFAULT_OUT = 1 << 20
DEFAULT_POOL_FRAMES = 48  # a decoder's references and threads, plus a 4 x 6 stream's frames in flight
MIN_POOL_FRAMES = 8
Chunk = Any  # Buffer | bytes-like | Packet | (data, pts) | object with .pts and the buffer protocol


def codec_id(name: str | abi.Codec) -> abi.Codec:
    if isinstance(name, abi.Codec):
        return name
    try:
        return CODECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(abi.CODEC_NAMES.values()))}") from None


def pix_fmt_id(name: str | PixFmt) -> PixFmt:
    if isinstance(name, PixFmt):
        return name
    try:
        return PIX_FMTS[name]
    except KeyError:
        raise ValueError(f"unknown pix_fmt {name!r}; known: {', '.join(PIX_FMTS)}") from None


@dataclass(frozen=True, slots=True)
class Packet:
    data: bytes
    pts: int | None
    dts: int | None
    is_keyframe: bool


def _plane_views(mem: memoryview, fmt: PixFmt, width: int, height: int, base: int,
                 offsets: Iterable[int], strides: Iterable[int]) -> list[npt.NDArray[np.uint8]]:
    views = []
    for (rows, row_bytes), off, stride in zip(abi.plane_shapes(fmt, width, height), offsets, strides, strict=False):
        a = np.ndarray((rows, row_bytes), np.uint8, buffer=mem, offset=base + off, strides=(stride, 1))
        if fmt in (PixFmt.RGB24, PixFmt.BGRA):
            a = a.reshape(rows, width, row_bytes // width)
        views.append(a)
    return views


Planes = list[npt.NDArray[np.uint8]]


class Frame:
    """A picture in region memory: ``planes`` are numpy views (rows x row bytes per plane)."""

    def __init__(self, width: int, height: int, fmt: PixFmt, pts: int | None,
                 planes: Planes | Callable[[], Planes],
                 *, offset: int = -1, strides: tuple[int, ...] = (), nbytes: int = 0,
                 buffer: Buffer | None = None, release: Callable[[], None] | None = None,
                 plane_offsets: tuple[int, ...] = (), retain: Callable[[], Callable[[], None]] | None = None,
                 converted: bool = False) -> None:
        """``planes``: the views, or a function that makes them on first access (a decoder's
        pooled frames: most are passed on or counted, never looked at).  ``plane_offsets``:
        each plane's region offset, when the frame lies in the region; ``retain``: for a pooled
        frame, takes one more lend of its slot and returns that lend's give-back.  ``converted``:
        the device converted the picture from the decoder's own format (abi.FRAME_CONVERTED)."""
        self.width = width
        self.height = height
        self.pix_fmt = fmt
        self.pts = pts
        self._planes = planes
        self.offset = offset  # region offset of plane 0 when planes are packed back to back
        self.strides = strides
        self.nbytes = nbytes
        self._buffer = buffer
        self._release = release
        self.plane_offsets = plane_offsets
        self._retain = retain
        self.converted = converted

    @property
    def planes(self) -> Planes:
        planes = self._planes
        if callable(planes):
            planes = self._planes = planes()
        return planes

    @planes.setter
    def planes(self, planes: Planes) -> None:
        self._planes = planes

    @property
    def format(self) -> str:
        return abi.PIX_FMT_NAMES[self.pix_fmt]

    @property
    def pooled(self) -> bool:
        """The decoder wrote this frame straight into the session's frame pool (read-only
        planes, lent until released)."""
        return self._release is not None

    def release(self) -> None:
        """Give a pooled frame's slot back to the decoder now instead of at the next call
        (its planes must not be read afterwards).  A no-op for other frames."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def retain(self) -> Callable[[], None]:
        """Keep a pooled frame's slot lent past ``release()`` (and past the decoder's next call)
        until the returned function is called (a display shows it meanwhile).  ValueError for a
        frame that is not pooled or was already released."""
        if self._retain is None or self._release is None:
            raise ValueError("only a pooled frame that is still lent can be retained")
        return self._retain()

    def copy(self) -> Frame:
        return Frame(self.width, self.height, self.pix_fmt, self.pts, [p.copy() for p in self.planes],
                     converted=self.converted)

    def to_ndarray(self) -> npt.NDArray[np.uint8]:
        """All planes stacked as FFmpeg lays out an unpadded frame (yuv420p: (h*3/2, w) for even sizes)."""
        return np.concatenate([p.reshape(-1) for p in self.planes])

    def __repr__(self) -> str:
        return f"Frame({self.width}x{self.height} {self.format} pts={self.pts})"
