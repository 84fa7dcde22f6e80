"""transcode(): demux and mux with PyAV in the guest; every codec step goes through the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import av.bitstream
from av.video.stream import VideoStream

from guestlib.codec import Encoder, Frame, Packet, codec_id
from guestlib.device import DeviceError
from vmediad import abi
from vmediad.abi import ErrorCode
from vmediad.errors import ClientError

if TYPE_CHECKING:
    from guestlib.codec import Decoder
    from guestlib.device import Device

# Encoder name PyAV's muxer should label each device codec with.
MUX_NAME = {abi.Codec.H264: "h264", abi.Codec.HEVC: "hevc", abi.Codec.VP9: "vp9", abi.Codec.AV1: "av1",
            abi.Codec.MJPEG: "mjpeg", abi.Codec.MPEG4: "mpeg4", abi.Codec.VP8: "vp8"}


_TO_ANNEXB = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
AVCOL_RANGE_JPEG = 2  # full range: what JPEG (and the device's mjpeg encoder) uses


class MediaError(ClientError):
    """A media file that cannot be used: unreadable, not a container, no video stream."""


def _why(e: Exception) -> str:
    # FFmpeg errors carry "[Errno -1094995529] text: 'file'"; the text is what a user needs.
    return getattr(e, "strerror", None) or str(e)


def open_video(path: str | Path) -> tuple[Any, VideoStream]:
    """Open ``path`` and return (container, its first video stream); MediaError says why not."""
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot read it as a media file ({_why(e)})") from None
    if not container.streams.video:
        kinds = ", ".join(sorted({str(s.type) for s in container.streams})) or "no"
        container.close()
        raise MediaError(f"{path}: no video stream (it has {kinds} streams)")
    return container, container.streams.video[0]


def demux_elementary(container: Any, stream: Any, problems: list[str] | None = None) -> Iterator[Any]:
    """Demux ``stream`` as self-contained packets the device can decode without extradata.

    MP4/MKV carry H.264/HEVC length-prefixed with the parameter sets in extradata;
    the standard bitstream filter rewrites them as Annex-B with in-band SPS/PPS.
    Damaged input is handled as ffmpeg does: a packet the filter refuses (the cut-off
    last packet of a truncated file) is skipped, and a demuxer error ends the input.
    Both are noted in ``problems`` when given.
    """
    name = stream.codec_context.name
    extradata = stream.codec_context.extradata or b""
    bsf = None
    if name in _TO_ANNEXB and extradata[:1] == b"\x01":
        bsf = av.bitstream.BitStreamFilterContext(_TO_ANNEXB[name], stream)
    demuxer = container.demux(stream)
    index = 0  # of the packet in the stream
    while True:
        try:
            packet = next(demuxer)
        except StopIteration:
            break
        except av.FFmpegError as e:
            if problems is not None:
                problems.append(f"input ends early: {_why(e)}")
            break
        if packet.size == 0:
            continue
        index += 1
        if bsf is None:
            yield packet
            continue
        try:
            filtered = bsf.filter(packet)
        except av.FFmpegError as e:
            if problems is not None:
                problems.append(f"packet {index} skipped: {_why(e)}")
            continue
        yield from filtered
    if bsf is not None:
        try:
            flushed = bsf.filter(None)
        except av.FFmpegError as e:
            flushed = []
            if problems is not None:
                problems.append(f"end of stream: {_why(e)}")
        yield from flushed


class DecodeAll:
    """Iterate for every frame of ``stream`` decoded on the device, buffered frames included.

    A packet the device refuses as INVALID_DATA is skipped (noted in ``problems``) and
    decoding goes on, as ffmpeg does; any other device error is raised.  Frames are lent
    (see Decoder.decode): use each before asking for the next.  Stopping the iteration
    early skips the flush.
    """

    def __init__(self, dec: Decoder, container: Any, stream: Any, problems: list[str] | None = None) -> None:
        self.dec = dec
        self.container = container
        self.stream = stream
        self.problems: list[str] = [] if problems is None else problems
        self.packets = 0

    def __iter__(self) -> Iterator[Frame]:
        for packet in demux_elementary(self.container, self.stream, self.problems):
            self.packets += 1
            try:
                frames = self.dec.decode(memoryview(packet), pts=packet.pts)
            except DeviceError as e:
                if e.code != ErrorCode.INVALID_DATA:
                    raise
                self.problems.append(f"packet {self.packets} skipped: the decoder found invalid data")
                continue
            yield from frames
        try:
            frames = self.dec.flush()
        except DeviceError as e:
            if e.code != ErrorCode.INVALID_DATA:
                raise
            # An error of a skipped packet may surface only here; what the decoder still
            # holds comes with the next flush.
            self.problems.append("the decoder reported invalid data at the end of the stream")
            frames = self.dec.flush()
        yield from frames


class Muxer:
    """Writes device packets into a container (mp4, mkv, ...) with PyAV, copying no codec work."""

    def __init__(self, path: str | Path, codec: str, width: int, height: int, time_base: Fraction,
                 fps: Fraction) -> None:
        self.container = av.open(str(path), "w")
        cid = codec_id(codec)
        stream = self.container.add_stream(MUX_NAME[cid], rate=fps)
        assert isinstance(stream, VideoStream)
        self.stream: VideoStream = stream
        self.stream.width = width
        self.stream.height = height
        self.stream.pix_fmt = "yuv420p"
        if cid == abi.Codec.MJPEG:
            # PyAV opens the stream's codec context when muxing starts, and FFmpeg's mjpeg
            # encoder refuses yuv420p unless the range is full (JPEG); the device's mjpeg
            # packets are full range too.
            self.stream.codec_context.color_range = AVCOL_RANGE_JPEG
        self.stream.time_base = time_base
        self.time_base = time_base
        self.packets = 0

    def write(self, packets: list[Packet]) -> None:
        for p in packets:
            pkt = av.Packet(len(p.data))  # FFmpeg-owned and zero-padded, unlike Packet(bytes)
            memoryview(pkt)[:] = p.data
            pkt.pts, pkt.dts = p.pts, p.dts
            pkt.time_base = self.time_base
            pkt.is_keyframe = p.is_keyframe
            pkt.stream = self.stream
            self.container.mux(pkt)
            self.packets += 1

    def close(self) -> None:
        self.container.close()


def transcode(dev: Device, input_path: str | Path, output_path: str | Path, codec: str = "h264",
              *, max_frames: int | None = None, on_frame: Callable[[int], None] | None = None,
              stop: Callable[[], bool] | None = None, problems: list[str] | None = None,
              on_picture: Callable[[Frame], None] | None = None, **options: Any) -> dict[str, int]:
    """Decode ``input_path`` and re-encode it as ``codec`` into ``output_path``, all codec work on the device.

    The whole input unless ``max_frames``; ``stop()`` returning true ends it early (the
    output is still finished).  Damaged packets are skipped as ffmpeg does and noted in
    ``problems``; an unusable input raises MediaError.
    """
    src, vstream = open_video(input_path)
    with src:
        in_codec = vstream.codec_context.name
        fps = Fraction(vstream.average_rate or vstream.guessed_rate or 30)
        frames = 0
        # The container's picture size gives the decoder a frame pool: it decodes in place.
        with dev.decoder(in_codec, parse=False, width=vstream.codec_context.width,
                         height=vstream.codec_context.height) as dec:
            decoding = DecodeAll(dec, src, vstream, problems)
            enc: Encoder | None = None
            mux: Muxer | None = None
            try:
                for f in decoding if max_frames is None or max_frames > 0 else ():
                    if stop is not None and stop():
                        break
                    if enc is None:
                        enc = Encoder(dev, codec, f.width, f.height, fps, pix_fmt=f.format, **options)
                        mux = Muxer(output_path, codec, f.width, f.height, enc.time_base, fps)
                    assert mux is not None
                    if on_picture is not None:
                        on_picture(f)  # e.g. shown on the VM's display before it is encoded
                    mux.write(enc.encode(f, pts=frames))  # a pooled frame is copied in once
                    frames += 1
                    if on_frame is not None:
                        on_frame(frames)
                    if max_frames is not None and frames >= max_frames:
                        break
                if enc is not None and mux is not None:
                    mux.write(enc.flush())
            finally:
                if enc is not None:
                    enc.close()
                if mux is not None:
                    mux.close()
    return {"frames": frames, "packets_in": decoding.packets, "problems": len(decoding.problems),
            "packets_out": mux.packets if mux else 0}
