"""The capability document: what this FFmpeg build offers per abi.Codec, and its OUT_JSON
encoding into the guest region (write_caps)."""

from __future__ import annotations

import json
from functools import lru_cache

import av
import av.error

from codec_backend.decode import DECODE_FORMATS
from codec_backend.encode import encode_formats, encode_zero_copy_formats
from codec_backend.session_base import DEFAULT_GEOMETRY, CodecError, _available, _check_range
from vmediad import abi
from vmediad.abi import (
    Codec,
    ErrorCode,
    GeometryLimits,
    OutHeader,
    RateControl,
)


@lru_cache(maxsize=1)
def _codec_caps() -> tuple[dict[str, object], ...]:
    out: list[dict[str, object]] = []
    for codec in Codec:
        enc, dec = abi.ENCODER_IMPL[codec], abi.DECODER_IMPL[codec]
        enc_ok, dec_ok = _available(enc, "w"), _available(dec, "r")
        in_place = sorted(abi.PIX_FMT_NAMES[f] for f in encode_zero_copy_formats(enc)) if enc_ok else []
        parser = False
        if dec_ok:
            try:
                av.CodecContext.create(dec, "r").parse(None)
                parser = True
            except (ValueError, av.error.FFmpegError):
                parser = False
        out.append({
            "id": int(codec),
            "name": abi.CODEC_NAMES[codec],
            "encoder": {
                "impl": enc,
                "available": enc_ok,
                # Per codec: what its FFmpeg encoder takes as it is (converted inputs included).
                "pix_fmts": [abi.PIX_FMT_NAMES[f] for f in encode_formats(enc)] if enc_ok else [],
                "zero_copy_pix_fmts": in_place,
                "bframes": enc in ("libx264", "libx265", "mpeg4", "libsvtav1"),
            },
            "decoder": {
                "impl": dec,
                "available": dec_ok,
                # Frames come out in the format asked for: "native" (each picture in the
                # decoder's own format when it is a device format, else converted to the
                # nearest one and flagged FRAME_CONVERTED) or a named one.  A picture already
                # in the asked format is emitted as decoded (into the frame pool when there is
                # one), others are converted.
                "pix_fmts": [abi.PIX_FMT_NAMES[f] for f in DECODE_FORMATS] if dec_ok else [],
                "parser": parser,
                # FFmpeg's vp8, vp9 and av1 parsers do not split a byte stream into
                # frames: with PARSE every chunk must still hold whole frames.
                "parser_splits": parser and codec not in (Codec.VP8, Codec.VP9, Codec.AV1),
            },
        })
    return tuple(out)


def caps_document(caps: GeometryLimits = DEFAULT_GEOMETRY) -> dict[str, object]:
    """What this FFmpeg build really offers, per abi.Codec, plus the geometry caps."""
    return {
        "abi_version": abi.ABI_VERSION,
        "backend": "pyav",
        "pyav_version": av.__version__,
        "ffmpeg_version": str(av.ffmpeg_version_info),
        "codecs": [dict(c) for c in _codec_caps()],
        "pix_fmts": {name: int(fmt) for fmt, name in abi.PIX_FMT_NAMES.items()},
        "rc_modes": {m.name: int(m) for m in RateControl},
        "geometry": {"max_width": caps.max_width, "max_height": caps.max_height,
                     "max_pixels": caps.max_pixels},
        "decoded_stride": "visible row bytes, planes packed",
    }


def write_caps(mem: memoryview, dst_off: int, dst_len: int, caps: GeometryLimits) -> tuple[int, int]:
    """OutHeader(OUT_JSON, 1, used) then the UTF-8 JSON, right after the header."""
    _check_range(mem, dst_off, dst_len, "dst")
    payload = json.dumps(caps_document(caps), sort_keys=True, separators=(",", ":")).encode()
    used = OutHeader.SIZE + len(payload)
    if used > dst_len:
        raise CodecError(ErrorCode.NO_SPACE, f"caps need {used} bytes", required=used)
    OutHeader.write(mem, dst_off, kind=abi.OUT_JSON, count=1, used=used)
    mem[dst_off + OutHeader.SIZE:dst_off + used] = payload
    return 1, used
