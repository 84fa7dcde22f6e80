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

    def add_copies(self, source: Any, problems: list[str]) -> dict[int, Any]:
        """Output streams copying every non-video stream of ``source`` (an open input
        container), before the first packet is muxed; ``{input index: output stream}``.  A
        stream this container cannot hold is dropped and named in ``problems``."""
        copies: dict[int, Any] = {}
        for st in source.streams:
            if st.type == "video":
                continue
            try:
                copies[st.index] = self.container.add_stream_from_template(st)
            except (ValueError, av.FFmpegError) as e:
                problems.append(f"{st.type} stream {st.index} ({st.codec_context.name}) not copied: {_why(e)}")
        return copies

    def copy_packets(self, path: str | Path, copies: dict[int, Any], until_s: float | None = None) -> int:
        """Mux the packets of the copied streams of ``path`` unchanged (timestamps included);
        with ``until_s`` (the video was cut short) only those that start before it."""
        if not copies:
            return 0
        n = 0
        with av.open(str(path)) as src:
            for pkt in src.demux([src.streams[i] for i in copies]):
                if pkt.dts is None and pkt.pts is None:
                    continue  # a demuxer's flush packet
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if until_s is not None and t is not None and pkt.time_base is not None \
                        and t * pkt.time_base >= until_s:
                    continue
                pkt.stream = copies[pkt.stream.index]
                self.container.mux(pkt)
                n += 1
        return n

    def close(self) -> None:
        self.container.close()


def transcode(dev: Device, input_path: str | Path, output_path: str | Path, codec: str = "h264",
              *, max_frames: int | None = None, on_frame: Callable[[int], None] | None = None,
              stop: Callable[[], bool] | None = None, problems: list[str] | None = None,
              on_picture: Callable[[Frame], None] | None = None, audio: str = "copy",
              **options: Any) -> dict[str, int]:
    """Decode ``input_path`` and re-encode it as ``codec`` into ``output_path``, all codec work on the device.

    The whole input unless ``max_frames``; ``stop()`` returning true ends it early (the
    output is still finished).  Damaged packets are skipped as ffmpeg does and noted in
    ``problems``; an unusable input raises MediaError.  Every frame keeps its timestamp (the
    encoder works in the input stream's time base), so a variable frame rate stays variable;
    ``audio="copy"`` copies every other stream (audio, subtitles) unchanged, ``"drop"``
    leaves them out.
    """
    if audio not in ("copy", "drop"):
        raise ValueError(f"audio must be 'copy' or 'drop', not {audio!r}")
    problems = [] if problems is None else problems
    src, vstream = open_video(input_path)
    with src:
        in_codec = vstream.codec_context.name
        fps = Fraction(vstream.average_rate or vstream.guessed_rate or 30)
        tb = Fraction(vstream.time_base) if vstream.time_base else 1 / fps
        step = max(1, round(1 / (fps * tb)))  # a frame's duration in tb units, for frames without pts
        frames = copied = 0
        last_pts: int | None = None
        copies: dict[int, Any] = {}
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
                        enc = Encoder(dev, codec, f.width, f.height, fps, pix_fmt=f.format, time_base=tb, **options)
                        mux = Muxer(output_path, codec, f.width, f.height, enc.time_base, fps)
                        if audio == "copy":
                            copies = mux.add_copies(src, problems)  # before the first packet
                    assert mux is not None
                    if on_picture is not None:
                        on_picture(f)  # e.g. shown on the VM's display before it is encoded
                    # The input's timestamp; one that does not move forward (or is missing)
                    # becomes the previous one plus a frame, as the encoder needs.
                    pts = f.pts if f.pts is not None and (last_pts is None or f.pts > last_pts) else \
                        (0 if last_pts is None else last_pts + step)
                    last_pts = pts
                    mux.write(enc.encode(f, pts=pts))  # a pooled frame is copied in once
                    frames += 1
                    if on_frame is not None:
                        on_frame(frames)
                    if max_frames is not None and frames >= max_frames:
                        break
                if enc is not None and mux is not None:
                    mux.write(enc.flush())
                    cut = (max_frames is not None and frames >= max_frames) or (stop is not None and stop())
                    end = None if not cut or last_pts is None else float((last_pts + step) * tb)
                    copied = mux.copy_packets(input_path, copies, end)
            finally:
                if enc is not None:
                    enc.close()
                if mux is not None:
                    mux.close()
    return {"frames": frames, "packets_in": decoding.packets, "problems": len(decoding.problems),
            "packets_out": mux.packets if mux else 0, "streams_copied": len(copies), "packets_copied": copied}
