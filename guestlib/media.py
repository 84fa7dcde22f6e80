"""transcode(): demux and mux with PyAV in the guest; every codec step goes through the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from vmediad.avformats import nearest_decoded
from vmediad.errors import ClientError

if TYPE_CHECKING:
    from guestlib.codec import Decoder
    from guestlib.device import Device

# Encoder name PyAV's muxer should label each device codec with.
MUX_NAME = {abi.Codec.H264: "h264", abi.Codec.HEVC: "hevc", abi.Codec.VP9: "vp9", abi.Codec.AV1: "av1",
            abi.Codec.MJPEG: "mjpeg", abi.Codec.MPEG4: "mpeg4", abi.Codec.VP8: "vp8"}


_TO_ANNEXB = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
AVCOL_RANGE_JPEG = 2  # full range: what JPEG (and the device's mjpeg encoder) uses
_UNSPECIFIED = 2  # AVCOL_PRI/TRC/SPC_UNSPECIFIED
_SPC_RGB = 0  # AVCOL_SPC_RGB: the "matrix" of an RGB picture, wrong once it is YUV
# AVFieldOrder: 0 unknown, 1 progressive, then (coded, displayed) top/bottom first.
_FIELD_NAMES = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}
_TOP_SHOWN_FIRST = frozenset({2, 5})
_RANGE_NAMES = {1: "tv", 2: "pc"}

# A decoded stream format the device decodes to as it is (no conversion): its device format.
_DEVICE_FORMAT = {name: abi.PIX_FMT_NAMES[fmt] for fmt, names in abi.DECODED_AS.items() for name in names}
# What an encoder is given instead when it cannot take a device format, nearest first.
_FALLBACKS = {"yuv422p": ("yuv420p",), "yuv444p": ("yuv422p", "yuv420p"), "yuv420p10le": ("yuv420p",),
              "p010le": ("yuv420p",)}


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


@dataclass(slots=True)
class Keep:
    """What a transcode carries from the input stream into the output, and what it could not.

    ``colour``: AVCodecContext colour fields (color_range, color_primaries, color_trc,
    colorspace) the input tags, as numbers; ``field_order``: the output's AVFieldOrder (0: leave
    it unknown); ``interlace``: encoder options for an interlaced output; ``conversions``: each
    change of what the input was, named (e.g. "yuv420p10le→yuv420p (bit depth)")."""

    colour: dict[str, int] = field(default_factory=dict)
    field_order: int = 0
    interlace: dict[str, str] = field(default_factory=dict)
    conversions: list[str] = field(default_factory=list)

    def encoder_options(self, user: dict[str, Any]) -> dict[str, Any]:
        """The device encoder's options: these tags, then the caller's (which win; flag and
        x264-params lists are joined, the caller's entries last)."""
        opts: dict[str, Any] = {k: str(v) for k, v in self.colour.items()}
        opts.update(self.interlace)
        for key, value in user.items():
            if key in opts and key == "x264-params":
                opts[key] = f"{opts[key]}:{value}"
            elif key in opts and key == "flags":
                opts[key] = f"{value}{opts[key]}"
            else:
                opts[key] = value
        return opts


def _traits(pix_fmt: str) -> tuple[int, str]:
    """(bits per sample, chroma layout) of a libav pixel format, for naming conversions."""
    f = av.VideoFormat(pix_fmt)
    bits = max(c.bits for c in f.components)
    if f.is_rgb:
        return bits, "RGB"
    if len(f.components) < 3:
        return bits, "gray"
    return bits, f"{f.chroma_width(64)}x{f.chroma_height(64)}"


def _nearest(pix_fmt: str) -> str:
    """The device format nearest a decoded format the device has no equal of (the rule a
    NATIVE decode session converts by)."""
    return abi.PIX_FMT_NAMES[nearest_decoded(av.VideoFormat(pix_fmt))]


def _conversion(src: str, out: str) -> str | None:
    """``src``→``out`` with what it changes (bit depth, chroma), or None if it changes neither."""
    (sb, sc), (ob, oc) = _traits(src), _traits(out)
    full = "64x64"  # RGB has full-resolution colour, like 4:4:4
    why = [w for w, changed in (("bit depth", sb != ob), ("chroma", (full if sc == "RGB" else sc) != oc),
                                ("RGB→YUV", sc == "RGB")) if changed]
    return f"{src}→{out} ({', '.join(why)})" if why else None


def _keep(cc: Any, codec: abi.Codec) -> Keep:
    """The colour tags and field order of the input stream's codec context ``cc`` the output
    keeps, with interlaced coding when ``codec`` can do it (H.264: x264 codes tff or bff)."""
    keep = Keep()
    src = cc.pix_fmt or "yuv420p"
    rng = cc.color_range or (AVCOL_RANGE_JPEG if src.startswith("yuvj") else 0)
    if rng in _RANGE_NAMES:
        keep.colour["color_range"] = rng
    for attr in ("color_primaries", "color_trc"):
        value = getattr(cc, attr)
        if value not in (0, _UNSPECIFIED):  # 0 is "reserved" for both
            keep.colour[attr] = value
    if cc.colorspace != _UNSPECIFIED and not (cc.colorspace == _SPC_RGB and _traits(src)[1] == "RGB"):
        keep.colour["colorspace"] = cc.colorspace
    if codec == abi.Codec.MJPEG and rng != AVCOL_RANGE_JPEG:
        # JPEG is full range: the samples go in as decoded and the output says "pc".
        keep.colour.pop("color_range", None)
        keep.conversions.append(f"range {_RANGE_NAMES.get(rng, 'unknown')}→pc (mjpeg is full range)")
    order = cc.field_order
    if order in (0, 1):
        keep.field_order = order
    elif codec == abi.Codec.H264:
        top = order in _TOP_SHOWN_FIRST
        keep.field_order = 2 if top else 3
        keep.interlace = {"flags": "+ildct+ilme", "x264-params": "tff=1" if top else "bff=1"}
        if keep.field_order != order:
            keep.conversions.append(f"field order {_FIELD_NAMES[order]}→{_FIELD_NAMES[keep.field_order]}")
    else:
        keep.field_order = 1
        keep.conversions.append("interlaced→progressive")
    return keep


class Muxer:
    """Writes device packets into a container (mp4, mkv, ...) with PyAV, copying no codec work."""

    def __init__(self, path: str | Path, codec: str, width: int, height: int, time_base: Fraction,
                 fps: Fraction, pix_fmt: str = "yuv420p", *, keep: Keep | None = None) -> None:
        """``keep``: the colour tags, field order and conversion notes the stream and file carry
        (transcode's); the device's packets must have been encoded with them."""
        self.container = av.open(str(path), "w")
        cid = codec_id(codec)
        stream = self.container.add_stream(MUX_NAME[cid], rate=fps)
        assert isinstance(stream, VideoStream)
        self.stream: VideoStream = stream
        self.stream.width = width
        self.stream.height = height
        # The bitstream's format: P010 and NV12 input are encoded as their planar equivalents.
        self.stream.pix_fmt = {"p010le": "yuv420p10le", "nv12": "yuv420p"}.get(pix_fmt, pix_fmt)
        # PyAV opens an encoder of the codec on this stream when muxing starts and writes its
        # parameters (and, for mp4, its headers) into the container: it is set up like the
        # device's, so the container says what the packets hold.
        if keep is not None:
            cc = self.stream.codec_context
            for attr, value in keep.colour.items():
                setattr(cc, attr, value)
            if keep.field_order:
                cc.field_order = keep.field_order
            cc.options = dict(keep.interlace)
            if keep.conversions:
                self.container.metadata["comment"] = "vmediad conversions: " + "; ".join(keep.conversions)
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


def _open_encoder(dev: Device, codec: str, width: int, height: int, fps: Fraction, tb: Fraction,
                  formats: tuple[str, ...], options: dict[str, Any]) -> Encoder:
    """An Encoder for the first of ``formats`` the device's ``codec`` takes (the device decides:
    a format the codec cannot encode is BAD_ARG).  If none is taken, the first refusal is raised."""
    first: DeviceError | None = None
    for fmt in formats:
        try:
            return Encoder(dev, codec, width, height, fps, pix_fmt=fmt, time_base=tb, **options)
        except DeviceError as e:
            if e.code != ErrorCode.BAD_ARG:
                raise
            first = first or e
    assert first is not None
    raise first


def transcode(dev: Device, input_path: str | Path, output_path: str | Path, codec: str = "h264",
              *, max_frames: int | None = None, on_frame: Callable[[int], None] | None = None,
              stop: Callable[[], bool] | None = None, problems: list[str] | None = None,
              on_picture: Callable[[Frame], None] | None = None, audio: str = "copy",
              **options: Any) -> dict[str, Any]:
    """Decode ``input_path`` and re-encode it as ``codec`` into ``output_path``, all codec work on the device.

    The whole input unless ``max_frames``; ``stop()`` returning true ends it early (the
    output is still finished).  Damaged packets are skipped as ffmpeg does and noted in
    ``problems``; an unusable input raises MediaError.  Every frame keeps its timestamp (the
    encoder works in the input stream's time base), so a variable frame rate stays variable;
    ``audio="copy"`` copies every other stream (audio, subtitles) unchanged, ``"drop"``
    leaves them out.

    The output keeps the input's pixel format when ``codec`` can encode it (10-bit stays 10-bit,
    4:4:4 stays 4:4:4), its colour tags (range, primaries, transfer, matrix) and, for H.264, its
    interlaced field order.  What it cannot keep is converted to the nearest the codec takes and
    named in the summary's ``conversions`` and in the file's ``comment`` tag.
    """
    if audio not in ("copy", "drop"):
        raise ValueError(f"audio must be 'copy' or 'drop', not {audio!r}")
    problems = [] if problems is None else problems
    src, vstream = open_video(input_path)
    with src:
        cc = vstream.codec_context
        in_codec, in_fmt = cc.name, cc.pix_fmt or "yuv420p"
        fps = Fraction(vstream.average_rate or vstream.guessed_rate or 30)
        tb = Fraction(vstream.time_base) if vstream.time_base else 1 / fps
        step = max(1, round(1 / (fps * tb)))  # a frame's duration in tb units, for frames without pts
        frames = copied = 0
        last_pts: int | None = None
        copies: dict[int, Any] = {}
        keep = _keep(cc, codec_id(codec))
        dec_fmt = _DEVICE_FORMAT.get(in_fmt) or _nearest(in_fmt)
        enc_options = keep.encoder_options(options)
        # The format is settled before decoding: the device decodes straight into what the
        # encoder takes.  Opened at the container's picture size; reopened if frames differ.
        w, h = cc.width or 64, cc.height or 64
        enc: Encoder | None = _open_encoder(dev, codec, w, h, fps, tb, (dec_fmt, *_FALLBACKS.get(dec_fmt, ())),
                                            enc_options)
        assert enc is not None
        out_fmt = abi.PIX_FMT_NAMES[enc.fmt]
        change = _conversion(in_fmt, out_fmt)
        if change is not None:
            keep.conversions.insert(0, change)
        mux: Muxer | None = None
        try:
            # The container's picture size gives the decoder a frame pool: it decodes in place.
            with dev.decoder(in_codec, parse=False, width=cc.width, height=cc.height, pix_fmt=out_fmt) as dec:
                decoding = DecodeAll(dec, src, vstream, problems)
                for f in decoding if max_frames is None or max_frames > 0 else ():
                    if stop is not None and stop():
                        break
                    if mux is None:
                        if (f.width, f.height) != (enc.width, enc.height):
                            enc.close()
                            enc = None
                            enc = Encoder(dev, codec, f.width, f.height, fps, pix_fmt=out_fmt, time_base=tb,
                                          **enc_options)
                        mux = Muxer(output_path, codec, f.width, f.height, enc.time_base, fps, out_fmt, keep=keep)
                        if audio == "copy":
                            copies = mux.add_copies(src, problems)  # before the first packet
                    assert enc is not None
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
                if mux is not None:
                    assert enc is not None
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
            "packets_out": mux.packets if mux else 0, "streams_copied": len(copies), "packets_copied": copied,
            "pix_fmt": out_fmt, "conversions": list(keep.conversions)}
