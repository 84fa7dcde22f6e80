"""Encode sessions: ``encoder_config`` and ``Encoder`` (``Device.encoder()``).

``Encoder.new_frame()`` hands out planes that are numpy views of region memory; packets come back
in the task's output table.  Imports ``guestlib.device`` only for type checking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from guestlib.frames import Frame, Packet, _plane_views, codec_id, pix_fmt_id
from guestlib.session import _Session, _Spec
from vmediad import abi
from vmediad.abi import Op, PacketEntry, PixFmt

if TYPE_CHECKING:
    from guestlib.device import Buffer, Device


def encoder_config(codec: str | abi.Codec = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                   bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                   pix_fmt: str | PixFmt = "yuv420p", *, qp: int | None = None, bframes: bool = False,
                   preset: str = "", profile: str = "", threads: int = 0, time_base: Fraction | None = None,
                   **options: Any) -> abi.SessionConfig:
    """The SessionConfig ``Encoder`` opens with these arguments (also the benchmark floor's)."""
    rate = Fraction(fps).limit_denominator(1001)
    tb = time_base or 1 / rate
    if bitrate is not None:
        rc, rv = abi.RateControl.BITRATE, int(bitrate)
    elif crf is not None:
        rc, rv = abi.RateControl.CRF, int(crf)
    elif qp is not None:
        rc, rv = abi.RateControl.QP, int(qp)
    else:
        rc, rv = abi.RateControl.DEFAULT, 0
    return abi.SessionConfig(
        direction=abi.Direction.ENCODE, codec=codec_id(codec), width=width, height=height,
        pix_fmt=pix_fmt_id(pix_fmt), tb_num=tb.numerator, tb_den=tb.denominator, fps_num=rate.numerator,
        fps_den=rate.denominator, rc_mode=rc, rc_value=rv, gop=gop or 0, bframes=1 if bframes else 0,
        threads=threads, preset=preset, profile=profile, options=tuple((k, str(v)) for k, v in options.items()),
    )



class Encoder(_Session):
    """An ENCODE session on the device.

    ``pix_fmt`` is the format frames come in: yuv420p, nv12, rgb24 and bgra for every codec;
    yuv422p, yuv444p, yuv420p10le and p010le for a codec that encodes them as they are (opening
    fails with BAD_ARG naming the formats the codec takes otherwise).  A 10-bit frame may be an
    array of 16-bit samples (all of plane 0, then the next planes); ``new_frame()`` planes are
    bytes, ``plane.view("<u2")`` gives the samples.
    """

    def __init__(self, dev: Device, codec: str = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                 bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                 pix_fmt: str = "yuv420p", *, qp: int | None = None, bframes: bool = False, preset: str = "",
                 profile: str = "", threads: int = 0, time_base: Fraction | None = None, **options: Any) -> None:
        cfg = encoder_config(codec, width, height, fps, bitrate, crf, gop, pix_fmt, qp=qp, bframes=bframes,
                             preset=preset, profile=profile, threads=threads, time_base=time_base, **options)
        self.fmt = PixFmt(cfg.pix_fmt)
        self.width, self.height = width, height
        self.time_base = Fraction(cfg.tb_num, cfg.tb_den)
        self.fps = Fraction(cfg.fps_num, cfg.fps_den)
        self.frame_bytes = abi.frame_size(self.fmt, width, height)
        self._pool: list[Buffer] = []
        self._kept: dict[int, Buffer] = {}
        self._next_pts = 0
        super().__init__(dev, cfg)

    def new_frame(self, *, keep: bool = False) -> Frame:
        """A frame whose planes are writable views of region memory.

        By default ``encode()`` takes the frame back (its buffer returns to a pool
        for the next ``new_frame()``).  With ``keep=True`` the caller owns it and may
        fill and encode it again and again (a ring of input frames); ``release()``
        or ``close()`` frees it.  The encoder never keeps a reference to the frame's
        memory after ``encode()`` returns, so refilling it then is safe.
        """
        buf = self._pool.pop() if self._pool else self.device.alloc(self.frame_bytes)
        shapes = abi.plane_shapes(self.fmt, self.width, self.height)
        offs, strides, acc = [], [], 0
        for rows, row_bytes in shapes:
            offs.append(acc)
            strides.append(row_bytes)
            acc += rows * row_bytes
        planes = _plane_views(self.device.region.mem, self.fmt, self.width, self.height, buf.offset, offs, strides)
        if keep:
            self._kept[buf.offset] = buf
        return Frame(self.width, self.height, self.fmt, None, planes, offset=buf.offset, strides=tuple(strides),
                     nbytes=self.frame_bytes, buffer=None if keep else buf)

    def release(self, frame: Frame) -> None:
        """Give back a frame made with ``new_frame(keep=True)``."""
        buf = self._kept.pop(frame.offset, None)
        if buf is not None:
            frame.planes = []
            self._pool.append(buf)

    def _from_array(self, data: npt.NDArray[Any]) -> Frame:
        frame = self.new_frame()
        if self.fmt in abi.TEN_BIT_FORMATS and data.dtype != np.uint8:
            # 16-bit samples (any integer array): their little-endian bytes are the frame's.
            flat = np.ascontiguousarray(data, dtype="<u2").view(np.uint8).reshape(-1)
        else:
            flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if flat.size != self.frame_bytes:
            self._pool.append(frame._buffer)  # type: ignore[arg-type]
            raise ValueError(f"array has {flat.size} bytes, a {self.width}x{self.height} "
                             f"{abi.PIX_FMT_NAMES[self.fmt]} frame has {self.frame_bytes}")
        dst = np.frombuffer(self.device.region.mem, np.uint8, self.frame_bytes, frame.offset)
        np.copyto(dst, flat)  # the one copy from private memory into the region
        return frame

    def encode(self, frame: Frame | npt.NDArray[Any], pts: int | None = None,
               force_keyframe: bool = False) -> list[Packet]:
        f = self._prepare(frame)
        if pts is None:
            pts = f.pts if f.pts is not None else self._next_pts
        self._next_pts = pts + 1
        s = (*f.strides, 0, 0, 0)[:3]
        flags = abi.F_PTS_VALID | (abi.F_FORCE_KEYFRAME if force_keyframe else 0)
        try:
            self._run(Op.ENCODE_FRAME, flags=flags, src=(f.offset, f.nbytes),
                      args=(pts & abi.U64_MAX, s[0] | s[1] << 32, s[2], 0))
        finally:
            if f._buffer is not None:
                self._pool.append(f._buffer)
                f._buffer = None
        return self._take_backlog() + self._packets()

    def flush(self) -> list[Packet]:
        self._run(Op.FLUSH)
        return self._take_backlog() + self._packets()

    def encode_stream(self, frames: Iterable[Frame | npt.NDArray[Any]], *, flush: bool = True,
                      depth: int = 2, batch: int = 1) -> Iterator[Packet]:
        """Encode ``frames`` with ``depth`` tasks queued on the device; yields packets in order.

        With ``batch`` > 1 each task carries up to that many frames (one MULTI
        descriptor; at most ``abi.MULTI_MAX``): fewer round trips per frame, at the
        cost of output arriving ``batch`` frames at a time.  A frame is handed to the
        device when its task is submitted and given back (to ``new_frame()``'s pool,
        unless made with ``keep=True``) once its task has run; a kept frame must not
        be refilled before then, so a ring of kept frames needs more than
        ``(depth + 1) * batch`` entries.  ``flush`` ends the stream (``flush()``);
        without it, output the codec holds back stays queued.
        """
        yield from self._take_backlog()
        yield from self._stream(self._encode_specs(frames, flush), depth, Op.ENCODE_FRAME, batch)

    def _encode_specs(self, frames: Iterable[Frame | npt.NDArray[Any]], flush: bool) -> Iterator[_Spec]:
        for frame in frames:
            f = self._prepare(frame)
            pts = f.pts if f.pts is not None else self._next_pts
            self._next_pts = pts + 1
            s = (*f.strides, 0, 0, 0)[:3]
            yield _Spec(Op.ENCODE_FRAME, abi.F_PTS_VALID, (f.offset, f.nbytes),
                        (pts & abi.U64_MAX, s[0] | s[1] << 32, s[2], 0), self._giver(f))
        if flush:
            yield _Spec(Op.FLUSH)

    def _giver(self, f: Frame) -> Callable[[], None] | None:
        buf = f._buffer
        if buf is None:
            return None
        f._buffer = None

        def give_back() -> None:
            self._pool.append(buf)
        return give_back

    def _prepare(self, frame: Frame | npt.NDArray[Any]) -> Frame:
        f = self._from_array(frame) if isinstance(frame, np.ndarray) else frame
        if f.pix_fmt != self.fmt or (f.width, f.height) != (self.width, self.height):
            raise ValueError(f"frame is {f.width}x{f.height} {f.format}, encoder takes "
                             f"{self.width}x{self.height} {abi.PIX_FMT_NAMES[self.fmt]}")
        if f.offset < 0:  # not packed in the region (a private copy, a pooled decoded frame)
            packed = self.new_frame()
            for dst, src in zip(packed.planes, f.planes, strict=True):
                np.copyto(dst, src)  # the one copy, plane by plane
            f = packed
        return f

    def _items_at(self, base: int) -> list[Any]:
        return self._packets(base)

    def _task_output(self, batch: int) -> int:
        # Encoders hold frames back (lookahead, B-frames, frame threads) and then emit a
        # burst with the first keyframe: x264 at 1080p emits 1.2-1.9 MB at once.  One raw
        # frame covers that burst in practice; a MULTI task of ``batch`` frames may emit a
        # packet per frame (VP8 at high quality: up to half a raw frame each), so half a raw
        # frame per input beyond that.  Larger output still ends in NO_SPACE.
        return self.frame_bytes * max(1, (batch + 1) // 2)

    def _packets(self, base: int | None = None) -> list[Packet]:
        mem = self.device.region.mem
        base = self._out.offset if base is None else base
        out = []
        for e in self._table(base, abi.OUT_PACKETS, PacketEntry):
            start = base + e.offset
            out.append(Packet(bytes(mem[start : start + e.size]), None if e.pts == abi.NO_PTS else e.pts,
                              None if e.dts == abi.NO_PTS else e.dts, bool(e.flags & abi.PACKET_KEY)))
        return out

    def close(self) -> None:
        if not self.closed:
            for b in [*self._pool, *self._kept.values()]:
                self.device.free(b)
            self._pool.clear()
            self._kept.clear()
        super().close()
