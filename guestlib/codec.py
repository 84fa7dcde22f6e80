"""Codec sessions through the device: ``Device.encoder()`` / ``Device.decoder()``.

Frames and bitstreams live in the guest's region and move by offset (seed 001):
``Encoder.new_frame()`` hands out planes that are numpy views of region memory,
and decoded ``Frame.planes`` are views of the decoder's output buffer.  A
decoded frame's planes stay valid until the next ``decode()``/``flush()`` call
on the same decoder (use ``Frame.copy()`` to keep one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vmediad import abi
from vmediad.abi import DescFlag, ErrorCode, Op, PixFmt

if TYPE_CHECKING:
    from guestlib.device import Buffer, Device, Task

CODECS = {name: c for c, name in abi.CODEC_NAMES.items()}
CODECS.update({"h265": abi.Codec.HEVC, "avc": abi.Codec.H264, "libx264": abi.Codec.H264,
               "libx265": abi.Codec.HEVC, "libvpx-vp9": abi.Codec.VP9, "libdav1d": abi.Codec.AV1,
               "libaom-av1": abi.Codec.AV1, "libsvtav1": abi.Codec.AV1})
PIX_FMTS = {name: f for f, name in abi.PIX_FMT_NAMES.items()}
DEFAULT_OUT = 1 << 20


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


class Frame:
    """A picture in region memory: ``planes`` are numpy views (rows x row bytes per plane)."""

    def __init__(self, width: int, height: int, fmt: PixFmt, pts: int | None, planes: list[npt.NDArray[np.uint8]],
                 *, offset: int = -1, strides: tuple[int, ...] = (), nbytes: int = 0,
                 buffer: Buffer | None = None) -> None:
        self.width = width
        self.height = height
        self.pix_fmt = fmt
        self.pts = pts
        self.planes = planes
        self.offset = offset  # region offset of plane 0 when planes are packed back to back
        self.strides = strides
        self.nbytes = nbytes
        self._buffer = buffer

    @property
    def format(self) -> str:
        return abi.PIX_FMT_NAMES[self.pix_fmt]

    def copy(self) -> Frame:
        return Frame(self.width, self.height, self.pix_fmt, self.pts, [p.copy() for p in self.planes])

    def to_ndarray(self) -> npt.NDArray[np.uint8]:
        """All planes stacked as FFmpeg lays out an unpadded frame (yuv420p: (h*3/2, w) for even sizes)."""
        return np.concatenate([p.reshape(-1) for p in self.planes])

    def __repr__(self) -> str:
        return f"Frame({self.width}x{self.height} {self.format} pts={self.pts})"


class _Session:
    def __init__(self, dev: Device, cfg: abi.SessionConfig) -> None:
        self.device = dev
        self.config = cfg
        self._out: Buffer = dev.alloc(DEFAULT_OUT)
        blob = dev.put(cfg.pack())
        try:
            c = dev.submit(Op.SESSION_OPEN, src=(blob.offset, len(cfg.pack()))).wait()
        finally:
            dev.free(blob)
        self.session: int = c.result
        self.closed = False

    def _run(self, op: Op, *, flags: int = 0, src: tuple[int, int] = (0, 0),
             args: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[int, int]:
        """Submit, and on NO_SPACE grow the output buffer and collect what hostd kept."""
        if self.closed:
            raise ValueError("session is closed")
        dev = self.device
        task: Task = dev.submit(op, flags=flags, session=self.session, src=src,
                                dst=(self._out.offset, self._out.size), args=args)
        while True:
            c = task.completion()
            if c.error == ErrorCode.NO_SPACE and c.result_len > self._out.size:
                dev.free(self._out)
                self._out = dev.alloc(max(c.result_len, 2 * self._out.size))
                retry_flags = DescFlag.DRAIN_PENDING if op in (Op.ENCODE_FRAME, Op.DECODE) else 0
                task = dev.submit(op if op != Op.ENCODE_FRAME else Op.ENCODE_FRAME, flags=retry_flags,
                                  session=self.session, dst=(self._out.offset, self._out.size))
                continue
            task.wait()  # raises DeviceError / SessionLost on an error status
            return c.result, c.result_len

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.device.submit(Op.SESSION_CLOSE, session=self.session).wait()
        except Exception:
            pass  # a lost session or a gone device has nothing left to close
        self.closed = True
        self.device.free(self._out)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Encoder(_Session):
    def __init__(self, dev: Device, codec: str = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                 bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                 pix_fmt: str = "yuv420p", *, qp: int | None = None, bframes: bool = False, preset: str = "",
                 profile: str = "", threads: int = 0, time_base: Fraction | None = None, **options: Any) -> None:
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
        self.fmt = pix_fmt_id(pix_fmt)
        self.width, self.height = width, height
        self.time_base = tb
        self.fps = rate
        cfg = abi.SessionConfig(
            direction=abi.Direction.ENCODE, codec=codec_id(codec), width=width, height=height, pix_fmt=self.fmt,
            tb_num=tb.numerator, tb_den=tb.denominator, fps_num=rate.numerator, fps_den=rate.denominator,
            rc_mode=rc, rc_value=rv, gop=gop or 0, bframes=1 if bframes else 0, threads=threads,
            preset=preset, profile=profile, options=tuple((k, str(v)) for k, v in options.items()),
        )
        self.frame_bytes = abi.frame_size(self.fmt, width, height)
        self._pool: list[Buffer] = []
        self._next_pts = 0
        super().__init__(dev, cfg)

    def new_frame(self) -> Frame:
        """A frame whose planes are writable views of region memory; encode() takes it back."""
        buf = self._pool.pop() if self._pool else self.device.alloc(self.frame_bytes)
        shapes = abi.plane_shapes(self.fmt, self.width, self.height)
        offs, strides, acc = [], [], 0
        for rows, row_bytes in shapes:
            offs.append(acc)
            strides.append(row_bytes)
            acc += rows * row_bytes
        planes = _plane_views(self.device.region.mem, self.fmt, self.width, self.height, buf.offset, offs, strides)
        return Frame(self.width, self.height, self.fmt, None, planes, offset=buf.offset, strides=tuple(strides),
                     nbytes=self.frame_bytes, buffer=buf)

    def _from_array(self, data: npt.NDArray[Any]) -> Frame:
        frame = self.new_frame()
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
        f = self._from_array(frame) if isinstance(frame, np.ndarray) else frame
        if f.pix_fmt != self.fmt or (f.width, f.height) != (self.width, self.height):
            raise ValueError(f"frame is {f.width}x{f.height} {f.format}, encoder takes "
                             f"{self.width}x{self.height} {abi.PIX_FMT_NAMES[self.fmt]}")
        if f.offset < 0:
            f = self._from_array(f.to_ndarray())
        if pts is None:
            pts = f.pts if f.pts is not None else self._next_pts
        self._next_pts = pts + 1
        s = (*f.strides, 0, 0, 0)[:3]
        flags = DescFlag.PTS_VALID | (DescFlag.FORCE_KEYFRAME if force_keyframe else 0)
        try:
            self._run(Op.ENCODE_FRAME, flags=flags, src=(f.offset, f.nbytes),
                      args=(pts & abi.U64_MAX, s[0] | s[1] << 32, s[2], 0))
        finally:
            if f._buffer is not None:
                self._pool.append(f._buffer)
                f._buffer = None
        return self._packets()

    def flush(self) -> list[Packet]:
        self._run(Op.FLUSH)
        return self._packets()

    def _packets(self) -> list[Packet]:
        mem = self.device.region.mem
        base = self._out.offset
        kind, count, _used = abi.OUT_HEADER.unpack_from(mem, base)
        if kind != abi.OUT_PACKETS:
            raise ValueError(f"unexpected output table kind {kind}")
        out = []
        for i in range(count):
            off, size, pts, dts, flags, _ = abi.PACKET_ENTRY.unpack_from(
                mem, base + abi.OUT_HEADER.size + i * abi.PACKET_ENTRY.size)
            out.append(Packet(bytes(mem[base + off : base + off + size]),
                              None if pts == abi.NO_PTS else pts, None if dts == abi.NO_PTS else dts,
                              bool(flags & abi.PACKET_KEY)))
        return out

    def close(self) -> None:
        if not self.closed:
            for b in self._pool:
                self.device.free(b)
            self._pool.clear()
        super().close()


class Decoder(_Session):
    def __init__(self, dev: Device, codec: str = "h264", *, pix_fmt: str = "yuv420p", threads: int = 0,
                 parse: bool = True, **options: Any) -> None:
        cfg = abi.SessionConfig(direction=abi.Direction.DECODE, codec=codec_id(codec), pix_fmt=pix_fmt_id(pix_fmt),
                                threads=threads, options=tuple((k, str(v)) for k, v in options.items()))
        self.parse = parse
        self._in: Buffer | None = None
        super().__init__(dev, cfg)
        self.device.free(self._out)
        self._out = dev.alloc(8 << 20)

    def _stage(self, data: bytes | bytearray | memoryview | Buffer) -> tuple[int, int]:
        from guestlib.device import Buffer

        if isinstance(data, Buffer):
            return data.offset, data.size
        mv = memoryview(data).cast("B")
        if self._in is None or self._in.size < mv.nbytes:
            if self._in is not None:
                self.device.free(self._in)
            self._in = self.device.alloc(max(mv.nbytes, 64 << 10))
        self._in.mem[: mv.nbytes] = mv  # the one copy of the bitstream into the region
        return self._in.offset, mv.nbytes

    def decode(self, data: bytes | bytearray | memoryview | Buffer, pts: int | None = None,
               parse: bool | None = None) -> list[Frame]:
        src = self._stage(data)
        if src[1] == 0:
            return []
        parse = self.parse if parse is None else parse
        flags = (DescFlag.PARSE if parse else 0) | (DescFlag.PTS_VALID if pts is not None else 0)
        self._run(Op.DECODE, flags=flags, src=src, args=((pts or 0) & abi.U64_MAX, 0, 0, 0))
        return self._frames()

    def flush(self) -> list[Frame]:
        self._run(Op.FLUSH)
        return self._frames()

    def _frames(self) -> list[Frame]:
        mem = self.device.region.mem
        base = self._out.offset
        kind, count, _used = abi.OUT_HEADER.unpack_from(mem, base)
        if kind != abi.OUT_FRAMES:
            raise ValueError(f"unexpected output table kind {kind}")
        frames = []
        for i in range(count):
            (off, w, h, fmt, nplanes, pts, o0, o1, o2, s0, s1, s2, _) = abi.FRAME_ENTRY.unpack_from(
                mem, base + abi.OUT_HEADER.size + i * abi.FRAME_ENTRY.size)
            pf = PixFmt(fmt)
            offs, strides = (o0, o1, o2)[:nplanes], (s0, s1, s2)[:nplanes]
            planes = _plane_views(mem, pf, w, h, base + off, offs, strides)
            packed = all(o == sum(r * s for (r, _), s in zip(abi.plane_shapes(pf, w, h)[:k], strides, strict=False))
                         for k, o in enumerate(offs))
            frames.append(Frame(w, h, pf, None if pts == abi.NO_PTS else pts, planes,
                                offset=base + off if packed else -1, strides=strides,
                                nbytes=abi.frame_size(pf, w, h, list(strides))))
        return frames

    def close(self) -> None:
        if not self.closed and self._in is not None:
            self.device.free(self._in)
            self._in = None
        super().close()


def caps(dev: Device) -> dict[str, Any]:
    """What this device's FFmpeg build really offers (the CAPS op)."""
    out = dev.alloc(64 << 10)
    try:
        c = dev.submit(Op.CAPS, dst=(out.offset, out.size)).wait()
        kind, _count, used = abi.OUT_HEADER.unpack_from(dev.region.mem, out.offset)
        doc: dict[str, Any] = json.loads(bytes(out.mem[abi.OUT_HEADER.size : used]).rstrip(b"\0"))
        _ = (c, kind)
        return doc
    finally:
        dev.free(out)
