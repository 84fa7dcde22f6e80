"""Codec sessions through the device: ``Device.encoder()`` / ``Device.decoder()``.

Frames and bitstreams live in the guest's region and move by offset (design D2, docs/architecture.md):
``Encoder.new_frame()`` hands out planes that are numpy views of region memory,
and decoded ``Frame.planes`` are views of region memory too.  A decoder given the
picture size (``width=``, ``height=``) gets a frame pool (``abi.POOL_HEADER``): the
codec allocates its pictures there and writes them itself, so nothing is copied,
and such frames are read-only (the decoder may still predict from them).  Without
a pool, frames are copied once into the task's output buffer.  Either way a
decoded frame's planes stay valid until the next ``decode()``/``flush()`` call on
the same decoder, or until a stream advances past it (``Frame.copy()`` keeps one,
``Frame.release()`` gives a pooled one back early).
Decoded frames keep the stream's own pixel format (``pix_fmt="native"``, the default; a
stream in a format the device has none for is converted and the frame says so,
``Frame.converted``) unless the decoder is opened with a named ``pix_fmt``.

``encode()``/``decode()`` run one task at a time.  ``encode_stream()`` and
``decode_stream()`` keep ``depth`` tasks queued on the session (each with its
own output buffer), so the device starts the next frame as soon as one ends
instead of waiting for the guest's round trip: use them for throughput.  They
wait and submit ``depth // 2`` tasks at a time: at depth 8 the guest sleeps
and rings the doorbell once per 4 tasks.  ``batch=k`` puts k frames or chunks in
one task (``vmediad bench codec`` streams encode at depth 4 x batch 8, decode at 3 x 12).

Output tables are read, and MULTI lists and the frame pool header written, through the ABI's
records (``abi.OutHeader``, ``PacketEntry``, ``FrameEntry``, ``MultiEntry``, ``FramePoolHeader``).

The implementation is split by concern: ``guestlib.frames`` (Frame, Packet, codec tables),
``guestlib.session`` (the shared session core), ``guestlib.encoder``, ``guestlib.decoder``;
this module keeps ``caps`` and re-exports the public names.
This module imports ``guestlib.device`` only for type checking: ``device`` imports it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from guestlib.decoder import Decoder, decoder_config, pool_slot_bytes
from guestlib.encoder import Encoder, encoder_config
from guestlib.frames import (
    CODECS,
    DEFAULT_OUT,
    DEFAULT_POOL_FRAMES,
    MIN_POOL_FRAMES,
    PIX_FMTS,
    Chunk,
    Frame,
    Packet,
    Planes,
    codec_id,
    pix_fmt_id,
)
from guestlib.session import error_text, raise_failed
from vmediad import abi
from vmediad.abi import Op, OutHeader

if TYPE_CHECKING:
    from guestlib.device import Device

__all__ = [
    "CODECS", "DEFAULT_OUT", "DEFAULT_POOL_FRAMES", "MIN_POOL_FRAMES", "PIX_FMTS", "Chunk", "Decoder", "Encoder",
    "Frame", "Packet", "Planes", "caps", "codec_id", "decoder_config", "encoder_config", "error_text",
    "pix_fmt_id", "pool_slot_bytes", "raise_failed",
]


def caps(dev: Device) -> dict[str, Any]:
    """What this device's FFmpeg build really offers (the CAPS op)."""
    out = dev.alloc(64 << 10)
    try:
        task = dev.submit(Op.CAPS, dst=(out.offset, out.size))
        if task.completion().status != abi.Status.DONE:
            raise_failed(dev, task, (out.offset, out.size))
        head = OutHeader.unpack_from(dev.region.mem, out.offset)
        doc: dict[str, Any] = json.loads(bytes(out.mem[OutHeader.SIZE : head.used]).rstrip(b"\0"))
        return doc
    finally:
        dev.free(out)
