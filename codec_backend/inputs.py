"""One input of a codec task: a frame (ENCODE_FRAME) or a bitstream chunk (DECODE) in the region."""

from __future__ import annotations

from typing import NamedTuple


class Input(NamedTuple):
    offset: int
    length: int
    pts: int | None
    force_keyframe: bool = False
