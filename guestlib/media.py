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
from vmediad import abi

if TYPE_CHECKING:
    from guestlib.device import Device

# Encoder name PyAV's muxer should label each device codec with.
MUX_NAME = {abi.Codec.H264: "h264", abi.Codec.HEVC: "hevc", abi.Codec.VP9: "vp9", abi.Codec.AV1: "av1",
            abi.Codec.MJPEG: "mjpeg", abi.Codec.MPEG4: "mpeg4"}


_TO_ANNEXB = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}


def demux_elementary(container: Any, stream: Any) -> Iterator[Any]:
    """Demux ``stream`` as self-contained packets the device can decode without extradata.

    MP4/MKV carry H.264/HEVC length-prefixed with the parameter sets in extradata;
    the standard bitstream filter rewrites them as Annex-B with in-band SPS/PPS.
    """
    name = stream.codec_context.name
    extradata = stream.codec_context.extradata or b""
    bsf = None
    if name in _TO_ANNEXB and extradata[:1] == b"\x01":
        bsf = av.bitstream.BitStreamFilterContext(_TO_ANNEXB[name], stream)
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if bsf is None:
            yield packet
        else:
            yield from bsf.filter(packet)
    if bsf is not None:
        yield from bsf.filter(None)


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
              **options: Any) -> dict[str, int]:
    """Decode ``input_path`` and re-encode it as ``codec`` into ``output_path``, all codec work on the device."""
    with av.open(str(input_path)) as src:
        vstream = src.streams.video[0]
        in_codec = vstream.codec_context.name
        fps = Fraction(vstream.average_rate or vstream.guessed_rate or 30)
        frames = packets_in = 0
        # The container's picture size gives the decoder a frame pool: it decodes in place.
        with dev.decoder(in_codec, parse=False, width=vstream.codec_context.width,
                         height=vstream.codec_context.height) as dec:
            enc: Encoder | None = None
            mux: Muxer | None = None
            try:
                def emit(decoded: list[Frame]) -> None:
                    nonlocal enc, mux, frames
                    for f in decoded:
                        if max_frames is not None and frames >= max_frames:
                            return
                        if enc is None:
                            enc = Encoder(dev, codec, f.width, f.height, fps, pix_fmt=f.format, **options)
                            mux = Muxer(output_path, codec, f.width, f.height, enc.time_base, fps)
                        assert mux is not None
                        mux.write(enc.encode(f, pts=frames))  # a pooled frame is copied in once
                        frames += 1
                        if on_frame is not None:
                            on_frame(frames)

                for packet in demux_elementary(src, vstream):
                    packets_in += 1
                    emit(dec.decode(memoryview(packet), pts=packet.pts))
                    if max_frames is not None and frames >= max_frames:
                        break
                else:
                    emit(dec.flush())
                if enc is not None and mux is not None:
                    mux.write(enc.flush())
            finally:
                if enc is not None:
                    enc.close()
                if mux is not None:
                    mux.close()
    return {"frames": frames, "packets_in": packets_in, "packets_out": mux.packets if mux else 0}
