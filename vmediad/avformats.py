"""libav pixel formats as the device sees them: the one place a libav format's sampling is read.

Both edges use it: the codec worker (a NATIVE decode session converting a picture the device has
no format for) and guestlib's transcode (what to decode into for an encoder), so a stream is
converted the same way by either."""

from __future__ import annotations

import av

from vmediad.abi import PixFmt


def nearest_decoded(fmt: av.VideoFormat) -> PixFmt:
    """The device format a picture in ``fmt`` (one with no equal in abi.DECODED_AS) is converted
    to: 10-bit 4:2:0 for samples deeper than 8 bits, else the 8-bit format that keeps all of its
    chroma (gray → yuv420p; gbrp, rgb24, yuv440p → yuv444p; yuv411p → yuv422p; yuv410p → yuv420p)."""
    comps = fmt.components
    if max(c.bits for c in comps) > 8:
        return PixFmt.YUV420P10LE
    if len(comps) < 3:  # gray, gray with alpha
        return PixFmt.YUV420P
    full_width, full_height = fmt.chroma_width(64) == 64, fmt.chroma_height(64) == 64  # RGB: both
    return PixFmt.YUV444P if full_width else PixFmt.YUV422P if full_height else PixFmt.YUV420P
